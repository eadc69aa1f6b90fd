"""The accelerator engine: device queues are streams, waits are events (device-generic torch API).

Written against ``torch.Stream``, ``torch.Event`` and ``torch.accelerator`` only, so CUDA today and other
accelerator backends run it unchanged; no other module of zoedge touches a device stream or event
(``tests/test_engines.py`` fails on a ``torch.cuda`` use outside this module and the race checker).

Scheduling::

    upload stream   : H2D(i+1) ........ H2D(i+2) ...
    compute stream  :      passes(i) ......... passes(i+1) ...
    offload stream  :                   D2H(i) (dense updates only)
    io thread       : read(i+2) ... read(i+3) ... write(i-1) ...

The compute stream is the device's current stream when the engine is created (the caller's work and
the passes' results live there). An operation waits, before it is enqueued, for each of its producers:
an event wait (``stream.wait_event``) when the producer ran on a device stream, a host wait
(``Future.result``) when it ran on the I/O thread; an I/O operation waiting for a device operation
synchronises on its event on the I/O thread, never on the thread that enqueues work. The host never
synchronises in the loop; the caller syncs once when it reads the step's losses.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import torch

from zoedge.errors import ConfigError
from zoedge.runtime.engines import Engine, _IOThread
from zoedge.runtime.schedule import COMPUTE, IO, OFFLOAD, UPLOAD, Op


def check_device(device: torch.device) -> None:
    """``device`` is the machine's accelerator (raises :class:`ConfigError` naming the fix otherwise)."""
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is None or acc.type != device.type:
        have = acc.type if acc is not None else "none"
        raise ConfigError("--device", f"{str(device)!r} but the available accelerator is {have}",
                          "use --device cpu" + (f" or --device {have}" if acc is not None else ""))


def _handles(op: Op) -> tuple:
    """Completion handles of ``op``: its event, its future, or (skipped) those of its own producers."""
    done = op.done
    return done if isinstance(done, tuple) else (done,)


class AcceleratorEngine(Engine):
    """Upload, compute and offload streams ordered by events; disk I/O on one host thread.

    Attributes:
        streams: queue name -> ``torch.Stream``.
        hooks: queue name -> callable run on that queue's stream right before each of its operations (tests
            enqueue a spin kernel here to delay one stream and make a missing wait observable).
    """

    def __init__(self, device: torch.device) -> None:
        check_device(device)
        self.device = device
        self.streams: dict[str, torch.Stream] = {
            UPLOAD: torch.Stream(device=device),
            COMPUTE: torch.accelerator.current_stream(device),
            OFFLOAD: torch.Stream(device=device),
        }
        self.hooks: dict[str, Callable[[], None]] = {}
        self.io = _IOThread()

    def issue(self, op: Op) -> None:
        handles = tuple(h for w in op.waits for h in _handles(w.producer) if h is not None)
        if op.queue == IO:
            op.done = self.io.submit(self._run_io, op, handles)
            return
        stream = self.streams[op.queue]
        for h in handles:
            if isinstance(h, Future):
                h.result()  # host wait: the bytes come from (or go to) a disk operation
            else:
                stream.wait_event(h)
        with stream:
            hook = self.hooks.get(op.queue)
            if hook is not None:
                hook()
            ran = op.run()
            if ran:
                event = torch.Event(device=self.device)
                event.record(stream)
                op.done = event
        if not ran:
            op.done = handles  # nothing enqueued: complete once its producers are

    @staticmethod
    def _run_io(op: Op, handles: tuple) -> bool:
        for h in handles:
            if not isinstance(h, Future):  # futures are earlier I/O operations: done (FIFO)
                h.synchronize()
        return op.run()

    def synchronize(self) -> None:
        torch.accelerator.synchronize(self.device)
        self.io.drain()

    def close(self) -> None:
        torch.accelerator.synchronize(self.device)
        self.io.close()

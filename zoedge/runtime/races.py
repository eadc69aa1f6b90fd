"""Happens-before check of a recorded schedule, by PyTorch's CUDA Stream Sanitizer race detector.

``torch.cuda._sanitizer.EventHandler`` (the analysis half of CSAN) is plain Python over stream, event and
data-pointer ids; it runs on a CPU-only build when fed synthetic ids. This module is the adapter: each
queue becomes a stream, each operation a kernel launch that reads and writes the data pointers of its
declared buffers, preceded by a wait on the event recorded after each producer it waits for. Any two
accesses to one buffer, at least one a write, from different queues and not ordered by queue order or
waits are reported (CSAN compares each access with the last write and the reads since).

Only the pure-Python analysis is used: no CUDA call, no dispatch mode. It uses private methods, so the
adapter accepts the torch versions in :data:`TORCH_RANGE` (run with 2.13; the methods it calls have the same
signatures in the 2.x sources it was checked against) and verifies the one signature it depends on.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import inspect

import torch

from zoedge.errors import ScheduleError
from zoedge.runtime.schedule import QUEUES, Op

#: torch versions (major, minor) accepted: [low, high)
TORCH_RANGE = ((2, 4), (2, 14))
_LAUNCH_ARGS = ["stream", "read_only", "read_write", "outputs", "operator", "tensor_aliases"]


@dataclass(frozen=True)
class Race:
    """Two unordered accesses to ``buffer`` (of block ``block``), ``first`` emitted before ``second``."""

    buffer: str
    first: str
    second: str
    block: int | None

    def __str__(self) -> str:
        return f"{self.buffer}: {self.second} is not ordered after {self.first}"


def _event_handler():
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    low, high = TORCH_RANGE
    fix = "use torch >= {}.{}, < {}.{}, or check zoedge/runtime/races.py against this version".format(*low, *high)
    if not low <= version < high:
        raise ScheduleError("torch", f"version {torch.__version__} is outside the race checker's tested range", fix)
    from torch.cuda._sanitizer import EventHandler
    if list(inspect.signature(EventHandler._handle_kernel_launch).parameters)[1:7] != _LAUNCH_ARGS:
        raise ScheduleError("torch", f"version {torch.__version__}: torch.cuda._sanitizer.EventHandler changed", fix)
    return EventHandler()


def find_races(ops: Iterable[Op]) -> list[Race]:
    """Every pair of conflicting, unordered accesses in ``ops`` (operations in emission order; waits on
    operations not in ``ops`` are taken as complete)."""
    handler = _event_handler()
    stream = {q: k + 1 for k, q in enumerate(QUEUES)}
    for sid in stream.values():
        handler._handle_stream_creation(sid)
    ptr: dict[str, int] = {}
    names: dict[int, str] = {}
    event: dict[int, int] = {}
    by_label: dict[str, Op] = {}
    races: list[Race] = []
    for op in ops:
        s = stream[op.queue]
        for w in op.waits:
            if w.producer.seq in event:
                handler._handle_event_wait(event[w.producer.seq], s)
        ids = {}
        for b in (*op.reads, *op.writes):
            if b not in ptr:
                ptr[b] = len(ptr) + 1
                names[ptr[b]] = b
            ids[b] = ptr[b]
        writes = {ids[b] for b in op.writes}
        reads = {ids[b] for b in op.reads} - writes
        label = f"#{op.seq} {op.label}"
        by_label[label] = op
        errors = handler._handle_kernel_launch(s, reads, writes, set(), label,
                                               {p: [names[p]] for p in reads | writes})
        for e in errors:
            races.append(Race(names[e.data_ptr], e.previous_access.operator, e.current_access.operator, op.block))
        eid = op.seq + 1
        handler._handle_event_creation(eid)
        handler._handle_event_record(eid, s)
        event[op.seq] = eid
    return races


def check(ops: Iterable[Op]) -> None:
    """Raise :class:`~zoedge.errors.ScheduleError` listing every race in ``ops``."""
    races = find_races(ops)
    if races:
        lines = "; ".join(str(r) for r in races[:10]) + (f"; ... ({len(races)} in all)" if len(races) > 10 else "")
        raise ScheduleError("schedule", f"unordered accesses: {lines}",
                            "add the missing wait (declare the buffer in both operations' effects)")

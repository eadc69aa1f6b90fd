"""Engines execute the operations a :class:`~zoedge.runtime.schedule.Schedule` emits.

* :class:`SyncEngine` (the default on CPU): device queues run inline, in emission order, on the calling
  thread; the ``io`` queue runs on one background thread so disk reads overlap compute.
* :class:`~zoedge.runtime.accelerator.AcceleratorEngine` (CUDA and other accelerators): device queues
  are streams ordered by events.
* :class:`SimulatedEngine` (tests, tools): every queue runs its operations in FIFO order, but the queues
  interleave in any order the waits allow: seeded random orders, or an adversarial order that runs,
  among the ready queue heads, the one emitted last (so every operation is delayed for as long as
  something emitted after it can run). Operations perform their real effects when they run, so a missing
  wait reads stale or overwritten bytes exactly as it would on a GPU, and results change.

All engines share one interface: ``issue(op)`` (called in emission order), ``outputs_ready()`` (the end of
a pass: the caller is about to read what compute produced), ``synchronize()`` (everything done) and
``close()``.
"""
from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor

from zoedge.runtime.schedule import COMPUTE, IO, QUEUES, Op


class Engine(ABC):
    """Interface; see the module docstring."""

    @abstractmethod
    def issue(self, op: Op) -> None:
        """Queue ``op`` on its queue (run it, or arrange for it to run after its waits)."""

    def outputs_ready(self) -> None:
        """The pass's compute results are about to be read."""

    def synchronize(self) -> None:
        """Every issued operation has completed."""

    def close(self) -> None:
        self.synchronize()


class _IOThread:
    """The ``io`` queue: one thread, so operations run in FIFO order (writes before later re-reads)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="zoedge-io")
        self.pending: deque[Future] = deque()

    def submit(self, fn, *args) -> Future:
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()  # surface an I/O error at the next operation
        f = self.pool.submit(fn, *args)
        self.pending.append(f)
        return f

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.pool.shutdown(wait=True)


class OpTimes:
    """Where a :class:`SyncEngine`'s time goes: wall seconds per operation kind (``read`` and ``write`` on the I/O
    thread, ``upload``, ``compute``, ``offload`` on the calling thread) and ``stall``, the time the calling thread
    waited for disk I/O. Each key is written by one thread only; read the figures after ``synchronize``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds.clear()

    def timed(self, op: Op) -> None:
        t0 = time.perf_counter()
        try:
            op.run()
        finally:
            self.seconds[op.kind] += time.perf_counter() - t0


class SyncEngine(Engine):
    """CPU: upload, compute and offload run inline in emission order (a pass costs what the plain loop
    costs); disk I/O runs ahead on one thread and a device operation host-waits for the I/O it needs.

    Args:
        times: if given, every operation's wall time and every host wait is added to it (``zoedge bench``).
    """

    def __init__(self, times: OpTimes | None = None) -> None:
        self.io = _IOThread()
        self.times = times

    def issue(self, op: Op) -> None:
        run = op.run if self.times is None else (lambda: self.times.timed(op))
        if op.queue == IO:
            op.done = self.io.submit(run)
            return
        io = [w.producer for w in op.waits if w.producer.queue == IO]
        if io:
            t0 = time.perf_counter()
            for producer in io:
                producer.done.result()
            if self.times is not None:
                self.times.seconds["stall"] += time.perf_counter() - t0
        run()

    def synchronize(self) -> None:
        self.io.drain()

    def close(self) -> None:
        self.io.close()


class SimulatedEngine(Engine):
    """Runs operations in an interleaving of the queues that respects only the declared waits.

    Args:
        seed: random interleaving from ``random.Random(seed)``; ignored when ``adversarial``.
        adversarial: always run the ready queue head that was emitted last.
    """

    def __init__(self, seed: int = 0, adversarial: bool = False) -> None:
        self.rng = random.Random(seed)
        self.adversarial = adversarial
        self.queues: dict[str, deque[Op]] = {q: deque() for q in QUEUES}
        self.pending: dict[int, list[Op]] = {}  # seq -> producers it waits for
        self.order: list[int] = []  # seq of each operation in the order it ran

    def issue(self, op: Op) -> None:
        op.done = False
        self.pending[op.seq] = [w.producer for w in op.waits]
        self.queues[op.queue].append(op)

    def _step(self) -> None:
        heads = [q[0] for q in self.queues.values() if q and all(p.done for p in self.pending[q[0].seq])]
        if not heads:
            stuck = [q[0].label for q in self.queues.values() if q]
            raise RuntimeError(f"simulated schedule deadlocked; queue heads: {stuck}")
        op = max(heads, key=lambda o: o.seq) if self.adversarial else self.rng.choice(heads)
        self.queues[op.queue].popleft()
        del self.pending[op.seq]
        op.run()
        op.done = True
        self.order.append(op.seq)

    def outputs_ready(self) -> None:
        while self.queues[COMPUTE]:
            self._step()

    def synchronize(self) -> None:
        while any(self.queues.values()):
            self._step()

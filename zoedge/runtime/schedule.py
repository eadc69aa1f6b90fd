"""A streamed pass as data: operations on named queues, their buffer effects, and the waits between them.

The runtime (:mod:`zoedge.runtime.run_loop` and the host tiers) never copies or computes directly: it
*emits* operations, and an engine (:mod:`zoedge.runtime.engines`, :mod:`zoedge.runtime.accelerator`)
executes them. Each operation runs on one of four queues, in FIFO order within its queue:

* ``io``       host I/O thread: disk reads into the pinned ring, disk writes of dense updates;
* ``upload``   host → device copies into a slot;
* ``compute``  the visitor's hooks and the forward passes of one block;
* ``offload``  device → host copies of updated blocks (write-backs).

Each operation declares the buffers it reads and writes (``host[i]``, ``ring[r]``, ``slot[s]``,
``staging``, ``file[i]``, ``tied[p]``). Its *waits* are derived from those effects, the
way a GPU programmer derives events: for every buffer, wait for the last writer on another queue
(read-after-write), for every reader on another queue since that write (write-after-read) and for the
last writer (write-after-write); then drop each wait already implied by queue order or by another wait
(a transitive reduction, computed with vector clocks). Every wait that remains is therefore necessary:
removing it leaves two conflicting accesses unordered, which is what the mutation tests check.

The named events of the CUDA design map onto these hazards: ``slot.uploaded`` is compute's
read-after-write on ``slot[s]``; ``slot.free`` is the next upload's write-after-read on ``slot[s]``;
``host_ready[i]`` is an upload's read-after-write on ``host[i]`` after a write-back; the ring's reuse is
a disk read's write-after-read on ``ring[r]``. A wait between a device queue and ``io`` is a *host wait*
(a thread blocks); between two device queues it is an *event wait*.

Test switch: :attr:`Schedule.drop` names waits (consumer seq, producer seq) that are derived as usual
(later waits are reduced as if they were present) and then left out of what the engines execute.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

IO, UPLOAD, COMPUTE, OFFLOAD = "io", "upload", "compute", "offload"
QUEUES = (IO, UPLOAD, COMPUTE, OFFLOAD)
DEVICE_QUEUES = (UPLOAD, COMPUTE, OFFLOAD)


@dataclass(eq=False)
class Wait:
    """``consumer`` may start only after ``producer`` has completed, because of ``reasons``."""

    producer: Op
    reasons: list[tuple[str, str]]  # (buffer, hazard: RAW / WAR / WAW)

    @property
    def buffers(self) -> list[str]:
        return sorted({b for b, _ in self.reasons})


@dataclass(eq=False)
class Op:
    """One operation. ``fn`` performs it and returns ``False`` when it found nothing to do (a write-back of
    a block the visitor did not change); engines then treat it as complete as soon as its waits are."""

    seq: int
    queue: str
    kind: str
    label: str
    block: int | None
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    fn: Callable[[], bool | None] = field(repr=False)
    nbytes: int = 0
    waits: list[Wait] = field(default_factory=list, repr=False)
    qpos: int = 0
    vc: dict[str, int] = field(default_factory=dict, repr=False)
    skipped: bool = False
    done: Any = field(default=None, repr=False)  # the engine's completion handle

    def run(self) -> bool:
        fn, self.fn = self.fn, _done  # run once; drop the closure (and the tensors it holds)
        self.skipped = fn() is False
        return not self.skipped

    def happens_before(self, other: Op) -> bool:
        """True when ``self`` is ordered before ``other`` by queue order and (full, derived) waits."""
        return other.vc.get(self.queue, -1) >= self.qpos

    def wait_kind(self, producer: Op) -> str:
        return "host wait" if IO in (self.queue, producer.queue) else "event wait"


class Schedule:
    """Builds operations, derives their waits and hands each to ``sink`` (the engine) in emission order.

    Emission order is a valid execution order: every wait points to an earlier operation. Unless recording,
    an operation's wait list is emptied once the engine has taken it (engines that run later keep a copy), so
    that a long run does not keep every operation reachable through its producers.
    """

    def __init__(self, sink: Callable[[Op], None]) -> None:
        self.sink = sink
        self.seq = 0
        self._count = {q: 0 for q in QUEUES}
        self._tail: dict[str, Op] = {}
        self._writer: dict[str, Op] = {}
        self._readers: dict[str, dict[str, Op]] = {}  # buffer -> queue -> latest reader since the last write
        self.recorded: list[Op] | None = None
        self.drop: set[tuple[int, int]] = set()
        self.dropped: list[tuple[Op, Wait]] = []

    def record(self) -> list[Op]:
        """Keep every operation emitted from now on (tests and tools); returns the list that fills up."""
        self.recorded = []
        return self.recorded

    def emit(self, queue: str, kind: str, label: str, fn: Callable[[], bool | None], *, reads: Iterable[str] = (),
             writes: Iterable[str] = (), block: int | None = None, nbytes: int = 0) -> Op:
        reads, writes = tuple(reads), tuple(writes)
        op = Op(self.seq, queue, kind, label, block, reads, writes, fn, nbytes, qpos=self._count[queue])
        self.seq += 1
        self._count[queue] += 1
        found: dict[int, Wait] = {}

        def need(producer: Op | None, buffer: str, hazard: str) -> None:
            if producer is None or producer.queue == queue:
                return  # same queue: FIFO order already holds
            w = found.get(producer.seq)
            if w is None:
                found[producer.seq] = Wait(producer, [(buffer, hazard)])
            elif (buffer, hazard) not in w.reasons:
                w.reasons.append((buffer, hazard))

        for b in reads:
            need(self._writer.get(b), b, "RAW")
        for b in writes:
            for r in self._readers.get(b, {}).values():
                need(r, b, "WAR")
            need(self._writer.get(b), b, "WAW")
        tail = self._tail.get(queue)
        cands = list(found.values())
        waits = [w for w in cands
                 if not (tail is not None and w.producer.happens_before(tail))
                 and not any(o is not w and w.producer.happens_before(o.producer) for o in cands)]
        vc = dict(tail.vc) if tail is not None else {}
        for w in waits:
            for q, pos in w.producer.vc.items():
                if vc.get(q, -1) < pos:
                    vc[q] = pos
        vc[queue] = op.qpos
        op.vc = vc
        for w in waits:
            if (op.seq, w.producer.seq) in self.drop:
                self.dropped.append((op, w))
            else:
                op.waits.append(w)
        for b in reads:
            self._readers.setdefault(b, {})[queue] = op
        for b in writes:
            self._writer[b] = op
            self._readers[b] = {}
        self._tail[queue] = op
        if self.recorded is not None:
            self.recorded.append(op)
        self.sink(op)
        if self.recorded is None:
            op.waits = []  # engines read the waits at issue; dropping them keeps the history collectable
        return op


def _done() -> bool:
    raise RuntimeError("operation already ran")


def describe(op: Op, wait: Wait) -> str:
    """One line naming a wait: ``compute layers.1 waits for upload layers.1 (event wait; slot[1] RAW)``."""
    why = ", ".join(f"{b} {h}" for b, h in wait.reasons)
    return f"{op.label} waits for {wait.producer.label} ({op.wait_kind(wait.producer)}; {why})"

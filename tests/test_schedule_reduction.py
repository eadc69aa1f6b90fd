"""The schedule's waits on a hand-built pass (zoedge/runtime/schedule.py): a wait already implied through another
queue is dropped (the transitive reduction, from the first operation of each queue on), each operation is
numbered in emission order and by position in its queue, and a wait is named a host wait when a thread blocks
(``io`` on either side) and an event wait between device queues."""
from __future__ import annotations

from zoedge.runtime.schedule import COMPUTE, IO, UPLOAD, Schedule, describe


def build():
    sched = Schedule(lambda op: None)
    ops = sched.record()
    emit = lambda q, label, **kw: sched.emit(q, label.split()[0], label, lambda: None, **kw)  # noqa: E731
    read = emit(IO, "read 0", writes=["host[0]"])
    upload = emit(UPLOAD, "upload 0", reads=["host[0]"], writes=["slot[0]"])
    compute = emit(COMPUTE, "compute 0", reads=["slot[0]"])
    again = emit(COMPUTE, "compute host", reads=["host[0]"])  # after `compute 0` (FIFO), so after `read 0` too
    return ops, (read, upload, compute, again)


def waits(op):
    return [w.producer.label for w in op.waits]


def test_implied_waits_are_dropped_from_the_first_operations_on():
    ops, (read, upload, compute, again) = build()
    assert waits(upload) == ["read 0"] and waits(compute) == ["upload 0"]
    assert waits(again) == []  # read 0 -> upload 0 -> compute 0 -> compute host: no host wait needed
    assert read.happens_before(again) and not again.happens_before(read)


def test_numbering():
    ops, _ = build()
    assert [(o.seq, o.queue, o.qpos) for o in ops] == [(0, IO, 0), (1, UPLOAD, 0), (2, COMPUTE, 0), (3, COMPUTE, 1)]
    assert [o.nbytes for o in ops] == [0, 0, 0, 0]


def test_wait_kinds_are_named():
    _, (read, upload, compute, _) = build()
    assert describe(upload, upload.waits[0]) == "upload 0 waits for read 0 (host wait; host[0] RAW)"
    assert describe(compute, compute.waits[0]) == "compute 0 waits for upload 0 (event wait; slot[0] RAW)"

"""Planning and measuring: named model shapes and synthetic checkpoints, exact device-memory accounting,
and the arithmetic behind ``zoedge plan`` / ``zoedge memory`` / ``zoedge bench``.

* :mod:`zoedge.plan.shapes` — named shapes of public models, random-weight checkpoints of them;
* :mod:`zoedge.plan.tracker` — live / peak bytes of one device, counted at every aten op;
* :mod:`zoedge.plan.accounting` — what a training step needs (device, host, disk, bytes moved, time);
* :mod:`zoedge.hardware` — named GPUs and their datasheet figures;
* :mod:`zoedge.plan.measure` — a real training step under the tracker (what ``plan`` is checked against).
"""

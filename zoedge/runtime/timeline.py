"""Cost timeline of a recorded schedule: predicted pass time, transfer/compute overlap, stalls, critical path.

Each operation gets a duration: copies and disk I/O their bytes over a bandwidth, compute its FLOPs
(counted by ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy of the model, see
:func:`block_flops`) over a throughput. The operations are then placed as early as their queue (FIFO),
their waits and the host thread allow: an operation is enqueued by the host in emission order, and an
operation that host-waits for disk I/O holds the host (and everything emitted after it) until the I/O
is done. The last operation's end is the predicted time; walking back through whichever constraint
set each start gives the critical path.

Parameters (:class:`~zoedge.hardware.Hardware`) are effective rates, not peaks; measured values can be passed instead.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from zoedge.hardware import Hardware
from zoedge.runtime.schedule import COMPUTE, IO, OFFLOAD, UPLOAD, Op


@dataclass
class Span:
    op: Op
    start: float
    end: float
    after: Span | None = None  # the constraint that set ``start`` (None: time 0)


@dataclass
class Timeline:
    spans: list[Span]
    total: float
    critical: list[Span]
    busy: dict[str, float] = field(default_factory=dict)
    overlap: float = 0.0  # time during which compute and some transfer (upload/offload/io) both run
    compute_stall: float = 0.0  # time the compute queue waits for data after its first operation started

    def summary(self) -> dict:
        return {"total_s": self.total, "busy_s": self.busy, "overlap_s": self.overlap,
                "compute_stall_s": self.compute_stall,
                "critical_path": [f"{s.op.label} [{s.start * 1e3:.3f}, {s.end * 1e3:.3f}] ms" for s in self.critical]}


def predict(ops: Sequence[Op], duration: Callable[[Op], float]) -> Timeline:
    """Place ``ops`` (emission order) as early as queues, waits and host waits allow.

    Producers outside ``ops`` (earlier passes) count as complete at time 0; skipped operations take no time.
    """
    spans: dict[int, Span] = {}
    tail: dict[str, Span] = {}
    host: Span | None = None  # the I/O span the host thread last waited for
    for op in ops:
        cands = [tail.get(op.queue), host]
        for w in op.waits:
            s = spans.get(w.producer.seq)
            if s is None:
                continue
            cands.append(s)
            if op.queue != IO and w.producer.queue == IO and (host is None or s.end > host.end):
                host = s  # the host blocks here: later operations are enqueued after this I/O
        cands = [c for c in cands if c is not None]
        after = max(cands, key=lambda c: c.end, default=None)
        start = after.end if after is not None else 0.0
        span = Span(op, start, start + (0.0 if op.skipped else duration(op)), after)
        spans[op.seq] = tail[op.queue] = span
    ordered = list(spans.values())
    total = max((s.end for s in ordered), default=0.0)
    critical: list[Span] = []
    s = max(ordered, key=lambda x: x.end, default=None)
    while s is not None:
        critical.append(s)
        s = s.after
    critical.reverse()
    busy = {q: sum(s.end - s.start for s in ordered if s.op.queue == q) for q in (IO, UPLOAD, COMPUTE, OFFLOAD)}
    comp = [(s.start, s.end) for s in ordered if s.op.queue == COMPUTE and s.end > s.start]
    xfer = _union([(s.start, s.end) for s in ordered if s.op.queue != COMPUTE and s.end > s.start])
    overlap = sum(max(0.0, min(b, d) - max(a, c)) for a, b in comp for c, d in xfer)
    stall, prev = 0.0, None
    for s in ordered:
        if s.op.queue == COMPUTE:
            if prev is not None:
                stall += max(0.0, s.start - prev)
            prev = s.end
    return Timeline(ordered, total, critical, busy, overlap, stall)


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass
class Costs:
    """Durations from bytes and FLOPs.

    Args:
        hardware: the rates.
        block_flops: forward FLOPs of one pass through each block (by block index).
        passes: forward passes per residency (MeZO: 2q); 0 for a flush (no forward).
        block_bytes: bytes per block, overriding each operation's own (a narrow twin's schedule costed at the real
            model's size).
        compute_extra_s: seconds added to each block's compute operation (e.g. a method's elementwise noise,
            perturbation and update work, costed by the caller).
    """

    hardware: Hardware
    block_flops: Sequence[float]
    passes: int = 1
    block_bytes: Sequence[int] | None = None
    compute_extra_s: Sequence[float] | None = None

    def __call__(self, op: Op) -> float:
        hw = self.hardware
        if op.kind == "compute":
            extra = self.compute_extra_s[op.block] if self.compute_extra_s is not None else 0.0
            return self.passes * self.block_flops[op.block] / hw.achieved_flops + extra
        nbytes = self.block_bytes[op.block] if self.block_bytes is not None else op.nbytes
        rate = {"read": hw.disk, "write": hw.disk_write, "upload": hw.pcie, "offload": hw.pcie}[op.kind]
        return nbytes / rate


def block_flops(config, block_names: Sequence[str], batch: int, seq: int) -> list[float]:
    """Forward FLOPs per block for a [batch, seq] input, counted by ``FlopCounterMode`` on a meta-device copy of
    the Hugging Face model (no weights, no memory). Decoder layer ``layers.i`` gets its module's count; the
    embedding gets 0 (a gather); the head gets the rest (final norm, LM head)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total = counter.get_total_flops()
    out = []
    for name in block_names:
        if name.startswith("layers."):
            out.append(float(next(v for k, v in counts.items() if k.endswith("." + name))))
        else:
            out.append(0.0)
    out[-1] = float(total - sum(out))
    return out

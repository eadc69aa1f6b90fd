"""The plan's predicted step time: the runtime's own schedule for the model's depth, costed on the plan's hardware.

How (a prediction, never a measurement):

1. **The schedule.** A *narrow twin* of the model (same family, depth and tied embeddings, width 16, zero
   weights) is prepared into a temporary store and its passes are emitted twice (the accelerator's schedule:
   slots, uploads, write-backs; no operation is executed) for the plan's tier, prefetch depth and RAM-cached
   blocks, by a
   visitor with the method's passes per residency that marks every block dirty when the method updates densely.
   The operations of the second (steady-state) pass are kept: the schedule depends on the block list, the tier
   and the method, not on the width.
2. **Costs** (:class:`zoedge.runtime.timeline.Costs`), at the real model's size: uploads and write-backs are the
   block's stored bytes over the host link, disk reads and writes its bytes over the disk's read and write
   rates, a compute operation the block's forward FLOPs (counted by ``FlopCounterMode`` in the plan's meta run)
   times the passes, over ``gpu_flops × efficiency``, plus the method's **elementwise arithmetic** on the block
   (see :func:`arithmetic_bytes`) over the GPU's memory bandwidth.
3. **The timeline** (:func:`zoedge.runtime.timeline.predict`): operations placed as early as their queues and
   waits allow; the last end is the step time, the critical path says what bounds it.

Assumptions, stated with every figure: earlier steps' operations count as complete when the step starts (the
host reads the losses at the end of each step, so a step's compute never overlaps the next one; trailing
write-backs could, which this ignores); dequantisation of int8/nf4 blocks is not costed; the elementwise
arithmetic runs at the datasheet memory bandwidth (an optimistic bound: these kernels are bandwidth-bound,
torch's Philox normal generator included, and reach 80-90% of it).

The roofline ``Σ_blocks max(transfer, compute)`` of earlier versions is kept beside it (``roofline_s``): it
ignores the slots' reuse (an upload waits for the write-back that frees its slot) and the pipeline's fill, so
it is a lower bound of the timeline.
"""
from __future__ import annotations

import copy
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoedge.runtime.engines import Engine
from zoedge.runtime.schedule import COMPUTE, Op
from zoedge.runtime.timeline import Costs, Timeline, predict
from zoedge.store.manifest import dtype_of

if TYPE_CHECKING:
    from zoedge.hardware import Hardware
    from zoedge.plan.spec import Method, ModelSpec, Workload

#: what the twin's width is cut to (any family: attributes a config lacks are not set)
NARROW = {"hidden_size": 16, "intermediate_size": 32, "ffn_dim": 32, "word_embed_proj_dim": 16,
          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64}
TRANSFER_KINDS = ("upload", "offload", "read", "write")


def twin_config(config: Any, layers: int) -> Any:
    """``config`` at width 16 with ``layers`` decoder layers (same family, tied embeddings and attention)."""
    c = copy.deepcopy(config)
    for k, v in NARROW.items():
        if getattr(c, k, None) is not None:
            setattr(c, k, v)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(c, k, None), int) and getattr(c, k) >= NARROW["vocab_size"]:
            setattr(c, k, None)
    c.num_hidden_layers = layers
    if getattr(c, "layer_types", None) is not None:
        c.layer_types = [c.layer_types[min(i, len(c.layer_types) - 1)] for i in range(layers)]
    if hasattr(c, "max_window_layers"):
        c.max_window_layers = min(c.max_window_layers, layers)
    return c


def _visitor(passes: int, dense: bool) -> Any:
    """The method as the schedule sees it: ``passes`` forward passes per residency; a dense method changes every
    block in ``on_resident`` (so each is written back)."""
    from zoedge.runtime.resident import BlockVisitor

    body: dict[str, Any] = {"passes": passes}
    if dense:
        body["on_resident"] = lambda self, block: block.mark_dirty()
    return type("PlanVisitor", (BlockVisitor,), body)()


class _Emitted(Engine):
    """Takes the operations and runs none: what a pass emits does not depend on what its operations compute."""

    def issue(self, op: Op) -> None:
        pass


_TWINS: list[tempfile.TemporaryDirectory] = []  # kept for the process's life (removed at exit)


@functools.lru_cache(maxsize=8)
def _twin_store(config_json: str, layers: int) -> Path:
    """A prepared store of the narrow twin (zero weights written straight from the adapter's tensor list)."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from zoedge.adapters import adapter_for
    from zoedge.store.prepare import prepare

    raw = json.loads(config_json)
    config = twin_config(AutoConfig.for_model(raw.pop("model_type"), **raw), layers)
    tmp = tempfile.TemporaryDirectory(prefix="zoedge-plan-twin-")
    _TWINS.append(tmp)
    root = Path(tmp.name)
    (root / "hf").mkdir()
    config.save_pretrained(root / "hf")
    shapes = adapter_for(config, torch.float32, torch.device("meta"), where="config").expected_shapes()
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, str(root / "hf" / "model.safetensors"))
    prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


@functools.lru_cache(maxsize=32)
def _record(config_json: str, layers: int, passes: int, dense: bool, tier: str, prefetch: int,
            ram_cache_blocks: int) -> tuple[Op, ...]:
    import torch

    from zoedge.loading import load

    store = _twin_store(config_json, layers)
    with tempfile.TemporaryDirectory(prefix="zoedge-plan-work-") as work:
        extra = {"working_dir": Path(work)} if tier == "disk" else {}
        # the accelerator's schedule (slots, uploads, write-backs: in_place=False), emitted but never executed
        m = load(store, tier=tier, prefetch=prefetch, ram_cache_blocks=ram_cache_blocks,
                        engine=_Emitted(), in_place=False, **extra)
        try:
            visitor = _visitor(passes, dense)
            ids = torch.ones(1, 4, dtype=torch.long)
            m.run(visitor, ids)
            ops = m.schedule.record()
            m.run(visitor, ids)
            m.synchronize()
        finally:
            m.close()
    return tuple(ops)


def emitted_schedule(config: Any, layers: int, passes: int, dense: bool, tier: str = "ram", prefetch: int = 1,
                     ram_cache_blocks: int = 0) -> list[Op]:
    """The operations one steady-state pass of a model of ``config``'s family with ``layers`` decoder layers emits
    on an accelerator: ``passes`` forward passes per residency, every block updated (written back) when ``dense``
    (recorded on the narrow twin; cached per process)."""
    return list(_record(config.to_json_string(use_diff=False), layers, passes, dense, tier, prefetch,
                        ram_cache_blocks))


def record_schedule(spec: ModelSpec, m: Method, work: Workload) -> list[Op]:
    """The operations one steady-state step of ``spec`` emits with method ``m`` and ``work``'s tier and prefetch."""
    return emitted_schedule(spec.config, spec.layers, m.passes, m.dense, work.tier, work.prefetch,
                            work.ram_cache_blocks)


def arithmetic_bytes(spec: ModelSpec, m: Method) -> list[int]:
    """Bytes the method's elementwise work reads and writes per block and step (dense MeZO with q directions, as
    the shipped plugin does it, in the stored dtype; N = the block's unquantized elements, b = bytes each):

    * noise: q draws of z (this step) and q regenerations (the lazy update of the previous step): 2q·N·b written;
    * perturbation: per pass θ ± εz into scratch (read θ and z, write scratch): 2q · 3N·b;
    * update: per direction θ ← θ − η g z (read θ and z, write θ): q · 3N·b.

    Low-rank methods and a plain forward: 0 (their factor products are small next to the forward's FLOPs).
    """
    if not m.dense:
        return [0] * (spec.layers + 2)
    q = m.passes // 2
    out = []
    for b in spec.block_list():
        nb = sum(t.numel * dtype_of(t.dtype).itemsize for t in b.tensors if t.quant == "none")
        out.append(2 * q * nb + m.passes * 3 * nb + q * 3 * nb)
    return out


@dataclass
class StepTime:
    """A predicted step: the timeline and the pieces it was costed from."""

    timeline: Timeline
    forward_s: list[float]      # per block: passes × FLOPs / rate
    arithmetic_s: list[float]   # per block: noise, perturbation and update bytes / memory bandwidth
    roofline_s: float
    tokens: int
    flops: dict[str, float]     # forward FLOPs of one pass through embed, a decoder layer, the head

    def to_dict(self) -> dict[str, Any]:
        tl = self.timeline
        by_kind: dict[str, float] = {}
        for s in tl.critical:
            d = s.end - s.start
            if s.op.kind == COMPUTE:
                b = s.op.block
                total = self.forward_s[b] + self.arithmetic_s[b]
                share = self.arithmetic_s[b] / total if total else 0.0
                by_kind["forward"] = by_kind.get("forward", 0.0) + d * (1 - share)
                by_kind["noise, perturbation, update"] = by_kind.get("noise, perturbation, update", 0.0) + d * share
            else:
                by_kind[s.op.kind] = by_kind.get(s.op.kind, 0.0) + d
        transfer = sum(v for k, v in by_kind.items() if k in TRANSFER_KINDS)
        compute = tl.total - transfer
        return {
            "step_s": tl.total, "tokens_per_s": self.tokens / tl.total if tl.total else 0.0,
            "bound": "transfer" if transfer > compute else "compute",
            "critical_path_s": by_kind, "critical_transfer_s": transfer, "critical_compute_s": compute,
            "busy_s": dict(tl.busy), "overlap_s": tl.overlap, "compute_stall_s": tl.compute_stall,
            "forward_s": sum(self.forward_s), "arithmetic_s": sum(self.arithmetic_s), "roofline_s": self.roofline_s,
            "flops_per_pass": dict(self.flops),
            "source": "timeline of the runtime's schedule (zoedge.plan.timing); a prediction",
        }


def step_time(spec: ModelSpec, m: Method, work: Workload, hw: Hardware, flops: dict[str, float]) -> StepTime:
    """Predict one training step (see the module docstring). ``flops``: forward FLOPs of one pass through
    ``embed``, a decoder ``layer`` and the ``head`` (the plan's meta run)."""
    blocks = spec.block_list()
    kinds = ["embed", *["layer"] * spec.layers, "head"]
    forward = [m.passes * flops[k] / hw.achieved_flops for k in kinds]
    arith = [n / hw.memory_bw for n in arithmetic_bytes(spec, m)]
    nbytes = [b.nbytes for b in blocks]
    ops = record_schedule(spec, m, work)
    block_flops = [flops[k] for k in kinds]
    tl = predict(ops, Costs(hw, block_flops, passes=m.passes, block_bytes=nbytes, compute_extra_s=arith))
    roofline = 0.0
    for i, b in enumerate(blocks):
        xfer = [nbytes[i] / hw.pcie]
        if any(o.block == i and o.kind == "offload" for o in ops):
            xfer.append(nbytes[i] / hw.pcie)
        disk = sum(nbytes[i] / (hw.disk if o.kind == "read" else hw.disk_write)
                   for o in ops if o.block == i and o.kind in ("read", "write"))
        roofline += max(max(xfer), disk, forward[i] + arith[i])
    return StepTime(tl, forward, arith, roofline, work.batch * work.seq, dict(flops))

"""A real training step under the device-memory tracker: what ``zoedge plan`` is checked against.

:func:`measure_step` opens a prepared store as a :class:`~zoedge.StreamedModel`,
builds the optimizer plugin and runs training steps exactly as the trainer
does (``begin_step``, every pass with the loss at the head, ``finish_step``),
with :class:`~zoedge.plan.tracker.DeviceMemoryTracker` counting every storage
the model's device receives from the moment the model is opened: slots,
workspaces, activations, logits.

* ``device="cpu"``: a real step on the CPU. The device *is* host memory here,
  so the host tier's buffers (``ALLOCATIONS`` purposes ``host`` and ``pinned``)
  are subtracted from the tracked peak. Blocks stream through slots as on an
  accelerator (``in_place=False``, lean perturbations: what ``zoedge plan``
  predicts; ``lean=False``: its workspace figures), unless ``in_place=True``
  measures the CPU runtime's own in-place binding.
* ``device="meta"``: the host tier reads the store's real bytes, the device
  side allocates and computes nothing (losses are not computed: the step's
  scalars are fed as 0). Counts real-width steps that do not fit this machine.
* ``device="cuda"``: a real GPU step; the tracker's figure is reported beside
  ``torch.cuda.max_memory_allocated`` and NVML's device-used.

The per-weight state a plugin declares (:meth:`~zoedge.optim.base.ZOOptimizer.state_spec`) lives on the host tier,
as ``zoedge plan`` counts it: it is created before the steps, outside the device's count, and reported on its own
(``optimizer_state_bytes``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoedge.noise.source import NoiseSource


@dataclass
class StepMeasurement:
    """Figures of measured steps (bytes, seconds)."""

    device: str
    tracked_peak: int                 # device bytes, counted by the tracker (host tier excluded on CPU)
    tracked_long_lived: int           # device bytes live between steps (slots, workspaces, tied copies)
    step_seconds: list[float]
    tokens_per_step: int
    host_tier_bytes: int
    pinned_bytes: int
    host_rss: int
    max_host_rss: int
    optimizer_state_bytes: int = 0    # the plugin's declared per-weight state, on the host tier
    cuda_max_allocated: int | None = None
    cuda_allocated_before: int | None = None
    nvml_used: int | None = None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rss() -> tuple[int, int]:
    import resource

    import psutil
    rss = psutil.Process().memory_info().rss
    return rss, max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def nvml_used(device: torch.device) -> int | None:
    """NVML device-used bytes of the GPU (all processes), or None without pynvml / NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # noqa: BLE001 - NVML missing or no driver: the figure is simply not available
        return None


def _storage_identity_on_meta(model: Any) -> None:
    """Meta tensors have no addresses (``data_ptr()`` is the byte offset into the storage), so the runtime's
    "is this tied tensor the base copy?" test by address would take a perturbed copy at the same offset of
    another buffer for the base and skip the per-pass copy. On meta, test storage and offset instead, then
    make the copy as the runtime does (this mirrors ``StreamedModel._keep_tied``; a runtime without it is
    left alone)."""
    keep = getattr(model, "_keep_tied", None)
    if keep is None:
        return

    def keep_tied(p: int, name: str, seen: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        same = seen.untyped_storage() is base.untyped_storage() and seen.storage_offset() == base.storage_offset()
        if same:
            return seen
        elsewhere = torch.empty(2, dtype=torch.uint8, device="meta")[1:]  # "address" 1: not seen's
        return keep(p, name, seen, elsewhere)  # the runtime compares addresses, then copies into its buffer

    model._keep_tied = keep_tied


def measure_step(store: str | Path, device: str = "cpu", *, optimizer: str = "mezo",
                 options: dict[str, Any] | None = None, batch: int = 1, seq: int = 128, scored: int = 0,
                 steps: int = 1, tier: str = "ram", prefetch: int = 1, attention: str = "sdpa",
                 working_dir: Path | None = None, seed: int = 0, progress: bool = False,
                 in_place: bool = False, lean: bool | None = None, unit: str = "layer",
                 chunk_bytes: int | None = None) -> StepMeasurement:
    """Open ``store`` on ``device`` and run ``steps`` training steps under the tracker (see the module docstring).

    Args:
        store: a prepared block store.
        device: ``cpu``, ``meta`` or ``cuda[:n]``.
        optimizer, options: the plugin and its options (as ``--opt``).
        batch, seq, scored: the synthetic batch (:func:`zoedge.plan.accounting.synthetic_batch`).
        steps: steps to run (the peak is over all of them; the first allocates the workspaces).
        tier, prefetch, working_dir: as :class:`~zoedge.StreamedModel`.
        attention: ``sdpa`` (fused kernels) or ``eager``; on meta this decides how attention is counted.
        in_place: on ``cpu``: bind blocks in the host tier's buffers (RAM buffers or the disk ring; no slots)
            instead of the accelerator's slot layout.
        lean: as :class:`~zoedge.StreamedModel` (default: on unless ``in_place``): perturbations formed just in
            time; ``False`` measures the workspace mode (``zoedge plan``'s ``workspace_*`` figures).
        unit: streaming unit (``layer`` or ``half``), as :class:`~zoedge.StreamedModel`.
        chunk_bytes: lean mode's row chunk (default the runtime's).

    Returns:
        A :class:`StepMeasurement`.
    """
    from tqdm.auto import tqdm

    from zoedge.optim.registry import build
    from zoedge.plan.accounting import synthetic_batch
    from zoedge.plan.tracker import DeviceMemoryTracker
    from zoedge.memory import ALLOCATIONS
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.train.trainer import _loss_passes

    dev = torch.device(device)
    host_before = ALLOCATIONS.nbytes["host"] + ALLOCATIONS.nbytes["pinned"]
    cuda = dev.type == "cuda"
    if cuda:
        torch.accelerator.reset_peak_memory_stats(dev)
    tracker = DeviceMemoryTracker(dev.type, attention)
    with tracker:
        model = StreamedModel(store, device=dev, tier=tier, prefetch=prefetch, working_dir=working_dir,
                              in_place=in_place, lean=lean, unit=unit,
                              **({} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}))
        if dev.type == "meta":
            tracker.discount(model.adapter.skeleton.parameters())  # the module skeleton is not device memory
            _storage_identity_on_meta(model)
        if attention == "eager":
            model.adapter.skeleton.config._attn_implementation = "eager"
        host_tier = ALLOCATIONS.nbytes["host"] + ALLOCATIONS.nbytes["pinned"] - host_before
        opt = build(optimizer, options or {}, seed=seed)
        if dev.type == "meta":
            opt.noise = NoiseSource(seed)
        with tracker.uncounted():  # host-tier memory, even where the host is the device
            for b in model.blocks:
                for t in b.tensors:
                    for key, spec in opt.state_spec(t.name, tuple(t.shape)).items():
                        opt.block_state.reserve(key, t.name, spec, tuple(t.shape), dev)
        batch_ = synthetic_batch(model.config.vocab_size, batch, seq, scored, seed)
        times: list[float] = []
        losses: list[float] = []
        cuda_before = torch.accelerator.memory_allocated(dev) if cuda else None
        for t in tqdm(range(steps), desc="measured steps", unit="step", disable=not progress):
            if cuda:
                torch.accelerator.synchronize(dev)
            t0 = time.perf_counter()
            opt.begin_step(t)
            out = [loss for loss, _ in _loss_passes(model, opt, batch_)]
            if dev.type == "meta":
                values = [torch.tensor(0.0)] * len(out)
            else:
                values = list(torch.stack(out).float().cpu())
            opt.finish_step(values)
            times.append(time.perf_counter() - t0)
            losses += [float(v) for v in values]
            del out
        long_lived = tracker.live
        model.synchronize()
    rss, max_rss = _rss()
    exclude = host_tier if dev.type == "cpu" else 0
    result = StepMeasurement(
        device=str(dev), tracked_peak=tracker.peak - exclude, tracked_long_lived=long_lived - exclude,
        step_seconds=times, tokens_per_step=batch * seq, host_tier_bytes=host_tier,
        pinned_bytes=ALLOCATIONS.nbytes["pinned"] if torch.accelerator.is_available() else 0, host_rss=rss,
        max_host_rss=max_rss, optimizer_state_bytes=opt.block_state.nbytes, losses=losses)
    if cuda:
        result.cuda_max_allocated = torch.accelerator.max_memory_allocated(dev)
        result.cuda_allocated_before = cuda_before
        result.nvml_used = nvml_used(dev)
    model.close()
    return result

"""The streamed model: blocks flow host → device slot → compute → (write-back) in one pass per step.

:class:`StreamedModel` holds what a model streams through: the store, the host tier, the slots (or, bound in
place on the CPU, the host buffers), the workspaces, the adapter that runs its blocks. Its responsibilities live
in modules of their own, each a part of it:

* :mod:`zoedge.runtime.resident`: the contract with a visitor (the optimizer plugin, seen through the
  trainer): :class:`Resident` (a block while resident), :class:`BlockVisitor` (the hooks), :class:`Forward`.
* :mod:`zoedge.runtime.run_loop`: a pass emitted as upload / compute / offload operations (:meth:`run`).
* :mod:`zoedge.runtime.concurrent_layers`: a pass's decoder layers run on worker threads (CPU).
* :mod:`zoedge.runtime.model_state`: the weights as a whole (``state_dict``, streams for checkpoints and exports,
  ``load_state_dict``, ``reset_to_base``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from zoedge.adapters import UNITS, Adapter, adapter_for
from zoedge.adapters.base import layer_index
from zoedge.errors import ConfigError
from zoedge.memory import allocate
from zoedge.runtime.concurrent_layers import LAYER_MEMORY_SHARE, ConcurrentLayers
from zoedge.runtime.engines import Engine, SyncEngine
from zoedge.runtime.host import DiskTier, HostTier, RamTier
from zoedge.runtime.lora import LoraAdapters, LoraSpec, init_a
from zoedge.runtime.model_state import ModelState
from zoedge.runtime.resident import (LAYER_SET, SCRATCH, BlockNoise, BlockVisitor, Forward, Resident, UpdatePart,
                                     may_update, workspace_nbytes)
from zoedge.runtime.run_loop import RunLoop
from zoedge.runtime.schedule import Schedule
from zoedge.runtime.slots import Slot, make_slot
from zoedge.store.manifest import BlockEntry, Manifest, Part, TensorEntry, dtype_of, load_manifest

# the contract's names stay importable from here, where they were first defined
__all__ = ["CHUNK_BYTES", "LAYER_MEMORY_SHARE", "LAYER_SET", "SCRATCH", "BlockNoise", "BlockVisitor", "Forward",
           "Resident", "StreamedModel", "UpdatePart", "may_update"]

#: lean mode's default row chunk for forming a perturbation or an update (bytes)
CHUNK_BYTES = 64 * 2**20


class StreamedModel(RunLoop, ConcurrentLayers, ModelState):
    """A causal LM whose blocks stream through device slots.

    Args:
        store: a prepared block store (see :func:`zoedge.prepare`).
        device: ``cpu`` or the accelerator (``cuda[:n]``, ...).
        tier: ``ram`` (all blocks in pinned host memory) or ``disk`` (read ahead into a pinned ring).
        prefetch: blocks uploaded (and, for ``disk``, read) ahead of the one computing; 1–3 typical.
        ram_cache_blocks: ``disk`` tier only: keep the first K blocks in RAM.
        working_dir: ``disk`` tier with dense updates: where the writable copy of the blocks lives.
        engine: what executes the schedule (default: :class:`~zoedge.runtime.engines.SyncEngine` on CPU and meta,
            :class:`~zoedge.runtime.accelerator.AcceleratorEngine` otherwise; tests pass a
            :class:`~zoedge.runtime.engines.SimulatedEngine`).
        in_place: bind blocks in place in the host buffers (no slots, uploads or device-to-host write-backs; the
            disk tier's ring buffers are computed on and written back from). Default: on when the device is
            ``cpu``; ``False`` streams through slots as on an accelerator (tests of the accelerator schedule,
            traffic counts).
        lean: perturbations formed just in time per tensor or row chunk, no block-sized noise or scratch
            workspaces (see :attr:`Resident.lean`). Default: on unless bound in place (where device memory is the
            host's and one draw per residency is faster).
        chunk_bytes: lean mode: the largest row chunk a perturbation (or an update) is formed in.
        unit: the streaming unit: ``layer`` (a stored block) or ``half`` (a decoder layer's attention and MLP
            halves as separate units, named ``layers.<i>.attn`` / ``.mlp``: slots sized to the larger half; ram
            tier; families whose adapter runs half layers; plugins without first-order blocks).
        workers: CPU, ram tier, bound in place, with a visitor that allows it (:attr:`BlockVisitor.concurrent`)
            and no grad pass: run the decoder layers on this many worker threads (:mod:`zoedge.runtime.pipeline`);
            0 or 1: one after another on the calling thread. Settable later (``model.workers``).
        worker_threads: each worker's intra-op threads (``model.worker_threads``; 1: workers pinned one per core
            when there is a core per worker).
    """

    def __init__(self, store: str | Path, device: str | torch.device = "cpu", tier: str = "ram", prefetch: int = 1,
                 ram_cache_blocks: int = 0, working_dir: Path | None = None, engine: Engine | None = None,
                 in_place: bool | None = None, lean: bool | None = None, chunk_bytes: int = CHUNK_BYTES,
                 unit: str = "layer", workers: int = 0, worker_threads: int = 1) -> None:
        from transformers import AutoConfig

        self.store = Path(store)
        self.manifest: Manifest = load_manifest(self.store)
        self.device = torch.device(device)
        if prefetch < 1:
            raise ConfigError("--prefetch", f"{prefetch}", "use 1 or more")
        if engine is None and self.device.type not in ("cpu", "meta"):  # meta: a dry run that only counts
            from zoedge.runtime.accelerator import AcceleratorEngine
            engine = AcceleratorEngine(self.device)
        self.engine: Engine = engine if engine is not None else SyncEngine()
        self.schedule = Schedule(self.engine.issue)
        self.prefetch = prefetch
        self.config = AutoConfig.from_pretrained(self.store)
        self.dtype = dtype_of(self.manifest.dtype)
        self.adapter: Adapter = adapter_for(self.config, self.dtype, self.device, where=str(self.store / "config.json"))
        names = [b.name for b in self.manifest.blocks]
        if names != self.adapter.block_names():
            raise ConfigError(self.store, f"blocks {names[:3]}... do not match the config", "re-run `zoedge prepare`")
        if unit not in UNITS:
            raise ConfigError("--unit", repr(unit), f"use one of {', '.join(UNITS)}")
        if unit != "layer" and tier != "ram":
            raise ConfigError("--unit", f"{unit!r} with tier {tier}", "stream units finer than a layer from the ram tier (--tier ram)")
        self.unit = unit
        # The streaming units: the stored blocks, or parts of them (each a contiguous span of its block's bytes).
        self.blocks, spans = _split(self.adapter, self.manifest.blocks, unit)
        self._spans = spans
        if tier not in ("ram", "disk"):
            raise ConfigError("--tier", f"unknown value {tier!r}", "use ram or disk")
        host_is_device = self.device.type == "cpu"
        if in_place and not host_is_device:
            raise ConfigError("in_place", f"True with device {self.device}", "bind in place only on device cpu")
        self.in_place = host_is_device if in_place is None else bool(in_place)
        # Tied weights: the block storing the tensor keeps a dedicated slot (bound in place: stays in RAM) until
        # the last user has run.
        self.aliases = dict(self.manifest.tied)
        owners = {self._block_index(self.adapter.block_of(src)) for src in self.aliases.values()}
        if tier == "ram":
            self.tier: HostTier = RamTier(self.store, self.manifest)
            if unit != "layer":  # each unit's host buffer is a view of its span of the block's buffer
                assert isinstance(self.tier, RamTier)
                self.tier.buffers = [self.tier.buffers[j][a:b] for j, a, b in spans]
        else:
            self.tier = DiskTier(self.store, self.manifest, ring=prefetch + 1, ram_cache_blocks=ram_cache_blocks,
                                 working_dir=working_dir, resident=owners if self.in_place else ())
        self.tier.attach(self.schedule)
        self.lean = (not self.in_place) if lean is None else bool(lean)
        if chunk_bytes < 1:
            raise ConfigError("chunk_bytes", f"{chunk_bytes}", "use a positive number of bytes (default 64 MiB)")
        self.chunk_bytes = int(chunk_bytes)
        self.dedicated: dict[int, Slot] = {}
        self.ring: list[Slot] = []
        self.in_host: dict[str, Slot] = {}  # in place: host buffer name -> the slot binding blocks in it
        if self.in_place:
            self.in_host = {name: Slot(0, buf) for name, buf in self.tier.named_buffers().items()}
        else:
            self.dedicated = {i: self._new_slot([self.blocks[i]], i) for i in sorted(owners)}
            ring_blocks = [b for i, b in enumerate(self.blocks) if i not in self.dedicated]
            self.ring = [self._new_slot(ring_blocks, len(self.dedicated) + k) for k in range(prefetch + 1)]
        self._workspaces: dict[str, torch.Tensor] = {}
        self._init_concurrent_layers(workers, worker_threads)
        #: LoRA adapters (:meth:`attach_lora`): the only trained tensors; the base is then read-only
        self.lora: LoraAdapters | None = None

    def attach_lora(self, spec: LoraSpec, seed: int = 0) -> LoraAdapters:
        """Attach LoRA adapters (see :mod:`zoedge.runtime.lora`): from now on every visitor sees each block's
        adapter tensors as its ``tensors`` and the base as ``frozen``; no pass writes the base back.

        Raises:
            ConfigError: adapters are attached already, or ``spec``'s targets match no linear of the model.
        """
        if self.lora is not None:
            raise ConfigError("--peft", "LoRA adapters are attached already", "attach them once per model")
        if self._workspaces:
            raise ConfigError("--peft", "adapters attached after the model streamed", "attach them right after load")
        self.lora = LoraAdapters(spec, self.adapter.skeleton, self.blocks, self.aliases, self.device, seed)
        return self.lora

    def stored(self, i: int, name: str, out: torch.Tensor) -> torch.Tensor:
        """See :meth:`Resident.stored` (block ``i``)."""
        if self.lora is not None and name in self.lora.tensors:
            if name.endswith(".lora_B.weight"):
                return out.zero_()
            return out.copy_(init_a(tuple(out.shape), self.lora.seed, name))
        entry = self.blocks[i]
        t = next(x for x in entry.tensors if x.name == name)
        if t.quant != "none":
            raise ConfigError(f"stored tensor {name}", f"is quantized ({t.quant}): its exact prepared values are "
                              "not kept", "use it unquantized (prepare with --quant none), or train adapters on it "
                              "(--peft lora)")
        part = t.parts["data"]
        j, start, _ = self._spans[i]  # the unit's span of its stored block
        with open(Path(self.store) / self.manifest.blocks[j].file, "rb") as f:
            f.seek(start + part.offset)
            raw = bytearray(f.read(part.nbytes))
        return out.copy_(torch.frombuffer(raw, dtype=dtype_of(part.dtype)).view(out.shape))

    # ------------------------------------------------------------------ setup
    def _block_index(self, name: str | None) -> int:
        return [b.name for b in self.blocks].index(name)

    def _new_slot(self, blocks: Sequence[BlockEntry], index: int) -> Slot:
        return make_slot(index, max(b.nbytes for b in blocks), self.device)

    def workspace(self, key: str, block: Resident) -> dict[str, torch.Tensor]:
        """See :meth:`Resident.workspace`: one flat buffer per key, sized to the largest block's tensors."""
        if key not in self._workspaces:
            blocks = self.blocks
            if key.startswith(LAYER_SET):  # only decoder layers run concurrently: sized to the largest of them
                blocks = [b for b in self.blocks if layer_index(b.name) is not None]
            size = max(workspace_nbytes(b) for b in blocks)
            if self.lora is not None:  # the visitors see adapters (smaller than their block, but fp32)
                size = max(size, *(self.lora.nbytes(b.name) for b in blocks))
            self._workspaces[key] = allocate(size, self.device, "workspace")
        buf, out, off = self._workspaces[key], {}, 0
        for name, t in block.tensors.items():
            n = t.numel() * t.element_size()
            out[name] = buf[off:off + n].view(t.dtype).view(t.shape)
            off += n
        return out

    # ------------------------------------------------------------ public API
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the stored model ([B, T, V], or [N, V] with ``select``), equal to the resident HF model's."""
        return self.run(Forward(), input_ids, attention_mask, position_ids, select)[0]

    __call__ = forward

    def synchronize(self) -> None:
        """Wait for every enqueued copy and kernel (and disk write)."""
        self.engine.synchronize()

    def use_engine(self, engine: Engine) -> None:
        """Finish everything the current engine holds, then execute later passes with ``engine``."""
        self.engine.close()
        self.engine = engine
        self.schedule = Schedule(engine.issue)
        self.tier.attach(self.schedule)

    def close(self) -> None:
        self.engine.close()
        self.tier.close()


def _split(adapter: Adapter, blocks: Sequence[BlockEntry], unit: str
           ) -> tuple[list[BlockEntry], list[tuple[int, int, int]]]:
    """The streaming units of ``blocks`` at granularity ``unit`` (see :meth:`Adapter.split`): unit entries whose
    part offsets are relative to the unit's span, and each span as (block index, start, end) in the block's bytes.

    Raises:
        ConfigError: the adapter cannot split its layers, or a unit's tensors are not contiguous in the store.
    """
    units: list[BlockEntry] = []
    spans: list[tuple[int, int, int]] = []
    for j, b in enumerate(blocks):
        by_name = {t.name: t for t in b.tensors}
        parts = adapter.split(b.name, list(by_name), unit)
        starts = [min(p.offset for n in names for p in by_name[n].parts.values()) for _, names in parts]
        ends = [*starts[1:], b.nbytes]
        for (name, names), a, z in zip(parts, starts, ends):
            if any(not (a <= p.offset and p.offset + p.nbytes <= z) for n in names for p in by_name[n].parts.values()):
                raise ConfigError("--unit", f"{unit!r}: the tensors of {name} are not contiguous in the store's layout",
                                  "use --unit layer")
            tensors = [TensorEntry(t.name, t.dtype, t.shape, t.quant, t.blocksize,
                                   {k: Part(p.dtype, p.shape, p.offset - a, p.nbytes) for k, p in t.parts.items()})
                       for t in (by_name[n] for n in names)]
            units.append(b if len(parts) == 1 else BlockEntry(name, b.file, z - a, "", tensors))
            spans.append((j, a, z))
    return units, spans

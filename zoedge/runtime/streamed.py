"""The streamed model: blocks flow host → device slot → compute → (write-back) in one pass per step.

A pass is emitted as operations on queues (see :mod:`zoedge.runtime.schedule`)::

    io       : read(i+2) .......... read(i+3) ....   (disk tier)
    upload   : H2D(i+1) ........ H2D(i+2) ...
    compute  :      passes(i) ........ passes(i+1) ...
    offload  :                   D2H(i) (blocks the visitor may update)

Each operation declares the buffers it reads and writes; the waits between queues follow from those
effects (compute(i) after H2D(i); the next H2D into a slot after the compute and write-back that read
it; an upload of block i after block i's previous write-back). An engine executes the operations:
synchronously on CPU, on streams and events on an accelerator, or in simulated interleavings in tests
(:mod:`zoedge.runtime.engines`, :mod:`zoedge.runtime.accelerator`). The host never synchronises in the
loop; the caller syncs once when it reads the step's losses.

On the CPU the device *is* the host: blocks are bound in place (their tensors are views of the host buffer
the tier holds them in), so a pass has no uploads, no slots and no device-to-host write-backs. With the RAM
tier an update lands in the block's host buffer (``host[i]``) and stays there. With the disk tier a block is
bound in the ring buffer its disk read filled (``ring[r]``; tied weights' owners stay in RAM, ``host[i]``),
its update lands there and the I/O thread writes that buffer to the working copy::

    io       : read(i+1) ... write(i-1) read(i+2) ... write(i) read(i+3) ...
    compute  :      passes(i) ............ passes(i+1) ........

The ring buffer of block i is read into again only after compute(i) (write-after-read) and write(i) (FIFO on
the I/O queue) have run; compute(i) waits for read(i) (read-after-write).

A *visitor* (the optimizer plugin, seen through the trainer) decides what each
pass of a residency sees: :class:`BlockVisitor` documents the hooks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoedge.adapters import HEAD, UNITS, Adapter, adapter_for
from zoedge.adapters.base import layer_index
from zoedge.errors import ConfigError, PluginError
from zoedge.noise.source import NoiseDraw, batched_draws
from zoedge.runtime.dequantized import Dequantized
from zoedge.runtime.engines import Engine, SyncEngine
from zoedge.runtime.host import DiskTier, HostTier, RamTier, available_memory
from zoedge.runtime.lora import LoraAdapters, LoraSpec, init_a
from zoedge.memory import allocate
from zoedge.runtime.perturbed import Fill, NoisePerturbed, row_chunks
from zoedge.runtime.pipeline import SLOTS, LayerPipeline, row_ranges
from zoedge.runtime.schedule import COMPUTE, OFFLOAD, UPLOAD, Op, Schedule
from zoedge.runtime.slots import Slot, bind, make_slot
from zoedge.store.manifest import MANIFEST_NAME, BlockEntry, Manifest, Part, TensorEntry, dtype_of, load_manifest
from zoedge.store.safetensors_io import WeightStream


#: lean mode's default row chunk for forming a perturbation or an update (bytes)
CHUNK_BYTES = 64 * 2**20
#: the workspace a pass's weights are formed in (:meth:`Resident.perturbed`): each pass has its own while the
#: layers run concurrently (:mod:`zoedge.runtime.pipeline`)
SCRATCH = "scratch"
#: prefix of the workspaces of the concurrently resident layers' sets
LAYER_SET = "layers@"
#: the concurrent layers' workspaces may take at most this share of the memory available when first needed
LAYER_MEMORY_SHARE = 0.5


@dataclass
class Resident:
    """A block while it occupies a slot.

    ``tensors`` are the slot's views of the stored tensors (tied aliases excluded:
    a tied tensor is seen, perturbed and updated once, in the block that stores it).
    ``writable`` names the tensors whose changes are written back (quantized ones are not).
    With LoRA adapters attached (:meth:`StreamedModel.attach_lora`), ``tensors`` are the block's adapter tensors
    (all of them trainable, none written back: they live beside the model) and ``frozen`` the stored base they
    adapt, read-only (see :mod:`zoedge.runtime.lora`).
    """

    name: str
    index: int
    tensors: dict[str, torch.Tensor]
    writable: frozenset[str]
    dirty: bool = False
    runtime: StreamedModel | None = field(default=None, repr=False)
    #: this residency's latest noise of each key (:meth:`noise`)
    drawn: dict[str, BlockNoise] = field(default_factory=dict, repr=False)
    #: concurrent layers (:mod:`zoedge.runtime.pipeline`): the set of workspaces this residency uses, and the
    #: pass whose weights ``pass_tensors`` is forming (it gets its own :data:`SCRATCH`); None: the shared ones
    workspace_set: int | None = None
    forming: int | None = None
    _views: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)  # workspace key -> views
    #: adapters attached: the block's stored tensors, never changed (empty otherwise)
    frozen: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def mark_dirty(self) -> None:
        """Call after changing ``tensors`` in place: the block is written back to the host tier."""
        self.dirty = True

    def workspace(self, key: str) -> dict[str, torch.Tensor]:
        """Scratch tensors shaped like this block's tensors, allocated once per key and reused by every block
        (while layers run concurrently: by every block of this residency's set, and :data:`SCRATCH` once per
        pass being formed)."""
        assert self.runtime is not None
        if self.workspace_set is not None:
            own = f".pass{self.forming}" if key == SCRATCH and self.forming is not None else ""
            key = f"{LAYER_SET}{self.workspace_set}.{key}{own}"
        views = self._views.get(key)
        if views is None:  # made once per residency: callers ask per tensor (a key's buffer never moves)
            views = self._views[key] = self.runtime.workspace(key, self)
        return dict(views)

    # -- noise, perturbations and updates: the runtime decides where noise and θ + αz live ----------------------
    @property
    def lean(self) -> bool:
        """True: perturbations are formed just in time per tensor or row chunk (:mod:`zoedge.runtime.perturbed`),
        nothing block-sized is allocated. False: noise is drawn once per residency into a block-sized workspace
        and θ + αz formed into another (fewer draws; the CPU's in-place binding). Plugins never need it."""
        return bool(getattr(self.runtime, "lean", False))

    def noise(self, key: str, fill_of: Callable[[str], Fill], names: Sequence[str] | None = None) -> BlockNoise:
        """This residency's noise ``key`` (e.g. ``"z0"``) for tensors ``names`` (default all), tensor ``name``'s
        given by ``fill_of(name)`` (a :data:`~zoedge.runtime.perturbed.Fill`). Passes read it through
        :meth:`perturbed`, updates through :meth:`parts`; the same numbers in every runtime mode.

        Where it is drawn is the runtime's choice: with block-sized workspaces, now, once (plain draws
        (:class:`~zoedge.noise.source.NoiseDraw`) queued and filled together, in parallel, or read in the noise
        cache's own buffer when it keeps them); lean, or from a source that forms θ + αz without a draw, where
        it is used. Its tensors are read-only (they may be the noise cache's)."""
        names = list(self.tensors) if names is None else list(names)
        fills = {name: fill_of(name) for name in names}
        drawn: dict[str, torch.Tensor] | None = None
        if not self.lean and not all(getattr(f, "free", False) for f in fills.values()):
            drawn = dict(self.workspace(key))
            with batched_draws():
                for name, fill in fills.items():
                    if not isinstance(fill, NoiseDraw):
                        fill(drawn[name], 0, drawn[name].numel())
                    elif (kept := fill.held(drawn[name])) is not None:
                        drawn[name] = kept
                    else:
                        fill.queue(drawn[name])  # drawn with the block's other tensors, in parallel, at the block's end
            drawn = {name: drawn[name] for name in names}
        noise = self.drawn[key] = BlockNoise(self, key, fills, drawn)
        return noise

    def forget_noise(self) -> None:
        """The noise drawn so far is not this step's (the framework calls it after a block's update): a pass that
        reads a key not drawn again is refused (:meth:`perturbed`)."""
        self.drawn.clear()

    def perturbed(self, name: str, key: str, alpha: float, base: torch.Tensor | None = None) -> torch.Tensor:
        """What a pass sees of tensor ``name``: θ + α·z (or ``base`` + α·z, ``base`` shaped like θ), z being this
        residency's noise ``key`` (:meth:`noise`). Lean: a :class:`NoisePerturbed` formed by each op that reads
        it; otherwise formed now into the ``scratch`` workspace.

        Raises:
            PluginError: noise ``key`` of ``name`` was not drawn in this residency (call :meth:`noise` in ``draw``).
            ConfigError: tensor ``name`` is stored quantized.
        """
        noise = self.drawn.get(key)
        if noise is None or name not in noise.fills:
            raise PluginError(f"block {self.name}", f"a pass reads noise {key!r} of {name}, which was not drawn in "
                              "this residency", f"draw it in the plugin's draw(block): block.noise({key!r}, ...)")
        theta = self.tensors[name] if base is None else base
        if isinstance(theta, Dequantized):
            raise ConfigError(name, f"is stored quantized ({theta.kind}): a dense perturbation of it is not supported",
                              "use a low-rank optimizer (hzo) with a quantized store, or prepare with --quant none")
        fill = noise.fills[name]
        if self.lean:
            assert self.runtime is not None
            return NoisePerturbed(theta, fill, alpha, self.runtime.chunk_bytes)
        out = self.workspace(SCRATCH)[name]
        if noise.tensors is None:  # θ + αz straight from the source: no noise workspace
            return fill.add_(out, theta, alpha)  # type: ignore[attr-defined]
        return torch.add(theta, noise.tensors[name], alpha=alpha, out=out)

    def parts(self, names: Sequence[str] | None = None) -> Iterator[UpdatePart]:
        """The parts to update tensors ``names`` (default all) in, in place: lean, row chunks of at most the
        runtime's ``chunk_bytes``; otherwise whole tensors."""
        for name in self.tensors if names is None else names:
            t = self.tensors[name]
            row = t[0].numel() if t.ndim > 1 else 1
            for a, b in self.chunks(name):
                yield UpdatePart(self, name, t[a:b] if t.ndim else t, (a, b), a * row, t.numel(), t.ndim)

    def chunks(self, name: str) -> list[tuple[int, int]]:
        """Row ranges of tensor ``name``'s :meth:`parts`."""
        t = self.tensors[name]
        if t.ndim == 0 or not self.lean:
            return [(0, t.shape[0] if t.ndim else 1)]
        assert self.runtime is not None
        return list(row_chunks(t.shape, t.element_size(), self.runtime.chunk_bytes))

    def buffer(self, key: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """A scratch shaped like rows ``rows`` of tensor ``name`` (default all): lean, a fresh tensor (freed by the
        caller dropping it); otherwise that part of workspace ``key``."""
        t = self.tensors[name]
        part = t if rows is None or t.ndim == 0 else t[rows[0]:rows[1]]
        if self.lean:
            return torch.empty(part.shape, dtype=t.dtype, device=t.device)
        ws = self.workspace(key)[name]
        return ws if rows is None or t.ndim == 0 else ws[rows[0]:rows[1]]

    def stored(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Tensor ``name`` before training into ``out``: as prepared (the pre-trained θ₀, read from the store), or,
        with adapters attached, an adapter's initialisation.

        Raises:
            ConfigError: the tensor is stored quantized (no exact θ₀).
        """
        assert self.runtime is not None
        return self.runtime.stored(self.index, name, out)


@dataclass
class BlockNoise:
    """A residency's noise ``key`` (:meth:`Resident.noise`): its fill per tensor, and the drawn tensors when the
    runtime drew it whole (None: formed where used)."""

    block: Resident = field(repr=False)
    key: str
    fills: dict[str, Fill]
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        """Tensor ``name``'s noise, whole (read-only; lean: drawn now into a fresh tensor)."""
        if self.tensors is not None:
            return self.tensors[name]
        out = self.block.buffer(self.key, name)
        return self.fills[name](out, 0, out.numel())


@dataclass
class UpdatePart:
    """Rows ``rows`` of tensor ``name`` of a resident block, to update in place (:meth:`Resident.parts`).

    ``tensor`` is the rows' view of the weight; ``start`` / ``total``: the rows' first element in the flat
    tensor and the tensor's element count (the range of a :data:`~zoedge.runtime.perturbed.Fill`); ``ndim``:
    the whole tensor's.
    """

    block: Resident = field(repr=False)
    name: str
    tensor: torch.Tensor = field(repr=False)
    rows: tuple[int, int]
    start: int
    total: int
    ndim: int

    def noise(self, z: BlockNoise) -> torch.Tensor:
        """``z``'s values of these rows (read-only; valid until ``z`` is read again for another part)."""
        if z.tensors is not None:
            whole = z.tensors[self.name]
            return whole if self.ndim == 0 or self.rows == (0, len(whole)) else whole[self.rows[0]:self.rows[1]]
        out = self.block.buffer(z.key, self.name, self.rows)
        return z.fills[self.name](out, self.start, self.total)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """These rows of ``tensor``, a tensor shaped like the weight (e.g. its optimizer state)."""
        return tensor if self.ndim == 0 else tensor[self.rows[0]:self.rows[1]]

    def mul_(self, value: float) -> UpdatePart:
        """``tensor *= value``."""
        self.tensor.mul_(value)
        return self

    def add_(self, z: BlockNoise | torch.Tensor, alpha: float = 1.0) -> UpdatePart:
        """``tensor += alpha · z``: ``z`` a tensor shaped like these rows, or a block noise (formed from its source
        without a draw where it can be)."""
        if isinstance(z, torch.Tensor):
            self.tensor.add_(z, alpha=alpha)
        elif z.tensors is None and getattr(fill := z.fills[self.name], "free", False):
            fill.add_(self.tensor, self.tensor, alpha, self.start, self.total)  # type: ignore[attr-defined]
        else:
            self.tensor.add_(self.noise(z), alpha=alpha)
        return self


class BlockVisitor:
    """Hooks the runtime calls while a block is resident. Defaults: plain forward, no changes.

    Order for each block: ``on_resident`` (apply pending updates, draw noise), then for each pass p
    ``pass_tensors(block, p)`` → the block's forward for pass p, then ``on_passes_done``.
    """

    #: forward passes per residency (each with its own hidden-state stream)
    passes: int = 1
    #: the one pass run under autograd (first-order blocks train on it; tensors that do not require grad
    #: record nothing), or None: every pass runs without grad
    grad_pass: int | None = None
    #: the decoder layers may run concurrently (:mod:`zoedge.runtime.pipeline`, CPU with several workers):
    #: ``pass_tensors`` of every pass of a residency is called before any of them runs and up to
    #: :data:`~zoedge.runtime.pipeline.SLOTS` residencies overlap, so what a pass sees must stay valid until
    #: ``on_passes_done``: the block's own tensors, fresh tensors, or workspace :data:`SCRATCH` (each pass being
    #: formed gets its own; every other workspace is the residency's own). The hooks still run one at a time.
    concurrent: bool = False

    def on_resident(self, block: Resident) -> None:
        """Block uploaded, nothing computed yet. Modify ``block.tensors`` in place + ``mark_dirty`` to update."""

    def pass_tensors(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        """The weights pass ``p`` sees. Must not modify ``block.tensors`` (return scratch or functional results)."""
        return block.tensors

    def on_passes_done(self, block: Resident) -> None:
        """All passes ran on this block."""


class Forward(BlockVisitor):
    """The stored model's plain forward (evaluation): it changes nothing, so its layers may run concurrently."""

    concurrent = True


def may_update(visitor: BlockVisitor) -> bool:
    """Only ``on_resident`` and ``on_passes_done`` may change a block: a visitor that overrides neither never
    does, and its passes schedule no write-backs."""
    cls = type(visitor)
    return cls.on_resident is not BlockVisitor.on_resident or cls.on_passes_done is not BlockVisitor.on_passes_done


class StreamedModel:
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
        self.workers, self.worker_threads = workers, worker_threads
        self._replicas: list[Adapter] = []  # the pipeline workers' adapters (each its own skeleton)
        #: the concurrent layers' seconds (:attr:`LayerPipeline.seconds`), summed over every pass that used them
        self.layer_seconds: dict[str, float] = {}
        self._layers_refused: str | None = None  # why the layers run one after another although workers are set
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
            size = max(sum(_nbytes(t.numel, t.dtype) for t in b.tensors) for b in blocks)
            if self.lora is not None:  # the visitors see adapters (smaller than their block, but fp32)
                size = max(size, *(self.lora.nbytes(b.name) for b in blocks))
            self._workspaces[key] = allocate(size, self.device, "workspace")
        buf, out, off = self._workspaces[key], {}, 0
        for name, t in block.tensors.items():
            n = t.numel() * t.element_size()
            out[name] = buf[off:off + n].view(t.dtype).view(t.shape)
            off += n
        return out

    def _keep_tied(self, p: int, name: str, seen: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Keep what pass ``p`` saw of a tied tensor until the head runs.

        The base copy stays in its dedicated slot anyway; a perturbed copy usually lives in plugin scratch
        that the next pass overwrites, so it is copied to a per-pass buffer (allocated once).
        """
        if seen.data_ptr() == base.data_ptr():
            return seen
        key = f"tied.{p}.{name}"
        if key not in self._workspaces:
            self._workspaces[key] = allocate(seen.numel() * seen.element_size(), self.device, "workspace")
        keep = self._workspaces[key].view(seen.dtype).view(seen.shape)
        keep.copy_(seen)
        return keep

    def _slot_for(self, i: int) -> Slot:
        if i in self.dedicated:
            return self.dedicated[i]
        ring_pos = i - sum(1 for d in self.dedicated if d < i)
        return self.ring[ring_pos % len(self.ring)]

    # ----------------------------------------------------------- the stream
    def _upload(self, i: int) -> None:
        """Emit the H2D copy of block ``i`` into its slot."""
        slot = self._slot_for(i)
        src_name, src = self.tier.source(i)
        dst = slot.raw[: src.numel()]
        slot.block = i
        self.schedule.emit(UPLOAD, "upload", f"upload {self.blocks[i].name}",
                           lambda: dst.copy_(src, non_blocking=True), reads=(src_name,),
                           writes=(f"slot[{slot.index}]",), block=i, nbytes=src.numel())

    def _offload(self, i: int, residents: dict[int, Resident]) -> None:
        """Emit the D2H write-back of block ``i`` (it copies only if the visitor marked the block dirty)."""
        slot = self._slot_for(i)
        name, target = self.tier.writeback_target(i)
        src = slot.raw[: target.numel()]

        def write_back() -> bool:
            res = residents.get(i)
            if res is not None and not res.dirty:
                return False
            self.tier.check_writable()
            target.copy_(src, non_blocking=True)
            return True

        op = self.schedule.emit(OFFLOAD, "offload", f"offload {self.blocks[i].name}", write_back,
                                reads=(f"slot[{slot.index}]",), writes=(name,), block=i, nbytes=target.numel())
        self.tier.persist(i, (name, target), lambda: not op.skipped)

    def _bytes_of(self, i: int) -> str:
        """The buffer compute reads a tied owner's bytes from: its slot, or its host buffer when bound in place."""
        return f"host[{i}]" if self.in_place else f"slot[{self._slot_for(i).index}]"

    def _compute(self, i: int, visitor: BlockVisitor, pass_state: _PassState, writes_back: bool) -> Op:
        """Emit block ``i``'s residency: the visitor's hooks, its forward passes; bound in place, then the persisting of
        its update from the host buffer it was computed in (disk tier)."""
        block = self.blocks[i]
        if self.in_place:  # the block's bytes are where the tier holds them: compute there
            where, host = self.tier.source(i)
            slot = self.in_host[where]
        else:
            slot = self._slot_for(i)
            where = f"slot[{slot.index}]"
        reads, writes = [where], []
        if writes_back:
            writes.append(where)
        tied_here = [src for alias, src in self.aliases.items() if self.adapter.block_of(alias) == block.name]
        for src in tied_here:  # the head reads the tied tensor from its owner's (dedicated) slot or host buffer
            reads.append(self._bytes_of(self._block_index(self.adapter.block_of(src))))
        if pass_state.compute:
            owns = [src for src in self.aliases.values() if self.adapter.block_of(src) == block.name]
            writes += [f"tied[{p}]" for p in range(visitor.passes) if owns]
            reads += [f"tied[{p}]" for p in range(visitor.passes) if tied_here]

        def run() -> None:
            res = self._resident(i, slot, visitor, pass_state)
            if pass_state.compute:
                pass_state.forward(i, res)
            visitor.on_passes_done(res)

        op = self.schedule.emit(COMPUTE, "compute", f"compute {block.name}", run, reads=reads, writes=writes,
                                block=i)
        if self.in_place and writes_back:
            residents = pass_state.residents
            self.tier.persist(i, (where, host), lambda: i not in residents or residents[i].dirty)
        return op

    def _resident(self, i: int, slot: Slot, visitor: BlockVisitor, pass_state: _PassState,
                  workspace_set: int | None = None) -> Resident:
        """Block ``i`` bound in ``slot``, after the visitor's ``on_resident``."""
        block = self.blocks[i]
        # quantized tensors are bound as views of their stored parts, expanded by the ops that read them
        bound = bind(slot, i, block, self.chunk_bytes)
        if self.lora is not None:  # the visitor trains the adapters; the base is frozen
            adapters = self.lora.of(block.name)
            res = Resident(block.name, i, adapters, frozenset(adapters), runtime=self, workspace_set=workspace_set,
                           frozen=bound)
            pass_state.residents[i] = res
            visitor.on_resident(res)
            return res
        res = Resident(block.name, i, bound, frozenset(t.name for t in block.tensors if t.quant == "none"),
                       runtime=self, workspace_set=workspace_set)
        pass_state.residents[i] = res
        visitor.on_resident(res)
        if res.dirty and len(res.writable) != len(res.tensors):
            raise ConfigError(block.name, "a dense update changed a quantized block",
                              "use a low-rank optimizer with a quantized store, or prepare with --quant none")
        if res.dirty and self.in_place:  # the update is in the host buffer: refuse before it is persisted
            self.tier.check_writable()
        return res

    def _concurrent_layers(self, visitor: BlockVisitor, state: _PassState) -> range | None:
        """The decoder layers that run concurrently in this pass (:mod:`zoedge.runtime.pipeline`), or None."""
        if (self.workers < 2 or not state.compute or visitor.passes < 1 or not getattr(visitor, "concurrent", False)
                or getattr(visitor, "grad_pass", None) is not None
                or not self.in_place or self.lean or not isinstance(self.tier, RamTier) or self.unit != "layer"):
            return None
        layers = [i for i, b in enumerate(self.blocks) if layer_index(b.name) is not None]
        tied = {self.adapter.block_of(n) for pair in self.aliases.items() for n in pair}
        if self._layers_refused is not None or len(layers) < 2 or layers != list(range(layers[0], layers[-1] + 1)) \
                or any(self.blocks[i].name in tied for i in layers):
            return None
        if not any(k.startswith(LAYER_SET) for k in self._workspaces):  # the first time: will the workspaces fit?
            layer = max(sum(_nbytes(t.numel, t.dtype) for t in self.blocks[i].tensors) for i in layers)
            need, available = SLOTS * (visitor.passes + 1) * layer, available_memory()
            if available is not None and need > LAYER_MEMORY_SHARE * available:
                self._layers_refused = (
                    f"their workspaces ({SLOTS} layers x ({visitor.passes} passes + noise) x {layer / 2**20:.0f} MiB = "
                    f"{need / 2**30:.1f} GiB) would take more than {LAYER_MEMORY_SHARE:.0%} of the memory available "
                    f"({available / 2**30:.1f} GiB)")
                return None
        return range(layers[0], layers[-1] + 1)

    def pass_weights(self, visitor: BlockVisitor, res: Resident, p: int) -> dict[str, torch.Tensor]:
        """The weights block ``res`` runs pass ``p`` with: the visitor's, combined with the frozen base when
        adapters are attached."""
        seen = visitor.pass_tensors(res, p)
        return dict(seen) if self.lora is None else self.lora.compose(res.frozen, seen)

    def writes_back(self, i: int, visitor_updates: bool) -> bool:
        """Whether block ``i``'s residency may write it back: the visitor may update, the block has unquantized
        tensors and no adapters are attached (they are the only trained tensors)."""
        return visitor_updates and self.lora is None and any(t.quant == "none" for t in self.blocks[i].tensors)

    def layer_mode(self) -> str:
        """How the decoder layers ran: concurrently on how many workers, or one after another (and why, where
        workers were set)."""
        if self.layer_seconds:
            return f"concurrent, {self.workers} workers"
        return "one after another" + (f": {self._layers_refused}" if self._layers_refused else "")

    def _replica(self, w: int) -> Adapter:
        """Worker ``w``'s adapter: functional_call swaps a module's tensors while it runs, so concurrent runs need
        skeletons of their own."""
        while len(self._replicas) <= w:
            self._replicas.append(self.adapter.replica())
        return self._replicas[w]

    def _compute_layers(self, layers: range, visitor: BlockVisitor, state: _PassState, writes_back: list[bool]) -> None:
        """Emit the residencies of decoder ``layers`` as one operation that runs them concurrently (see
        :mod:`zoedge.runtime.pipeline`), then the persisting of their updates."""
        wheres = {i: self.tier.source(i) for i in layers}
        reads = [wheres[i][0] for i in layers]
        writes = [wheres[i][0] for i, w in zip(layers, writes_back) if w]
        for w in range(self.workers):
            self._replica(w)  # made here, before the workers start

        def run() -> None:
            rows = row_ranges(int(state.ctx.input_ids.shape[0]))
            ctx = state.ctx
            contexts = [self.adapter.begin(ctx.input_ids[a:b],
                                           None if ctx.attention_mask is None else ctx.attention_mask[a:b],
                                           ctx.position_ids[a:b]) for a, b in rows]
            chains = [(p, c) for p in range(visitor.passes) for c in range(len(rows))]
            residents: dict[int, Resident] = {}

            def prep(j: int, ws: int) -> list[Mapping[str, torch.Tensor]]:
                i = layers[j]
                res = residents[j] = self._resident(i, self.in_host[wheres[i][0]], visitor, state, ws)
                weights = []
                for p in range(visitor.passes):
                    res.forming = p
                    weights.append(self.pass_weights(visitor, res, p))
                res.forming = None
                return weights

            def step(w: int, j: int, k: int, weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
                return self._replica(w).run(self.blocks[layers[j]].name, weights, x, contexts[chains[k][1]])

            def done(j: int) -> None:
                visitor.on_passes_done(residents.pop(j))

            starts = [state.states[p][a:b] for p, c in chains for a, b in [rows[c]]]
            pipeline = LayerPipeline(len(layers), starts, [p for p, _ in chains], prep, step, done, self.workers,
                                     self.worker_threads)
            try:
                ends = pipeline.run()
            finally:
                for k, v in pipeline.seconds.items():
                    self.layer_seconds[k] = self.layer_seconds.get(k, 0.0) + v
            for p in range(visitor.passes):
                state.states[p] = torch.cat([ends[k] for k, (q, _) in enumerate(chains) if q == p])

        self.schedule.emit(COMPUTE, "compute", f"compute {self.blocks[layers[0]].name}..{self.blocks[layers[-1]].name}",
                           run, reads=reads, writes=writes, block=layers[0])
        residents = state.residents
        for i, w in zip(layers, writes_back):
            if w:
                self.tier.persist(i, wheres[i], lambda i=i: i not in residents or residents[i].dirty)

    def run(self, visitor: BlockVisitor, inputs: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, select: torch.Tensor | None = None,
            head_fn: Callable[[int, torch.Tensor], Any] | None = None, cache: Any = None) -> list[Any]:
        """Stream every block once. With ``inputs`` run ``visitor.passes`` forward passes; without, only visit
        (apply pending updates: the flush before eval/save).

        Args:
            visitor: the hooks (see :class:`BlockVisitor`).
            inputs: input ids [B, T] (any device; moved to ours).
            attention_mask: [B, T] 1 for tokens, 0 for (left) padding.
            position_ids: default ``cumsum(mask) - 1``.
            select: flat indices into B×T: the head computes logits only there ([N, V]).
            head_fn: ``head_fn(p, logits)`` reduces pass p's logits (e.g. to a loss) so they need not be kept.
            cache: a transformers KV cache (one pass): ``inputs`` follow the tokens it holds, ``attention_mask``
                covers both, and each decoder layer appends its keys and values to it (see :meth:`Adapter.begin`;
                decoding, :mod:`zoedge.runtime.decoding`). The layers then run one after another.

        Returns:
            Per pass, ``head_fn(p, logits)`` or the logits.
        """
        if self.unit != "layer" and getattr(visitor, "first_order", None) is not None:
            raise ConfigError("--unit", f"{self.unit!r} with first-order blocks",
                              "first-order blocks train whole layers: use --unit layer")
        state = _PassState(self, visitor, head_fn)
        if inputs is not None:
            inputs = inputs.to(self.device)
            attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
            position_ids = position_ids.to(self.device) if position_ids is not None else None
            select = select.to(self.device) if select is not None else None
            state.begin(self.adapter.begin(inputs, attention_mask, position_ids, select, cache), inputs)
        updates = may_update(visitor)
        n = len(self.blocks)
        issued = 0
        concurrent = self._concurrent_layers(visitor, state) if cache is None else None  # the cache is batch-wide
        for i, block in enumerate(self.blocks):
            if concurrent is not None and i in concurrent:
                if i == concurrent.start:
                    self._compute_layers(concurrent, visitor, state, [self.writes_back(j, updates) for j in concurrent])
                continue
            if self.in_place:  # the block's bytes are where compute reads them: an update lands in place
                for j in range(i, min(i + self.prefetch + 1, n)):  # disk reads ahead, as many as the ring holds
                    self.tier.read_ahead(j)
                self._compute(i, visitor, state, self.writes_back(i, updates))
                continue
            while issued < min(i + self.prefetch + 1, n):
                self._upload(issued)
                issued += 1
            # Start the disk reads of the next uploads early, as many as the ring has buffers (prefetch + 1): the
            # I/O thread then reads while the device queues copy into slots or compute.
            for j in range(issued, min(issued + self.prefetch + 1, n)):
                self.tier.read_ahead(j)
            writes_back = self.writes_back(i, updates)
            self._compute(i, visitor, state, writes_back)
            if writes_back and i not in self.dedicated:
                self._offload(i, state.residents)
        for i in self.dedicated:  # a tied owner's slot is read by the head: write it back after the pass
            if self.writes_back(i, updates):
                self._offload(i, state.residents)
        self.engine.outputs_ready()
        return state.states if state.compute else []

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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All current weights as CPU tensors (quantized ones dequantized), tied aliases included; with adapters
        attached, the frozen base's (the adapters: ``lora.state_dict()``, merged: :meth:`merged_stream`)."""
        self.synchronize()
        out: dict[str, torch.Tensor] = {}
        for i in range(len(self.blocks)):
            out.update({k: v.clone() for k, v in self._block_state(i).items()})
        for alias, src in self.aliases.items():
            out[alias] = out[src]
        return out

    def weight_stream(self) -> WeightStream:
        """The current weights block by block (tied aliases not repeated), for writing a checkpoint or an export
        of a model larger than memory: only one block's tensors are held at a time."""
        self.synchronize()
        entries = [(t.name, dtype_of(t.parts["data"].dtype if t.quant == "none" else t.dtype), tuple(t.shape))
                   for b in self.blocks for t in b.tensors]
        return WeightStream(entries, (self._block_state(i) for i in range(len(self.blocks))))

    def trained_stream(self) -> WeightStream:
        """What training changes, for a checkpoint: the adapters when attached, else every weight
        (:meth:`weight_stream`)."""
        if self.lora is None:
            return self.weight_stream()
        self.synchronize()
        return WeightStream.of(self.lora.state_dict())

    def load_trained(self, state: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`trained_stream` (the adapters, or :meth:`load_state_dict`).

        Raises:
            ConfigError: a tensor is missing or has the wrong shape.
        """
        if self.lora is None:
            self.load_state_dict(state)
        else:
            self.synchronize()
            self.lora.load_state_dict(state)

    def merged_stream(self) -> WeightStream:
        """The model's weights with the adapters merged (W + scaling · B A; no adapters: :meth:`weight_stream`),
        block by block, for exporting a merged model."""
        stream = self.weight_stream()
        if self.lora is None:
            return stream
        lora = self.lora
        return WeightStream(stream.entries, ({n: lora.merged(n, t) for n, t in chunk.items()}
                                             for chunk in stream.chunks))

    def _block_state(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors (views of its host bytes; quantized ones dequantized), after a synchronize."""
        from zoedge.store import quant as q
        host = self._read_block(i)
        out: dict[str, torch.Tensor] = {}
        for t in self.blocks[i].tensors:
            if t.quant == "none":
                p = t.parts["data"]
                out[t.name] = host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(t.shape)
            else:
                parts = {k: host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(p.shape)
                         for k, p in t.parts.items()}
                out[t.name] = q.dequantize(t.quant, parts, tuple(t.shape), dtype_of(t.dtype), t.blocksize)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the working copy (host tier) with ``state`` (e.g. weights from a checkpoint).

        Every unquantized stored tensor must be present; quantized tensors are left as stored (their
        trained state lives in the plugin). The prepared store on disk is never written.

        Raises:
            ConfigError: a tensor is missing or has the wrong shape.
        """
        self.tier.check_writable()
        self.synchronize()
        for i, b in enumerate(self.blocks):
            host = self._read_block(i)
            for t in b.tensors:
                if t.quant != "none":
                    continue
                value = state[t.name] if t.name in state else None  # read once: ``state`` may load lazily
                if value is None or tuple(value.shape) != tuple(t.shape):
                    got = tuple(value.shape) if value is not None else "missing"
                    raise ConfigError(t.name, f"checkpoint tensor is {got}, the model needs {tuple(t.shape)}",
                                      "resume from a checkpoint of the same model")
                p = t.parts["data"]
                host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).copy_(value.reshape(-1))
            self.tier.write_block(i, host)

    def reset_to_base(self) -> None:
        """Make the weights the prepared store's again (the host tier drops trained changes; the store itself is
        never written): the start of a replay of logged updates."""
        self.synchronize()
        self.tier.reset_to_base()

    def _read_block(self, i: int) -> torch.Tensor:
        return self.tier.read_block(i)

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


def _nbytes(numel: int, dtype: str) -> int:
    return numel * dtype_of(dtype).itemsize


class _PassState:
    """What the compute operations of one pass share: the hidden states of each pass, the tied tensors seen,
    the blocks' residencies (read by their write-backs)."""

    def __init__(self, model: StreamedModel, visitor: BlockVisitor, head_fn: Callable[[int, torch.Tensor], Any] | None):
        self.model, self.visitor, self.head_fn = model, visitor, head_fn
        self.compute = False
        self.ctx: Any = None
        self.states: list[Any] = []
        self.tied_seen: list[dict[str, torch.Tensor]] = [{} for _ in range(visitor.passes)]
        self.residents: dict[int, Resident] = {}

    def begin(self, ctx: Any, inputs: torch.Tensor) -> None:
        self.compute, self.ctx, self.states = True, ctx, [inputs] * self.visitor.passes

    def forward(self, i: int, res: Resident) -> None:
        m, name = self.model, res.name
        grad_pass = getattr(self.visitor, "grad_pass", None)  # duck-typed visitors may not declare it
        for p in range(self.visitor.passes):
            with torch.set_grad_enabled(p == grad_pass):
                tensors = m.pass_weights(self.visitor, res, p)
                for alias, src in m.aliases.items():
                    if src in tensors:
                        self.tied_seen[p][src] = m._keep_tied(p, src, tensors[src], (res.frozen or res.tensors)[src])
                    if m.adapter.block_of(alias) == name:
                        tensors[alias] = self.tied_seen[p][src]
                self.states[p] = m.adapter.run(name, tensors, self.states[p], self.ctx)
                if name == HEAD and self.head_fn is not None:
                    self.states[p] = self.head_fn(p, self.states[p])

"""What a block is while it is resident, and the hooks that see it: the contract between the runtime and a visitor.

A *visitor* (the optimizer plugin, seen through the trainer) decides what each pass of a residency sees:
:class:`BlockVisitor` documents the hooks. The block it is handed, :class:`Resident`, hides where noise, θ + αz
and updates are formed (:attr:`Resident.lean`): a plugin draws noise (:meth:`Resident.noise`), reads a pass's
weights (:meth:`Resident.perturbed`) and updates part by part (:meth:`Resident.parts`, :class:`UpdatePart`) the
same way in every runtime mode. The runtime that streams the blocks is :mod:`zoedge.runtime.streamed`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from zoedge.errors import ConfigError, PluginError
from zoedge.noise.source import NoiseDraw, batched_draws
from zoedge.runtime.dequantized import Dequantized
from zoedge.runtime.perturbed import Fill, NoisePerturbed, row_chunks
from zoedge.store.manifest import BlockEntry, dtype_of

#: the workspace a pass's weights are formed in (:meth:`Resident.perturbed`): each pass has its own while the
#: layers run concurrently (:mod:`zoedge.runtime.pipeline`)
SCRATCH = "scratch"
#: prefix of the workspaces of the concurrently resident layers' sets
LAYER_SET = "layers@"


def workspace_nbytes(block: BlockEntry) -> int:
    """Bytes of a workspace shaped like ``block``'s tensors (quantized ones at their unquantized dtype)."""
    return sum(t.numel * dtype_of(t.dtype).itemsize for t in block.tensors)


class Runtime(Protocol):
    """What a :class:`Resident` asks of the runtime streaming it (:class:`~zoedge.runtime.streamed.StreamedModel`)."""

    lean: bool
    chunk_bytes: int

    def workspace(self, key: str, block: Resident) -> dict[str, torch.Tensor]: ...

    def stored(self, i: int, name: str, out: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Resident:
    """A block while it occupies a slot.

    ``tensors`` are the slot's views of the stored tensors (tied aliases excluded:
    a tied tensor is seen, perturbed and updated once, in the block that stores it).
    ``writable`` names the tensors whose changes are written back (quantized ones are not).
    With LoRA adapters attached (:meth:`~zoedge.runtime.streamed.StreamedModel.attach_lora`), ``tensors`` are the
    block's adapter tensors (all of them trainable, none written back: they live beside the model) and ``frozen``
    the stored base they adapt, read-only (see :mod:`zoedge.runtime.lora`).
    """

    name: str
    index: int
    tensors: dict[str, torch.Tensor]
    writable: frozenset[str]
    dirty: bool = False
    runtime: Runtime | None = field(default=None, repr=False)
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

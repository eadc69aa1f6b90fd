"""The streamed model: blocks flow host → device slot → compute → (write-back) in one pass per step.

Scheduling (CUDA)::

    upload stream   : H2D(i+1) ........ H2D(i+2) ...
    compute stream  :      dequant+passes(i) .... passes(i+1) ...
    offload stream  :                   D2H(i) (dense updates only)

Ordering is by events only: compute(i) waits for ``slot.uploaded``; the next
upload into a slot waits for ``slot.free`` (recorded after its compute, or
after its write-back when the block changed); an upload of block i also waits
for block i's previous write-back (``host_ready[i]``) so it never reads stale
bytes. The host never synchronises in the loop; the caller syncs once when it
reads the step's losses. On CPU the same code runs with every event ``None``
and every copy synchronous.

A *visitor* (the optimizer plugin, seen through the trainer) decides what each
pass of a residency sees: :class:`BlockVisitor` documents the hooks.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoedge.adapters import EMBED, HEAD, Adapter, adapter_for
from zoedge.errors import ConfigError
from zoedge.runtime.host import DiskTier, HostTier, RamTier
from zoedge.runtime.memory import allocate
from zoedge.runtime.slots import Slot, bind, dequantize, make_slot
from zoedge.store.manifest import BlockEntry, Manifest, dtype_of, load_manifest


@dataclass
class Resident:
    """A block while it occupies a slot.

    ``tensors`` are the slot's views of the stored tensors (tied aliases excluded:
    a tied tensor is seen, perturbed and updated once, in the block that stores it).
    ``writable`` names the tensors whose changes are written back (quantized ones are not).
    """

    name: str
    index: int
    tensors: dict[str, torch.Tensor]
    writable: frozenset[str]
    dirty: bool = False
    runtime: StreamedModel | None = field(default=None, repr=False)

    def mark_dirty(self) -> None:
        """Call after changing ``tensors`` in place: the block is written back to the host tier."""
        self.dirty = True

    def workspace(self, key: str) -> dict[str, torch.Tensor]:
        """Scratch tensors shaped like this block's tensors, allocated once per key and reused by every block."""
        assert self.runtime is not None
        return self.runtime.workspace(key, self)


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

    def on_resident(self, block: Resident) -> None:
        """Block uploaded, nothing computed yet. Modify ``block.tensors`` in place + ``mark_dirty`` to update."""

    def pass_tensors(self, block: Resident, p: int) -> Mapping[str, torch.Tensor]:
        """The weights pass ``p`` sees. Must not modify ``block.tensors`` (return scratch or functional results)."""
        return block.tensors

    def on_passes_done(self, block: Resident) -> None:
        """All passes ran on this block."""


class StreamedModel:
    """A causal LM whose blocks stream through device slots.

    Args:
        store: a prepared block store (see :func:`zoedge.prepare`).
        device: ``cpu`` or ``cuda[:n]``.
        tier: ``ram`` (all blocks in pinned host memory) or ``disk`` (read ahead into a pinned ring).
        prefetch: blocks uploaded (and, for ``disk``, read) ahead of the one computing; 1–3 typical.
        ram_cache_blocks: ``disk`` tier only: keep the first K blocks in RAM.
        working_dir: ``disk`` tier with dense updates: where the writable copy of the blocks lives.
    """

    def __init__(self, store: str | Path, device: str | torch.device = "cpu", tier: str = "ram", prefetch: int = 1,
                 ram_cache_blocks: int = 0, working_dir: Path | None = None) -> None:
        from transformers import AutoConfig

        self.store = Path(store)
        self.manifest: Manifest = load_manifest(self.store)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device", f"{device!r} but CUDA is not available", "use --device cpu")
        if prefetch < 1:
            raise ConfigError("--prefetch", f"{prefetch}", "use 1 or more")
        self.prefetch = prefetch
        self.config = AutoConfig.from_pretrained(self.store)
        self.dtype = dtype_of(self.manifest.dtype)
        self.adapter: Adapter = adapter_for(self.config, self.dtype, self.device, where=str(self.store / "config.json"))
        self.blocks: list[BlockEntry] = self.manifest.blocks
        names = [b.name for b in self.blocks]
        if names != self.adapter.block_names():
            raise ConfigError(self.store, f"blocks {names[:3]}... do not match the config", "re-run `zoedge prepare`")
        if tier == "ram":
            self.tier: HostTier = RamTier(self.store, self.manifest)
        elif tier == "disk":
            self.tier = DiskTier(self.store, self.manifest, ring=prefetch + 1, ram_cache_blocks=ram_cache_blocks,
                                 working_dir=working_dir)
        else:
            raise ConfigError("--tier", f"unknown value {tier!r}", "use ram or disk")
        # Tied weights: the block storing the tensor keeps a dedicated slot until the last user has run.
        self.aliases = dict(self.manifest.tied)
        owners = {self._block_index(self.adapter.block_of(src)) for src in self.aliases.values()}
        self.dedicated = {i: self._new_slot([self.blocks[i]], i) for i in sorted(owners)}
        ring_blocks = [b for i, b in enumerate(self.blocks) if i not in self.dedicated]
        self.ring = [self._new_slot(ring_blocks, len(self.dedicated) + k) for k in range(prefetch + 1)]
        self.host_ready: list[torch.cuda.Event | None] = [None] * len(self.blocks)
        cuda = self.device.type == "cuda"
        self.up = torch.cuda.Stream(self.device) if cuda else None
        self.compute = torch.cuda.current_stream(self.device) if cuda else None
        self.down = torch.cuda.Stream(self.device) if cuda else None
        self._workspaces: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def _block_index(self, name: str | None) -> int:
        return [b.name for b in self.blocks].index(name)

    def _new_slot(self, blocks: Sequence[BlockEntry], index: int) -> Slot:
        return make_slot(index, max(b.nbytes for b in blocks), max(b.dequant_nbytes for b in blocks), self.device)

    def workspace(self, key: str, block: Resident) -> dict[str, torch.Tensor]:
        """See :meth:`Resident.workspace`: one flat buffer per key, sized to the largest block's tensors."""
        if key not in self._workspaces:
            size = max(sum(_nbytes(t.numel, t.dtype) for t in b.tensors) for b in self.blocks)
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
    def _record(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        if stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def _upload(self, i: int) -> None:
        """Enqueue H2D of block ``i`` into its slot (upload stream)."""
        slot = self._slot_for(i)
        host = self.tier.fetch(i)
        with torch.cuda.stream(self.up) if self.up is not None else _null():
            for ev in (slot.free, self.host_ready[i]):
                if ev is not None and self.up is not None:
                    self.up.wait_event(ev)
            slot.raw[: host.numel()].copy_(host, non_blocking=True)
            slot.uploaded = self._record(self.up)
        slot.block = i
        self.tier.release(i, slot.uploaded)

    def _offload(self, i: int, slot: Slot, computed: torch.cuda.Event | None) -> None:
        """Enqueue D2H of block ``i``'s bytes after its compute; the slot is free once it is done."""
        target = self.tier.writeback_target(i)
        with torch.cuda.stream(self.down) if self.down is not None else _null():
            if computed is not None and self.down is not None:
                self.down.wait_event(computed)
            target.copy_(slot.raw[: target.numel()], non_blocking=True)
            done = self._record(self.down)
        self.host_ready[i] = done
        slot.free = done
        self.tier.commit_writeback(i, done)

    def run(self, visitor: BlockVisitor, inputs: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, select: torch.Tensor | None = None,
            head_fn: Callable[[int, torch.Tensor], Any] | None = None) -> list[Any]:
        """Stream every block once. With ``inputs`` run ``visitor.passes`` forward passes; without, only visit
        (apply pending updates: the flush before eval/save).

        Args:
            visitor: the hooks (see :class:`BlockVisitor`).
            inputs: input ids [B, T] (any device; moved to ours).
            attention_mask: [B, T] 1 for tokens, 0 for (left) padding.
            position_ids: default ``cumsum(mask) - 1``.
            select: flat indices into B×T: the head computes logits only there ([N, V]).
            head_fn: ``head_fn(p, logits)`` reduces pass p's logits (e.g. to a loss) so they need not be kept.

        Returns:
            Per pass, ``head_fn(p, logits)`` or the logits.
        """
        compute = inputs is not None
        ctx = None
        states: list[torch.Tensor] = []
        if compute:
            inputs = inputs.to(self.device)
            attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
            position_ids = position_ids.to(self.device) if position_ids is not None else None
            select = select.to(self.device) if select is not None else None
            ctx = self.adapter.begin(inputs, attention_mask, position_ids, select)
            states = [inputs] * visitor.passes
        n = len(self.blocks)
        grad_pass = getattr(visitor, "grad_pass", None)  # duck-typed visitors may not declare it
        tied_seen: list[dict[str, torch.Tensor]] = [{} for _ in range(visitor.passes)]
        pending_free: list[tuple[int, Slot, Resident]] = []  # dedicated slots released after the last block
        outputs: list[Any] = []
        issued = 0
        for i, block in enumerate(self.blocks):
            while issued < min(i + self.prefetch + 1, n):
                self.tier.schedule(issued)
                self._upload(issued)
                issued += 1
            # Start the disk reads of the next uploads early, as many as the ring has buffers (prefetch + 1): the
            # I/O thread then reads while this thread copies into slots (synchronous on CPU) or computes. Each
            # buffer's previous block is already released (uploaded, or guarded by its H2D event).
            for j in range(issued, min(issued + self.prefetch + 1, n)):
                self.tier.schedule(j)
            slot = self._slot_for(i)
            with torch.cuda.stream(self.compute) if self.compute is not None else _null():
                if self.compute is not None and slot.uploaded is not None:
                    self.compute.wait_event(slot.uploaded)
                dequantize(slot, i, block)
                res = Resident(block.name, i, bind(slot, i, block),
                               frozenset(t.name for t in block.tensors if t.quant == "none"), runtime=self)
                visitor.on_resident(res)
                if res.dirty and len(res.writable) != len(res.tensors):
                    raise ConfigError(block.name, "a dense update changed a quantized block",
                                      "use a low-rank optimizer with a quantized store, or prepare with --quant none")
                if compute:
                    for p in range(visitor.passes):
                        with torch.set_grad_enabled(p == grad_pass):
                            tensors = dict(visitor.pass_tensors(res, p))
                            for alias, src in self.aliases.items():
                                if src in tensors:
                                    tied_seen[p][src] = self._keep_tied(p, src, tensors[src], res.tensors[src])
                                if self.adapter.block_of(alias) == block.name:
                                    tensors[alias] = tied_seen[p][src]
                            states[p] = self.adapter.run(block.name, tensors, states[p], ctx)
                            if block.name == HEAD and head_fn is not None:
                                states[p] = head_fn(p, states[p])
                visitor.on_passes_done(res)
                computed = self._record(self.compute)
            if i in self.dedicated:
                pending_free.append((i, slot, res))
            elif res.dirty:
                self._offload(i, slot, computed)
            else:
                slot.free = computed
        for i, slot, res in pending_free:
            computed = self._record(self.compute)
            if res.dirty:
                self._offload(i, slot, computed)
            else:
                slot.free = computed
        if compute:
            outputs = states
        return outputs

    # ------------------------------------------------------------ public API
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the stored model ([B, T, V], or [N, V] with ``select``), equal to the resident HF model's."""
        return self.run(BlockVisitor(), input_ids, attention_mask, position_ids, select)[0]

    __call__ = forward

    def synchronize(self) -> None:
        """Wait for every enqueued copy and kernel (and disk write)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if isinstance(self.tier, DiskTier) and self.tier.write_done is not None:
            self.tier.write_done.result()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All current weights as CPU tensors (quantized ones dequantized), tied aliases included."""
        from zoedge.store import quant as q
        self.synchronize()
        out: dict[str, torch.Tensor] = {}
        for i, b in enumerate(self.blocks):
            host = self._read_block(i)
            for t in b.tensors:
                if t.quant == "none":
                    p = t.parts["data"]
                    out[t.name] = host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(t.shape).clone()
                else:
                    parts = {k: host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).view(p.shape)
                             for k, p in t.parts.items()}
                    out[t.name] = q.dequantize(t.quant, parts, tuple(t.shape), dtype_of(t.dtype), t.blocksize)
        for alias, src in self.aliases.items():
            out[alias] = out[src]
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the working copy (host tier) with ``state`` (e.g. weights from a checkpoint).

        Every unquantized stored tensor must be present; quantized tensors are left as stored (their
        trained state lives in the plugin). The prepared store on disk is never written.

        Raises:
            ConfigError: a tensor is missing or has the wrong shape.
        """
        from zoedge.runtime.host import write_file_from
        if isinstance(self.tier, DiskTier):
            self.tier.check_writable()
        self.synchronize()
        for i, b in enumerate(self.blocks):
            host = self._read_block(i)
            for t in b.tensors:
                if t.quant != "none":
                    continue
                if t.name not in state or tuple(state[t.name].shape) != tuple(t.shape):
                    got = tuple(state[t.name].shape) if t.name in state else "missing"
                    raise ConfigError(t.name, f"checkpoint tensor is {got}, the model needs {tuple(t.shape)}",
                                      "resume from a checkpoint of the same model")
                p = t.parts["data"]
                host[p.offset:p.offset + p.nbytes].view(dtype_of(p.dtype)).copy_(state[t.name].reshape(-1))
            if isinstance(self.tier, DiskTier):
                write_file_from(self.tier.paths[i], host)
                if i in self.tier.cache:
                    self.tier.cache[i].copy_(host)

    def _read_block(self, i: int) -> torch.Tensor:
        if isinstance(self.tier, DiskTier):
            from zoedge.runtime.host import read_file_into
            buf = torch.empty(self.blocks[i].nbytes, dtype=torch.uint8)
            read_file_into(self.tier.paths[i], buf)
            return buf
        return self.tier.fetch(i)

    def close(self) -> None:
        self.synchronize()
        self.tier.close()


def _nbytes(numel: int, dtype: str) -> int:
    return numel * dtype_of(dtype).itemsize


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def load(store: str | Path, device: str | torch.device = "cpu", tier: str = "ram", prefetch: int = 1,
         **kwargs: Any) -> StreamedModel:
    """Open a prepared block store as a :class:`StreamedModel` (see its Args)."""
    return StreamedModel(store, device=device, tier=tier, prefetch=prefetch, **kwargs)

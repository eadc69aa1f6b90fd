"""The run loop: a pass over the streamed blocks emitted as operations on queues (see :mod:`zoedge.runtime.schedule`)::

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

:class:`RunLoop` is a part of :class:`~zoedge.runtime.streamed.StreamedModel`, which sets the attributes it
declares; the decoder layers may instead run concurrently (:mod:`zoedge.runtime.concurrent_layers`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zoedge.adapters import HEAD, Adapter
from zoedge.errors import ConfigError
from zoedge.memory import allocate
from zoedge.runtime.engines import Engine
from zoedge.runtime.host import HostTier
from zoedge.runtime.lora import LoraAdapters
from zoedge.runtime.resident import BlockVisitor, Resident, may_update
from zoedge.runtime.schedule import COMPUTE, OFFLOAD, UPLOAD, Op, Schedule
from zoedge.runtime.slots import Slot, bind
from zoedge.store.manifest import BlockEntry


class RunLoop:
    """Streams every block once per call of :meth:`run`: uploads, the visitor's residencies and forward passes,
    write-backs (a part of :class:`~zoedge.runtime.streamed.StreamedModel`)."""

    # set by StreamedModel
    blocks: list[BlockEntry]
    aliases: dict[str, str]
    adapter: Adapter
    device: torch.device
    tier: HostTier
    engine: Engine
    schedule: Schedule
    prefetch: int
    unit: str
    in_place: bool
    in_host: dict[str, Slot]
    dedicated: dict[int, Slot]
    ring: list[Slot]
    chunk_bytes: int
    lora: LoraAdapters | None
    _workspaces: dict[str, torch.Tensor]
    _block_index: Callable[[str | None], int]
    _concurrent_layers: Callable[[BlockVisitor, PassState], range | None]
    _compute_layers: Callable[[range, BlockVisitor, PassState, list[bool]], None]

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

    def _compute(self, i: int, visitor: BlockVisitor, pass_state: PassState, writes_back: bool) -> Op:
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

    def _resident(self, i: int, slot: Slot, visitor: BlockVisitor, pass_state: PassState,
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

    def pass_weights(self, visitor: BlockVisitor, res: Resident, p: int) -> dict[str, torch.Tensor]:
        """The weights block ``res`` runs pass ``p`` with: the visitor's, combined with the frozen base when
        adapters are attached."""
        seen = visitor.pass_tensors(res, p)
        return dict(seen) if self.lora is None else self.lora.compose(res.frozen, seen)

    def writes_back(self, i: int, visitor_updates: bool) -> bool:
        """Whether block ``i``'s residency may write it back: the visitor may update, the block has unquantized
        tensors and no adapters are attached (they are the only trained tensors)."""
        return visitor_updates and self.lora is None and any(t.quant == "none" for t in self.blocks[i].tensors)

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
        state = PassState(self, visitor, head_fn)
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


class PassState:
    """What the compute operations of one pass share: the hidden states of each pass, the tied tensors seen,
    the blocks' residencies (read by their write-backs)."""

    def __init__(self, model: RunLoop, visitor: BlockVisitor, head_fn: Callable[[int, torch.Tensor], Any] | None):
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

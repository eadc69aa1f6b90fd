"""Concurrent decoder layers on the CPU: a pass's decoder layers emitted as one compute operation that runs them
on worker threads (:mod:`zoedge.runtime.pipeline`), when the visitor allows it (:attr:`BlockVisitor.concurrent`).

:class:`ConcurrentLayers` is a part of :class:`~zoedge.runtime.streamed.StreamedModel`, which sets the attributes it
declares; the layers' residencies and passes are the run loop's (:mod:`zoedge.runtime.run_loop`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from zoedge.adapters import Adapter
from zoedge.adapters.base import layer_index
from zoedge.runtime.host import HostTier, RamTier, available_memory
from zoedge.runtime.pipeline import SLOTS, LayerPipeline, row_ranges
from zoedge.runtime.resident import LAYER_SET, BlockVisitor, Resident, workspace_nbytes
from zoedge.runtime.run_loop import PassState
from zoedge.runtime.schedule import COMPUTE, Schedule
from zoedge.runtime.slots import Slot
from zoedge.store.manifest import BlockEntry

#: the concurrent layers' workspaces may take at most this share of the memory available when first needed
LAYER_MEMORY_SHARE = 0.5


class ConcurrentLayers:
    """Runs a pass's decoder layers concurrently (a part of :class:`~zoedge.runtime.streamed.StreamedModel`).

    ``workers``: worker threads (0 or 1: the layers run one after another); ``worker_threads``: each worker's
    intra-op threads; ``layer_seconds``: the concurrent layers' seconds (:attr:`LayerPipeline.seconds`), summed
    over every pass that used them."""

    # set by StreamedModel
    blocks: list[BlockEntry]
    aliases: dict[str, str]
    adapter: Adapter
    tier: HostTier
    schedule: Schedule
    unit: str
    in_place: bool
    lean: bool
    in_host: dict[str, Slot]
    _workspaces: dict[str, torch.Tensor]
    _resident: Callable[..., Resident]
    pass_weights: Callable[[BlockVisitor, Resident, int], dict[str, torch.Tensor]]

    def _init_concurrent_layers(self, workers: int, worker_threads: int) -> None:
        self.workers, self.worker_threads = workers, worker_threads
        self._replicas: list[Adapter] = []  # the pipeline workers' adapters (each its own skeleton)
        self.layer_seconds: dict[str, float] = {}
        self._layers_refused: str | None = None  # why the layers run one after another although workers are set

    def _concurrent_layers(self, visitor: BlockVisitor, state: PassState) -> range | None:
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
            layer = max(workspace_nbytes(self.blocks[i]) for i in layers)
            need, available = SLOTS * (visitor.passes + 1) * layer, available_memory()
            if available is not None and need > LAYER_MEMORY_SHARE * available:
                self._layers_refused = (
                    f"their workspaces ({SLOTS} layers x ({visitor.passes} passes + noise) x {layer / 2**20:.0f} MiB = "
                    f"{need / 2**30:.1f} GiB) would take more than {LAYER_MEMORY_SHARE:.0%} of the memory available "
                    f"({available / 2**30:.1f} GiB)")
                return None
        return range(layers[0], layers[-1] + 1)

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

    def _compute_layers(self, layers: range, visitor: BlockVisitor, state: PassState, writes_back: list[bool]) -> None:
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

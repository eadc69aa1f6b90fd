"""What a training step needs: device bytes (exact), host RAM, disk, bytes moved and a predicted step time.

Device memory is the sum of two parts, each computed the way the runtime
computes it:

* **long-lived buffers**, from the block layout ``zoedge prepare`` produces (the
  same layout function, so sizes match byte for byte) and the runtime's
  allocation rules (``zoedge/runtime/streamed.py``): a ring of ``prefetch + 1``
  slots sized to the largest streamed block (an int8 / nf4 store's quantized
  bytes: quantized tensors stay quantized in the slots), a dedicated slot for a
  block holding a tied tensor, and a plugin's state (the low-rank method's
  factors: what the plugin's own hooks allocate per block in the simulation,
  times the depth);
* **transient tensors** of the step (hidden states of every pass, masks,
  activations, attention, logits at the scored positions, the loss, and the
  perturbed weights formed just in time), measured by running the adapter's
  blocks on the meta device under :class:`~zoedge.plan.tracker.DeviceMemoryTracker`,
  the way ``StreamedModel.run`` runs them (two decoder layers stand for all:
  every layer has the same shapes), with the weights a dense method's pass sees
  wrapped as the runtime wraps them (:class:`~zoedge.runtime.perturbed.NoisePerturbed`,
  row chunks of ``chunk_bytes``), quantized matrices bound as the runtime binds
  them (:class:`~zoedge.runtime.dequantized.Dequantized`: each expanded at the op
  that reads it, one matrix or ``chunk_bytes`` row chunk at a time), and for the
  low-rank method the HZO plugin's own hooks deciding what each pass sees
  (:class:`~zoedge.optim.lowrank.LowRankPerturbed` over the stored weights).

Two runtime modes are planned (``StreamedModel(lean=...)``):

* **lean** (the default on an accelerator and whenever blocks stream through
  slots): perturbations θ ± εz are formed per tensor or row chunk right before
  the op that reads them, from range-addressable noise; the tied embedding is
  perturbed where it is read (embed and head) with no per-pass copy. No
  block-sized workspace exists.
* **workspaces** (``lean=False``; the CPU's in-place binding uses it without the
  slots): the optimizer's block-sized workspaces (MeZO: one noise buffer per
  direction and one scratch for θ ± εz) and one copy of a perturbed tied tensor
  per pass.

Streaming units (``Workload.unit``, ``StreamedModel(unit=...)``): whole decoder
layers, or their attention and MLP halves (``half``, for families whose adapter
runs half layers: OPT), slots sized to the largest unit. Still a **design
target**, not implemented: single-Linear units (and halves for the other
families; untied embeddings and heads would stream in row chunks no larger than
the unit): :func:`unit_long_lived`, ``Plan.gpu_peak_by_unit``.

Step time is a prediction: the runtime's schedule for the step, costed on the
hardware and placed on a timeline (:mod:`zoedge.plan.timing`); FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` on the same meta run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from zoedge.errors import ConfigError
from zoedge.names import STORE_DTYPES
from zoedge.hardware import GiB, Hardware
from zoedge.plan.spec import QUANTS, RUNTIME_UNITS, Method, ModelSpec, Workload, method  # noqa: F401 (re-exported)
from zoedge.plan.timing import step_time
from zoedge.runtime.lora import LoraAdapters, LoraSpec
from zoedge.runtime.streamed import CHUNK_BYTES
from zoedge.store.manifest import DTYPES, BlockEntry, dtype_of



#: optimizer plugins the plan has a footprint for, and the footprint
FOOTPRINTS = {"mezo": "mezo", "hzo": "lowrank"}


def method_for(optimizer: str, options: dict[str, Any], lora: LoraSpec | None = None) -> Method:
    """The footprint of optimizer plugin ``optimizer`` with plugin ``options`` (``--opt``: mezo's q, hzo's rank),
    training ``lora`` adapters on a frozen base when given (``--peft lora``).

    Raises:
        ConfigError: no footprint for that plugin, (from the plugin) options it refuses, or ``lora`` with a
            plugin other than mezo.
    """
    from zoedge.optim.registry import build

    plugin = build(optimizer, options, seed=0)
    if optimizer not in FOOTPRINTS:
        if plugin.dense and plugin.passes == 2 and plugin.fo_pass is None:  # perturbs densely, two passes: MeZO's
            return replace(method("mezo", lora=lora),
                           note=f"{optimizer}: a dense two-pass plugin, planned with MeZO's footprint")
        raise ConfigError("--optimizer", f"the plan has no footprint for {optimizer!r}",
                          f"use one of {', '.join(FOOTPRINTS)} (or zoedge plan --method forward)")
    return method(FOOTPRINTS[optimizer], int(getattr(plugin, "q", 1)), int(getattr(plugin, "rank", 4)), lora)


# ------------------------------------------------------------------------------------------------- the model
def _owners(config: Any, tied: dict[str, str]) -> frozenset[str]:
    from zoedge.adapters import adapter_for
    if not tied:
        return frozenset()
    adapter = adapter_for(_cut(config, 1, "sdpa"), torch.float32, "meta")
    return frozenset(adapter.block_of(src) for src in tied.values())


def layout(config: Any, dtype: str, quant: str = "none") -> tuple[list[BlockEntry], dict[str, str]]:
    """The block entries ``zoedge prepare`` would write for ``config`` (embed, layers.0, head), without data.

    Uses the prepare step's own layout function, so offsets and sizes are identical (every decoder layer has
    the same layout, so a one-layer skeleton is built).
    """
    from zoedge.adapters import adapter_for
    from zoedge.store.manifest import plan_block

    if dtype not in STORE_DTYPES:
        raise ConfigError("--dtype", repr(dtype), "use fp32, fp16 or bf16")
    if quant not in QUANTS:
        raise ConfigError("--quant", repr(quant), f"use one of {', '.join(QUANTS)}")
    adapter = adapter_for(_cut(config, 1, "sdpa"), DTYPES[dtype], "meta")
    expected = adapter.expected_shapes()
    out = []
    for block in ("embed", "layers.0", "head"):
        names = [n for n in expected if adapter.block_of(n) == block]
        entries, nbytes = plan_block(names, expected, DTYPES[dtype], quant, block)
        out.append(BlockEntry(block, "", nbytes, "", entries))
    return out, dict(adapter.tied())


def model_spec(source: str, dtype: str | None = None, quant: str | None = None, layers: int | None = None) -> ModelSpec:
    """A :class:`ModelSpec` from a named shape, a Hugging Face checkpoint directory or a prepared store.

    Args:
        source: shape name (``opt-175b``), checkpoint dir (``config.json``) or store dir (``manifest.json``).
        dtype: stored dtype (default: the store's, else fp16).
        quant: none / int8 / nf4 (default: the store's, else none).
        layers: depth to plan for (default: the named shape's full depth, else the config's).

    Raises:
        ConfigError: the source is none of these, or dtype/quant contradict a store.
    """
    from transformers import AutoConfig

    from zoedge.plan.shapes import SHAPES, shape_config, shape_name

    path = Path(source)
    if (path / "manifest.json").is_file():
        from zoedge.store.manifest import load_manifest
        man = load_manifest(path, verify=False)  # the layout only: no block bytes are read
        for opt, given, stored in (("--dtype", dtype, man.dtype), ("--quant", quant, man.quant)):
            if given is not None and given != stored:
                raise ConfigError(opt, f"{given} but the store {path} holds {stored}", f"omit {opt} or give {stored}")
        config = AutoConfig.from_pretrained(path)
        lay = [b for b in man.blocks if b.name.startswith("layers.")]
        blocks = [man.blocks[0], max(lay, key=lambda b: b.nbytes), man.blocks[-1]] if lay else man.blocks
        n = config.num_hidden_layers
        return ModelSpec(str(path), config, man.dtype, man.quant, blocks, dict(man.tied),
                         _owners(config, dict(man.tied)), layers or n,
                         n if layers and layers != n else None)
    if (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path)
        label = str(path)
        native = config.num_hidden_layers
    else:
        try:
            name = shape_name(source)
        except ConfigError:
            raise ConfigError("MODEL", f"{source!r} is not a named shape, a checkpoint directory (config.json) or "
                              "a prepared store (manifest.json)", f"use one of {', '.join(SHAPES)} or a path") from None
        config, label, native = shape_config(name), name, SHAPES[name]["num_hidden_layers"]
    dtype, quant = dtype or "fp16", quant or "none"
    blocks, tied = layout(config, dtype, quant)
    return ModelSpec(label, config, dtype, quant, blocks, tied, _owners(config, tied), layers or native,
                     native if layers and layers != native else None)


# ------------------------------------------------------------------------------------- the step's workload
def synthetic_batch(vocab: int, batch: int, seq: int, scored: int = 0, seed: int = 0):
    """A generation-kind :class:`~zoedge.train.batching.Batch` of random ids (no padding) scoring the last
    ``scored`` flat positions (0: all ``batch × seq``; a position's target is the next id, wrapping at the end).
    The plan's simulation and the measured steps use the same batch."""
    from zoedge.train.batching import Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    n = scored or batch * seq
    index = torch.arange(batch * seq - n, batch * seq)  # the last n positions (flat)
    flat = ids.reshape(-1)
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), target_index=index,
                 target_ids=flat[(index + 1) % flat.numel()].clone(), target_row=index // seq,
                 row_example=torch.arange(batch), labels=torch.zeros(batch, dtype=torch.long),
                 num_candidates=torch.ones(batch, dtype=torch.long), kind="generation", n_tokens=batch * seq)


# -------------------------------------------------------------------------------------- long-lived buffers
def _tensor_bytes(block: BlockEntry) -> int:
    return sum(t.numel * dtype_of(t.dtype).itemsize for t in block.tensors)


def units(spec: ModelSpec, unit: str = "layer") -> list[BlockEntry]:
    """The streaming units of the plan's blocks (embed, one layer, head) as the runtime splits them
    (``StreamedModel(unit=...)``; the same function).

    Raises:
        ConfigError: the family's adapter cannot split at ``unit``.
    """
    if unit not in spec.units_cache:
        from zoedge.adapters import adapter_for
        from zoedge.runtime.streamed import _split

        adapter = adapter_for(_cut(spec.config, 1, "sdpa"), DTYPES[spec.dtype], "meta")
        try:
            spec.units_cache[unit] = _split(adapter, spec.blocks, unit)[0]
        except ConfigError as e:  # the family cannot split there: asked again, the same answer
            spec.units_cache[unit] = e
    found = spec.units_cache[unit]
    if isinstance(found, ConfigError):
        raise found.with_traceback(None)
    return list(found)


def long_lived(spec: ModelSpec, m: Method, prefetch: int, lean: bool = True, unit: str = "layer") -> dict[str, int]:
    """Device buffers the runtime allocates once (by purpose), following ``StreamedModel``'s rules: ``lean`` (the
    default on an accelerator) or workspace mode (``lean=False``), streaming units (``unit``)."""
    dedicated = [b for b in spec.blocks if b.name in spec.dedicated]
    streamed = [b for b in units(spec, unit) if b.name not in spec.dedicated]
    out = {  # quantized tensors stay quantized in the slots (expanded per matrix or row chunk: transient)
        "ring slots": (prefetch + 1) * max(b.nbytes for b in streamed),
        "tied-weight slot": sum(b.nbytes for b in dedicated),
    }
    if m.lora is not None:
        per = lora_bytes(spec, m.lora, unit)
        out["LoRA adapters (fp32)"] = per["embed"] + per["head"] + per["layer"] * spec.layers
    if lean:
        return out
    sizes = lora_bytes(spec, m.lora, unit)["units"] if m.lora is not None else [_tensor_bytes(b) for b in units(spec, unit)]
    out["optimizer workspaces"] = m.workspaces * max(sizes)
    out["tied copies (one per pass)"] = 0
    if m.dense and spec.tied:
        sizes = {t.name: t.numel * dtype_of(t.dtype).itemsize for b in spec.blocks for t in b.tensors}
        out["tied copies (one per pass)"] = m.passes * sum(sizes[src] for src in set(spec.tied.values()))
    return out


def lora_bytes(spec: ModelSpec, lora: LoraSpec, unit: str = "layer") -> dict[str, Any]:
    """Adapter bytes of the embed, of one decoder layer (all its units), of the head, and of each unit (the
    adapters the runtime attaches, made on the meta device)."""
    from zoedge.adapters import adapter_for
    layer = int(spec.layer_block.name.split(".")[1])
    adapter = adapter_for(_cut(spec.config, layer + 1, "sdpa"), DTYPES[spec.dtype], "meta")
    blocks = units(spec, unit)
    ad = LoraAdapters(lora, adapter.skeleton, blocks, spec.tied, torch.device("meta"))
    each = {b.name: ad.nbytes(b.name) for b in blocks}
    return {"embed": each.get("embed", 0), "head": each.get("head", 0),
            "layer": sum(v for k, v in each.items() if k.startswith("layers.")), "units": list(each.values())}


def runtime_units(spec: ModelSpec) -> list[str]:
    """The units the runtime can stream this model in (``half`` needs an adapter that runs half layers)."""
    out = []
    for u in RUNTIME_UNITS:
        try:
            units(spec, u)
            out.append(u)
        except ConfigError:
            pass
    return out


LEAN_UNITS = ("linear", "half", "layer")


def lean_unit_bytes(spec: ModelSpec, unit: str = "linear") -> int:
    """Stored bytes of the largest streaming unit of a decoder layer: one matrix (``linear``), the attention or
    the MLP half (``half``; tensors named ``*attn*`` vs the rest), or the whole layer (``layer``)."""
    if unit not in LEAN_UNITS:
        raise ConfigError("--lean-unit", repr(unit), f"use one of {', '.join(LEAN_UNITS)}")
    sizes = {t.name: sum(p.nbytes for p in t.parts.values()) for t in spec.layer_block.tensors}
    if unit == "linear":
        return max(sizes.values())
    if unit == "half":
        attn = sum(v for k, v in sizes.items() if "attn" in k)
        return max(attn, sum(sizes.values()) - attn)
    return sum(sizes.values())


def unit_long_lived(spec: ModelSpec, m: Method, prefetch: int, unit: str = "linear") -> dict[str, int]:
    """Device buffers of the lean runtime streaming units (``unit``): the runtime's own (:func:`long_lived`) where it
    implements the unit for this model (:func:`runtime_units`), else the design target, not implemented: slots
    sized to the unit (single matrices for ``linear``; untied embeddings and heads would stream in row chunks no
    larger than the unit); a quantized matrix is expanded per matrix or row chunk at its op, as the runtime does
    (counted in the transient)."""
    if unit in runtime_units(spec):
        return long_lived(spec, m, prefetch, lean=True, unit=unit)
    return {
        "ring slots": (prefetch + 1) * lean_unit_bytes(spec, unit),
        "tied-weight slot": sum(b.nbytes for b in spec.blocks if b.name in spec.dedicated),
    }


# ------------------------------------------------------------------------------------- transient (simulated)
@dataclass
class Simulation:
    """Transient device bytes of one step (above the long-lived buffers), FLOPs per block and pass, and the device
    bytes a plugin's state takes per block (``embed``, one decoder ``layer``, ``head``; run with a plugin only)."""

    peak: int
    block_peaks: dict[str, int]
    flops: dict[str, int]
    state: dict[str, int] = field(default_factory=dict)


def _meta_weights(spec: ModelSpec, adapter: Any, dtype: torch.dtype, chunk_bytes: int) -> dict[str, torch.Tensor]:
    """The model's weights on the meta device as the runtime binds them: plain tensors, and quantized matrices as
    :class:`~zoedge.runtime.dequantized.Dequantized` views of their stored parts (expanded in ``chunk_bytes``)."""
    import re

    from zoedge.runtime.dequantized import Dequantized

    def any_layer(name: str) -> str:  # every decoder layer has the same layout
        return re.sub(r"\blayers\.\d+\.", "layers.#.", name)

    quantized = {any_layer(t.name): t for t in spec.layer_block.tensors if t.quant != "none"}
    weights: dict[str, torch.Tensor] = {}
    for n, shape in adapter.expected_shapes().items():
        t = quantized.get(any_layer(n))
        if t is None:
            weights[n] = torch.empty(shape, dtype=dtype, device="meta")
        else:
            parts = {k: torch.empty(p.shape, dtype=dtype_of(p.dtype), device="meta") for k, p in t.parts.items()}
            weights[n] = Dequantized(t.quant, parts, t.shape, dtype_of(t.dtype), t.blocksize, chunk_bytes, n)
    for alias, src in adapter.tied().items():
        weights[alias] = weights[src]
    return weights


def simulate(spec: ModelSpec, work: Workload, passes: int, loss: bool = True, perturbed: bool = False,
             chunk_bytes: int = CHUNK_BYTES, plugin: str | None = None, options: dict[str, Any] | None = None,
             lora: LoraSpec | None = None) -> Simulation:
    """Run embed, two decoder layers and the head on the meta device as ``StreamedModel.run`` does (every pass,
    the trainer's loss at the head, the streaming units of ``work.unit``) and count the transient bytes; see the
    module docstring. ``perturbed``: every pass sees every weight as the lean runtime's just-in-time θ + εz (a
    dense method), formed in row chunks of ``chunk_bytes``. ``plugin``: the registered optimizer plugin (with
    ``options``) decides what each pass sees and updates the blocks, as in a training run (its hooks are called
    as the runtime calls them); three steps run, the third counted, when its state (created by the second step's
    updates) exists for every block. ``lora``: the plugin sees each unit's adapters (the runtime's residents with
    adapters attached) and the passes run the base with them (:class:`~zoedge.runtime.lora.LoraWeight`). Quantized
    matrices are bound as the runtime binds them (expanded one matrix
    or row chunk at a time by the ops)."""
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    from zoedge.adapters import EMBED, HEAD, adapter_for
    from zoedge.noise.source import NoiseSource
    from zoedge.plan.tracker import DeviceMemoryTracker
    from zoedge.runtime.dequantized import Dequantized
    from zoedge.runtime.perturbed import NoisePerturbed
    from zoedge.runtime.resident import Resident
    from zoedge.train.batching import candidate_loss, token_logprobs_from_logits

    if spec.quant != "none":
        # before counting: the import logs a warning whose exception references this stack; a handler that keeps
        # log records (pytest's) would keep the counted tensors alive and inflate the peaks
        from zoedge.store.quant import import_backend
        import_backend()
    config = _cut(spec.config, min(spec.layers, 2), work.attention)
    dtype = DTYPES[spec.dtype]
    adapter = adapter_for(config, dtype, "meta")
    weights = _meta_weights(spec, adapter, dtype, chunk_bytes)
    tied = adapter.tied()
    batch = synthetic_batch(config.vocab_size, work.batch, work.seq, work.scored)
    noise = NoiseSource(0)  # on meta it allocates what a real draw allocates and draws nothing
    units = [u for b in adapter.block_names() for u in adapter.split(b, adapter.tensors_of(b), work.unit)]
    opt = None
    if plugin is not None:
        from zoedge.optim.registry import build
        opt = build(plugin, dict(options or {}), seed=0)
        opt.noise = NoiseSource(0)
    runtime = SimpleNamespace(lean=True, chunk_bytes=chunk_bytes)  # what a Resident asks of its runtime
    adapters = None
    if lora is not None:
        from zoedge.store.manifest import BlockEntry, TensorEntry
        entries = [BlockEntry(u, "", 0, "", [TensorEntry(n, spec.dtype, list(weights[n].shape))
                                             for n in names if n not in tied]) for u, names in units]
        adapters = LoraAdapters(lora, adapter.skeleton, entries, tied, torch.device("meta"))

    def seen(p: int) -> dict[str, torch.Tensor]:  # what pass p's blocks see (the runtime's perturb of MeZO)
        if not perturbed:
            return weights
        out = {n: NoisePerturbed(t, lambda o, a, n_, n=n: noise.normal_at_(o, 0, n, "z0", a, n_), 1.0, chunk_bytes)
               for n, t in weights.items() if n not in tied}
        out.update({alias: out[src] for alias, src in tied.items()})  # the head reads the embed's
        return out

    views = [seen(p) for p in range(passes)]
    peaks: dict[str, int] = {}
    flops: dict[str, int] = {}
    state: dict[str, int] = {}
    steps = 1 if opt is None else 3
    with DeviceMemoryTracker("meta", work.attention) as tracker:
        dev = batch.to("meta")

        def head(p: int, logits: torch.Tensor):
            return candidate_loss(token_logprobs_from_logits(logits, dev.target_ids), dev)

        for step in range(steps):
            last = step == steps - 1
            if opt is not None:
                opt.begin_step(step)
                passes = opt.passes
            if last:
                tracker.reset_peak()
                held = sum(state.values())  # the plugin's state of the simulated blocks: long-lived, counted apart
            with torch.no_grad():
                ctx = adapter.begin(dev.input_ids, dev.attention_mask, None, dev.target_index if loss else None)
            states: list[Any] = [dev.input_ids] * passes
            tied_seen: list[dict[str, torch.Tensor]] = [{} for _ in range(passes)]
            for i, (unit, names) in enumerate(units):
                with tracker.section() as sec:
                    res = None
                    if opt is not None and adapters is not None:
                        res = Resident(unit, i, adapters.of(unit), frozenset(adapters.of(unit)), runtime=runtime,
                                       frozen={n: weights[n] for n in names if n not in tied})
                        before = tracker.live
                        with torch.no_grad():
                            opt.on_resident(res)
                    elif opt is not None:
                        res = Resident(unit, i, {n: weights[n] for n in names if n not in tied},
                                       frozenset(n for n in names if not isinstance(weights[n], Dequantized)),
                                       runtime=runtime)
                        before = tracker.live
                        with torch.no_grad():
                            opt.on_resident(res)
                        if step == 1:
                            state[unit] = tracker.live - before
                    for p in range(passes):
                        with torch.set_grad_enabled(False):
                            if res is not None:
                                w = dict(opt.pass_tensors(res, p))
                                if adapters is not None:
                                    w = adapters.compose(res.frozen, w)
                                for alias, src in tied.items():
                                    if src in w:
                                        tied_seen[p][src] = w[src]
                                    if alias in names:
                                        w[alias] = tied_seen[p][src]
                            else:
                                w = {n: views[p][n] for n in names}
                            if p == 0 and last:
                                with FlopCounterMode(display=False) as fc:
                                    states[p] = adapter.run(unit, w, states[p], ctx)
                                flops[unit] = fc.get_total_flops()
                            else:
                                states[p] = adapter.run(unit, w, states[p], ctx)
                            if unit == HEAD and loss:
                                states[p] = head(p, states[p])
                    del w  # as in the runtime: pass p's weights live until pass p + 1's are formed
                    if res is not None:
                        opt.on_passes_done(res)
                        del res
                if last:
                    peaks[unit] = sec["peak"] - held
            if opt is not None:
                opt.finish_step([torch.tensor(0.0)] * passes)  # meta losses have no values
            del states, ctx, tied_seen
        peak = tracker.peak - held
        del dev

    def layer_sum(values: dict[str, int], pick: Any) -> int:
        return pick(v for k, v in values.items() if k.startswith("layers.0"))

    return Simulation(peak, {"embed": peaks[EMBED], "layer": max(v for k, v in peaks.items() if k.startswith("layers.")),
                             "head": peaks[HEAD]},
                      {"embed": flops[EMBED], "layer": layer_sum(flops, sum), "head": flops[HEAD]},
                      {"embed": state.get(EMBED, 0), "layer": layer_sum(state, sum), "head": state.get(HEAD, 0)}
                      if opt is not None else {})


def _cut(config: Any, layers: int, attention: str) -> Any:
    import copy
    c = copy.deepcopy(config)
    c.num_hidden_layers = layers
    if hasattr(c, "layer_types") and c.layer_types is not None:
        c.layer_types = c.layer_types[:layers]
    c._attn_implementation = "eager" if attention == "eager" else "sdpa"
    return c


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Everything ``zoedge plan`` reports; bytes and seconds. ``to_dict`` is the JSON form.

    ``device_long_lived`` / ``transient_peak`` / ``device_peak``: the runtime as it runs on an accelerator (lean
    mode); ``workspace_*``: the same runtime with ``lean=False``.
    """

    model: str
    layers: int
    measured_layers: int | None
    dtype: str
    quant: str
    method: Method
    work: Workload
    hardware: Hardware
    params: int
    stored_bytes: int
    device_long_lived: dict[str, int]
    transient_peak: int
    transient_by_block: dict[str, int]
    workspace_long_lived: dict[str, int]
    workspace_transient_peak: int
    host_ram: int
    disk: int
    moved: dict[str, int]
    flops_per_step: float
    time: dict[str, Any]
    chunk_bytes: int = CHUNK_BYTES
    #: lean GPU peak by streaming unit (:func:`unit_long_lived`): the runtime's for ``runtime_units``, a design
    #: target (not implemented) for the others
    gpu_peak_by_unit: dict[str, int] = field(default_factory=dict)
    runtime_units: list[str] = field(default_factory=list)
    fits: list[dict[str, Any]] = field(default_factory=list)
    #: the optimizer state a plugin declares (:meth:`~zoedge.optim.base.ZOOptimizer.state_spec`), kept on the host
    #: tier: counted in ``host_ram`` (ram tier) or ``disk`` (disk tier)
    optimizer_state: int = 0

    @property
    def device_peak(self) -> int:
        return sum(self.device_long_lived.values()) + self.transient_peak

    @property
    def workspace_device_peak(self) -> int:
        return sum(self.workspace_long_lived.values()) + self.workspace_transient_peak

    @property
    def gpu_peak(self) -> int:
        """``device_peak`` plus what the CUDA allocator holds besides zoedge's tensors (cuBLAS workspace)."""
        return self.device_peak + self.hardware.cuda_extra

    @property
    def workspace_gpu_peak(self) -> int:
        return self.workspace_device_peak + self.hardware.cuda_extra

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"], d["work"], d["hardware"] = asdict(self.method), asdict(self.work), self.hardware.to_dict()
        d["device_peak"], d["workspace_device_peak"] = self.device_peak, self.workspace_device_peak
        d["gpu_peak"], d["workspace_gpu_peak"] = self.gpu_peak, self.workspace_gpu_peak
        d["notes"] = NOTES
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


NOTES = ("device_peak: bytes of zoedge's tensors (what the tracker counts; before allocator rounding) with the "
         "runtime's default on an accelerator (lean: perturbations formed just in time); gpu_peak adds the cuBLAS "
         "workspace; NVML device-used adds the CUDA context and the allocator's cache on top",
         "workspace_*: the same runtime with lean=False (block-sized noise and scratch workspaces, tied copies)",
         "gpu_peak_by_unit: lean GPU peak by streaming unit; units in runtime_units are implemented "
         "(StreamedModel(unit=...)), the others are a design target, not implemented",
         "int8/nf4 stores: the slots hold the quantized bytes; each matrix is expanded at its op, one matrix or "
         "chunk_bytes row chunk at a time (in the transient); lowrank: the HZO plugin's own hooks run on the meta "
         "device, its factors counted as 'optimizer state (factors)'",
         "time: the step's predicted timeline (zoedge.plan.timing: the runtime's schedule costed at the hardware's "
         "rates), not a measurement; roofline_s is the per-block max(transfer, compute) bound beside it")


def plugin_state(spec: ModelSpec, sim: Simulation) -> dict[str, int]:
    """The plugin's long-lived device state for the whole depth (its factors, deltas), from what its own hooks
    allocated per block in the simulation: ``{}`` without a plugin."""
    if not any(sim.state.values()):  # no plugin, or one without state (MeZO on adapters)
        return {}
    return {"optimizer state (factors)": sim.state["embed"] + sim.state["head"] + sim.state["layer"] * spec.layers}


def declared_state(spec: ModelSpec, optimizer: Any) -> int:
    """Bytes of the per-weight state ``optimizer`` (a built plugin) declares for every stored tensor of ``spec``."""
    return optimizer.state_bytes((t.name, tuple(t.shape)) for b in spec.block_list() for t in b.tensors)


def optimizer_plan(spec: ModelSpec, optimizer: str, options: dict[str, Any], work: Workload, hw: Hardware,
                   chunk_bytes: int = CHUNK_BYTES, lora: LoraSpec | None = None) -> Plan:
    """One training step of ``spec`` with optimizer plugin ``optimizer`` (``--opt`` ``options``): its footprint
    (:func:`method_for`) and the per-weight state it declares (:func:`declared_state`, on the host tier). What
    ``zoedge plan --optimizer`` and ``zoedge memory`` predict.

    Raises:
        ConfigError: as :func:`method_for`.
    """
    from zoedge.optim.registry import build

    m = method_for(optimizer, options, lora)
    state = declared_state(spec, build(optimizer, options, seed=0))
    return make_plan(spec, m, work, hw, chunk_bytes, optimizer_state=state)


def make_plan(spec: ModelSpec, m: Method, work: Workload, hw: Hardware, chunk_bytes: int = CHUNK_BYTES,
              timing: bool = True, optimizer_state: int = 0) -> Plan:
    """Plan one training step of ``spec`` with method ``m`` on ``hw`` (see the module docstring); ``timing=False``
    plans the bytes only (``time`` empty, each fit's ``step_s`` None), without the timing model's schedule;
    ``optimizer_state``: the bytes of a plugin's declared state (:func:`declared_state`), kept on the host tier."""
    work.check()
    sim = simulate(spec, work, m.passes, m.loss, perturbed=m.dense, chunk_bytes=chunk_bytes, plugin=m.plugin,
                   options=dict(m.options), lora=m.lora)
    wsim = simulate(spec, work, m.passes, m.loss, chunk_bytes=chunk_bytes) if m.dense else sim
    state = plugin_state(spec, sim)
    live = {**long_lived(spec, m, work.prefetch, lean=True, unit=work.unit), **state}
    blocks = spec.block_list()
    stored = spec.stored_bytes
    biggest = max(b.nbytes for b in spec.blocks)
    if work.tier == "ram":
        host = stored
    else:
        cached = sum(b.nbytes for b in blocks[:work.ram_cache_blocks])
        staging = biggest if m.dense else 0  # allocated only when something is written back
        host = (work.prefetch + 1) * biggest + staging + cached  # read ring + write-back staging + RAM cache
    disk = stored * (2 if (work.tier == "disk" and m.dense) else 1)  # + the working copy of dense disk runs
    if work.tier == "ram":
        host += optimizer_state
    else:
        disk += optimizer_state
    h2d = stored
    d2h = sum(b.nbytes for b in blocks if all(t.quant == "none" for t in b.tensors)) if m.dense else 0
    disk_read = (stored - sum(b.nbytes for b in blocks[:work.ram_cache_blocks])) if work.tier == "disk" else 0
    disk_write = d2h if work.tier == "disk" else 0
    flops = {"embed": sim.flops["embed"], "layer": sim.flops["layer"], "head": sim.flops["head"]}
    total_flops = m.passes * sum(flops["layer" if b.name.startswith("layers.") else b.name] for b in blocks)
    time = step_time(spec, m, work, hw, flops).to_dict() if timing else {}
    plan = Plan(spec.label, spec.layers, spec.measured_layers, spec.dtype, spec.quant, m, work, hw,
                params=sum(t.numel for b in blocks for t in b.tensors), stored_bytes=stored,
                device_long_lived=live, transient_peak=sim.peak, transient_by_block=sim.block_peaks,
                workspace_long_lived={**long_lived(spec, m, work.prefetch, lean=False, unit=work.unit), **state},
                workspace_transient_peak=wsim.peak, host_ram=host, disk=disk,
                moved={"h2d": h2d, "d2h": d2h, "disk_read": disk_read, "disk_write": disk_write},
                flops_per_step=float(total_flops), time=time, chunk_bytes=chunk_bytes, optimizer_state=optimizer_state)
    plan.gpu_peak_by_unit = {u: sum(unit_long_lived(spec, m, work.prefetch, u).values()) + sum(state.values()) + sim.peak
                             + hw.cuda_extra for u in LEAN_UNITS}
    plan.runtime_units = runtime_units(spec)
    plan.fits = _fits(spec, m, work, hw, sim.peak + sum(state.values()), wsim.peak + sum(state.values()))
    for f in plan.fits:  # the predicted step of each tier and prefetch depth
        f["step_s"] = None if not timing else step_time(spec, m, replace(work, tier=f["tier"], prefetch=f["prefetch"], unit=f["unit"]), hw,
                                flops).timeline.total
    return plan


def _fits(spec: ModelSpec, m: Method, work: Workload, hw: Hardware, transient: int, ws_transient: int) -> list[dict]:
    """Which tier and prefetch depth fit the GPU and host RAM (the runtime, its workspace mode, and the design
    target's finer units)."""
    out = []
    stored, biggest = spec.stored_bytes, max(b.nbytes for b in spec.blocks)
    for tier in ("ram", "disk"):
        for pf in (1, 2, 3):
            unit = work.unit if tier == "ram" else "layer"
            dev = sum(long_lived(spec, m, pf, unit=unit).values()) + transient + hw.cuda_extra
            ws = sum(long_lived(spec, m, pf, lean=False, unit=unit).values()) + ws_transient + hw.cuda_extra
            design = {u: sum(unit_long_lived(spec, m, pf, u).values()) + transient + hw.cuda_extra
                      for u in LEAN_UNITS}
            host = stored if tier == "ram" else (pf + 1 + (1 if m.dense else 0)) * biggest
            host_ok = hw.host_ram is None or host <= hw.host_ram

            def ok(n: int) -> bool:
                return host_ok and (hw.gpu_memory is None or n <= hw.gpu_memory)

            out.append({"tier": tier, "prefetch": pf, "unit": unit, "device_peak": dev, "host_ram": host, "fits": ok(dev),
                        "workspace_device_peak": ws, "workspace_fits": ok(ws),
                        "by_unit": design, "units_that_fit": [u for u in LEAN_UNITS if ok(design[u])]})
    return out


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"

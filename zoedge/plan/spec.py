"""What a plan is made for: the method's footprint (:class:`Method`), the model (:class:`ModelSpec`) and the step's
workload (:class:`Workload`), as values (:mod:`zoedge.plan.accounting` plans them, :mod:`zoedge.plan.timing` times
them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zoedge.errors import ConfigError
from zoedge.names import QUANT_KINDS
from zoedge.runtime.lora import LoraSpec
from zoedge.store.manifest import BlockEntry

QUANTS = QUANT_KINDS
#: units the runtime streams (``StreamedModel(unit=...)``)
RUNTIME_UNITS = ("layer", "half")


@dataclass(frozen=True)
class Method:
    """What an optimizer asks of the device, as far as memory and time go.

    ``workspaces``: block-sized device buffers it allocates through ``Resident.workspace`` in workspace mode
    (none in lean mode); ``dense``: it perturbs every tensor densely (in workspace mode perturbed tied tensors
    are copied once per pass; lean mode forms them just in time) and writes updated blocks back; ``loss``: the
    head reduces the logits to the training loss (a plain forward returns them).
    """

    name: str
    passes: int
    workspaces: int
    dense: bool
    note: str = ""
    loss: bool = True
    #: the registered plugin whose own hooks the plan runs (on the meta device), and its options
    plugin: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    #: LoRA adapters (``--peft lora``): the plugin trains them, the base is frozen (no write-back, no working copy)
    lora: LoraSpec | None = None


def method(name: str, q: int = 1, rank: int = 4, lora: LoraSpec | None = None) -> Method:
    """The footprint of a method: ``mezo`` (the shipped plugin; q directions), ``lowrank`` (the HZO plugin in
    factor mode, rank ``rank``: perturbations as lazy ``LowRankPerturbed`` products over the stored, possibly
    quantized, weights, no dense workspace, no write-back; the plan runs the plugin's own hooks and counts its
    factors) or ``forward`` (one plain streamed forward returning the logits, as ``StreamedModel.forward``).

    Raises:
        ConfigError: unknown method, q < 1, (lowrank) q > 1 or rank < 1, or ``lora`` with a method other than
            mezo (``lora``: MeZO on LoRA adapters, the base frozen).
    """
    if q < 1:
        raise ConfigError("--q", f"{q}", "use 1 or more directions")
    if name == "lowrank" and (q != 1 or rank < 1):
        raise ConfigError("--q/--rank", f"q={q}, rank={rank}", "the low-rank plugin (hzo) takes q=1 and rank >= 1")
    table = {
        "mezo": Method("mezo", 2 * q, q + 1, True, f"MeZO, q={q} (workspace mode: {q} noise workspace(s) + 1 scratch)"),
        "lowrank": Method("lowrank", 2, 0, False, f"low-rank ZO (HZO factor mode, rank {rank}; its factors counted)",
                          plugin="hzo", options=(("rank", rank),)),
        "forward": Method("forward", 1, 0, False, "one forward pass, logits returned", loss=False),
    }
    if name not in table:
        raise ConfigError("--method", f"unknown method {name!r}", f"use one of {', '.join(table)}")
    if lora is not None:
        if name != "mezo":
            raise ConfigError("--peft lora", f"with --method {name}", "plan LoRA with --method mezo (MeZO on the "
                              "adapters)")
        return Method("mezo", 2 * q, q + 1, False, f"MeZO on LoRA adapters (rank {lora.rank}, "
                      f"{','.join(lora.targets)}; q={q}; base frozen: no write-back, no working copy)",
                      plugin="mezo", options=(("q", q),), lora=lora)
    return table[name]


@dataclass
class ModelSpec:
    """The model a plan is made for: its config (possibly cut to fewer layers), the block layout, the depth."""

    label: str
    config: Any
    dtype: str
    quant: str
    blocks: list[BlockEntry]          # embed, the largest decoder layer, head
    tied: dict[str, str]
    dedicated: frozenset[str]         # blocks that store a tied tensor (kept in their own slot)
    layers: int                       # depth the figures are for
    measured_layers: int | None = None  # depth of the source checkpoint/store when smaller than `layers`
    #: the streaming units per unit name (or why the family cannot split there), split once by accounting.units:
    #: a plan asks for them hundreds of times
    units_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def layer_block(self) -> BlockEntry:
        return next(b for b in self.blocks if b.name.startswith("layers."))

    def block_list(self) -> list[BlockEntry]:
        """Every block in execution order, the layer entry repeated ``layers`` times."""
        embed, head = self.blocks[0], self.blocks[-1]
        return [embed, *[self.layer_block] * self.layers, head]

    @property
    def stored_bytes(self) -> int:
        return self.blocks[0].nbytes + self.blocks[-1].nbytes + self.layer_block.nbytes * self.layers


@dataclass(frozen=True)
class Workload:
    """One training step: ``batch`` rows of ``seq`` tokens, ``scored`` positions scored (0: every position)."""

    batch: int = 1
    seq: int = 2048
    scored: int = 0
    prefetch: int = 1
    tier: str = "ram"
    attention: str = "sdpa"
    ram_cache_blocks: int = 0
    unit: str = "layer"

    def check(self) -> None:
        for name in ("batch", "seq", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}", f"{getattr(self, name)}", "use a positive integer")
        if not 0 <= self.scored <= self.batch * self.seq:
            raise ConfigError("--scored", f"{self.scored}", f"use 0 (every position) to {self.batch * self.seq}")
        if self.tier not in ("ram", "disk"):
            raise ConfigError("--tier", repr(self.tier), "use ram or disk")
        if self.attention not in ("sdpa", "eager"):
            raise ConfigError("--attention", repr(self.attention), "use sdpa or eager")
        if self.unit not in RUNTIME_UNITS:
            raise ConfigError("--unit", repr(self.unit), f"use one of {', '.join(RUNTIME_UNITS)}")
        if self.unit != "layer" and self.tier != "ram":
            raise ConfigError("--unit", f"{self.unit} with tier {self.tier}", "units finer than a layer: ram tier")

    @property
    def n_scored(self) -> int:
        return self.scored or self.batch * self.seq

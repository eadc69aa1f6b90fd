"""LoRA adapters on a frozen streamed base: the trainable tensors of a block are its adapters.

With adapters attached (:meth:`zoedge.runtime.streamed.StreamedModel.attach_lora`), the runtime shows every visitor
(an optimizer plugin, its extra phases, an evaluation) a block whose ``tensors`` are that block's adapter tensors
only; the stored base weights are bound as ``Resident.frozen``, read-only. What a pass sees of the adapters (a
plugin's θ ± εz of them) is combined with the base by :meth:`LoraAdapters.compose`: each target ``nn.Linear``
weight W becomes a :class:`LoraWeight`, whose ``F.linear`` computes PEFT's LoRA forward::

    y = x Wᵀ + b + (x Aᵀ Bᵀ) · (alpha / rank)        A [rank, in], B [out, rank]

W may be any form the runtime binds (a slot view, an int8 / nf4 :class:`~zoedge.runtime.dequantized.Dequantized`
view expanded just in time); A and B any form a plugin returns (tensors, just-in-time
:class:`~zoedge.runtime.perturbed.NoisePerturbed` views). So every plugin that works on ``block.tensors`` trains
the adapters unchanged, and the base is never perturbed, updated or written back.

Naming and layout are PEFT's: module ``model.layers.3.self_attn.q_proj`` gets ``…q_proj.lora_A.weight`` and
``…q_proj.lora_B.weight`` (the noise of a tensor is keyed by these names); targets match a module whose name is a
target or ends with ``.`` + target (PEFT's ``target_modules`` list rule). Adapters are fp32 on the model's device
(the LoRA branch runs in fp32 and is cast to the base output's dtype, as PEFT does).

Initialisation (PEFT's and MeZO's): A uniform in ±1/√in (kaiming-uniform with a = √5), drawn from a generator
seeded by (run seed, tensor name), so it is the same in every layout and on resume; B = 0, so the adapted model
starts as the base exactly. While B = 0 the loss does not depend on A (∂L/∂A = B ᵀ(…) = 0): a ZO perturbation of
A changes nothing, the projected gradient comes from B's perturbation alone, and A's first updates are a random
walk of size lr·g·z_A, while B moves along its (non-zero, since A ≠ 0) gradient estimate; once B ≠ 0, A receives
signal too. Nothing special is done for it: it is what MeZO's repository trains, and the demo's tuned lr accounts
for it (docs/lora.md).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoedge import output_dir
from zoedge.errors import ConfigError
from zoedge.runtime.rowview import call_formed
from zoedge.store.atomic import fsync_dir, write_durable
from zoedge.store.manifest import BlockEntry

#: PEFT's file names in an adapter directory
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
#: PEFT's prefix of a causal LM's adapter keys
PEFT_PREFIX = "base_model.model."
#: MeZO's repository's LoRA defaults (rank, alpha, target modules: attention query and value projections)
DEFAULT_RANK, DEFAULT_ALPHA, DEFAULT_TARGETS = 8, 16.0, ("q_proj", "v_proj")


@dataclass(frozen=True)
class LoraSpec:
    """What to attach: rank r, alpha (scaling alpha / r), target module name patterns; dropout is 0 (ZO passes
    must see the same function)."""

    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError("--lora-rank", f"{self.rank}", "use a positive rank (e.g. 8)")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError("--lora-alpha", f"{self.alpha}", "use a positive alpha (e.g. 16)")
        if not self.targets or any(not t for t in self.targets):
            raise ConfigError("--lora-targets", f"{','.join(self.targets)!r}",
                              "give comma-separated module names, e.g. q_proj,v_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @staticmethod
    def parse_targets(text: str) -> tuple[str, ...]:
        """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``."""
        return tuple(t.strip() for t in text.split(",") if t.strip())

    def matches(self, module: str) -> bool:
        """PEFT's rule for a list of target modules: the module's name is a target or ends with ``.target``."""
        return any(module == t or module.endswith("." + t) for t in self.targets)


class LoraWeight(torch.Tensor):
    """A target weight with its adapter: ``F.linear`` runs the base product then adds the LoRA branch (module
    docstring); any other op sees the merged matrix W + scaling · B A (formed whole)."""

    base: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @staticmethod
    def __new__(cls, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> LoraWeight:
        out = torch.Tensor._make_subclass(cls, base)
        out.base, out.a, out.b, out.scaling = base, a, b, scaling
        return out

    def materialize(self) -> torch.Tensor:
        """W + scaling · B A in W's dtype (allocates)."""
        w = self.base.materialize() if hasattr(self.base, "materialize") else self.base
        with torch._C.DisableTorchFunctionSubclass():
            a = self.a.materialize() if hasattr(self.a, "materialize") else self.a
            b = self.b.materialize() if hasattr(self.b, "materialize") else self.b
            return (w.float() + (b.float() @ a.float()) * self.scaling).to(w.dtype)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.data_ptr:  # the storage is the base's (the runtime keeps tied views by reference)
            return args[0].base.data_ptr()
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, LoraWeight) and not isinstance(x, LoraWeight):
                y = F.linear(x, w.base, bias)  # dispatch on: a Dequantized / perturbed base forms itself here
                lora = F.linear(F.linear(x.to(w.a.dtype), w.a), w.b)  # A, B may be just-in-time views
                with torch._C.DisableTorchFunctionSubclass():
                    return (y + lora * w.scaling).to(y.dtype)
        return call_formed(func, args, kwargs, LoraWeight)


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_a(shape: tuple[int, int], seed: int, name: str) -> torch.Tensor:
    """LoRA's A: uniform in ±1/√in (PEFT's kaiming_uniform(a=√5)), a pure function of (seed, name), fp32 on CPU."""
    g = torch.Generator().manual_seed(_seed_of(seed, name))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * bound


class LoraAdapters:
    """The adapters of a streamed model: per streaming unit, the A and B of every target ``nn.Linear`` in it.

    Args:
        spec: rank, alpha, targets.
        skeleton: the model's (meta) module tree, to find the ``nn.Linear`` modules.
        blocks: the streaming units, in order.
        aliases: tied alias -> stored tensor (a tied weight cannot be a target).
        device: where the adapters live.
        seed: seeds A's initialisation.

    Raises:
        ConfigError: a target matches no ``nn.Linear`` of the model, or matches a tied weight.
    """

    def __init__(self, spec: LoraSpec, skeleton: nn.Module, blocks: Sequence[BlockEntry], aliases: Mapping[str, str],
                 device: torch.device, seed: int = 0) -> None:
        self.spec, self.device, self.seed = spec, torch.device(device), seed
        linears = {name: m for name, m in skeleton.named_modules() if isinstance(m, nn.Linear)}
        tied = set(aliases) | set(aliases.values())
        self.tensors: dict[str, torch.Tensor] = {}
        self.of_unit: dict[str, list[str]] = {}
        self.targets: dict[str, tuple[str, str]] = {}  # base weight name -> (A name, B name)
        self.modules: list[str] = []
        for unit in blocks:
            names = []
            for t in unit.tensors:
                module = t.name.removesuffix(".weight")
                if not t.name.endswith(".weight") or module not in linears or not spec.matches(module):
                    continue
                if t.name in tied:
                    raise ConfigError("--lora-targets", f"{module} is tied to another weight ({t.name})",
                                      "target other modules (e.g. q_proj,v_proj)")
                out_f, in_f = int(t.shape[0]), int(t.shape[1])
                a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
                self.tensors[a] = init_a((spec.rank, in_f), seed, a).to(self.device)
                self.tensors[b] = torch.zeros(out_f, spec.rank, dtype=torch.float32, device=self.device)
                self.targets[t.name] = (a, b)
                self.modules.append(module)
                names += [a, b]
            self.of_unit[unit.name] = names
        if not self.targets:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError("--lora-targets", f"{','.join(spec.targets)!r} matches no nn.Linear of the model",
                              f"use module names such as {','.join(kinds)}")

    # ------------------------------------------------------------------ runtime
    def of(self, unit: str) -> dict[str, torch.Tensor]:
        """The adapter tensors of streaming unit ``unit`` (the trained tensors themselves: updated in place)."""
        return {n: self.tensors[n] for n in self.of_unit.get(unit, [])}

    def nbytes_total(self) -> int:
        """Bytes of every adapter tensor."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def nbytes(self, unit: str) -> int:
        return sum(self.tensors[n].numel() * self.tensors[n].element_size() for n in self.of_unit.get(unit, []))

    def compose(self, frozen: Mapping[str, torch.Tensor], seen: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A unit's weights for one pass: the base ``frozen``, each target weight wrapped with what the pass sees
        of its adapter (``seen``: the visitor's tensors of the unit)."""
        out = dict(frozen)
        for w, (a, b) in self.targets.items():
            if w in out:
                out[w] = LoraWeight(out[w], seen[a], seen[b], self.spec.scaling)
        return out

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors (CPU copies)."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self.tensors.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], where: str | Path = "checkpoint") -> None:
        """Overwrite the adapters with ``state`` (same names and shapes).

        Raises:
            ConfigError: a tensor is missing or has the wrong shape.
        """
        for n, t in self.tensors.items():
            value = state[n] if n in state else None
            if value is None or tuple(value.shape) != tuple(t.shape):
                got = tuple(value.shape) if value is not None else "missing"
                raise ConfigError(where, f"adapter tensor {n} is {got}, the model's adapters need {tuple(t.shape)}",
                                  "use adapters made for this model with the same rank and targets (--lora-rank, "
                                  "--lora-targets; a resume: the checkpointed run's)")
            t.copy_(value)

    def merged(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (base tensor ``name``) with its adapter merged: W + scaling · B A (unchanged if no target)."""
        if name not in self.targets:
            return weight
        a, b = (self.tensors[n].detach().cpu() for n in self.targets[name])
        return (weight.float() + (b @ a) * self.spec.scaling).to(weight.dtype)

    # ------------------------------------------------------------------ PEFT
    def peft_config(self, base_model: str = "") -> dict[str, Any]:
        """``adapter_config.json`` of these adapters (PEFT LoRA, causal LM)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.spec.rank, "lora_alpha": self.spec.alpha,
                "lora_dropout": 0.0, "target_modules": sorted({m.rsplit(".", 1)[-1] for m in self.modules}),
                "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
                "base_model_name_or_path": base_model}

    def save_peft(self, out: str | Path, base_model: str = "") -> Path:
        """Write a PEFT adapter directory that ``peft.PeftModel.from_pretrained(base, out)`` loads."""
        state = {PEFT_PREFIX + n: t for n, t in self.state_dict().items()}
        return write_peft_dir(out, state, self.peft_config(base_model))

    def load_peft(self, directory: str | Path) -> None:
        """Load a PEFT LoRA directory written for the same model, rank and targets (``zoedge eval --adapter``).

        Raises:
            ConfigError: unreadable, not LoRA, or tensors that do not match these adapters.
        """
        state = read_peft_dir(directory)[1]
        self.load_state_dict({k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}, directory)


def write_peft_dir(out: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in ``out``, written and fsynced in a temporary sibling
    that is then exchanged with ``out`` (a kill leaves the old adapter or the new one, whole).

    Raises:
        ConfigError: ``out`` exists and is not an adapter directory (it is never replaced).
    """
    from safetensors.torch import save
    out = Path(out)
    if out.exists() and not (out / CONFIG_NAME).is_file():
        raise ConfigError(str(out), f"exists and is not a PEFT adapter directory (no {CONFIG_NAME})",
                          "give a new path for the adapter")
    tmp = out.with_name(out.name + ".tmp")
    output_dir.remove(tmp)  # a killed earlier write
    tmp.mkdir(parents=True)
    write_durable(tmp / WEIGHTS_NAME, save({k: v.contiguous() for k, v in state.items()}))
    write_durable(tmp / CONFIG_NAME, json.dumps(dict(config), indent=2).encode())
    fsync_dir(tmp)
    output_dir.replace_dir(tmp, out)
    return out


def read_peft_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT LoRA directory.

    Raises:
        ConfigError: the directory or a file is missing or unreadable, or the adapter is not LoRA.
    """
    from safetensors.torch import load_file
    d = Path(directory)
    try:
        config = json.loads((d / CONFIG_NAME).read_text())
        state = load_file(str(d / WEIGHTS_NAME))
    except (OSError, ValueError) as e:
        raise ConfigError("--adapter", f"{d} is not a readable PEFT adapter directory ({e})",
                          f"give a directory holding {CONFIG_NAME} and {WEIGHTS_NAME} (e.g. a finetune run's "
                          "OUTPUT/adapter)") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError("--adapter", f"{d} holds a {config.get('peft_type')!r} adapter", "give a LoRA adapter")
    return config, state


def attach_peft_dir(model: Any, directory: str | Path) -> LoraAdapters:
    """Attach the adapters of a PEFT LoRA directory to a streamed ``model`` (its base), with their trained values.

    Raises:
        ConfigError: the directory is unreadable or not LoRA, or its tensors do not fit ``model``.
    """
    config, state = read_peft_dir(directory)
    lora = model.attach_lora(spec_of_peft(config))
    lora.load_state_dict({k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}, directory)
    return lora


def spec_of_peft(config: Mapping[str, Any]) -> LoraSpec:
    """The :class:`LoraSpec` an ``adapter_config.json`` describes."""
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        raise ConfigError("--adapter", f"target_modules is a pattern ({targets!r})", "give a list of module names")
    return LoraSpec(int(config["r"]), float(config["lora_alpha"]), tuple(targets))

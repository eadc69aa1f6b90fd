"""Export a low-rank fine-tuning delta as a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

The delta of every changed ``nn.Linear`` weight, Δ = W_trained − W_base (m×n), is factored as Δ = B A with
B [m, r], A [r, n] (a truncated SVD, computed in float64); PEFT adds ``scaling · B A`` with
``scaling = lora_alpha / r = 1``. The export is exact when every Δ has rank ≤ r, as HZO's factor mode
guarantees within one period (Δ = A_period Vᵀ, rank ≤ its ``rank``); otherwise it refuses, naming the tensor
and the relative error, unless a tolerance is given. Tensors that a LoRA adapter cannot hold (embeddings,
norms, biases) must be unchanged (e.g. HZO with ``vector=frozen`` and ``freeze=embed``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from zoedge.errors import ConfigError


def lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B [m, rank], A [rank, n] with B A ≈ ``delta``, and the relative Frobenius error of that approximation."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    total = float(s.norm())
    err = float(s[k:].norm()) / total if total > 0 else 0.0
    return b.to(delta.dtype), a.to(delta.dtype), err


def linear_weights(config: object) -> dict[str, str]:
    """``{weight tensor name: module name}`` of every ``nn.Linear`` of the model ``config`` describes (meta device)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {f"{name}.weight": name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def export_peft_adapter(base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], config: object,
                        out: str | Path, rank: int, base_model: str = "", tolerance: float = 1e-5) -> Path:
    """Write the trained-minus-base delta as a PEFT LoRA adapter in ``out``; returns ``out``.

    Args:
        base: the base weights (e.g. a fresh ``zoedge.load(store).state_dict()``).
        trained: the fine-tuned weights (``model.state_dict()`` after training).
        config: the model's transformers config.
        out: adapter directory (created).
        rank: LoRA rank r.
        base_model: recorded as ``base_model_name_or_path``.
        tolerance: largest relative error of a rank-r factorisation accepted.

    Raises:
        ConfigError: a changed tensor is not an ``nn.Linear`` weight, a delta is not rank ≤ r within
            ``tolerance``, or nothing changed.
    """
    linears = linear_weights(config)
    changed = [n for n in trained if n in base and not torch.equal(trained[n], base[n])]
    other = [n for n in changed if n not in linears]
    if other:
        raise ConfigError("LoRA export", f"tensors a LoRA adapter cannot hold were trained: {other[:4]}"
                          f"{' ...' if len(other) > 4 else ''}",
                          "freeze them during training (e.g. HZO --opt vector=frozen --opt freeze=embed) or "
                          "export the full model instead")
    if not changed:
        raise ConfigError("LoRA export", "no weight differs from the base", "train first")
    tensors: dict[str, torch.Tensor] = {}
    for n in changed:
        b, a, err = lora_factors(trained[n].float() - base[n].float(), rank)
        if err > tolerance:
            raise ConfigError(f"LoRA export of {n}", f"the delta is not rank {rank}: relative error {err:.2e} > "
                              f"{tolerance:.0e}", "raise the rank, or pass a larger tolerance")
        module = linears[n]
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
           "target_modules": sorted(linears[n] for n in changed), "bias": "none", "fan_in_fan_out": False,
           "inference_mode": True, "base_model_name_or_path": base_model}
    # each file written to a temporary name and renamed: a reader never sees half an adapter file
    save_file(tensors, str(out / "adapter_model.safetensors.tmp"))
    os.replace(out / "adapter_model.safetensors.tmp", out / "adapter_model.safetensors")
    (out / "adapter_config.json.tmp").write_text(json.dumps(cfg, indent=2))
    os.replace(out / "adapter_config.json.tmp", out / "adapter_config.json")
    return out


def factors_adapter(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], config: object, out: str | Path,
                    base_model: str = "") -> Path:
    """Write a plugin's exact factors (:meth:`~zoedge.optim.base.ZOOptimizer.lora_factors`: ΔW = B A per tensor)
    as a PEFT LoRA adapter in ``out`` (rank k, ``lora_alpha = k``: scaling 1; target modules by full name, so
    exactly the trained ones match); returns ``out``.

    Raises:
        ConfigError: a factored tensor is not an ``nn.Linear`` weight, or the tensors' ranks differ.
    """
    from zoedge.runtime.lora import PEFT_PREFIX, write_peft_dir
    linears = linear_weights(config)
    other = [n for n in factors if n not in linears]
    if other:
        raise ConfigError("LoRA export", f"tensors a LoRA adapter cannot hold were trained: {other[:4]}"
                          f"{' ...' if len(other) > 4 else ''}", "freeze them during training (e.g. HZO --opt "
                          "freeze=embed) or use the exported model instead")
    ranks = {int(b.shape[1]) for b, _ in factors.values()}
    if len(ranks) != 1:
        raise ConfigError("LoRA export", f"the factors have different ranks {sorted(ranks)}",
                          "train every tensor for the same periods, or use the exported model instead")
    tensors: dict[str, torch.Tensor] = {}
    for n, (b, a) in factors.items():
        tensors[f"{PEFT_PREFIX}{linears[n]}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PEFT_PREFIX}{linears[n]}.lora_B.weight"] = b.float().contiguous()
    (k,) = ranks
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": k, "lora_alpha": k, "lora_dropout": 0.0,
           "target_modules": sorted(linears[n] for n in factors), "bias": "none", "fan_in_fan_out": False,
           "inference_mode": True, "base_model_name_or_path": base_model}
    return write_peft_dir(out, tensors, cfg)

"""Named shapes of public models, and random-weight Hugging Face checkpoints of them.

A shape is the config of a published model (field values only, no weights). A
synthetic checkpoint of it, with fewer layers when the full depth does not fit
the machine, is what the memory and time figures are measured on: per-layer
figures do not depend on depth when the model streams.

Weights are N(0, 0.02) for matrices and 1 for vectors (norm weights; biases
too, which is harmless for memory and timing). The checkpoint is written one
safetensors shard per decoder layer, so memory stays at one layer's tensors.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoedge.errors import ConfigError
from zoedge.names import STORE_DTYPES

#: in a checkpoint being written (``OUT.synth-tmp``): what lets a later synth remove it as its own
SYNTH_MARKER = ".zoedge-synth"

_OPT = dict(model_type="opt", vocab_size=50272, word_embed_proj_dim=None, tie_word_embeddings=True,
            max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=2, do_layer_norm_before=True)
_LLAMA2 = dict(model_type="llama", vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096,
               rms_norm_eps=1e-5)


def _opt(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return {**_OPT, "hidden_size": hidden, "ffn_dim": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "word_embed_proj_dim": hidden}


#: name -> config fields of the published model (``model_type`` selects the transformers config class).
SHAPES: dict[str, dict[str, Any]] = {
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "opt-175b": _opt(12288, 96, 96),
    "llama-2-7b": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-2-13b": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-2-70b": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8},
    "qwen2-72b": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                      tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, use_sliding_window=False),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5),
}
#: older spellings still accepted
ALIASES = {"llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b", "llama2-70b": "llama-2-70b"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


def shape_name(name: str) -> str:
    """The canonical shape name (aliases resolved).

    Raises:
        ConfigError: unknown shape (lists the known ones).
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SHAPES:
        raise ConfigError("SHAPE", f"unknown shape {name!r}", f"use one of {', '.join(SHAPES)}")
    return key


def shape_config(name: str, layers: int | None = None):
    """The transformers config of a named shape, with ``layers`` decoder layers (default: the model's own)."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape_name(name)])
    if layers is not None:
        if layers < 1:
            raise ConfigError("--layers", f"{layers}", "use 1 or more")
        fields["num_hidden_layers"] = layers
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.architectures = [_architecture(config.model_type)]
    return config


def _architecture(model_type: str) -> str:
    return {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]


def write_checkpoint(shape: str, out: str | Path, layers: int | None = None, dtype: str = "fp32", seed: int = 0,
                     tokenizer_from: str | Path | None = None, progress: bool = True,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write a random-weight checkpoint of ``shape`` into ``out`` (one shard per decoder layer).

    Args:
        shape: a name from :data:`SHAPES`.
        out: directory to create (absent or empty; the checkpoint is written beside it and renamed into place).
        layers: decoder layers (default: the full depth).
        dtype: stored dtype (fp32, fp16, bf16).
        seed: weight seed.
        tokenizer_from: copy the tokenizer files of this directory (so ``zoedge finetune`` can run on it).

    Returns:
        A summary: shape, layers, parameters, bytes, and the full model's parameters for extrapolation.

    Raises:
        ConfigError: unknown shape or dtype, ``out`` is not an empty directory, or ``out.synth-tmp`` is not synth's.
    """
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from zoedge.store.manifest import dtype_of

    if dtype not in STORE_DTYPES:
        raise ConfigError("--dtype", repr(dtype), f"use one of {', '.join(STORE_DTYPES)}")
    torch_dtype = dtype_of(dtype)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never writes among files it did not write
        raise ConfigError("OUT", f"{out} exists and is not an empty directory", "choose a new directory")
    tmp = out.with_name(out.name + ".synth-tmp")  # filled, then renamed to OUT: a kill leaves no half checkpoint
    if tmp.exists():
        if not (tmp / SYNTH_MARKER).is_file():
            raise ConfigError("OUT", f"{tmp} exists and was not written by zoedge synth", "move it, or choose another OUT")
        shutil.rmtree(tmp)  # a killed earlier synth's
    name = shape_name(shape)
    config = shape_config(name, layers)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    shards: dict[int, list[str]] = {}  # shard 0: everything outside the decoder layers; shard i+1: layer i
    for n in shapes:
        parts = n.split(".")
        shards.setdefault(int(parts[parts.index("layers") + 1]) + 1 if "layers" in parts else 0, []).append(n)
    tmp.mkdir(parents=True)
    (tmp / SYNTH_MARKER).touch()
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    nbytes = 0
    for idx, names in tqdm(sorted(shards.items()), desc=f"synth {name}", unit="shard", disable=not progress):
        fname = f"model-{idx:05d}.safetensors"
        tensors = {}
        for n in names:
            t = torch.empty(shapes[n], dtype=torch_dtype)
            if len(shapes[n]) > 1:
                t.normal_(0.0, 0.02, generator=g)
            else:
                t.fill_(1.0)
            tensors[n] = t
            weight_map[n] = fname
            nbytes += t.numel() * t.element_size()
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, indent=1))
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_from) / f).is_file():
                shutil.copy2(Path(tokenizer_from) / f, tmp / f)
    config.dtype = torch_dtype
    config.save_pretrained(tmp)
    tmp.rename(out)  # one rename(2), which also replaces an empty OUT: a kill leaves no OUT or the whole checkpoint
    (out / SYNTH_MARKER).unlink()  # kept until now: a kill before the rename leaves a leftover the next synth removes
    params = sum(math.prod(s) for s in shapes.values())
    full = full_parameters(name)
    summary = {"shape": name, "layers": config.num_hidden_layers, "full_layers": SHAPES[name]["num_hidden_layers"],
               "parameters": params, "full_parameters": full, "dtype": dtype, "bytes": nbytes, "out": str(out)}
    log(f"wrote {name} ({config.num_hidden_layers} of {summary['full_layers']} layers, {params / 1e9:.3f} G params "
        f"of {full / 1e9:.1f} G, {dtype}, {nbytes / 2**30:.2f} GiB) -> {out}")
    return summary


def parameters_by_block(config) -> dict[str, int]:
    """Parameters of ``embed``, one decoder layer (``layer``) and ``head`` (tied weights counted once)."""
    from zoedge.adapters import adapter_for
    import torch

    adapter = adapter_for(config, torch.float16, "meta")
    out = {"embed": 0, "layer": 0, "head": 0}
    for n, shp in adapter.expected_shapes().items():
        block = adapter.block_of(n)
        if block == "layers.0":
            out["layer"] += math.prod(shp)
        elif block in ("embed", "head"):
            out[block] += math.prod(shp)
    return out


def full_parameters(name: str) -> int:
    """Parameters of the full-depth model of a named shape (from a 1-layer skeleton: no weights needed)."""
    p = parameters_by_block(shape_config(name, 1))
    return p["embed"] + p["head"] + p["layer"] * SHAPES[shape_name(name)]["num_hidden_layers"]

#!/usr/bin/env python
"""Write a random-weights Hugging Face checkpoint of a named real shape (for benchmarks without downloads).

Shapes are those of public models (config fields only; weights are N(0, 0.02), norms 1):

* ``smollm2-135m``: SmolLM2-135M (Llama family, hidden 576, 30 layers, tied embeddings);
* ``llama2-7b``: Llama-2-7B (hidden 4096, ffn 11008, 32 layers, vocab 32000);
* ``opt-1.3b``: OPT-1.3B (hidden 2048, 24 layers, tied).

``--layers`` overrides the depth (e.g. a 4-layer slice of a 7B-wide model). The checkpoint is written one
safetensors shard per block, so memory stays at one block; ``--tokenizer-from DIR`` copies a tokenizer
(e.g. the converted default model's) so that ``zoedge finetune --model OUT`` works on it.

Example::

    python tools/synth_checkpoint.py llama2-7b --layers 4 --dtype fp16 --out /tmp/llama7b-4l
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0),
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      tie_word_embeddings=False, max_position_embeddings=4096),
    "opt-1.3b": dict(model_type="opt", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                     num_attention_heads=32, word_embed_proj_dim=2048, tie_word_embeddings=True,
                     max_position_embeddings=2048, pad_token_id=1),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja")


def synth_config(shape: str, layers: int | None = None):
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def write_checkpoint(shape: str, out: Path, layers: int | None = None, dtype: str = "fp32", seed: int = 0,
                     tokenizer_from: Path | None = None) -> Path:
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = synth_config(shape, layers)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    # one shard per decoder layer (by the "layers.<i>." component of the name), everything else in shard 0
    shards: dict[int, list[str]] = {}
    for n in shapes:
        parts = n.split(".")
        idx = int(parts[parts.index("layers") + 1]) + 1 if "layers" in parts else 0
        shards.setdefault(idx, []).append(n)
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for idx, names in sorted(shards.items()):
        fname = f"model-{idx:05d}.safetensors"
        tensors = {}
        for n in names:
            t = torch.empty(shapes[n], dtype=torch.float32)
            t.normal_(0.0, 0.02, generator=g) if len(shapes[n]) > 1 else t.fill_(1.0)
            tensors[n] = t.to(DTYPES[dtype])
            weight_map[n] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_from / f).is_file():
                shutil.copy2(tokenizer_from / f, out / f)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"wrote {shape} ({config.num_hidden_layers} layers, {n / 1e9:.3f} G params, {dtype}) -> {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-from", type=Path, default=None)
    a = p.parse_args(argv)
    write_checkpoint(a.shape, a.out, a.layers, a.dtype, a.seed, a.tokenizer_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())

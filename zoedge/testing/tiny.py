"""Tiny random models of every supported family, saved as HF checkpoints (fixed seeds), a dependency-free
tokenizer for them and a toy task: what plugin tests train on (see :mod:`zoedge.testing`)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

FAMILIES = ("llama", "mistral", "qwen2", "opt")


def tiny_config(family: str, layers: int = 3, tie: bool | None = None):
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=64)
    if family == "llama":
        return LlamaConfig(**common, intermediate_size=64, num_key_value_heads=2,
                           tie_word_embeddings=True if tie is None else tie)
    if family == "mistral":
        return MistralConfig(**common, intermediate_size=64, num_key_value_heads=2, sliding_window=4,
                             tie_word_embeddings=bool(tie))
    if family == "qwen2":
        return Qwen2Config(**common, intermediate_size=64, num_key_value_heads=2, use_sliding_window=True,
                           sliding_window=4, max_window_layers=1, tie_word_embeddings=bool(tie))
    if family == "opt":
        return OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=16, pad_token_id=1,
                         tie_word_embeddings=True if tie is None else tie)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw)).eval()
    with torch.no_grad():  # random init gives near-zero norms/biases: spread them so every tensor matters
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny(family: str, directory: Path, seed: int = 0, **kw) -> torch.nn.Module:
    model = tiny_model(family, seed, **kw)
    model.save_pretrained(directory)
    return model


def batch(vocab: int = 97, b: int = 3, t: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with left padding of different lengths per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    for r in range(b):
        pad = (r * 2) % (t - 2)
        mask[r, :pad] = 0
        ids[r, :pad] = 1
    return ids, mask


def resident_logits(model, ids, mask) -> torch.Tensor:
    """The HF model's logits with the positions zoedge uses (cumsum(mask) - 1; OPT computes them itself)."""
    with torch.no_grad():
        if model.config.model_type == "opt":
            return model(input_ids=ids, attention_mask=mask).logits
        pos = mask.cumsum(-1) * mask - 1
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


class CharTokenizer:
    """A dependency-free tokenizer for tiny models: one id per character (ids 2..96), pad = 1."""

    pad_token_id = 1
    eos_token_id = 1

    def __call__(self, texts, add_special_tokens: bool = True):
        return {"input_ids": [[ord(c) % 95 + 2 for c in t] for t in texts]}


def toy_examples(n: int = 40, seed: int = 0):
    """A small classification task for tiny models."""
    import random

    from zoedge.train.tasks import Example

    rng = random.Random(seed)
    words = ["good", "bad", "fine", "poor", "nice", "sad"]
    out = []
    for i in range(n):
        w = rng.choice(words)
        out.append(Example(f"{w} {i} is", (" no", " yes"), int(words.index(w) % 2 == 0)))
    return out

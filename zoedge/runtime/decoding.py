"""Decoding through the streamed runtime, with the KV cache kept beside the layers.

The prefill is one streamed pass over the prompts; every new token is one more streamed pass over that token
alone. The keys and values live in a transformers ``DynamicCache`` that the model's own attention modules fill:
the runtime hands it to every decoder layer (:meth:`~zoedge.adapters.base.Adapter.begin`), and layer ``i``'s
attention appends to, and reads, entry ``i`` of it while layer ``i``'s weights are resident::

    pass t   : embed(token t) -> layer 0 [cache[0] += k,v; attend] -> layer 1 [cache[1] ...] -> ... -> head
    pass t+1 : embed(token t+1) -> layer 0 [cache[0] ...] -> ...

So a layer's cache is touched exactly when its weights are. On an accelerator the cache is transformers'
offloaded ``DynamicCache`` (``offloading=True``): a layer's keys and values wait in host memory and are
prefetched to the device while the layer before computes, then offloaded again, so the device holds about one
layer's cache at a time as it holds about one layer's weights: a model larger than the device can be sampled.
On the CPU the cache is simply in host memory.

Token choice follows transformers' ``generate``: greedy is the argmax of the float32 logits; sampling applies
its logits warpers (temperature, top-k, top-p, in that order) and draws with ``torch.multinomial``. A row ends at
an end-of-sequence token (kept) or when the caller's ``stop`` says so; finished rows are fed the pad token, as
transformers does, until every row has ended or ``max_new_tokens`` are reached.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zoedge.runtime.resident import Forward
from zoedge.runtime.streamed import StreamedModel


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    ``temperature`` 0: greedy (the most likely token). Above 0: sampled from the distribution after temperature,
    top-k (``top_k`` most likely tokens; 0: off) and top-p (the smallest set whose probability reaches ``top_p``;
    1: off), drawn with a CPU generator seeded with ``seed``, so the same seed gives the same tokens.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self):  # -> transformers.LogitsProcessorList
        """transformers' own logits warpers for these knobs, in the order its ``generate`` applies them."""
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
        out = LogitsProcessorList()
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        return out


@dataclass
class Decoded:
    """What :func:`decode` produced.

    Attributes:
        tokens: per row, the generated ids, through the end-of-sequence token that ended the row, if any.
        ended: per row, why it ended: ``"eos"``, ``"stop"`` (the caller's ``stop``) or ``"length"``.
        prefill_seconds: the prompts' pass and the choice of the first tokens.
        decode_seconds: the passes of the later tokens.
        passes: streamed passes run (the prefill included).
    """

    tokens: list[list[int]]
    ended: list[str]
    prefill_seconds: float
    decode_seconds: float
    passes: int


class _Decode(Forward):
    """The plain forward, its layers one after another (the cache holds every row of the batch)."""

    concurrent = False


def new_cache(model: StreamedModel):  # -> transformers.DynamicCache
    """An empty KV cache for ``model``: in host memory on the CPU; offloaded to host memory, one layer on the device
    at a time, on an accelerator."""
    from transformers import DynamicCache
    return DynamicCache(config=model.config, offloading=model.device.type != "cpu")


def decode(model: StreamedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           sampling: Sampling = Sampling(), eos_ids: Sequence[int] = (), pad_id: int = 0,
           stop: Callable[[int, list[int]], bool] | None = None) -> Decoded:
    """Generate up to ``max_new_tokens`` after each row of the left-padded ``input_ids`` ([B, T]; ``attention_mask``
    1 for tokens, 0 for padding).

    Args:
        eos_ids: tokens that end a row (kept in its output).
        pad_id: what finished rows are fed until every row has ended.
        stop: ``stop(row, tokens)`` after each new token of an unfinished row: True ends the row.
    """
    b, t = input_ids.shape
    generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed)
    warpers = None if sampling.greedy else sampling.warpers()
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long)
    cache = new_cache(model)
    ids, mask = input_ids.cpu(), attention_mask.cpu().long()
    seen = ids  # every token so far (the warpers of some transformers versions read it)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' generate: padding at position 0
    tokens: list[list[int]] = [[] for _ in range(b)]
    ended = ["length"] * b
    alive = torch.ones(b, dtype=torch.bool)
    started = time.perf_counter()
    prefill = decoding = 0.0
    passes = 0
    for step in range(max_new_tokens):
        n = ids.shape[1]
        select = torch.arange(b) * n + (n - 1)  # the head computes the last position's logits only
        # no padding: no mask at all (transformers' generate drops it too; attention then takes its causal path)
        logits = model.run(_Decode(), ids, None if bool(mask.all()) else mask, positions[:, -n:], select,
                           cache=cache)[0]
        passes += 1
        logits = logits.to(device="cpu", dtype=torch.float32)
        if warpers is None:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(warpers(seen, logits), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        for r in torch.nonzero(alive).flatten().tolist():
            tokens[r].append(int(nxt[r]))
            if eos.numel() and bool((eos == nxt[r]).any()):
                alive[r], ended[r] = False, "eos"
            elif stop is not None and stop(r, tokens[r]):
                alive[r], ended[r] = False, "stop"
        now = time.perf_counter()
        if step == 0:
            prefill = now - started
        if not bool(alive.any()) or step == max_new_tokens - 1:
            break
        ids = nxt.unsqueeze(1)
        seen = torch.cat([seen, ids], dim=1)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    decoding = time.perf_counter() - started - prefill
    return Decoded(tokens, ended, prefill, decoding, passes)


def end_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the model's generation config's ``eos_token_id`` (what transformers'
    ``generate`` uses), else its config's, else the tokenizer's."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model.store).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

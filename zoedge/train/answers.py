"""Answer metrics of generation-style layouts: greedy decoding, exact match and token F1.

The scores follow SQuAD's evaluation script, as MeZO's repository scores SQuAD and DROP: both strings are
normalised (lower case, punctuation removed, the articles a / an / the removed, whitespace collapsed); exact
match is 1 when the normalised strings are equal; token F1 is the harmonic mean of precision and recall of the
normalised tokens (bag of words). A prediction and a reference both empty after normalisation score 1.

Greedy decoding here is the plain loop: every new token is one forward pass of the streamed model over the rows
so far (no KV cache), the rows of a batch stopping at EOS one by one.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["normalize_answer", "exact_match", "token_f1", "greedy_decode", "MAX_NEW_TOKENS", "EXTRA_NEW_TOKENS"]

#: decoding stops at EOS, or after the batch's longest reference (in tokens) plus EXTRA_NEW_TOKENS, at most this
MAX_NEW_TOKENS = 64
EXTRA_NEW_TOKENS = 4
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Token F1 of the normalised strings (bag of words)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def greedy_decode(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                  max_length: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` by the streamed model's *current* weights (flush first).

    A prompt row is BOS (if the tokenizer adds one) + the prompt's tokens, as in training rows; a row longer than
    ``max_length`` loses tokens from its left (after BOS). Special tokens are left out of the decoded text.
    """
    from zoedge.runtime.streamed import Forward
    from zoedge.train.batching import _ids, _left_padded, _pad_id

    prefix = _ids(tokenizer, [""], special=True)[0]
    rows = [prefix + ids for ids in _ids(tokenizer, list(prompts), special=False)]
    eos, pad = getattr(tokenizer, "eos_token_id", None), _pad_id(tokenizer)
    out: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    for _ in range(max_new_tokens):
        if not active:
            break
        batch = []
        for i in active:
            ids = rows[i]
            if max_length and len(ids) > max_length:
                keep = len(prefix)
                ids = ids[:keep] + ids[len(ids) - (max_length - keep):]
            batch.append(ids)
        input_ids, mask = _left_padded(batch, pad, 1)
        T = input_ids.shape[1]
        select = torch.arange(len(batch), dtype=torch.long) * T + (T - 1)
        dev = model.device
        (nxt,) = model.run(Forward(), input_ids.to(dev), mask.to(dev), select=select.to(dev),
                           head_fn=lambda p, logits: logits.argmax(dim=-1))
        still = []
        for i, token in zip(active, nxt.tolist()):
            if token == eos:
                continue
            out[i].append(token)
            rows[i].append(token)
            still.append(i)
        active = still
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in out]

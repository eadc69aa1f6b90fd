"""Answer metrics of generation-style layouts: greedy decoding, exact match and token F1.

The scores follow SQuAD's evaluation script, as MeZO's repository scores SQuAD and DROP: both strings are
normalised (lower case, punctuation removed, the articles a / an / the removed, whitespace collapsed); exact
match is 1 when the normalised strings are equal; token F1 is the harmonic mean of precision and recall of the
normalised tokens (bag of words). A prediction and a reference both empty after normalisation score 1.

Greedy decoding is :func:`zoedge.runtime.decoding.decode` (the streamed runtime with a per-layer KV cache), the
rows of a batch stopping at EOS one by one.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

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
    """Greedy continuations of ``prompts`` by the streamed model's *current* weights (flush first), through
    :func:`zoedge.runtime.decoding.decode` (the streamed runtime with a KV cache).

    A prompt row is BOS (if the tokenizer adds one) + the prompt's tokens, as in training rows; a row longer than
    ``max_length`` loses tokens from its left (after BOS). A row ends at the model's or the tokenizer's EOS;
    special tokens are left out of the decoded text.
    """
    from zoedge.runtime.decoding import end_tokens
    from zoedge.runtime.decoding import decode
    from zoedge.train.batching import _ids, _left_padded, _pad_id

    prefix = _ids(tokenizer, [""], special=True)[0]
    rows = []
    for ids in _ids(tokenizer, list(prompts), special=False):
        ids = prefix + ids
        if max_length and len(ids) > max_length:
            ids = prefix + ids[len(ids) - (max_length - len(prefix)):]
        rows.append(ids)
    pad = _pad_id(tokenizer)
    eos = set(end_tokens(model, tokenizer)) | ({tokenizer.eos_token_id} - {None})
    input_ids, mask = _left_padded(rows, pad, 1)
    out = decode(model, input_ids, mask, max_new_tokens, eos_ids=sorted(eos), pad_id=pad)
    return [tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True) for ids in out.tokens]

"""Collation of examples into token batches, and the candidate-scoring loss.

One row per (example, candidate): ``prompt ids + candidate ids``, LEFT padded so
that every row ends at the last column. Prompt and candidate are tokenized
separately and concatenated, so the scored tokens are exactly the candidate's
own tokenization (no BOS in the middle); the prompt is truncated from the left
(after a leading BOS, if the tokenizer adds one) when a row exceeds
``max_length``.

The logits at position ``p`` predict token ``p + 1``: ``target_index`` holds
the flat ``row * T + p`` of the position *before* each candidate token, so a
caller gathers only those hidden states (``select_targets``), applies the LM
head to ``N`` rows instead of ``R * T`` and calls
:func:`token_logprobs_from_logits` then :func:`candidate_loss`.

Left padding shifts absolute positions: pass :meth:`Batch.position_ids` to the
model (OPT derives them from the mask itself; RoPE models are shift-invariant
only up to rounding).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from zoedge.errors import DataError
from zoedge.train.tasks import Example


@dataclass
class Batch:
    """A collated batch; ``R`` rows of length ``T``, ``N`` scored tokens, ``E`` examples.

    With shared prompts (see :func:`collate`) the input has one row per example while the scored rows
    (``row_example``, ``row_candidate``) stay one per candidate.

    ``row_candidate`` ([R], candidate index of each row) and ``max_candidates`` are
    derived from ``row_example`` when not given, so the loss needs no host sync.
    """

    input_ids: torch.Tensor  # [R, T] int64, left padded
    attention_mask: torch.Tensor  # [R, T] int64, 1 = real token
    target_index: torch.Tensor  # [N] int64, flat index into R*T of the predicting position
    target_ids: torch.Tensor  # [N] int64, the candidate tokens being scored
    target_row: torch.Tensor  # [N] int64, scored row (one per candidate) of each scored token
    row_example: torch.Tensor  # [R] int64, example of each scored row (rows of an example are contiguous)
    labels: torch.Tensor  # [E] int64, gold candidate index
    num_candidates: torch.Tensor  # [E] int64
    kind: str  # "classification" | "generation"
    n_tokens: int  # real (non-pad) tokens, for tokens/s
    row_candidate: torch.Tensor | None = None  # [R] int64, candidate index of each row
    max_candidates: int = 0

    def __post_init__(self) -> None:
        if self.row_candidate is None:
            counts = self.num_candidates.tolist()
            self.row_candidate = torch.tensor([c for n in counts for c in range(n)], dtype=torch.long,
                                              device=self.row_example.device)
        if not self.max_candidates:
            self.max_candidates = int(self.num_candidates.max()) if self.num_candidates.numel() else 0

    @property
    def num_rows(self) -> int:
        """R, the number of sequences."""
        return self.input_ids.shape[0]

    @property
    def num_examples(self) -> int:
        """E, the number of examples."""
        return self.labels.shape[0]

    def position_ids(self) -> torch.Tensor:
        """[R, T] positions counted from each row's first real token (pads get 0)."""
        return (self.attention_mask.cumsum(-1) - 1).clamp_(min=0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy every tensor to ``device``; returns a new Batch."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
        return Batch(**moved)


def _ids(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise DataError("tokenizer", "has neither a pad_token_id nor an eos_token_id",
                        "set tokenizer.pad_token (any id works: pads are masked)")
    return int(pad)


def collate(tokenizer: Any, examples: Sequence[Example], max_length: int | None = None,
            pad_to_multiple_of: int = 1, share_prompts: bool = False) -> Batch:
    """Tokenize and left-pad examples into one :class:`Batch`.

    Args:
        tokenizer: a Hugging Face tokenizer (``__call__`` with ``add_special_tokens``).
        examples: all of one kind; classification rows hold every candidate of an
            example, generation one row with the answer.
        max_length: row length cap; the prompt loses tokens from its left.
        pad_to_multiple_of: round ``T`` up (fixed shapes help allocator reuse).
        share_prompts: when every candidate of a classification batch is a single token, use one row per
            example (the prompt alone) and score every candidate at its last position: the same
            log-probabilities (causal attention) for 1/C of the compute. Otherwise ignored.

    Returns:
        The batch (CPU tensors).

    Raises:
        DataError: empty or mixed-kind examples, a candidate that tokenizes to nothing,
            an empty prompt, or a candidate too long for ``max_length``.
    """
    if not examples:
        raise DataError("batch", "has no examples", "pass at least one example")
    kinds = {e.kind for e in examples}
    if len(kinds) > 1:
        raise DataError("batch", f"mixes kinds {sorted(kinds)}", "collate classification and "
                        "generation examples separately")
    if max_length is not None and max_length < 2:
        raise DataError("max_length", f"is {max_length}", "give at least 2 (one prompt, one target token)")
    if pad_to_multiple_of < 1:
        raise DataError("pad_to_multiple_of", f"is {pad_to_multiple_of}", "give an integer >= 1")
    pad_id = _pad_id(tokenizer)
    if examples[0].kind == "generation":
        return _collate_generation(tokenizer, examples, max_length, pad_to_multiple_of, pad_id)
    prefix = _ids(tokenizer, [""], special=True)[0]  # e.g. [bos] or []
    prompts = _ids(tokenizer, [e.prompt for e in examples], special=True)
    unique = sorted({c for e in examples for c in e.candidates})
    cand_ids = dict(zip(unique, _ids(tokenizer, unique, special=False)))

    if share_prompts and examples[0].kind == "classification" and all(len(v) == 1 for v in cand_ids.values()):
        return _collate_shared(examples, prompts, prefix, cand_ids, pad_id, max_length, pad_to_multiple_of)
    rows: list[list[int]] = []
    starts: list[int] = []  # index in the row of the first candidate token
    row_example: list[int] = []
    for i, (ex, p_ids) in enumerate(zip(examples, prompts)):
        keep = len(prefix) if p_ids[:len(prefix)] == prefix else 0
        if len(p_ids) == 0:
            raise DataError(f"example {i} ({ex.prompt!r})", "has a prompt that tokenizes to nothing and "
                            "the tokenizer adds no BOS", "give a non-empty prompt")
        for cand in ex.candidates:
            c_ids = cand_ids[cand]
            if not c_ids:
                raise DataError(f"example {i} candidate {cand!r}", "tokenizes to no tokens",
                                "use a candidate with visible text")
            head = p_ids
            over = len(p_ids) + len(c_ids) - max_length if max_length else 0
            if over > 0:
                droppable = len(p_ids) - max(keep, 1)
                if over > droppable:
                    raise DataError(f"example {i} candidate {cand!r}", f"needs {len(c_ids) + 1} tokens, "
                                    f"more than max_length={max_length} allows", "raise max_length")
                head = p_ids[:keep] + p_ids[keep + over:]
            rows.append(head + c_ids)
            starts.append(len(head))
            row_example.append(i)

    input_ids, attention_mask = _left_padded(rows, pad_id, pad_to_multiple_of)
    T = input_ids.shape[1]
    target_index: list[int] = []
    target_row: list[int] = []
    for r, (ids, start) in enumerate(zip(rows, starts)):
        offset = T - len(ids)  # left padding
        n_cand = len(ids) - start
        base = r * T + offset + start - 1  # position predicting the first candidate token
        target_index.extend(range(base, base + n_cand))
        target_row.extend([r] * n_cand)
    flat = input_ids.view(-1)
    index = torch.tensor(target_index, dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_index=index,
        target_ids=flat[index + 1].clone(),
        target_row=torch.tensor(target_row, dtype=torch.long),
        row_example=torch.tensor(row_example, dtype=torch.long),
        labels=torch.tensor([e.label for e in examples], dtype=torch.long),
        num_candidates=torch.tensor([len(e.candidates) for e in examples], dtype=torch.long),
        kind=examples[0].kind,
        n_tokens=sum(len(r) for r in rows),
    )


def generation_rows(tokenizer: Any, examples: Sequence[Example], max_length: int | None = None
                    ) -> list[tuple[list[int], list[bool]]]:
    """Generation examples as token rows: ``(ids, scored)`` per example, ``scored[j]`` when token ``j`` is in the
    loss (a scored piece or the EOS; never token 0, which nothing predicts).

    A row is BOS (if the tokenizer adds one) + each piece of :attr:`Example.pieces` tokenized alone + EOS (with
    :attr:`Example.eos`). A row longer than ``max_length`` loses tokens from its left (after BOS) down to its last
    scored piece, which must fit whole; a row scored from its first token on (the ``text`` layout) keeps its
    first ``max_length`` tokens instead.

    Raises:
        DataError: a row with nothing to score, a last scored piece longer than ``max_length`` allows, or
            ``eos`` with a tokenizer that has no EOS token.
    """
    prefix = _ids(tokenizer, [""], special=True)[0]  # e.g. [bos] or []
    texts = sorted({t for e in examples for t, _ in e.pieces})
    piece_ids = dict(zip(texts, _ids(tokenizer, texts, special=False)))
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for i, ex in enumerate(examples):
        ids, scored = list(prefix), [False] * len(prefix)
        last_start = len(prefix)
        for text, is_scored in ex.pieces:
            if is_scored:
                last_start = len(ids)
            ids += piece_ids[text]
            scored += [is_scored] * len(piece_ids[text])
        if ex.eos:
            if eos is None:
                raise DataError("tokenizer", "has no eos_token_id, which this layout appends to every answer",
                                "set tokenizer.eos_token (tokenizer_config.json)")
            ids.append(int(eos))
            scored.append(True)
        what = f"example {i} ({(ex.prompt or ex.candidates[0])[:40]!r})"
        over = len(ids) - max_length if max_length else 0
        if over > 0:
            keep = max(len(prefix), 1)
            if all(scored[len(prefix):]):  # nothing but scored text: keep its head
                ids, scored = ids[:max_length], scored[:max_length]
            elif over > last_start - keep:
                raise DataError(what, f"needs {len(ids) - last_start + 1} tokens for its answer (with one of "
                                f"context), more than max_length={max_length} allows", "raise --max-length, or "
                                "shorten the answer")
            else:
                ids, scored = ids[:keep] + ids[keep + over:], scored[:keep] + scored[keep + over:]
        if len(ids) > 0:
            scored[0] = False
        if not any(scored):
            raise DataError(what, "has no token to score (an empty answer, or a one-token text with no BOS)",
                            "give a longer answer or text")
        out.append((ids, scored))
    return out


def _collate_generation(tokenizer: Any, examples: Sequence[Example], max_length: int | None,
                        pad_to_multiple_of: int, pad_id: int) -> Batch:
    """One row per generation example (see :func:`generation_rows`), every scored token a target."""
    rows = generation_rows(tokenizer, examples, max_length)
    input_ids, attention_mask = _left_padded([ids for ids, _ in rows], pad_id, pad_to_multiple_of)
    T = input_ids.shape[1]
    target_index: list[int] = []
    target_row: list[int] = []
    for r, (ids, scored) in enumerate(rows):
        base = r * T + T - len(ids) - 1  # + j: the position predicting token j
        js = [j for j, s in enumerate(scored) if s]
        target_index.extend(base + j for j in js)
        target_row.extend([r] * len(js))
    index = torch.tensor(target_index, dtype=torch.long)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_index=index,
        target_ids=input_ids.view(-1)[index + 1].clone(),
        target_row=torch.tensor(target_row, dtype=torch.long),
        row_example=torch.arange(len(rows), dtype=torch.long),
        labels=torch.zeros(len(rows), dtype=torch.long),
        num_candidates=torch.ones(len(rows), dtype=torch.long),
        kind="generation",
        n_tokens=sum(len(ids) for ids, _ in rows),
    )


def _left_padded(rows: list[list[int]], pad_id: int, pad_to_multiple_of: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [R, T] of token rows padded on the left to the longest row, rounded up to a
    multiple of ``pad_to_multiple_of``."""
    T = max(len(r) for r in rows)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, T - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, T - len(ids):] = 1
    return input_ids, attention_mask


def _collate_shared(examples: Sequence[Example], prompts: list[list[int]], prefix: list[int],
                    cand_ids: dict[str, list[int]], pad_id: int, max_length: int | None,
                    pad_to_multiple_of: int) -> Batch:
    """One row per example (single-token candidates): see ``share_prompts`` in :func:`collate`.

    The "rows" of the loss (``row_example``, ``row_candidate``, ``target_row``) are still one per candidate;
    only the input rows are shared. Truncation is as if the candidate token were appended.
    """
    input_rows: list[list[int]] = []
    for i, (ex, p_ids) in enumerate(zip(examples, prompts)):
        if not p_ids:
            raise DataError(f"example {i} ({ex.prompt!r})", "has a prompt that tokenizes to nothing and "
                            "the tokenizer adds no BOS", "give a non-empty prompt")
        keep = len(prefix) if p_ids[:len(prefix)] == prefix else 0
        over = len(p_ids) + 1 - max_length if max_length else 0
        if over > 0:
            if over > len(p_ids) - max(keep, 1):
                raise DataError(f"example {i}", f"needs 2 tokens, more than max_length={max_length} allows",
                                "raise max_length")
            p_ids = p_ids[:keep] + p_ids[keep + over:]
        input_rows.append(p_ids)
    input_ids, attention_mask = _left_padded(input_rows, pad_id, pad_to_multiple_of)
    T = input_ids.shape[1]
    target_index: list[int] = []
    target_ids: list[int] = []
    row_example: list[int] = []
    for e, ex in enumerate(examples):
        for cand in ex.candidates:
            target_index.append(e * T + T - 1)  # the last prompt position predicts the candidate token
            target_ids.append(cand_ids[cand][0])
            row_example.append(e)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_index=torch.tensor(target_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        target_row=torch.arange(len(target_ids), dtype=torch.long),
        row_example=torch.tensor(row_example, dtype=torch.long),
        labels=torch.tensor([e.label for e in examples], dtype=torch.long),
        num_candidates=torch.tensor([len(e.candidates) for e in examples], dtype=torch.long),
        kind="classification",
        n_tokens=sum(len(r) for r in input_rows),
    )


def select_targets(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Gather the scored positions of ``hidden`` [R, T, ...] -> [N, ...]."""
    return hidden.reshape(-1, *hidden.shape[2:])[batch.target_index]  # [R*T, ...] -> [N, ...]


def token_logprobs_from_logits(logits_at_targets: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """log p(target | prefix) in fp32.

    Args:
        logits_at_targets: [N, V] logits at the predicting positions (any float dtype).
        target_ids: [N] token ids.

    Returns:
        [N] fp32 log-probabilities.
    """
    logits = logits_at_targets.float()
    picked = logits.gather(1, target_ids.view(-1, 1)).squeeze(1)  # [N]
    return picked - torch.logsumexp(logits, dim=-1)


def loss_count(batch: Batch) -> int:
    """What :func:`candidate_loss` averages over: examples (classification) or answer tokens (generation)."""
    return batch.num_examples if batch.kind == "classification" else int(batch.target_ids.numel())


def candidate_loss(token_logprobs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and predictions from the scored tokens' log-probabilities.

    Classification: each row's score is its mean token log-prob (length
    normalised); the loss is the cross-entropy of the scores of an example's
    candidates against its label, averaged over examples; the prediction is the
    argmax (first candidate on ties).
    Generation: the loss is the mean negative log-prob over all answer tokens of
    the batch (token-weighted, the usual LM loss); predictions are all -1.

    Runs on the tensors' device with no host synchronisation and no Python loop.

    Args:
        token_logprobs: [N] log p(target_ids | prefix), aligned with ``batch.target_index``.
        batch: the batch from :func:`collate` (on the same device).

    Returns:
        (fp32 scalar loss, [E] int64 predictions).
    """
    lp = token_logprobs.float()
    E = batch.num_examples
    if batch.kind == "generation":
        return -lp.mean(), torch.full((E,), -1, dtype=torch.long, device=lp.device)
    R = batch.row_example.numel()  # scored rows: one per candidate (input rows may be shared, see collate)
    row_sum = lp.new_zeros(R).index_add_(0, batch.target_row, lp)  # [R]
    row_len = lp.new_zeros(R).index_add_(0, batch.target_row, torch.ones_like(lp))  # [R]
    score = row_sum / row_len  # [R] mean log-prob of each candidate
    scores = lp.new_full((E, batch.max_candidates), float("-inf"))  # [E, C], -inf = no candidate
    assert batch.row_candidate is not None
    scores = scores.index_put((batch.row_example, batch.row_candidate), score)
    loss = F.cross_entropy(scores, batch.labels)
    return loss, scores.argmax(dim=-1)


def length_batches(tokenizer: Any, examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
    """Evaluation batches of one kind each, examples sorted by token length so a batch wastes little padding.

    Args:
        tokenizer: as for :func:`collate`.
        examples: any mix of kinds.
        batch_size: examples per batch (the last batch of a kind may be smaller).

    Returns:
        Batches covering every example once; order inside and across batches follows length, not input order.
    """
    if batch_size < 1:
        raise DataError("batch_size", f"is {batch_size}", "give an integer >= 1")
    out: list[list[Example]] = []
    for kind in ("classification", "generation"):
        part = [e for e in examples if e.kind == kind]
        if not part:
            continue
        if kind == "generation":
            length = [len(ids) for ids, _ in generation_rows(tokenizer, part)]
            order = sorted(range(len(part)), key=lambda i: length[i])
            out += [[part[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
            continue
        prompt_len = [len(ids) for ids in _ids(tokenizer, [e.prompt for e in part], special=True)]
        cands = sorted({c for e in part for c in e.candidates})
        cand_len = dict(zip(cands, (len(ids) for ids in _ids(tokenizer, cands, special=False))))
        length = [p + max(cand_len[c] for c in e.candidates) for p, e in zip(prompt_len, part)]
        order = sorted(range(len(part)), key=lambda i: length[i])
        out += [[part[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    return out

"""Text in, text out: prompts (plain or chat), batching, stop strings, around :func:`zoedge.runtime.decoding.decode`.

A prompt file holds one prompt per line, or JSONL (detected by its ``.jsonl`` suffix, or by a first line that is a
JSON object) whose lines are ``{"prompt": ...}`` (an optional ``"completion"`` is kept as the reference) or
``{"messages": [{"role": ..., "content": ...}, ...]}`` (rendered with the tokenizer's chat template, the generation
prompt added; trailing assistant turns are dropped and the last one kept as the reference). The file is read and
checked before the model is loaded; chat rendering needs the tokenizer and follows.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoedge.errors import ConfigError, DataError


@dataclass
class Prompt:
    """One prompt: ``text`` (plain) or ``messages`` (chat), where it came from, and the reference if the file has one."""

    where: str
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    reference: str | None = None

    def shown(self) -> Any:
        """What the JSON output records as the prompt."""
        return self.messages if self.messages is not None else self.text


@dataclass
class Completion:
    """One prompt's result. ``finish``: ``eos`` (the model ended it), ``stop`` (a stop text) or ``length``."""

    prompt: Any
    completion: str
    prompt_tokens: int
    new_tokens: int
    finish: str
    reference: str | None = None


@dataclass
class Generated:
    """Every prompt's :class:`Completion`, in the order given, and the figures of the run."""

    completions: list[Completion]
    new_tokens: int
    seconds: float
    prefill_seconds: float
    passes: int
    batches: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        """New tokens per second of wall time, the prompts' prefill included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"completions": [asdict(c) for c in self.completions], "new_tokens": self.new_tokens,
                "seconds": self.seconds, "prefill_seconds": self.prefill_seconds, "tokens_per_s": self.tokens_per_s,
                "passes": self.passes, "batches": self.batches, "settings": self.settings}


# ---------------------------------------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a file (see the module docstring), checked.

    Raises:
        DataError: the file is missing, not UTF-8, empty, or a JSONL line is not an object with a string
            ``prompt`` or a list of ``messages`` (naming the file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("--prompts", f"{p} does not exist or is not a file", "give a text or JSONL file of prompts")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(p, f"is not UTF-8 text (byte {e.start})", "save the file as UTF-8") from None
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise DataError(p, "holds no prompt", "write one prompt per line, or JSONL lines with \"prompt\" or \"messages\"")
    if not _is_jsonl(p, numbered[0][1]):
        return [Prompt(f"{p}:{i}", text=line) for i, line in numbered]
    return [_json_prompt(f"{p}:{i}", line) for i, line in numbered]


def _is_jsonl(path: Path, first: str) -> bool:
    if path.suffix == ".jsonl":
        return True
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


_FIELDS = 'an object with a string "prompt" (optionally "completion") or a list of chat "messages"'


def _json_prompt(where: str, line: str) -> Prompt:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise DataError(where, f"is not valid JSON ({e.msg})", f"write {_FIELDS} on each line") from None
    if not isinstance(row, dict):
        raise DataError(where, f"is a JSON {type(row).__name__}, not an object", f"write {_FIELDS} on each line")
    if isinstance(row.get("prompt"), str):
        ref = row.get("completion")
        return Prompt(where, text=row["prompt"], reference=ref if isinstance(ref, str) else None)
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        bad = [m for m in messages if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                                           and isinstance(m.get("content"), str))]
        if bad:
            raise DataError(where, f"has a message that is not {{\"role\": TEXT, \"content\": TEXT}}: {bad[0]!r}",
                            "give every message a string role and content")
        turns = list(messages)
        reference = None
        while turns and turns[-1]["role"] == "assistant":
            reference = reference if reference is not None else turns[-1]["content"]
            turns.pop()
        if not turns:
            raise DataError(where, "has only assistant messages: nothing to answer",
                            "end the messages with a user (or system) turn")
        return Prompt(where, messages=turns, reference=reference)
    raise DataError(where, f"has fields {sorted(row)}", f"write {_FIELDS}")


def prompts_from(texts: Sequence[str] = (), file: str | Path | None = None) -> list[Prompt]:
    """Command-line prompts (``--prompt``), then those of ``file`` (``--prompts``)."""
    out = [Prompt(f"--prompt #{k}", text=t) for k, t in enumerate(texts, 1)]
    return out + (read_prompts(file) if file is not None else [])


# ---------------------------------------------------------------------------------------------------------------
def encode(tokenizer: Any, prompt: Prompt, chat: bool = False) -> list[int]:
    """The token ids of ``prompt``: plain text with the tokenizer's special tokens; chat messages (and, with
    ``chat``, plain text as one user message) rendered by the chat template with the generation prompt.

    Raises:
        DataError: chat rendering with a tokenizer that has no chat template.
    """
    messages = prompt.messages
    if messages is None and chat:
        messages = [{"role": "user", "content": prompt.text or ""}]
    if messages is None:
        return list(tokenizer(prompt.text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(prompt.where, "needs a chat template (chat messages or --chat) but the model's tokenizer "
                        "has none", "give plain prompts without --chat, or a model whose tokenizer_config.json "
                        "has a chat_template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model: Any, prompts: str | Prompt | Sequence[str | Prompt | dict], tokenizer: Any = None, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop: Sequence[str] = (), seed: int = 0, batch_size: int = 8, chat: bool = False) -> Generated:
    """Complete ``prompts`` with a :class:`~zoedge.runtime.streamed.StreamedModel` (see :mod:`zoedge.runtime.decoding`
    for how each token streams the model).

    Args:
        prompts: text, :class:`Prompt` objects, or dicts with ``messages`` (chat) or ``prompt``.
        tokenizer: default: the store's.
        max_new_tokens, temperature, top_p, top_k, seed: see :class:`~zoedge.settings.GenerateSettings`.
        stop: texts that end a completion (not kept in it).
        batch_size: prompts decoded together; prompts of similar length are batched together.
        chat: plain prompts are rendered as one user message with the chat template.

    Raises:
        ConfigError: a knob out of range, or a prompt too long for the model's positions.
        DataError: chat rendering without a chat template.
    """
    from zoedge.runtime.decoding import Sampling, decode, end_tokens
    from zoedge.settings import GenerateSettings

    items = [prompts] if isinstance(prompts, (str, Prompt, dict)) else list(prompts)
    given = [_as_prompt(p, k) for k, p in enumerate(items, 1)]
    knobs = GenerateSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, stop=list(stop), seed=seed, batch_size=batch_size, chat=chat)
    knobs.check()
    if tokenizer is None:
        tokenizer = model_tokenizer(model)
    encoded = [encode(tokenizer, p, chat) for p in given]
    limit = getattr(model.config, "max_position_embeddings", None)
    for p, ids in zip(given, encoded):
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ConfigError(p.where, f"has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that passes the "
                              f"model's {limit} positions", "shorten the prompt or lower --max-new-tokens")
        if not ids:
            raise DataError(p.where, "is empty after tokenization", "give a non-empty prompt")
    eos = end_tokens(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sampling = Sampling(knobs.temperature, knobs.top_k, knobs.top_p, knobs.seed)
    order = sorted(range(len(given)), key=lambda k: len(encoded[k]))
    results: list[Completion | None] = [None] * len(given)
    new = passes = batches = 0
    prefill = 0.0
    started = time.perf_counter()
    for a in range(0, len(order), batch_size):
        rows = order[a:a + batch_size]
        width = max(len(encoded[k]) for k in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, k in enumerate(rows):
            n = len(encoded[k])
            ids[r, width - n:] = torch.tensor(encoded[k])
            mask[r, width - n:] = 1

        def stopped(r: int, tokens: list[int]) -> bool:
            return bool(stop) and _cut(tokenizer.decode(tokens, skip_special_tokens=True), stop) is not None

        out = decode(model, ids, mask, max_new_tokens, sampling, eos, pad, stopped if stop else None)
        for r, k in enumerate(rows):
            text = tokenizer.decode(out.tokens[r], skip_special_tokens=True)
            cut = _cut(text, stop)
            results[k] = Completion(given[k].shown(), text if cut is None else text[:cut], len(encoded[k]),
                                    len(out.tokens[r]), out.ended[r], given[k].reference)
            new += len(out.tokens[r])
        passes += out.passes
        prefill += out.prefill_seconds
        batches += 1
    seconds = time.perf_counter() - started
    done = [c for c in results if c is not None]
    return Generated(done, new, seconds, prefill, passes, batches,
                     {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                      "stop": list(stop), "seed": seed, "batch_size": batch_size, "chat": chat})


def _cut(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop text starts in ``text`` (None: none occurs)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _as_prompt(p: str | Prompt | dict, k: int) -> Prompt:
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(f"prompt #{k}", text=p)
    if isinstance(p, dict):
        return _json_prompt(f"prompt #{k}", json.dumps(p))
    raise ConfigError(f"prompt #{k}", f"is a {type(p).__name__}", "give text, or a dict with \"prompt\" or \"messages\"")


def model_tokenizer(model: Any) -> Any:
    """The tokenizer of ``model``'s store, loaded once per model."""
    tok = getattr(model, "_tokenizer", None)
    if tok is None:
        from zoedge.train.job import load_tokenizer
        tok = model._tokenizer = load_tokenizer(model.store)
    return tok

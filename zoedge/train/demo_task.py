"""The built-in ``demo`` task: sentiment of short generated reviews.

Sentences are assembled from word lists, deterministically from a seed, in the
SST-2 format (``"{review} It was"`` -> " terrible" / " great"). Four sentence
kinds mix easy and hard cases so that a small instruct model (SmolLM2-135M) is
clearly above chance zero-shot but not perfect, leaving room for fine-tuning:

* ``plain``: "The soup was delicious." (easy);
* ``pair``: two clauses of the same polarity joined by "and" (easy);
* ``negated``: "The soup was not delicious." (the label flips; small models
  mostly miss the negation);
* ``contrast``: "The soup was cold, but the staff were kind." (opposite
  polarities; the clause after "but" decides, as in review data).

Labels are balanced (alternating before the final shuffle) and every prompt is
unique, so any disjoint split of the list has no sentence in two splits.

The built-in ``codes`` task (:func:`codes_examples`) asks for the same
sentiment under label words the model cannot guess: ``"{review} Answer:"`` ->
" A" (negative) / " B" (positive). SmolLM2-135M-Instruct is at chance
zero-shot (it answers " A" to everything); the mapping must be learned, which
first-order training does in tens of steps and dense ZO only slowly -- the
harder task of the convergence benchmark (README "Benchmarks").
"""
from __future__ import annotations

import random

from zoedge.errors import DataError
from zoedge.train.example import Example

CANDIDATES = (" terrible", " great")
CODE_CANDIDATES = (" A", " B")  # negative, positive: nothing in the words tells which is which

# (noun phrase, verb) -- the verb agrees with the noun.
_SUBJECTS: tuple[tuple[str, str], ...] = (
    ("the food", "was"), ("the soup", "was"), ("the pasta", "was"), ("the coffee", "was"),
    ("the dessert", "was"), ("the bread", "was"), ("the service", "was"), ("the room", "was"),
    ("the bed", "was"), ("the view", "was"), ("the music", "was"), ("the movie", "was"),
    ("the plot", "was"), ("the ending", "was"), ("the acting", "was"), ("the book", "was"),
    ("the hotel", "was"), ("the trip", "was"), ("the concert", "was"), ("the game", "was"),
    ("the staff", "were"), ("the waiters", "were"), ("the seats", "were"), ("the prices", "were"),
    ("the songs", "were"), ("the actors", "were"), ("the rooms", "were"), ("the fries", "were"),
)
_POSITIVE: tuple[str, ...] = (
    "delicious", "wonderful", "excellent", "lovely", "amazing", "superb", "fantastic",
    "delightful", "charming", "perfect", "brilliant", "pleasant", "fresh", "friendly",
    "kind", "clean", "beautiful", "fun",
)
_NEGATIVE: tuple[str, ...] = (
    "awful", "horrible", "bland", "disappointing", "dreadful", "boring", "rude", "dirty",
    "cold", "stale", "noisy", "ugly", "overpriced", "poor", "unpleasant", "dull",
    "greasy", "slow",
)
KINDS: tuple[str, ...] = ("plain", "pair", "negated", "contrast")
_MAX_ATTEMPTS_PER_EXAMPLE = 200


def _clause(rng: random.Random, positive: bool, avoid: str = "") -> str:
    subjects = [s for s in _SUBJECTS if s[0] != avoid]
    noun, verb = rng.choice(subjects)
    adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
    return f"{noun} {verb} {adj}"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sentence(rng: random.Random, kind: str, label: int) -> str:
    """One review sentence of ``kind`` whose sentiment is ``label`` (1 = positive)."""
    pos = bool(label)
    if kind == "plain":
        body = _clause(rng, pos)
    elif kind == "pair":
        first = _clause(rng, pos)
        body = f"{first} and {_clause(rng, pos, avoid=first.rsplit(' ', 2)[0])}"
    elif kind == "negated":
        noun, verb = rng.choice(_SUBJECTS)
        adj = rng.choice(_NEGATIVE if pos else _POSITIVE)  # "not <opposite>"
        body = f"{noun} {verb} not {adj}"
    elif kind == "contrast":
        first = _clause(rng, not pos)
        body = f"{first}, but {_clause(rng, pos, avoid=first.rsplit(' ', 2)[0])}"
    else:
        raise DataError(f"demo sentence kind {kind!r}", "is unknown", f"use one of {KINDS}")
    return _capitalize(body) + "."


def demo_examples(n: int = 2500, seed: int = 0,
                  weights: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)) -> list[Example]:
    """Generate ``n`` unique, label-balanced demo examples.

    Args:
        n: number of examples (several thousand unique sentences exist).
        seed: generator seed; the same seed gives the same list.
        weights: relative frequency of the sentence kinds in :data:`KINDS`.

    Returns:
        Examples with prompt ``"{review} It was"`` and candidates (" terrible", " great").

    Raises:
        DataError: ``n`` < 1, bad weights, or ``n`` beyond the unique sentences available.
    """
    return [Example(f"{review} It was", CANDIDATES, label) for review, label in _reviews(n, seed, weights)]


def codes_examples(n: int = 2500, seed: int = 0,
                   weights: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)) -> list[Example]:
    """The ``codes`` task: the demo reviews (same sentences, labels and order for the same arguments)
    with prompt ``"{review} Answer:"`` and arbitrary label words (" A" = negative, " B" = positive).

    Raises:
        DataError: as :func:`demo_examples`.
    """
    return [Example(f"{review} Answer:", CODE_CANDIDATES, label) for review, label in _reviews(n, seed, weights)]


def _reviews(n: int, seed: int, weights: tuple[float, ...]) -> list[tuple[str, int]]:
    """``n`` unique (review, label) pairs, labels balanced, in a seeded random order."""
    if n < 1:
        raise DataError("demo task n", f"is {n}", "ask for at least one example")
    if len(weights) != len(KINDS) or min(weights) < 0 or sum(weights) <= 0:
        raise DataError("demo task weights", f"{weights!r} is invalid",
                        f"give {len(KINDS)} non-negative weights for {KINDS}")
    rng = random.Random(f"zoedge-demo:{seed}")
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > _MAX_ATTEMPTS_PER_EXAMPLE * n:
            raise DataError("demo task n", f"{n} exceeds the unique sentences found ({len(out)})",
                            "ask for fewer examples")
        label = len(out) % 2
        kind = rng.choices(KINDS, weights)[0]
        review = _sentence(rng, kind, label)
        if review in seen:
            continue
        seen.add(review)
        out.append((review, label))
    rng.shuffle(out)
    return out


#: the answer of each review in the token-level layouts (label 0 = negative)
VERDICTS = ("The review is negative.", "The review is positive.")


def layout_records(layout: str, n: int = 100, seed: int = 0) -> list[dict]:
    """The demo reviews as data records of a token-level layout, for examples, tests and measurements.

    Args:
        layout: ``completion`` ({prompt, completion}), ``messages`` (a user turn and an assistant turn),
            ``generation`` ({text, answer}) or ``text`` ({text}, the review and its verdict).
        n, seed: as :func:`demo_examples` (the same reviews).

    Raises:
        DataError: an unknown layout, or as :func:`demo_examples`.
    """
    out = []
    for review, label in _reviews(n, seed, (0.3, 0.3, 0.2, 0.2)):
        question, verdict = f"Is this review positive or negative? {review}", VERDICTS[label]
        if layout == "completion":
            out.append({"prompt": question + "\n", "completion": verdict})
        elif layout == "messages":
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": verdict}]})
        elif layout == "generation":
            out.append({"text": question + "\n", "answer": verdict})
        elif layout == "text":
            out.append({"text": f"{question}\n{verdict}"})
        else:
            raise DataError(f"layout {layout!r}", "has no demo records", "use completion, messages, generation or text")
    return out

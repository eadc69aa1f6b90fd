"""One task example: a prompt, the candidates scored after it and the gold one (the unit every task yields)."""
from __future__ import annotations

from dataclasses import dataclass

from zoedge.errors import DataError

#: the kinds of example
KINDS = ("classification", "generation")


@dataclass(frozen=True)
class Example:
    """One task example.

    Args:
        prompt: the text the model conditions on (generation: the prompt greedy decoding starts from; "" when
            there is none, e.g. the ``text`` layout).
        candidates: the continuations to score (generation: ``(answer,)``, the reference of the decoded answer).
        label: index of the gold candidate (generation: 0).
        kind: ``"classification"`` or ``"generation"``.
        segments: generation only: the whole row as ``(text, scored)`` pieces when it is not
            ``prompt + answer`` (chat turns, plain text); see :attr:`pieces`.
        eos: generation only: the tokenizer's EOS token ends the row and is scored.

    Raises:
        DataError: empty candidates, label out of range, an unknown kind or segments without a scored piece.
    """

    prompt: str
    candidates: tuple[str, ...]
    label: int
    kind: str = "classification"
    segments: tuple[tuple[str, bool], ...] = ()
    eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, tuple):
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if not isinstance(self.segments, tuple):
            object.__setattr__(self, "segments", tuple((str(t), bool(b)) for t, b in self.segments))
        what = f"example {self.prompt[:40]!r}"
        if self.kind not in KINDS:
            raise DataError(what, f"kind {self.kind!r} is unknown", f"use one of {KINDS}")
        if not self.candidates or not all(isinstance(c, str) and c for c in self.candidates):
            raise DataError(what, f"candidates {self.candidates!r} must be non-empty strings",
                            "give at least one non-empty candidate string")
        if self.kind == "generation" and (len(self.candidates) != 1 or self.label != 0):
            raise DataError(what, "a generation example needs candidates=(answer,) and label=0",
                            "use Example.generation(prompt, answer)")
        if self.kind == "classification" and (self.segments or self.eos):
            raise DataError(what, "a classification example has no segments or eos", "drop them")
        if self.segments and not any(scored and text for text, scored in self.segments):
            raise DataError(what, "has segments but none is scored and non-empty", "score at least one piece")
        if not 0 <= self.label < len(self.candidates):
            raise DataError(what, f"label {self.label} is outside 0..{len(self.candidates) - 1}",
                            "give the index of the gold candidate")

    @classmethod
    def generation(cls, prompt: str, answer: str, eos: bool = False) -> Example:
        """Build a generation example (teacher-forced loss on ``answer``, and on EOS with ``eos``)."""
        return cls(prompt, (answer,), 0, "generation", eos=eos)

    @property
    def pieces(self) -> tuple[tuple[str, bool], ...]:
        """Generation: the row as ``(text, scored)`` pieces, tokenized one by one and concatenated after the
        tokenizer's BOS (if any); EOS follows when :attr:`eos`."""
        return self.segments or ((self.prompt, False), (self.candidates[0], True))

    @property
    def reference(self) -> str | None:
        """Generation with a prompt: the answer greedy decoding is scored against (None otherwise)."""
        return self.candidates[0] if self.kind == "generation" and self.prompt else None

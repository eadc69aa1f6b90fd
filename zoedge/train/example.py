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
        prompt: the text the model conditions on.
        candidates: the continuations to score (generation: ``(answer,)``).
        label: index of the gold candidate (generation: 0).
        kind: ``"classification"`` or ``"generation"``.

    Raises:
        DataError: empty candidates, label out of range or an unknown kind.
    """

    prompt: str
    candidates: tuple[str, ...]
    label: int
    kind: str = "classification"

    def __post_init__(self) -> None:
        if not isinstance(self.candidates, tuple):
            object.__setattr__(self, "candidates", tuple(self.candidates))
        what = f"example {self.prompt[:40]!r}"
        if self.kind not in KINDS:
            raise DataError(what, f"kind {self.kind!r} is unknown", f"use one of {KINDS}")
        if not self.candidates or not all(isinstance(c, str) and c for c in self.candidates):
            raise DataError(what, f"candidates {self.candidates!r} must be non-empty strings",
                            "give at least one non-empty candidate string")
        if self.kind == "generation" and (len(self.candidates) != 1 or self.label != 0):
            raise DataError(what, "a generation example needs candidates=(answer,) and label=0",
                            "use Example.generation(prompt, answer)")
        if not 0 <= self.label < len(self.candidates):
            raise DataError(what, f"label {self.label} is outside 0..{len(self.candidates) - 1}",
                            "give the index of the gold candidate")

    @classmethod
    def generation(cls, prompt: str, answer: str) -> Example:
        """Build a generation example (teacher-forced loss on ``answer``)."""
        return cls(prompt, (answer,), 0, "generation")

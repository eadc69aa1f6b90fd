"""Range-checked number types for the commands' argparse options: a bad value is a usage error naming the option
(``argument --batch: 0 is too small: use an integer >= 1``), at parse time, before any work."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(kind: type = int, minimum: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """An argparse ``type`` that parses ``kind`` (int or float) and refuses NaN, infinities and values below
    ``minimum`` (or not above ``above``)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is too small: use {noun} >= {minimum:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{text} is too small: use {noun} > {above:g}")
        return value

    parse.__name__ = kind.__name__
    return parse


#: the common cases
COUNT = number(int, minimum=1)        # 1, 2, ...
AMOUNT = number(int, minimum=0)       # 0, 1, ...
RATE = number(float, above=0)         # > 0, finite
DAYS = number(float, minimum=0)       # >= 0, finite

"""Dev and test never hold an example the run trains on (zoedge/train/sampling.py ``disjoint``): examples whose
content (prompt and candidates, case- and space-folded) is in the training split are dropped and counted per
split; a split left empty is refused, naming it."""
from __future__ import annotations

import pytest

from zoedge.errors import DataError
from zoedge.train.example import Example
from zoedge.train.sampling import Splits, disjoint


def ex(prompt, label=0):
    return Example(prompt=prompt, candidates=["yes", "no"], label=label)


def test_overlapping_examples_are_dropped_and_counted():
    train = [ex("a"), ex("b")]
    out = disjoint(Splits(train, [ex("A "), ex("c"), ex("b", label=1)], [ex("d")]))
    assert [e.prompt for e in out.dev] == ["c"] and [e.prompt for e in out.test] == ["d"]
    assert out.dropped == {"dev": 2}


def test_a_split_left_empty_is_refused():
    with pytest.raises(DataError, match="test data.*all 1 of its examples"):
        disjoint(Splits([ex("a")], [ex("c")], [ex("a")]))

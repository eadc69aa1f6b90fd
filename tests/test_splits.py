"""Carving train/dev/test from one pool that does not divide evenly: every example lands in exactly one split."""
from __future__ import annotations

import itertools

import pytest

from zoedge.train.sampling import split
from zoedge.train.tasks import Example


def pool(n: int) -> list[Example]:
    return [Example(f"prompt {i}", (" no", " yes"), i % 2) for i in range(n)]


WANTS = [(1000, 500, 1000), (7, 3, 5), (10, 1, 1), (1, 1, 1), (5, 0, 3), (3, 7, 0), (2, 999, 1)]


@pytest.mark.parametrize("n_train,n_dev,n_test", WANTS)
def test_every_example_in_exactly_one_split(n_train, n_dev, n_test):
    """Pools of 1..60 against requests they rarely divide: short pools are used whole (the rounding leftovers
    included), each example once; a non-zero request gets at least one example while the pool has one for it;
    a pool large enough gives every split exactly its request."""
    wants = (n_train, n_dev, n_test)
    for n, seed in itertools.product(range(1, 61), (0, 13)):
        s = split(pool(n), n_train, n_dev, n_test, seed=seed)
        got = [e.prompt for e in s.train + s.dev + s.test]
        assert len(got) == len(set(got)), (n, wants, "an example in two splits")
        sizes = (len(s.train), len(s.dev), len(s.test))
        if n >= sum(wants):
            assert sizes == wants, (n, wants, sizes)
        else:
            assert len(got) == n, (n, wants, sizes, "examples left out of every split")
            if n >= sum(1 for w in wants if w):
                assert all(size > 0 for size, w in zip(sizes, wants) if w), (n, wants, sizes)
            assert all(size <= w for size, w in zip(sizes, wants) if w != n_train), (n, wants, sizes)


def test_defaults_are_the_papers_sizes_and_seed_zero():
    """split(pool) samples 1000 / 500 / 1000 (the MeZO papers' sizes) with seed 0."""
    s = split(pool(3000))
    assert (len(s.train), len(s.dev), len(s.test)) == (1000, 500, 1000)
    assert s == split(pool(3000), 1000, 500, 1000, seed=0) and s != split(pool(3000), seed=1)

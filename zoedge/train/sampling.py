"""Train / dev / test sampling as in the MeZO papers (1000 / 500 / 1000 per task).

Every source is shuffled by its own ``random.Random`` seeded from a string
derived from the run's sampling seed, so the result is the same on every
machine and Python version (string seeds do not depend on ``PYTHONHASHSEED``).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from zoedge.errors import DataError
from zoedge.train.example import Example

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Disjoint train / dev / test example lists."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]


def _shares(pool: int, wants: Sequence[int]) -> list[int]:
    """Split ``pool`` items among requests; shrink proportionally when short (each
    non-zero request keeps at least one item while the pool allows)."""
    if sum(wants) <= pool:
        return list(wants)
    got = [w * pool // sum(wants) for w in wants]
    for i, w in enumerate(wants):
        if w and not got[i] and sum(got) < pool:
            got[i] = 1
    got[0] += pool - sum(got)  # rounding leftovers go to train (index 0)
    return got


def split(train: Sequence[Example], n_train: int = 1000, n_dev: int = 500, n_test: int = 1000,
          seed: int = 0, *, dev: Sequence[Example] | None = None,
          test: Sequence[Example] | None = None) -> Splits:
    """Sample train/dev/test as in the MeZO papers (defaults 1000/500/1000).

    Each source is shuffled with its own ``random.Random`` derived from ``seed``.
    Splits missing a separate source are carved, disjointly, from ``train``; when the
    pool is smaller than the requests, every carved split shrinks proportionally.

    Args:
        train: the training pool.
        n_train, n_dev, n_test: requested sizes (capped by the data).
        seed: sampling seed (the papers use 13, 21, 42, 87, 100).
        dev, test: separate sources, sampled independently when given.

    Returns:
        The three splits.

    Raises:
        DataError: a negative size or an empty train pool.
    """
    for name, n in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if n < 0:
            raise DataError(name, f"is {n}", "give a size >= 0")
    if not train:
        raise DataError("train data", "is empty", "give at least one training example")
    pool = list(train)
    random.Random(f"zoedge-split:{seed}:train").shuffle(pool)
    carved = [("train", n_train)]
    out: dict[str, list[Example]] = {}
    for name, n, source in (("dev", n_dev, dev), ("test", n_test, test)):
        if source is None:
            carved.append((name, n))
        else:
            items = list(source)
            random.Random(f"zoedge-split:{seed}:{name}").shuffle(items)
            out[name] = items[:n]
    sizes = _shares(len(pool), [n for _, n in carved])
    if sizes != [n for _, n in carved]:
        log.warning("only %d examples to carve %s from; using %s", len(pool),
                    [f"{k}={n}" for k, n in carved], sizes)
    start = 0  # carve dev/test first so the train size does not change which examples they get
    for (name, _), size in reversed(list(zip(carved, sizes))):
        out[name] = pool[start:start + size]
        start += size
    return Splits(out["train"], out["dev"], out["test"])

"""Train / dev / test sampling as in the MeZO papers (1000 / 500 / 1000 per task).

Every source is shuffled by its own ``random.Random`` seeded from a string
derived from the run's sampling seed, so the result is the same on every
machine and Python version (string seeds do not depend on ``PYTHONHASHSEED``).

The splits are disjoint by content, whatever the files hold: a dev or test example
whose normalised prompt and candidates (:func:`content_key`) equal a training
example's is dropped (and counted in :attr:`Splits.dropped`); a dev or test split
that would be left empty that way is refused.
"""
from __future__ import annotations

import json
import logging
import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from zoedge.errors import DataError
from zoedge.train.example import Example

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Disjoint train / dev / test example lists."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    #: split name -> examples dropped because their content is in the training split
    dropped: dict[str, int] = field(default_factory=dict)


def content_key(e: Example) -> str:
    """An example's content as compared across splits: prompt and candidates, Unicode-normalised (NFKC),
    case-folded, whitespace collapsed; the label is left out (the same text with another label is the same
    input)."""
    def norm(text: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return json.dumps([norm(e.prompt), [norm(c) for c in e.candidates]], ensure_ascii=False)


def disjoint(splits: Splits) -> Splits:
    """``splits`` with every dev / test example whose content is in the training split dropped.

    Raises:
        DataError: a dev or test split that had examples has none left.
    """
    seen = {content_key(e) for e in splits.train}
    kept, dropped = {}, {}
    for name in ("dev", "test"):
        items = getattr(splits, name)
        kept[name] = [e for e in items if content_key(e) not in seen]
        if len(kept[name]) < len(items):
            dropped[name] = len(items) - len(kept[name])
            log.warning("dropped %d of %d %s examples: their content is in the training split",
                        dropped[name], len(items), name)
            if not kept[name]:
                raise DataError(f"{name} data", f"all {len(items)} of its examples are also in the training split "
                                "(same prompt and candidates)", f"give --{name} a file of other examples than "
                                "--train's (dev and test never hold an example the run trains on)")
    return Splits(splits.train, kept["dev"], kept["test"], dropped)


def _shares(pool: int, wants: Sequence[int]) -> list[int]:
    """Split ``pool`` items among requests; shrink proportionally when short (each
    non-zero request keeps at least one item while the pool allows)."""
    if sum(wants) <= pool:
        return list(wants)
    got = [w * pool // sum(wants) for w in wants]
    for i, w in enumerate(wants):
        if w and not got[i]:
            donor = max(range(len(got)), key=got.__getitem__)
            if sum(got) < pool:
                got[i] = 1
            elif got[donor] > 1:  # the pool is all shared out: the largest share gives one up
                got[donor], got[i] = got[donor] - 1, 1
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
        The three splits, disjoint by content (:func:`disjoint`).

    Raises:
        DataError: a negative size, an empty train pool, or a dev / test source wholly inside the training split.
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
        log.warning("%d examples are fewer than the %s asked for: carved %s (give --dev/--test files or smaller "
                    "--n-dev/--n-test to choose)", len(pool), ", ".join(f"{k} {n}" for k, n in carved),
                    ", ".join(f"{k} {n}" for (k, _), n in zip(carved, sizes)))
    start = 0  # carve dev/test first so the train size does not change which examples they get
    for (name, _), size in reversed(list(zip(carved, sizes))):
        out[name] = pool[start:start + size]
        start += size
    return disjoint(Splits(out["train"], out["dev"], out["test"]))

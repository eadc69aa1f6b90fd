"""Batched draws and the noise cache change no value: a draw is a pure function of its key, whoever serves it."""
from __future__ import annotations

import pytest
import torch

from zoedge.noise import source as nz
from zoedge.noise.cache import NoiseCache, attach, budget
from zoedge.memory import ALLOCATIONS

SHAPES = {"big": (3, nz.CHUNK // 2 + 5), "mid": (300, 1000), "small": (7, 5), "bias": (11,), "scalar": ()}


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def draws(src: nz.NoiseSource, step: int, batched: bool) -> dict[str, torch.Tensor]:
    out = {name: torch.full(shape, float("nan")) for name, shape in SHAPES.items()}
    out["strided"] = torch.full((40, 30), float("nan")).t()  # a non-contiguous target
    with nz.batched_draws():
        for name, t in out.items():
            draw = src.draw(step, name, "z0")
            draw.queue(t) if batched else draw(t, 0, t.numel())
    return out


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "pool"])
def test_batched_draws_equal_one_by_one(two_threads, kind):
    """Every tensor's chunks drawn together, on two threads, at the end of the block: the same numbers."""
    one = draws(nz.make_noise(kind, 3), 5, batched=False)
    together = draws(nz.make_noise(kind, 3), 5, batched=True)
    for name in one:
        assert torch.equal(one[name], together[name]), name
        assert not together[name].isnan().any(), name


def test_queued_targets_are_filled_when_the_block_ends(two_threads):
    t, now = torch.zeros(4, nz.CHUNK), torch.zeros(3)
    src = nz.NoiseSource(0)
    with nz.batched_draws():
        src.draw(0, "w", "z0").queue(t)
        with nz.batched_draws():  # a nested block joins the outer one
            pass
        src.draw(0, "b", "z0")(now, 0, 3)  # a fill that is called (not queued) draws at once
        assert not t.any() and now.all()
    assert t.std() > 0.9
    with pytest.raises(RuntimeError, match="outside a batched_draws"):
        src.draw(0, "w", "z0").queue(t)


def test_a_cache_hit_is_the_draw_and_nothing_else_hits():
    cache = NoiseCache(1 << 30)
    src = nz.NoiseSource(7)
    src.cache = cache
    first = draws(src, 2, batched=True)
    assert cache.hits == 0 and cache.used > 0
    again = draws(src, 2, batched=False)
    assert cache.hits == len(first)
    fresh = draws(nz.NoiseSource(7), 2, batched=False)
    for name in first:
        assert torch.equal(again[name], fresh[name]), name
    # another step, another seed, another stream, another dtype or size: drawn, never served from the cache
    hits = cache.hits
    other_step = src.normal_(torch.empty(SHAPES["mid"]), 3, "mid", "z0")
    assert torch.equal(other_step, nz.NoiseSource(7).normal_(torch.empty(SHAPES["mid"]), 3, "mid", "z0"))
    src.normal_(torch.empty(SHAPES["mid"]), 2, "mid", "z1")
    src.normal_(torch.empty(SHAPES["mid"], dtype=torch.bfloat16), 2, "mid", "z0")
    src.normal_(torch.empty(299, 1000), 2, "mid", "z0")
    src.uniform_(torch.empty(SHAPES["mid"]), 2, "mid", "z0")
    reseeded = src.reseeded(8)
    assert reseeded.cache is cache
    assert torch.equal(reseeded.normal_(torch.empty(SHAPES["small"]), 2, "small", "z0"),
                       nz.NoiseSource(8).normal_(torch.empty(SHAPES["small"]), 2, "small", "z0"))
    legacy = src.reseeded(7, "mt19937")  # the same seed drawn by the other generator: other values
    assert legacy.cache is cache
    assert torch.equal(legacy.normal_(torch.empty(SHAPES["small"]), 2, "small", "z0"),
                       nz.NoiseSource(7, "mt19937").normal_(torch.empty(SHAPES["small"]), 2, "small", "z0"))
    assert cache.hits == hits


def test_the_cache_keeps_its_budget_and_allocates_once():
    small = 7 * 5 * 4
    cache = NoiseCache(small + 11 * 4)  # room for "small" and "bias" only
    src = nz.NoiseSource(1)
    src.cache = cache
    draws(src, 0, batched=True)
    assert cache.used == small + 11 * 4
    before = ALLOCATIONS.count["noise cache"]
    for step in range(1, 4):  # each step overwrites the same entries: no new allocation
        draws(src, step, batched=True)
        draws(src, step, batched=False)
    assert ALLOCATIONS.count["noise cache"] == before
    assert cache.hits == 3 * 2  # the two tensors that fit, each step
    assert NoiseCache(0).to_dict() == {"budget_bytes": 0, "bytes": 0, "hits": 0, "misses": 0}


def test_default_budget():
    assert budget(None, "cpu", "ram", 8 << 30) == 2 << 30
    assert budget(None, "cpu", "disk", 8 << 30) == 0  # the disk tier is for models larger than RAM
    assert budget(None, "meta", "ram", 8 << 30) == 0
    assert budget(None, "cpu", "ram", None) == 0
    assert budget(100, "cpu", "disk", None) == 100 << 20


def test_attach_gives_the_source_the_budgeted_cache():
    src = nz.make_noise("rademacher", 0)
    assert attach(src, 3, "cpu", "disk").budget == 3 << 20 and src.cache.budget == 3 << 20  # --noise-cache 3
    assert attach(src, 0, "cpu", "ram") is None and src.cache is None  # --noise-cache 0: off
    assert attach(src, None, "cpu", "disk") is None  # the disk tier's default


def test_a_held_draw_is_read_in_the_caches_buffer_and_redrawn_there_next_step():
    cache = NoiseCache(1 << 30)
    src = nz.NoiseSource(7)
    src.cache = cache
    like = torch.empty(SHAPES["mid"])
    with nz.batched_draws():
        first = src.draw(2, "mid", "z0").held(like)
        assert cache.misses == 1 and cache.hits == 0  # queued: filled when the block ends
    assert torch.equal(first, nz.NoiseSource(7).normal_(torch.empty_like(like), 2, "mid", "z0"))
    kept = first.clone()
    with nz.batched_draws():
        again = src.draw(2, "mid", "z0").held(like)
    assert cache.hits == 1 and again.data_ptr() == first.data_ptr() and torch.equal(again, kept)
    with nz.batched_draws():
        step3 = src.draw(3, "mid", "z0").held(like)
    assert step3.data_ptr() == first.data_ptr()  # the next step's draw goes into the same buffer ...
    assert torch.equal(step3, nz.NoiseSource(7).normal_(torch.empty_like(like), 3, "mid", "z0"))
    # ... and the step-2 values are gone: neither a copy nor a lend serves them
    assert not cache.get(torch.empty_like(like), src.identity, 2, "mid", "z0", "normal")
    # a draw that does not fit the budget is not held
    small = NoiseCache(100)
    src.cache = small
    with nz.batched_draws():
        assert src.draw(2, "mid", "z0").held(like) is None
    assert small.used == 0

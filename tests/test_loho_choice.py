"""LoHO's first-order choice and masked noise, driven directly (plugins/loho.py): ``fo_layers=auto`` takes the
deepest blocks whose first-order memory (weights, grads and optimizer state; intra: the grad pass's copy, and Δ
with its indices) fits ``fo_budget_mb``, a budget met exactly included; the ZO noise of a tensor with FO entries
is zero there, whichever range of it is drawn; options outside their ranges are refused."""
from __future__ import annotations

import pytest
import torch

from zoedge.store.manifest import BlockEntry, TensorEntry
from zoedge_plugins.loho import LoHO

MIB = 2 ** 20


def layer(i: int) -> BlockEntry:
    """An fp32 decoder block: a 64×32 weight and a 32-vector (2048 + 32 elements)."""
    return BlockEntry(f"layers.{i}", f"b{i}.bin", 0, "", [TensorEntry(f"layers.{i}.w", "fp32", [64, 32]),
                                                           TensorEntry(f"layers.{i}.b", "fp32", [32])])


BLOCKS = [BlockEntry("embed", "e.bin", 0, "", [TensorEntry("embed.w", "fp32", [10, 4])])] + \
    [layer(i) for i in range(4)]
INTER = {"sgd": 2080 * 4 * 2, "adamw": 2080 * 4 * 4}  # weights + grads (+ two fp32 moments)
INTRA_SGD = 2080 * 4 + round(0.25 * 2048) * (4 * 2 + 16)  # the copy; Δ, its grad, its int64 row and column


@pytest.mark.parametrize("fo_optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("k", [1, 3])
def test_auto_inter_takes_the_deepest_blocks_that_fit(fo_optimizer, k):
    exact = LoHO(fo_layers="auto", fo_optimizer=fo_optimizer, fo_budget_mb=k * INTER[fo_optimizer] / MIB)
    assert exact.fo_blocks(BLOCKS) == [f"layers.{i}" for i in range(4 - k, 4)]  # the budget met exactly
    short = LoHO(fo_layers="auto", fo_optimizer=fo_optimizer, fo_budget_mb=(k * INTER[fo_optimizer] - 1) / MIB)
    assert short.fo_blocks(BLOCKS) == [f"layers.{i}" for i in range(5 - k, 4)]


def test_auto_intra_counts_the_copy_and_the_sparse_delta():
    opt = LoHO(fo_layers="auto", mode="intra", intra_p=0.25, fo_budget_mb=2 * INTRA_SGD / MIB)
    assert opt.fo_blocks(BLOCKS) == [] and opt.chosen == ["layers.2", "layers.3"]
    opt = LoHO(fo_layers="auto", mode="intra", intra_p=0.25, fo_budget_mb=(2 * INTRA_SGD - 1) / MIB)
    opt.fo_blocks(BLOCKS)
    assert opt.chosen == ["layers.3"]


def test_noise_is_zero_on_the_first_order_entries_in_any_range():
    opt = LoHO(mode="intra")
    opt.entries["w"] = torch.tensor([0, 5, 6, 11])
    whole = torch.empty(12)
    opt.z(3, "w", 0)(whole, 0, 12)
    halves = [torch.empty(6), torch.empty(6)]
    opt.z(3, "w", 0)(halves[0], 0, 12)
    opt.z(3, "w", 0)(halves[1], 6, 12)
    assert torch.equal(torch.cat(halves), whole)
    assert (whole[[0, 5, 6, 11]] == 0).all() and (whole[[1, 2, 3, 4, 7, 8, 9, 10]] != 0).all()


@pytest.mark.parametrize("options", [dict(intra_p=0.0), dict(intra_p=1.5), dict(fo_layers="x"),
                                     dict(fo_layers="auto")])
def test_out_of_range_options_are_refused(options):
    with pytest.raises(ValueError):
        LoHO(**options)


def test_every_entry_may_be_first_order():
    assert LoHO(intra_p=1.0).intra_p == 1.0

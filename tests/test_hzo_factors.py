"""HZO's factor mode, driven directly (plugins/hzo.py): merging a period's factor A into a weight adds A Vᵀ
(V that period's noise) and keeps the factors, so ``lora_factors`` returns B, A with B·A equal to the weight's
whole change, across a flush in the middle of a period and across periods; it returns nothing when the change is
not all factors (a merged vector, first-order blocks, ``factors=off``); merging into a tensor the store cannot
write (quantized) is refused."""
from __future__ import annotations

import pytest
import torch

from zoedge.errors import ConfigError
from zoedge.runtime.streamed import Resident
from zoedge.testing import Workspaces, resident_block
from zoedge_plugins.hzo import HZO


def merge(opt, block, step, seed):
    opt.a["layers.0.w"] = torch.randn(4, opt.rank, generator=torch.Generator().manual_seed(seed))
    opt._merge(block, step)


def test_lora_factors_hold_the_whole_change_across_a_flush_and_periods():
    opt = HZO(rank=2, nu=5)
    block = resident_block("layers.0", {"layers.0.w": torch.zeros(4, 3)})
    merge(opt, block, 1, seed=1)  # a flush in the middle of period 0
    merge(opt, block, 4, seed=2)  # period 0 ends
    merge(opt, block, 7, seed=3)  # a flush in period 5
    b, a = opt.lora_factors()["layers.0.w"]
    assert b.shape == (4, 4) and a.shape == (4, 3)  # two periods of rank 2
    torch.testing.assert_close(b @ a, block.tensors["layers.0.w"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(block.tensors["layers.0.w"], torch.zeros(4, 3))


@pytest.mark.parametrize("options,vector_merged", [(dict(factors="off"), False), (dict(fo_layers=1), False),
                                                   ({}, True)])
def test_no_factors_when_the_change_is_not_all_factors(options, vector_merged):
    opt = HZO(rank=2, nu=5, **options)
    block = resident_block("layers.0", {"layers.0.w": torch.zeros(4, 3), "layers.0.b": torch.zeros(3)})
    merge(opt, block, 1, seed=1)
    if vector_merged:
        opt.d["layers.0.b"] = torch.ones(3)
        opt._merge(block, 2)
        assert torch.equal(block.tensors["layers.0.b"], torch.ones(3))
    assert opt.lora_factors() == {}


def test_merging_into_a_quantized_tensor_is_refused():
    opt = HZO(rank=2)
    tensors = {"layers.0.w": torch.zeros(4, 3)}
    block = Resident("layers.0", 0, tensors, frozenset(), runtime=Workspaces())  # nothing writable
    with pytest.raises(ConfigError, match="stored quantized"):
        merge(opt, block, 1, seed=1)
    opt = HZO(rank=2)
    opt.d["layers.0.b"] = torch.ones(3)
    block = Resident("layers.0", 0, {"layers.0.b": torch.zeros(3)}, frozenset(), runtime=Workspaces())
    with pytest.raises(ConfigError, match="stored quantized"):
        opt._merge(block, 1)

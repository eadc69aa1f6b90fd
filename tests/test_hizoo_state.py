"""HiZOO-L's options and Hessian state, driven directly (plugins/hizoo.py): the option ranges, the bytes of its
state (m + n fp32 values per factored m×n weight, n per vector), and fp32 scratch on every store dtype (the shared
workspace itself for an fp32 store)."""
from __future__ import annotations

import pytest
import torch

from tests.plugin_harness import quadratic_steps, resident_block
from zoedge_plugins.hizoo import HiZOOL


@pytest.mark.parametrize("options", [dict(eps=0.0), dict(alpha=-1e-9), dict(alpha=1.5), dict(h_min=0.0),
                                     dict(h_min=2.0), dict(h_max=0.5)])
def test_out_of_range_options_are_refused(options):
    with pytest.raises(ValueError, match=f"{next(iter(options))}="):
        HiZOOL(**options)


@pytest.mark.parametrize("options", [dict(alpha=0.0), dict(alpha=1.0), dict(h_min=1.0, h_max=1.0)])
def test_edge_options_are_accepted(options):
    opt = HiZOOL(**options)
    assert all(getattr(opt, k) == v for k, v in options.items())


@pytest.mark.parametrize("factored,want", [(True, (8 + 6 + 6) * 4), (False, (8 * 6 + 6) * 4)])
def test_hessian_bytes(factored, want):
    block = resident_block("layers.0", {"w": torch.zeros(8, 6), "b": torch.zeros(6)})
    opt = HiZOOL(lr=1e-3, alpha=1e-3, factored=factored)
    quadratic_steps(opt, block, lambda ts: float(sum((t - 1).square().sum() for t in ts.values())), 2)
    assert opt.hessian_bytes() == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scratch_is_fp32(dtype):
    block = resident_block("layers.0", {"w": torch.zeros(4, 3, dtype=dtype)})
    got = HiZOOL._fp32(block, "z")["w"]
    assert got.dtype == torch.float32 and got.shape == (4, 3)
    assert (got is block.workspace("z")["w"]) == (dtype == torch.float32)

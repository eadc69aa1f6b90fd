"""HZO's options, driven directly (plugins/hzo.py): the ranges it refuses, and which tensors it trains (2-D ones
always, 1-D ones unless ``vector=frozen``, nothing whose name matches ``freeze``)."""
from __future__ import annotations

import pytest
import torch

from zoedge_plugins.hzo import HZO


@pytest.mark.parametrize("options", [dict(eps=0.0), dict(rank=0), dict(nu=0), dict(fo_layers=-1)])
def test_out_of_range_options_are_refused(options):
    with pytest.raises(ValueError, match=f"{next(iter(options))}="):
        HZO(**options)


def test_edge_options_are_accepted():
    opt = HZO(rank=1, nu=1, fo_layers=0)
    assert (opt.rank, opt.nu, opt.fo_layers, opt.fo_pass) == (1, 1, 0, None)


@pytest.mark.parametrize("vector,freeze,trained", [
    ("dense", "", {"layers.0.w", "layers.0.b"}),
    ("frozen", "", {"layers.0.w"}),
    ("dense", "layers.0.b", {"layers.0.w"}),
    ("dense", ".w,.b", set()),
])
def test_which_tensors_it_trains(vector, freeze, trained):
    opt = HZO(vector=vector, freeze=freeze)
    tensors = {"layers.0.w": torch.zeros(4, 3), "layers.0.b": torch.zeros(3)}
    assert {n for n, t in tensors.items() if opt._trains(n, t)} == trained

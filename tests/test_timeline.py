"""The cost timeline against hand-computed critical paths, on the schedule the runtime really emits."""
from __future__ import annotations

import pytest
import torch

import zoedge
from tests.tiny import batch, save_tiny, tiny_config
from zoedge.hardware import Hardware
from zoedge.runtime.timeline import Costs, block_flops, predict


@pytest.fixture(scope="module")
def forward_ops(tmp_path_factory):
    """One forward of an untied 2-layer Llama (blocks embed, layers.0, layers.1, head), ram tier, prefetch 1:
    two ring slots, so layers.1 reuses embed's slot and head reuses layers.0's."""
    root = tmp_path_factory.mktemp("timeline")
    save_tiny("llama", root / "hf", layers=2, tie=False)
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    m = zoedge.load(root / "store", prefetch=1, in_place=False)  # the accelerator's schedule
    ops = m.schedule.record()
    m(*batch())
    m.close()
    return ops


def _unit(upload: float, compute: float):
    return lambda op: {"upload": upload, "compute": compute}[op.kind]


def test_compute_bound_critical_path(forward_ops):
    # U0[0,2] U1[2,4] C0[2,5] U2[5,7] (slot of embed: after C0) C1[5,8] U3[8,10] (after C1) C2[8,11] C3[11,14]
    t = predict(forward_ops, _unit(2.0, 3.0))
    assert t.total == 14.0
    assert [s.op.label for s in t.critical] == ["upload embed", "compute embed", "compute layers.0",
                                                "compute layers.1", "compute head"]
    assert t.busy["upload"] == 8.0 and t.busy["compute"] == 12.0
    assert t.overlap == 6.0  # [2,4] + [5,7] + [8,10]
    assert t.compute_stall == 0.0


def test_transfer_bound_critical_path(forward_ops):
    # U0[0,4] U1[4,8] C0[4,7] U2[8,12] C1[8,11] U3[12,16] C2[12,15] C3[16,19]: compute waits 1 before C1, C2, C3
    t = predict(forward_ops, _unit(4.0, 3.0))
    assert t.total == 19.0
    assert [s.op.label for s in t.critical] == ["upload embed", "upload layers.0", "upload layers.1", "upload head",
                                                "compute head"]
    assert t.compute_stall == 3.0
    assert t.overlap == 3.0 + 3.0 + 3.0  # C0 under U1, C1 under U2, C2 under U3


def test_costs_from_bytes_and_flops(forward_ops):
    hw = Hardware("test", gpu_memory=None, pcie=1e9, gpu_flops=1e9, disk=1e9, disk_write=1e9, efficiency=1.0)
    costs = Costs(hw, block_flops=[0.0, 2e9, 2e9, 1e9], passes=2)
    up = next(op for op in forward_ops if op.kind == "upload" and op.block == 1)
    comp = next(op for op in forward_ops if op.kind == "compute" and op.block == 1)
    assert costs(up) == up.nbytes / 1e9 and up.nbytes > 0
    assert costs(comp) == 2 * 2e9 / 1e9


def test_block_flops_counts_the_matmuls():
    cfg = tiny_config("llama", layers=2, tie=False)
    b, t = 2, 8
    flops = block_flops(cfg, ["embed", "layers.0", "layers.1", "head"], b, t)
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    linear = 2 * b * t * (h * h + 2 * h * kv + h * h + 3 * h * f)  # q, k, v, o, gate/up/down
    attention = 2 * 2 * b * t * t * h  # scores and weighted sum
    assert flops[0] == 0.0 and flops[1] == flops[2] == linear + attention
    assert flops[3] == 2 * b * t * h * cfg.vocab_size
    assert torch.tensor(flops).sum() > 0

"""MeZO's ``stochastic_rounding=True`` on a bf16/fp16 store: the update is computed in fp32 and rounded to one of
the two neighbouring low-precision values, up with probability equal to the fraction of the gap, so an update
smaller than half a step of the dtype is kept on average instead of lost (round-to-nearest drops it).

The expected neighbours below are written by hand from the formats (bf16 has 8 significant bits: a step of 2^-7
in [1, 2); fp16 has 11: 2^-10), never computed with the plugin's helpers."""
from __future__ import annotations

import pytest
import torch

from tests.plugin_harness import quadratic_steps, resident_block
from zoedge_plugins.mezo import MeZO, stochastic_round_

BF16_STEP = 2.0 ** -7  # the gap between neighbouring bf16 values in [1, 2)
FP16_STEP = 2.0 ** -10


@pytest.mark.parametrize("dtype,step", [(torch.bfloat16, BF16_STEP), (torch.float16, FP16_STEP)])
def test_rounds_to_a_neighbour_up_with_the_fraction_of_the_gap(dtype, step):
    """(value, uniform draw, result): the nearest neighbour, or the other one exactly when the draw is below the
    distance to the nearest as a fraction of the gap (so for U[0, 1) draws each neighbour's probability is the
    other's share of the gap), for values below and above the midpoint, a tie, negative values, and values the
    dtype holds exactly (never moved)."""
    cases = [
        (1 + 0.25 * step, 0.20, 1 + step), (1 + 0.25 * step, 0.30, 1.0), (1 + 0.25 * step, 0.25, 1.0),
        (1 + 0.75 * step, 0.20, 1.0), (1 + 0.75 * step, 0.30, 1 + step),  # nearest is the upper neighbour
        (1 + 0.5 * step, 0.49, 1 + step), (1 + 0.5 * step, 0.51, 1.0),  # tie: to even (1)
        (-(1 + 0.25 * step), 0.20, -(1 + step)), (-(1 + 0.25 * step), 0.30, -1.0),  # negative: mirrored
        (1.0, 0.0, 1.0), (1 + step, 0.0, 1 + step),  # exact values stay, even for the smallest draw
    ]
    value = torch.tensor([v for v, _, _ in cases], dtype=torch.float32)
    uniform = torch.tensor([u for _, u, _ in cases], dtype=torch.float32)
    out = torch.empty(len(cases), dtype=dtype)
    stochastic_round_(out, value, uniform)
    assert out.float().tolist() == [want for _, _, want in cases]


def test_the_rounding_is_unbiased():
    """Over many uniform draws the mean of the rounded values is the fp32 value (well within 4 standard errors)."""
    n, frac = 20000, 0.3
    value = torch.full((n,), 1 + frac * BF16_STEP)
    out = torch.empty(n, dtype=torch.bfloat16)
    stochastic_round_(out, value, torch.rand(n, generator=torch.Generator().manual_seed(0)))
    assert set(out.float().unique().tolist()) == {1.0, 1 + BF16_STEP}
    stderr = BF16_STEP * (frac * (1 - frac) / n) ** 0.5
    assert abs(out.double().mean().item() - value[0].item()) < 4 * stderr


def one_step(stochastic_rounding: bool, dtype: torch.dtype, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One MeZO step (losses 1 and 0: g = 1 / (2ε)) on a 64×64 block of 1.5 stored in ``dtype``; returns the
    weights after the update and the fp32 update's target 1.5 − lr·g·z, z the step's seeded draw."""
    eps = 1e-3
    block = resident_block("layers.0", {"w": torch.full((64, 64), 1.5, dtype=dtype)})
    opt = MeZO(seed=3, lr=lr, eps=eps, stochastic_rounding=stochastic_rounding)
    losses = iter([1.0, 0.0])
    quadratic_steps(opt, block, lambda ts: next(losses), 1)
    z = torch.empty(64, 64)
    opt.z(0, "w", 0)(z, 0, z.numel())
    return block.tensors["w"].float(), 1.5 - lr * (1.0 / (2 * eps)) * z


def test_mezo_keeps_updates_below_half_a_bf16_step_on_average():
    """lr·g·|z| is about 0.1 of a bf16 step: round-to-nearest loses the whole update (the weights stay 1.5), the
    stochastic rounding puts each weight on a neighbour of its fp32 target, with the target as mean."""
    lr = 0.1 * BF16_STEP * 2e-3  # lr·g = 0.1 step (g = 500)
    nearest, target = one_step(False, torch.bfloat16, lr)
    assert torch.equal(nearest, torch.full_like(nearest, 1.5))  # lost: why the option exists
    rounded, target = one_step(True, torch.bfloat16, lr)
    inside = (target - 1.5).abs() < BF16_STEP  # |z| < 10: all of them
    assert inside.sum() > 4000
    lower = torch.where(target >= 1.5, 1.5, 1.5 - BF16_STEP)
    assert ((rounded == lower) | (rounded == lower + BF16_STEP))[inside].all()
    assert (rounded != 1.5).sum() > 100  # updates kept
    # unbiased: the mean error along each update's direction is ~0 (7 standard errors: step / 32); rounding to
    # nearest would give -E|lr·g·z| = -0.08 step
    err = ((rounded - target) * (target - 1.5).sign())[inside].double().mean().item()
    assert abs(err) < BF16_STEP / 32, err / BF16_STEP


def test_stochastic_rounding_leaves_fp32_weights_as_plain_mezo():
    """An fp32 store is updated in fp32 either way: the option changes nothing there."""
    lr = 1e-3
    plain, _ = one_step(False, torch.float32, lr)
    rounded, target = one_step(True, torch.float32, lr)
    assert torch.equal(plain, rounded)
    assert torch.equal(plain, target)

"""The divergence guard's verdicts, driven directly (zoedge/train/guard.py): a non-finite step is reported by its
cause (a model broken as loaded, training that made the weights non-finite, or finite weights whose computation
overflowed), each with the fix that can help; the stall warning comes at the third step in a row with an exactly
zero projected gradient and an unchanged loss, once, and any moving step restarts the count."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zoedge.errors import StoreError, TrainingError
from zoedge.train.guard import StepGuard, nonfinite_cause


def model(**tensors):
    """What nonfinite_cause reads of a streamed model: its store and its weights, chunk by chunk."""
    return SimpleNamespace(store=Path("/stores/m"),
                           weight_stream=lambda: SimpleNamespace(chunks=[{"ok": torch.ones(2)}, tensors]))


def test_a_model_broken_as_loaded_is_a_store_error():
    err = nonfinite_cause(model(bad=torch.tensor([float("nan")])), "dev scores", trained=False, dtype="fp32")
    assert isinstance(err, StoreError)
    assert "tensor bad" in str(err) and "prepare the store again" in str(err)


def test_weights_made_non_finite_by_training_ask_for_a_lower_lr():
    err = nonfinite_cause(model(bad=torch.tensor([float("inf")])), "dev scores", trained=True, dtype="fp32")
    assert isinstance(err, TrainingError)
    assert "training made the weights non-finite (tensor bad)" in str(err) and "lower --lr" in str(err)


@pytest.mark.parametrize("dtype,fix", [("fp16", "use --dtype fp32 (or bf16"), ("bf16", "check the data")])
def test_finite_weights_blame_the_computation(dtype, fix):
    err = nonfinite_cause(model(fine=torch.zeros(3)), "dev scores", trained=True, dtype=dtype)
    assert isinstance(err, TrainingError)
    assert f"the {dtype} computation overflowed" in str(err) and fix in str(err)


def test_first_step_of_a_broken_model_names_the_tensor_not_the_lr():
    g = StepGuard(None, log=print)
    with pytest.raises(TrainingError, match="not finite before this step \\(tensor layers.3.w"):
        g.check(1, [float("nan"), 0.5], {}, 1e-3, untouched=lambda: "layers.3.w")
    with pytest.raises(TrainingError, match="training diverged: non-finite loss"):
        g.check(1, [float("nan"), 0.5], {}, 1e-3, untouched=lambda: None)


def stalled_steps(guard: StepGuard, steps: int, start: int = 1) -> None:
    for s in range(start, start + steps):
        guard.check(s, [0.6931, 0.6931], {"projected_grad": 0.0}, 1e30)


def test_stall_warning_at_the_third_step_once():
    g = StepGuard(None, log=(lines := []).append)
    stalled_steps(g, 2)
    assert lines == []
    stalled_steps(g, 1, start=3)
    assert len(lines) == 1 and "step 3" in lines[0] and "stayed at 0.6931" in lines[0] and "for 3 steps" in lines[0]
    stalled_steps(g, 5, start=4)
    assert len(lines) == 1


def test_a_moving_step_restarts_the_stall_count():
    g = StepGuard(None, log=(lines := []).append)
    stalled_steps(g, 2)
    g.check(3, [0.6931, 0.6931], {"projected_grad": 0.25}, 1e30)  # a non-zero gradient, same loss
    stalled_steps(g, 2, start=4)
    g.check(6, [0.5, 0.5], {"projected_grad": 0.0}, 1e30)  # a zero gradient, the loss moved
    stalled_steps(g, 2, start=7)
    assert lines == []

"""The divergence guard: a step's result is accepted only when it is finite.

:meth:`StepGuard.check` runs after the optimizer has turned a step's losses
into its (pending) update and *before* that update is applied, checkpointed or
exported. It refuses non-finite losses, non-finite metrics (e.g. the projected
gradient) and an update scale ``lr × projected gradient`` beyond the fp32 range, with
a :class:`~zoedge.errors.TrainingError` naming the step and the last good
checkpoint. It also warns once when the loss stalls with an exactly zero
projected gradient for several steps (typical of a learning rate so large that
the model saturates: the loss sits at ln(#candidates)).

Checkpoints and exports check the weights themselves as a last line
(:func:`zoedge.train.checkpoint.check_finite_weights`), so a non-finite model is never written.

A non-finite loss or evaluation score is reported by its cause
(:func:`nonfinite_cause`): weights that were not finite before training
touched them (a broken store or checkpoint: lowering --lr cannot help), weights
that training made non-finite (lower --lr), or finite weights whose computation
overflowed (the dtype).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from zoedge.errors import StoreError, TrainingError, ZoedgeError
from zoedge.train.checkpoint import last_good

FP32_MAX = float(torch.finfo(torch.float32).max)
#: steps in a row with a zero projected gradient and an unchanged loss before the stall warning
STALL_STEPS = 3


class StepGuard:
    """Accepts or refuses each step's result (see the module docstring).

    Args:
        ckpt_dir: the run's checkpoint folder (named in errors).
        log: where the stall warning goes.
    """

    def __init__(self, ckpt_dir: Path | None, log: Callable[[str], None]) -> None:
        self.ckpt_dir = ckpt_dir
        self.log = log
        self.stalled = 0
        self.warned = False
        self.last_loss: float | None = None

    def check(self, step: int, losses: Sequence[float | torch.Tensor], metrics: Mapping[str, object],
              lr: float, untouched: Callable[[], str | None] | None = None) -> None:
        """Refuse step ``step`` (1-based) when its losses, metrics or update scale are not finite.

        Args:
            untouched: for the first step since the weights were loaded: returns the name of a non-finite
                weight (None when all are finite), so the error names the broken model instead of the lr.

        Raises:
            TrainingError: naming the step, the bad values and the last good checkpoint.
        """
        values = [float(x) for x in losses]
        problem = None
        if not all(math.isfinite(v) for v in values):
            problem = f"non-finite loss {values}"
        else:
            bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
            if bad:
                problem = f"non-finite {', '.join(f'{k} {v}' for k, v in bad.items())} (losses {values})"
            g = metrics.get("projected_grad")
            if problem is None and isinstance(g, float) and not abs(lr * g) <= FP32_MAX:
                problem = f"the update scale lr × projected gradient = {lr:g} × {g:g} overflows fp32"
        if problem is not None:
            bad = untouched() if untouched is not None else None
            if bad is not None:
                raise TrainingError(f"step {step}", f"{problem}: the model's weights are not finite before this "
                                    f"step (tensor {bad} holds NaN or infinite values as loaded), so no learning "
                                    "rate can help", f"train an intact model (prepare the store again from its "
                                    f"checkpoint, or check that checkpoint); {last_good(self.ckpt_dir)}")
            raise TrainingError(f"step {step}", f"training diverged: {problem}; this step's update was not applied",
                                f"lower --lr or --eps, or check the data; {last_good(self.ckpt_dir)}")
        self._watch_stall(step, sum(values) / len(values), metrics.get("projected_grad"), lr)

    def _watch_stall(self, step: int, loss: float, g: object, lr: float) -> None:
        if isinstance(g, float) and g == 0.0 and (self.last_loss is None or loss == self.last_loss):
            self.stalled += 1
        else:
            self.stalled = 0
        self.last_loss = loss
        if self.stalled >= STALL_STEPS and not self.warned:
            self.warned = True
            self.log(f"warning: step {step}: the loss has stayed at {loss:.4f} with a zero projected gradient for "
                     f"{self.stalled} steps; training has stalled (lr {lr:g} is probably far too large and the "
                     "model saturated, or --eps is below the weights' precision): lower --lr")


def first_nonfinite(weights: Iterable[Mapping[str, torch.Tensor]]) -> str | None:
    """The name of the first NaN / infinite floating-point tensor in ``weights`` (chunks of name -> tensor)."""
    for chunk in weights:
        for name, t in chunk.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def nonfinite_cause(model: Any, what: str, trained: bool, dtype: str, ckpt_dir: Path | None = None) -> ZoedgeError:
    """The error for ``what`` (e.g. "dev scores") being NaN or infinite, by its cause.

    Args:
        model: the :class:`~zoedge.runtime.streamed.StreamedModel` (its weights are read once, block by block).
        trained: whether training has changed the weights since they were loaded.
        dtype: the compute dtype (named when the weights are finite: the computation overflowed).
    """
    bad = first_nonfinite(model.weight_stream().chunks)
    if bad is not None and not trained:
        return StoreError(model.store, f"{what} are not finite: the model's weights are not finite (tensor {bad} "
                          "holds NaN or infinite values); no metric of it is reported",
                          "use an intact model: prepare the store again from its checkpoint, or check that "
                          "checkpoint")
    if bad is not None:
        return TrainingError(what, f"are not finite: training made the weights non-finite (tensor {bad})",
                             f"lower --lr or --eps; {last_good(ckpt_dir)}")
    fix = "use --dtype fp32 (or bf16, whose range is fp32's)" if dtype == "fp16" else \
        "check the data (an empty candidate or prompt?) and use --dtype fp32"
    return TrainingError(what, f"are not finite although every weight is finite (the {dtype} computation "
                         "overflowed); no metric is reported", fix)

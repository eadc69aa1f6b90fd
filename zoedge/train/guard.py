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
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from zoedge.errors import TrainingError
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
              lr: float) -> None:
        """Refuse step ``step`` (1-based) when its losses, metrics or update scale are not finite.

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

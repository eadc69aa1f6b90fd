"""The training loop: one upload per step, every pass of the step while each block is resident.

Step t: ``optimizer.begin_step(t)`` → the runtime streams the blocks once and
runs ``optimizer.passes`` forward passes (the optimizer is the block visitor;
each pass's loss is computed at the head in fp32) → ``optimizer.finish_step``
stores the pending update, applied lazily during step t+1's stream. Before
eval, checkpoint and export the pending update is *flushed* (one stream with
no compute).

Data order is a pure function of (seed, step): batch t holds the examples at
positions [t·B, (t+1)·B) of the concatenation of per-epoch permutations drawn
from ``seed``. Resume therefore needs only the step number, and N steps
straight equal N/2 + resume + N/2 bit for bit (CPU, fp32).
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from zoedge.errors import ConfigError, DataError
from zoedge.optim.api import ZOOptimizer
from zoedge.optim.first_order import FirstOrder
from zoedge.runtime.streamed import BlockVisitor, StreamedModel
from zoedge.settings import TrainSettings
from zoedge.train.batching import Batch, candidate_loss, collate, length_batches, token_logprobs_from_logits
from zoedge.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from zoedge.train.guard import StepGuard
from zoedge.train.tasks import Example

__all__ = ["Trainer", "TrainSettings", "TrainResult", "Evaluation", "evaluate", "batch_indices", "log_stderr"]


def log_stderr(message: str) -> None:
    """Human-readable progress goes to stderr; stdout is left for machine-readable output."""
    print(message, file=sys.stderr, flush=True)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of batch ``step`` (see the module docstring)."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = perm[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def make_scheduler(optimizer: ZOOptimizer, schedule: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``constant`` or ``linear`` decay to 0 over ``steps``, as a torch LR scheduler."""
    if schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)


@dataclass
class Evaluation:
    loss: float
    accuracy: float | None
    examples: int


def evaluate(model: StreamedModel, tokenizer: Any, examples: Sequence[Example], batch_size: int = 32,
             max_length: int = 256, progress: bool = False, desc: str = "eval") -> Evaluation:
    """Mean loss and accuracy (classification) of the model's *current* weights (flush first)."""
    if not examples:
        return Evaluation(float("nan"), None, 0)
    total_loss, correct, n, cls = 0.0, 0, 0, 0
    for part in tqdm(length_batches(tokenizer, examples, batch_size), desc=desc, leave=False, disable=not progress):
        batch = collate(tokenizer, part, max_length, share_prompts=True)
        loss, pred = _loss_passes(model, BlockVisitor(), batch)[0]
        total_loss += float(loss) * len(part)
        n += len(part)
        if part[0].kind == "classification":
            correct += int((pred.cpu() == batch.labels).sum())
            cls += len(part)
    return Evaluation(total_loss / n, correct / cls if cls else None, n)


def _loss_passes(model: StreamedModel, visitor: BlockVisitor, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``visitor.passes`` passes; per pass (fp32 loss, predictions), logits only at scored positions."""
    dev = batch.to(model.device)

    def head(p: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return candidate_loss(token_logprobs_from_logits(logits, dev.target_ids), dev)

    return model.run(visitor, dev.input_ids, dev.attention_mask, select=dev.target_index, head_fn=head)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    last_loss: float = float("nan")
    fo_memory: dict[str, int] = field(default_factory=dict)  # bytes of the first-order blocks (if any)


class Trainer:
    """Fine-tunes a :class:`StreamedModel` with a ZO optimizer plugin.

    Args:
        model: the streamed model (its host tier is the working copy of the weights).
        tokenizer: the model's tokenizer.
        optimizer: a built plugin.
        train, dev, test: example splits.
        settings: loop settings.
        output: run directory (checkpoints, metrics, final model, summary).
        metrics_path: JSONL file of per-step metrics (default ``output/metrics.jsonl``).
    """

    def __init__(self, model: StreamedModel, tokenizer: Any, optimizer: ZOOptimizer, train: Sequence[Example],
                 dev: Sequence[Example], test: Sequence[Example], settings: TrainSettings, output: Path,
                 metrics_path: Path | None = None, progress: bool = True,
                 log: Callable[[str], None] = log_stderr) -> None:
        settings.check()
        if settings.batch_size > len(train):
            raise DataError("--batch-size", f"{settings.batch_size} is larger than the {len(train)} training examples",
                            f"use --batch-size {len(train)} or less, or give more training data")
        fo_blocks = optimizer.fo_blocks(model.blocks)
        fo_extra = optimizer.fo_parameters(model.device)
        self.fo: FirstOrder | None = None
        if fo_blocks or fo_extra:
            who = optimizer.name or type(optimizer).__name__
            if optimizer.fo_pass is None:
                raise ConfigError(f"optimizer '{who}'", "trains first-order tensors but declares no fo_pass",
                                  "set fo_pass to the plugin's unperturbed pass")
            self.fo = optimizer.first_order = FirstOrder(model, fo_blocks, optimizer.fo_settings(), who, fo_extra)
        self.model, self.tok, self.opt = model, tokenizer, optimizer
        self.train, self.dev, self.test = list(train), list(dev), list(test)
        self.s = settings
        self.output = Path(output)
        self.ckpt_dir = self.output / "checkpoints"
        self.metrics_path = metrics_path or self.output / "metrics.jsonl"
        self.scheduler = make_scheduler(optimizer, settings.schedule, settings.steps)
        self.step = 0
        self.last_plugin_metrics: dict[str, float] = {}  # the plugin's metrics of the last step (progress bar)
        self.last_losses: list[float] = []                # the last step's loss per pass
        self.progress = progress
        self.log = log
        self.guard = StepGuard(self.ckpt_dir, log)

    # ------------------------------------------------------------------ state
    def flush(self) -> None:
        """Apply pending updates to every block (before eval / save / export)."""
        self.model.run(self.opt)
        self.opt.flushed()

    def save(self) -> Path:
        """Flush and write a checkpoint of the current step."""
        self.flush()
        state = {"step": self.step, "settings": asdict(self.s), "optimizer": self.opt.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.fo is not None:
            state["first_order"] = self.fo.state_dict()
        return save_checkpoint(self.ckpt_dir, self.step, self.model.state_dict(), state, self.s.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest complete checkpoint if there is one; True when resumed."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        weights, state = load_checkpoint(path)
        self.model.load_state_dict(weights)
        self.opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.fo is not None:
            self.fo.reload(self.model)
            self.fo.load_state_dict(state["first_order"])
        self.step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------- loop
    def train_step(self) -> dict[str, float]:
        """One ZO step on batch ``self.step``; returns its metrics."""
        idx = batch_indices(len(self.train), self.s.batch_size, self.s.seed, self.step)
        batch = collate(self.tok, [self.train[i] for i in idx], self.s.max_length, share_prompts=True)
        lr = self.opt.lr
        t0 = time.perf_counter()
        self.run_extra_phases(batch)
        self.opt.begin_step(self.step)
        losses = [loss for loss, _ in _loss_passes(self.model, self.opt, batch)]
        values = torch.stack([x.detach() for x in losses]).float().cpu()  # the one host sync of the step
        if self.fo is not None and self.opt.grad_pass is not None:
            self.fo.step(losses[self.opt.grad_pass])
        self.last_losses = values.tolist()  # per pass
        metrics = self.opt.finish_step(list(values))
        self.guard.check(self.step + 1, values.tolist(), metrics, lr)  # before the update is applied or saved
        self.last_plugin_metrics = metrics
        self.scheduler.step()
        self.step += 1
        return {"step": self.step, "loss": float(values.mean()), "lr": lr, **metrics,
                "seconds": time.perf_counter() - t0, "tokens": batch.n_tokens}

    def run_extra_phases(self, batch: Batch) -> None:
        """The plugin's extra streamed phases before this step (DiZO), on this step's batch, after a flush; a
        phase with no passes is streamed without inputs (a visit)."""
        flushed = False
        for phase in self.opt.extra_phases(self.step):
            if not flushed:
                self.flush()  # phases read the current weights: the pending update first
                flushed = True
            if phase.passes:
                losses = [loss for loss, _ in _loss_passes(self.model, phase, batch)]
                self.opt.finish_phase(phase, list(torch.stack(losses).float().cpu()))
            else:  # a visit-only stream (e.g. writing the phase's result into the weights)
                self.model.run(phase)
                self.opt.finish_phase(phase, [])

    def evaluate(self, examples: Sequence[Example], desc: str) -> Evaluation:
        self.flush()
        return evaluate(self.model, self.tok, examples, self.s.eval_batch_size, self.s.max_length, self.progress, desc)

    def fit(self) -> TrainResult:
        """Train to ``settings.steps`` (from the resumed step), evaluating and checkpointing as configured."""
        self.output.mkdir(parents=True, exist_ok=True)
        result = TrainResult(steps=0, seconds=0.0, tokens=0)
        start_step = self.step
        ev = self.evaluate(self.dev, "dev (before)")
        result.before = asdict(ev)
        self.log(f"dev before: loss {ev.loss:.4f}" + (f", accuracy {ev.accuracy:.3f}" if ev.accuracy is not None else ""))
        if self.fo is not None:
            result.fo_memory = self.fo.memory()
            self.log(f"first-order blocks: {len(self.fo.blocks)} ({', '.join(self.fo.blocks)}); memory before "
                     f"the first step: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result.fo_memory.items()))
        t0 = time.perf_counter()
        bar = tqdm(total=self.s.steps, initial=self.step, desc="finetune", unit="step", disable=not self.progress)
        with open(self.metrics_path, "a") as mf:
            while self.step < self.s.steps:
                m = self.train_step()
                result.tokens += int(m["tokens"])
                result.last_loss = m["loss"]
                if self.s.eval_every and self.step % self.s.eval_every == 0 and self.step < self.s.steps:
                    e = self.evaluate(self.dev, "dev")
                    m["dev_loss"], m["dev_accuracy"] = e.loss, e.accuracy
                mf.write(json.dumps(m) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", **{k: f"{v:.3g}" for k, v in self.last_plugin_metrics.items()})
                if self.s.save_every and self.step % self.s.save_every == 0 and self.step < self.s.steps:
                    self.save()
        bar.close()
        result.steps = self.step - start_step
        if self.fo is not None:
            result.fo_memory = self.fo.memory()  # weights, grads and optimizer state, all allocated by now
            self.log("first-order memory: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result.fo_memory.items()))
        result.seconds = time.perf_counter() - t0
        self.save()
        ev = self.evaluate(self.dev, "dev (after)")
        result.after = asdict(ev)
        self.log(f"dev after: loss {ev.loss:.4f}" + (f", accuracy {ev.accuracy:.3f}" if ev.accuracy is not None else ""))
        return result

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

A checkpoint holds the weights, or, for a replayable plugin, the log of
every update since the base store (``--checkpoint-weights``, see
:meth:`Trainer.checkpoint_kind` and :mod:`zoedge.train.update_log`): resuming
from it replays the log onto the store, bit-equal to the weights it replaces.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from zoedge.errors import ConfigError, DataError
from zoedge.optim.base import ZOOptimizer
from zoedge.optim.first_order import FirstOrder
from zoedge.runtime.host import DiskTier
from zoedge.runtime.resident import BlockVisitor, Forward
from zoedge.runtime.streamed import StreamedModel
from zoedge.runtime.threads import ThreadGovernor
from zoedge.settings import TrainSettings
from zoedge.train.answers import EXTRA_NEW_TOKENS, MAX_NEW_TOKENS, exact_match, greedy_decode, token_f1
from zoedge.train.batching import Batch, candidate_loss, collate, length_batches, loss_count, token_logprobs_from_logits
from zoedge.train.checkpoint import free_disk, latest_checkpoint, load_checkpoint, save_checkpoint
from zoedge.store.atomic import write_error
from zoedge.train.guard import StepGuard, first_nonfinite, last_good, nonfinite_cause
from zoedge.train.tasks import Example
from zoedge.train.update_log import UpdateLog, changed_replay_error, store_identity
from zoedge.train.world import DirectionSplit, World, state_checksum

#: ``--checkpoint-weights auto`` writes the weights when the free disk holds a full checkpoint times this, plus
#: FULL_MARGIN_BYTES (other files grow meanwhile: metrics, the final export)
FULL_MARGIN = 1.1
FULL_MARGIN_BYTES = 2**30

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
    """Figures of one evaluation. ``loss``: mean over examples (classification) or over scored tokens
    (generation); ``perplexity`` = exp(loss) for generation; ``exact_match`` / ``f1``: greedy answers of the
    generation examples with a prompt and a reference (see :mod:`zoedge.train.answers`), else None.
    ``nonfinite``: examples in batches whose loss was NaN or infinite (then ``loss`` is NaN and the other figures
    None: a broken model gets no figures; callers turn it into an error)."""

    loss: float
    accuracy: float | None
    examples: int
    nonfinite: int = 0
    perplexity: float | None = None
    exact_match: float | None = None
    f1: float | None = None


def evaluate(model: StreamedModel, tokenizer: Any, examples: Sequence[Example], batch_size: int = 32,
             max_length: int = 256, progress: bool = False, desc: str = "eval", world: World | None = None
             ) -> Evaluation:
    """Loss and the metrics that fit the examples' layout, of the model's *current* weights (flush first):
    accuracy (classification); perplexity, and exact match and token F1 of greedy answers (generation).

    With a ``world`` of several ranks, rank r evaluates eval batches r, r + size, ... and the sums are
    all-reduced: the same batches as one process, so the same figures up to summation order."""
    if not examples:
        return Evaluation(float("nan"), None, 0)
    world = world or World()
    total_loss, weight, correct, n, cls, bad = 0.0, 0, 0, 0, 0, 0
    em, f1, answered = 0.0, 0.0, 0
    parts = length_batches(tokenizer, examples, batch_size)[world.rank::world.size]  # sharded across ranks
    for part in tqdm(parts, desc=desc, leave=False, disable=not progress):
        batch = collate(tokenizer, part, max_length, share_prompts=True)
        loss, pred = _loss_passes(model, Forward(), batch)[0]
        value = float(loss)
        if not math.isfinite(value):  # argmax over NaN scores would pick the first candidate: no figure at all
            bad += len(part)
            continue
        w = len(part) if part[0].kind == "classification" else loss_count(batch)  # examples / scored tokens
        total_loss += value * w
        weight += w
        n += len(part)
        if part[0].kind == "classification":
            correct += int((pred.cpu() == batch.labels).sum())
            cls += len(part)
        asked = [e for e in part if e.reference is not None]
        if asked:
            refs = [e.reference or "" for e in asked]
            longest = max(len(ids) for ids in tokenizer(refs, add_special_tokens=False)["input_ids"])
            answers = greedy_decode(model, tokenizer, [e.prompt for e in asked],
                                    min(MAX_NEW_TOKENS, longest + EXTRA_NEW_TOKENS), max_length)
            em += sum(exact_match(a, r) for a, r in zip(answers, refs))
            f1 += sum(token_f1(a, r) for a, r in zip(answers, refs))
            answered += len(asked)
    if world.size > 1:  # every rank learns of a non-finite batch anywhere (and all raise together)
        sums = world.all_reduce_sum(torch.tensor([total_loss, weight, correct, n, cls, bad, em, f1, answered],
                                                 dtype=torch.float64)).tolist()
        total_loss, weight, correct, n, cls, bad, em, f1, answered = sums
        weight, correct, n, cls, bad, answered = int(weight), int(correct), int(n), int(cls), int(bad), int(answered)
    if bad:
        return Evaluation(float("nan"), None, n + bad, bad)
    loss = total_loss / weight
    generation = cls < n
    return Evaluation(loss, correct / cls if cls else None, n,
                      perplexity=math.exp(min(loss, 700.0)) if generation else None,
                      exact_match=em / answered if answered else None, f1=f1 / answered if answered else None)


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
        world: the ranks of a data-parallel run (default: this process alone); see :mod:`zoedge.train.world`.
        threads: re-evaluates the CPU thread count every few steps (see :mod:`zoedge.runtime.threads`).
        identity: the run's identity (settings, store, data; see :mod:`zoedge.train.run_record`), recorded in
            every checkpoint and checked on resume.
    """

    def __init__(self, model: StreamedModel, tokenizer: Any, optimizer: ZOOptimizer, train: Sequence[Example],
                 dev: Sequence[Example], test: Sequence[Example], settings: TrainSettings, output: Path,
                 metrics_path: Path | None = None, progress: bool = True,
                 log: Callable[[str], None] = log_stderr, world: World | None = None,
                 threads: ThreadGovernor | None = None, identity: dict[str, Any] | None = None) -> None:
        settings.check()
        if settings.batch_size > len(train):
            raise DataError("--batch-size", f"{settings.batch_size} is larger than the {len(train)} training examples",
                            f"use --batch-size {len(train)} or less, or give more training data")
        self.world = world or World()
        if settings.batch_size < self.world.size and settings.dp_mode == "batch":
            raise ConfigError("--batch-size", f"{settings.batch_size} is smaller than the {self.world.size} ranks "
                              "(the global batch is split across ranks)",
                              f"use --batch-size {self.world.size} or more, or fewer ranks")
        fo_blocks = optimizer.fo_blocks(model.blocks)
        fo_extra = optimizer.fo_parameters(model.device)
        self.fo: FirstOrder | None = None
        if fo_blocks or fo_extra:
            who = optimizer.name or type(optimizer).__name__
            if model.lora is not None:
                raise ConfigError(f"--peft lora with optimizer '{who}'", "it trains first-order blocks or tensors "
                                  f"({', '.join(fo_blocks) or 'its own'}) of the base, which stays frozen under "
                                  "adapters", "turn its first-order part off (hzo: --opt fo_layers=0), use a "
                                  "zeroth-order optimizer (mezo, dizo, hizoo-l), or drop --peft")
            if settings.dp_mode == "directions":
                raise ConfigError(f"--dp-mode directions with optimizer '{who}'", "it trains first-order tensors "
                                  "(their gradient needs the batch split)", "use --dp-mode batch (the default)")
            if optimizer.fo_pass is None:
                raise ConfigError(f"optimizer '{who}'", "trains first-order tensors but declares no fo_pass",
                                  "set fo_pass to the plugin's unperturbed pass")
            self.fo = optimizer.first_order = FirstOrder(model, fo_blocks, optimizer.fo_settings(), who, fo_extra)
        # --dp-mode directions: every rank takes the whole batch and its share of the directions (DirectionSplit)
        self.split = DirectionSplit(optimizer, self.world) if settings.dp_mode == "directions" else None
        self.data_world = self.world if self.split is None else World()  # the ranks the batch is split across
        self.model, self.tok, self.opt = model, tokenizer, optimizer
        if isinstance(model.tier, DiskTier) and model.tier.working:  # the plugin's state waits where the weights do
            optimizer.block_state.directory = model.tier.working[0].parent / "optimizer-state"
        self.train, self.dev, self.test = list(train), list(dev), list(test)
        self.s = settings
        self.output = Path(output)
        self.ckpt_dir = self.output / "checkpoints"
        self.metrics_path = metrics_path or self.output / "metrics.jsonl"
        self.scheduler = make_scheduler(optimizer, settings.schedule, settings.steps)
        self.all_blocks = frozenset(b.name for b in model.blocks)
        self.step = 0
        self.loaded_step = 0  # the step whose weights were loaded (a resume's checkpoint step)
        self.last_plugin_metrics: dict[str, float] = {}  # the plugin's metrics of the last step (progress bar)
        self.last_losses: list[float] = []                # the last step's loss per pass
        self.progress = progress and self.world.is_main
        self.log = log if self.world.is_main else (lambda message: None)
        self.guard = StepGuard(self.ckpt_dir, self.log)
        self.threads = threads
        self.eval_seconds = 0.0  # spent in evaluate() (flush included), for the run summary
        # checkpoints of updates: the log of every update since the base store (None: checkpoints hold weights)
        self.not_replayable = self._not_replayable()
        if settings.checkpoint_weights == "updates" and self.not_replayable:
            who = optimizer.name or type(optimizer).__name__
            raise ConfigError("--checkpoint-weights updates", f"optimizer '{who}' cannot be checkpointed as "
                              f"updates: {self.not_replayable}",
                              "use --checkpoint-weights full, or auto (which writes the weights for it)")
        self.updates: UpdateLog | None = None
        if settings.checkpoint_weights != "full" and not self.not_replayable:
            self.updates = UpdateLog(store_identity(model.store))
        self.checkpoint_choice: dict[str, Any] = {}  # the last checkpoint's kind and why (for summary.json)
        self.replayed: dict[str, Any] | None = None  # what the resume's replay cost (for summary.json)
        self.identity = identity

    def _not_replayable(self) -> str:
        """Why this run's weights cannot be rebuilt from the base store and the update log ("" when they can)."""
        if not self.opt.replayable:
            return "its weights are not a pure function of the base and its updates (its replayable is False)"
        if self.fo is not None:
            return "it trains first-order blocks (their weights are not in the update log)"
        if self.model.lora is not None:
            return "it trains LoRA adapters (checkpointed whole: they are small)"
        return ""

    # ------------------------------------------------------------------ state
    def flush(self) -> None:
        """Apply pending updates to every block (before eval / save / export)."""
        self.model.run(self.opt)
        self.opt.flushed()

    def save(self) -> Path:
        """Flush and write a checkpoint of the current step: the weights, or the update log (see
        :meth:`checkpoint_kind`)."""
        self.flush()
        kind = self.checkpoint_kind()
        state = {"step": self.step, "settings": asdict(self.s), "optimizer": self.opt.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.fo is not None:
            state["first_order"] = self.fo.state_dict()
        if self.updates is not None:
            state["updates"] = self.updates.state()
        if self.identity is not None:
            state["run"] = self.identity
        path = self.ckpt_dir / f"step-{self.step:08d}"
        if self.world.is_main:  # every rank holds the same state: one writes it
            weights = self.model.trained_stream() if kind == "full" else None
            path = save_checkpoint(self.ckpt_dir, self.step, weights, state, self.s.keep_checkpoints)
        self.world.barrier()
        return path

    def checkpoint_kind(self) -> str:
        """What the next checkpoint holds, "full" (the weights) or "updates" (the update log), by
        ``--checkpoint-weights``; ``auto``: the weights when the run cannot be replayed or a full checkpoint fits
        the free disk of the checkpoint folder with a margin (:data:`FULL_MARGIN`), else the updates. The choice
        and its reason are logged when the kind changes and kept in :attr:`checkpoint_choice`."""
        setting = self.s.checkpoint_weights
        if setting == "full":
            kind, reason = "full", "--checkpoint-weights full"
        elif self.updates is None:  # auto (updates was refused at construction or resume)
            why = self.not_replayable or "the run resumed from a checkpoint of weights without an update log"
            kind, reason = "full", f"auto: the updates cannot be replayed ({why})"
        elif setting == "updates":
            kind, reason = "updates", "--checkpoint-weights updates"
        else:
            size = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in self.model.weight_stream().entries)
            need, free = int(size * FULL_MARGIN) + FULL_MARGIN_BYTES, free_disk(self.ckpt_dir)
            where = f"{_gb(free)} free in {self.ckpt_dir}"
            if free >= need:
                kind, reason = "full", f"auto: a full checkpoint ({_gb(size)}) fits the {where} with a margin"
            else:
                kind, reason = "updates", (f"auto: a full checkpoint ({_gb(size)}, {_gb(need)} with a margin) does "
                                           f"not fit the {where}")
        if kind != self.checkpoint_choice.get("kind"):
            self.log(f"checkpoints hold {'the weights' if kind == 'full' else 'the update log'} ({reason})")
        self.checkpoint_choice = {"setting": setting, "kind": kind, "reason": reason}
        return kind

    def resume(self, changed: Sequence[str] = ()) -> bool:
        """Load the newest complete checkpoint if there is one; True when resumed. A checkpoint of updates is
        replayed onto the base store (see :mod:`zoedge.train.update_log`).

        Args:
            changed: settings this resume changes (``--allow-changes``) that change what a logged update means
                (plugin options, the seed): the plugin would replay the log with the new values, so a log is
                neither replayed nor continued across them.

        Raises:
            StoreError: a checkpoint of updates made to another store.
            ConfigError: a checkpoint of updates with a plugin that cannot replay them or with ``changed``
                settings, or ``--checkpoint-weights updates`` after a checkpoint that has no usable update log.
        """
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            return False
        weights, state = load_checkpoint(path)
        self.opt.load_state_dict(state["optimizer"])  # first: a replay regenerates noise from the restored seed
        self.scheduler.load_state_dict(state["scheduler"])
        log = UpdateLog.from_state(state["updates"]) if "updates" in state else None
        if weights is None:
            if self.not_replayable or log is None:
                who = self.opt.name or type(self.opt).__name__
                raise ConfigError(path, f"holds a log of updates, not weights, and optimizer '{who}' cannot replay "
                                  f"it: {self.not_replayable or 'the log is missing'}",
                                  "resume with the checkpointed run's optimizer and options, or start a fresh run")
            if changed:
                raise changed_replay_error(path, changed)
            log.check_base(self.model.store, path)
            self.log(f"replaying {len(log)} update(s) onto {len(self.model.blocks)} block(s) "
                     f"({log.cost(self.model)} block updates) from the store {self.model.store}")
            self.replayed = log.replay(self.model, self.opt, path)
            self.log(f"replayed {self.replayed['block_updates']} block updates in {self.replayed['seconds']:.1f} s")
        else:
            self.model.load_trained(weights)
        if self.fo is not None:
            self.fo.reload(self.model)
            self.fo.load_state_dict(state["first_order"])
        # the log continues only from this store (a checkpoint of weights may carry none)
        keep = (log is not None and self.updates is not None and not changed
                and log.base.get("manifest_sha256") == self.updates.base["manifest_sha256"])
        self.updates = log if keep else None
        if self.s.checkpoint_weights == "updates" and self.updates is None:
            raise ConfigError("--checkpoint-weights updates", f"the run resumes from {path}, a checkpoint of "
                              "weights without a log of updates since the store that this run can continue "
                              + (f"(changed: {', '.join(changed)})" if changed else "(written with full)"),
                              "resume with --checkpoint-weights full or auto (a log of updates starts with the run)")
        self.step = self.loaded_step = int(state["step"])
        self.log(f"resumed from {path} at step {self.step}")
        self.check_consistent(f"resume from {path}")  # every rank must have read the same checkpoint
        return True

    def check_consistent(self, when: str) -> None:
        """Data-parallel runs: stop unless every rank holds the same trained state (see World.check_consistent)."""
        if self.world.size > 1:
            extra = [v for v in self.opt.plugin_state().values() if isinstance(v, torch.Tensor)]
            if self.model.lora is not None:
                extra += list(self.model.lora.tensors.values())
            if self.fo is not None:
                extra += [p.detach() for b in self.fo.blocks for p in self.fo.params[b].values()]
                extra += [p.detach() for p in self.fo.extra.values()]
            self.world.check_consistent(state_checksum(self.model, extra), when)

    def shares(self) -> dict[str, list[int]]:
        """Each rank's share of a step (for summary.json): examples, and directions when they are split."""
        if self.split is None:
            return {"per_rank_batch": [b - a for a, b in self.world.shard_bounds(self.s.batch_size)]}
        return {"per_rank_batch": [self.s.batch_size] * self.world.size,
                "per_rank_directions": [b - a for a, b in self.world.shard_bounds(len(self.split.groups))]}

    # ------------------------------------------------------------------- loop
    def train_step(self) -> dict[str, float]:
        """One ZO step on batch ``self.step``; returns its metrics."""
        idx = self.data_world.shard(batch_indices(len(self.train), self.s.batch_size, self.s.seed, self.step))
        batch = collate(self.tok, [self.train[i] for i in idx], self.s.max_length, share_prompts=True)
        lr = self.opt.lr
        t0 = time.perf_counter()
        self.world.step = self.step
        self.run_extra_phases(batch)
        self.opt.begin_step(self.step)
        losses = [loss for loss, _ in _loss_passes(self.model, self.split.visitor if self.split else self.opt, batch)]
        # the one host sync of the step (and, across ranks, the one collective: global-batch means of the passes,
        # or, with the directions split, every rank's passes gathered)
        values, total, (tokens,) = self.data_world.mean_losses(losses, loss_count(batch), [batch.n_tokens])
        if self.split is not None:
            values = self.split.gather(values)
        if self.fo is not None and self.opt.grad_pass is not None:
            if self.world.size > 1:  # the gradient of the global mean: local share, summed over ranks
                self.fo.step(losses[self.opt.grad_pass] * (loss_count(batch) / total), self.world.all_reduce_grads)
            else:
                self.fo.step(losses[self.opt.grad_pass])
        self.last_losses = values.tolist()  # per pass
        metrics = self.opt.finish_step(list(values))
        untouched = None
        if self.step == self.loaded_step:  # no update applied yet: a non-finite loss may be the loaded weights'
            untouched = lambda: first_nonfinite(self.model.weight_stream().chunks)  # noqa: E731
        self.guard.check(self.step + 1, values.tolist(), metrics, lr, untouched)  # before the update is applied
        if self.updates is not None:
            owed = self.opt.owed
            self.updates.record(self.opt.pending, None if owed == self.all_blocks else owed)  # type: ignore[arg-type]
        self.last_plugin_metrics = metrics
        self.scheduler.step()
        self.step += 1
        if self.world.check_every and self.step % self.world.check_every == 0:
            self.check_consistent(f"step {self.step}")
        return {"step": self.step, "loss": float(values.mean()), "lr": lr, **metrics,
                "seconds": time.perf_counter() - t0, "tokens": int(tokens)}

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
                self.opt.finish_phase(phase, list(self.data_world.mean_losses(losses, loss_count(batch))[0]))
            else:  # a visit-only stream (e.g. writing the phase's result into the weights)
                self.model.run(phase)
                self.opt.finish_phase(phase, [])

    def evaluate(self, examples: Sequence[Example], desc: str) -> Evaluation:
        t0 = time.perf_counter()
        self.flush()
        ev = evaluate(self.model, self.tok, examples, self.s.eval_batch_size, self.s.max_length, self.progress, desc,
                      self.world)
        self.eval_seconds += time.perf_counter() - t0
        if ev.nonfinite:
            raise nonfinite_cause(self.model, f"{desc} scores ({ev.nonfinite} of {ev.examples} examples)",
                                  trained=self.step > self.loaded_step, dtype=self.model.manifest.dtype,
                                  ckpt_dir=self.ckpt_dir)
        return ev

    def fit(self) -> TrainResult:
        """Train to ``settings.steps`` (from the resumed step), evaluating and checkpointing as configured."""
        if self.world.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        result = TrainResult(steps=0, seconds=0.0, tokens=0)
        start_step = self.step
        ev = self.evaluate(self.dev, "dev (before)")
        result.before = asdict(ev)
        self.log(f"dev before: {describe(ev)}")
        if self.fo is not None:
            result.fo_memory = self.fo.memory()
            self.log(f"first-order blocks: {len(self.fo.blocks)} ({', '.join(self.fo.blocks)}); memory before "
                     f"the first step: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result.fo_memory.items()))
        t0 = time.perf_counter()
        bar = tqdm(total=self.s.steps, initial=self.step, desc="finetune", unit="step", disable=not self.progress)
        # rank 0 writes; unbuffered: a failed write (disk full) leaves nothing buffered to fail again at close
        with open(self.metrics_path if self.world.is_main else os.devnull, "ab", buffering=0) as mf:
            while self.step < self.s.steps:
                m = self.train_step()
                if self.threads is not None:
                    m["threads"] = self.threads.after_step(self.step)
                result.tokens += int(m["tokens"])
                result.last_loss = m["loss"]
                if self.s.eval_every and self.step % self.s.eval_every == 0 and self.step < self.s.steps:
                    e = self.evaluate(self.dev, "dev")
                    m["dev_loss"], m["dev_accuracy"] = e.loss, e.accuracy
                    m.update({f"dev_{k}": v for k, v in (("perplexity", e.perplexity), ("exact_match", e.exact_match),
                                                          ("f1", e.f1)) if v is not None})
                try:
                    mf.write((json.dumps(m) + "\n").encode())
                except OSError as e:
                    raise write_error(self.metrics_path, f"the metrics of step {self.step}", e, "free disk space or "
                                      f"fix permissions, then re-run the same command with --resume; "
                                      f"{last_good(self.ckpt_dir)}") from None
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
        self.log(f"dev after: {describe(ev)}")
        return result


def describe(ev: Evaluation | dict[str, Any]) -> str:
    """``loss 0.6931, accuracy 0.750`` / ``loss 1.2, perplexity 3.3, exact match 0.40, token F1 0.55``."""
    d = asdict(ev) if isinstance(ev, Evaluation) else ev
    parts = [f"loss {d['loss']:.4f}"] if d.get("loss") is not None else []
    for key, name, fmt in (("accuracy", "accuracy", ".3f"), ("perplexity", "perplexity", ".2f"),
                           ("exact_match", "exact match", ".3f"), ("f1", "token F1", ".3f")):
        if d.get(key) is not None:
            parts.append(f"{name} {d[key]:{fmt}}")
    return ", ".join(parts) or "n/a"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"

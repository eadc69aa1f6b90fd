"""Checks for optimizer plugins, installed with zoedge (the plugin guide: docs/plugins.md).

* :func:`check_streamed_equals_resident`: a plugin trained through the streaming runtime, in every layout and on
  both host tiers, gives the losses and weights of a textbook loop over the resident model, bit for bit;
* :func:`check_resume_equals_uninterrupted`: N steps == N/2, a checkpoint, a resume and N/2 more, bit for bit;
* the pieces they use: tiny models with a tokenizer (:mod:`zoedge.testing.tiny`), :func:`loss_passes` (a step's
  passes on the streamed model), :func:`resident_loss` (the resident model's loss at given weights), and
  hand-made residents for driving hooks directly (:func:`resident_block`, :func:`quadratic_steps`).
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from zoedge.loading import load
from zoedge.store.prepare import prepare
from zoedge.optim.base import ZOOptimizer
from zoedge.runtime.resident import BlockVisitor, Resident
from zoedge.runtime.streamed import StreamedModel
from zoedge.testing.tiny import CharTokenizer, save_tiny, toy_examples
from zoedge.train.batching import Batch, candidate_loss, collate, token_logprobs_from_logits
from zoedge.train.trainer import TrainSettings, Trainer, _loss_passes, batch_indices

__all__ = ["LAYOUTS", "TIERS", "CharTokenizer", "Workspaces", "batches", "check_resume_equals_uninterrupted",
           "check_streamed_equals_resident", "loss_passes", "quadratic_steps", "resident_block", "resident_loss",
           "run_streamed", "save_tiny", "tiny_store", "toy_examples"]

#: runtime layouts (options of :func:`zoedge.load`): the CPU's in-place binding (noise drawn once into
#: workspaces), device slots with just-in-time perturbations (an accelerator's default), slots with workspaces
LAYOUTS: dict[str, dict[str, Any]] = {"in-place": {}, "lean": dict(in_place=False),
                                      "workspaces": dict(in_place=False, lean=False)}
#: host tiers
TIERS = ("ram", "disk")

#: ``make_plugin(seed)``: a fresh plugin
MakePlugin = Callable[[int], ZOOptimizer]
#: ``reference(params, loss, steps, seed)``: the method as a textbook loop on resident weights ``params`` (updated in
#: place, eagerly), ``loss(weights, t)`` the loss of step ``t``'s batch at ``weights``; returns each step's pass losses
Reference = Callable[[dict[str, torch.Tensor], Callable[[Mapping[str, torch.Tensor], int], float], int, int],
                     list[list[float]]]


def tiny_store(directory: Path, family: str = "llama", seed: int = 0) -> tuple[torch.nn.Module, Path]:
    """A tiny random HF model of ``family`` saved under ``directory/hf`` and prepared into ``directory/store``."""
    model = save_tiny(family, directory / "hf", seed=seed)
    prepare(directory / "hf", directory / "store", progress=False, log=lambda s: None)
    return model, directory / "store"


def batches(examples: Sequence[Any], steps: int, batch_size: int, seed: int) -> list[Batch]:
    """The trainer's batches of ``steps`` steps (same order and padding), tokenized by :class:`CharTokenizer`."""
    tok = CharTokenizer()
    return [collate(tok, [examples[i] for i in batch_indices(len(examples), batch_size, seed, t)])
            for t in range(steps)]


def loss_passes(model: StreamedModel, visitor: BlockVisitor, batch: Batch) -> list[torch.Tensor]:
    """The fp32 loss of each of ``visitor``'s passes over ``batch`` (one streamed step, as the trainer runs it)."""
    return [loss for loss, _ in _loss_passes(model, visitor, batch)]


def resident_loss(model: torch.nn.Module, params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
    """The trainer's loss of ``batch`` on the resident HF ``model`` with weights ``params`` (functional_call)."""
    pos = batch.attention_mask.cumsum(-1) * batch.attention_mask - 1
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if model.config.model_type != "opt":
        kwargs["position_ids"] = pos
    logits = functional_call(model, dict(params), (), kwargs).logits
    at = logits.reshape(-1, logits.shape[-1])[batch.target_index]
    return candidate_loss(token_logprobs_from_logits(at, batch.target_ids), batch)[0]


def run_streamed(opt: ZOOptimizer, store: Path, steps_batches: Sequence[Batch], **load_options: Any
                 ) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """The plugin's steps on the streamed model (constant lr), then a flush: (per-step pass losses, weights)."""
    model = load(store, **load_options)
    losses = []
    try:
        for t, batch in enumerate(steps_batches):
            opt.begin_step(t)
            ls = loss_passes(model, opt, batch)
            losses.append([float(x) for x in ls])
            opt.finish_step(ls)
        model.run(opt)
        opt.flushed()
        return losses, {n: t.clone() for n, t in model.state_dict().items()}
    finally:
        model.close()


def _load_options(layout: str, tier: str, directory: Path) -> dict[str, Any]:
    options = dict(LAYOUTS[layout])
    if tier == "disk":
        options.update(tier="disk", working_dir=directory / f"working-{layout}")
    return options


def check_streamed_equals_resident(make_plugin: MakePlugin, reference: Reference, *, family: str = "llama",
                                   layouts: Sequence[str] = tuple(LAYOUTS), tiers: Sequence[str] = TIERS,
                                   steps: int = 4, batch_size: int = 4, seed: int = 7,
                                   directory: Path | None = None) -> None:
    """The plugin through the streaming runtime == ``reference`` on the resident tiny model, bit for bit: every
    pass's loss and every weight after the final flush, in each layout and on each tier (CPU, fp32).

    Raises:
        AssertionError: naming the layout, tier and the first loss or weight that differs.
    """
    directory = Path(tempfile.mkdtemp(prefix="zoedge-check-")) if directory is None else Path(directory)
    model, store = tiny_store(directory, family)
    steps_batches = batches(toy_examples(), steps, batch_size, seed)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = reference(params, lambda w, t: float(resident_loss(model, w, steps_batches[t])), steps, seed)
    for tier in tiers:
        for layout in layouts:
            got, weights = run_streamed(make_plugin(seed), store, steps_batches, **_load_options(layout, tier, directory))
            where = f"{layout} layout, {tier} tier"
            if got != expected:
                raise AssertionError(f"{where}: pass losses {got} != the reference's {expected}")
            for n, p in params.items():
                if not torch.equal(weights[n], p):
                    raise AssertionError(f"{where}: weight {n} differs from the reference's (max abs diff "
                                         f"{(weights[n] - p).abs().max().item():.3g})")


def _metrics_losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def check_resume_equals_uninterrupted(make_plugin: MakePlugin, *, family: str = "llama", tiers: Sequence[str] = TIERS,
                                      steps: int = 6, batch_size: int = 4, seed: int = 4,
                                      directory: Path | None = None, **settings: Any) -> None:
    """``steps`` steps straight == ``steps // 2``, a checkpoint, a resume in a new trainer and the rest: the same
    losses and weights, bit for bit, on each tier (the plugin's state must survive the checkpoint).

    Raises:
        AssertionError: naming the tier and what differs.
    """
    directory = Path(tempfile.mkdtemp(prefix="zoedge-check-")) if directory is None else Path(directory)
    _, store = tiny_store(directory, family)
    ex = toy_examples()

    def trainer(out: Path, tier: str) -> Trainer:
        model = load(store, tier=tier, working_dir=out / "working" if tier == "disk" else None)
        return Trainer(model, CharTokenizer(), make_plugin(seed), ex, ex[:4], [],
                       TrainSettings(steps=steps, batch_size=batch_size, seed=seed, **settings), out, progress=False,
                       log=lambda s: None)

    for tier in tiers:
        straight = trainer(directory / f"straight-{tier}", tier)
        straight.fit()
        half = trainer(directory / f"resumed-{tier}", tier)
        first = [half.train_step()["loss"] for _ in range(steps // 2)]
        half.save()
        half.model.close()
        resumed = trainer(directory / f"resumed-{tier}", tier)
        if not resumed.resume():
            raise AssertionError(f"{tier} tier: the run did not resume from its checkpoint")
        resumed.fit()
        a, b = _metrics_losses(directory / f"straight-{tier}"), first + _metrics_losses(directory / f"resumed-{tier}")
        if a != b:
            raise AssertionError(f"{tier} tier: losses {b} after the resume != {a} uninterrupted")
        wa, wb = straight.model.state_dict(), resumed.model.state_dict()
        for k in wa:
            if not torch.equal(wa[k], wb[k]):
                raise AssertionError(f"{tier} tier: weight {k} after the resume differs from the uninterrupted run's")
        straight.model.close()
        resumed.model.close()


class Workspaces:
    """A hand-made runtime's ``workspace`` for :func:`resident_block`: one buffer per (key, tensor name)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, str], torch.Tensor] = {}

    def workspace(self, key: str, block: Resident) -> dict[str, torch.Tensor]:
        return {n: self.bufs.setdefault((key, n), torch.empty_like(t)) for n, t in block.tensors.items()}


def resident_block(name: str, tensors: dict[str, torch.Tensor], runtime: Any = None) -> Resident:
    """A resident block of ``tensors`` outside any model (for driving a plugin's hooks directly)."""
    return Resident(name, 0, tensors, frozenset(tensors), runtime=runtime or Workspaces())


def quadratic_steps(opt: ZOOptimizer, block: Resident, loss_fn: Callable[[Mapping[str, torch.Tensor]], float],
                    steps: int) -> None:
    """Drive ``opt`` through its hooks on one hand-made block whose loss is ``loss_fn(tensors)``, then flush."""
    for t in range(steps):
        opt.begin_step(t)
        opt.on_resident(block)
        losses = [torch.tensor(float(loss_fn(opt.pass_tensors(block, p)))) for p in range(opt.passes)]
        opt.finish_step(losses)
    opt.on_resident(block)
    opt.flushed()

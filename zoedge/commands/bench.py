"""``zoedge bench STORE``: measured training-step throughput (tokens/s) with a time breakdown, optionally against a
resident MeZO step in the same process (``--compare resident``)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoedge.commands.memory import add_common, options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge bench``."""
    p = subparsers.add_parser(
        "bench", help="measure training-step throughput (tokens/s, time breakdown), optionally vs resident MeZO",
        description="Run --warmup untimed and --steps timed training steps on a synthetic batch and report the "
        "median step time, tokens/s and where the time goes (optimizer hooks: applying the pending update and "
        "drawing noise; building the perturbed weights; the rest: copies and the forward passes). "
        "--compare resident also times a plain resident MeZO step (the whole model on the device, perturbed in "
        "place) and the step's forward passes alone (the floor) on the same batch, alternating with the streamed "
        "step, and reports the ratios. On CUDA the "
        "hook timings synchronise the device (the breakdown, not the total, is then approximate).")
    add_common(p)
    p.set_defaults(steps=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--compare", choices=("resident",), default=None,
                   help="also time resident MeZO in the same process (needs the whole model in device memory)")
    p.set_defaults(command="bench")


class TimedVisitor:
    """Delegates every hook to the optimizer and adds up the time spent in each."""

    def __init__(self, opt: Any, device: Any) -> None:
        self.opt, self.device = opt, device
        self.passes = opt.passes
        self.times = {"on_resident": 0.0, "pass_tensors": 0.0, "on_passes_done": 0.0}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch
            torch.accelerator.synchronize(self.device)

    def _timed(self, hook: str, *args: Any) -> Any:
        self._sync()
        t0 = time.perf_counter()
        out = getattr(self.opt, hook)(*args)
        self._sync()
        self.times[hook] += time.perf_counter() - t0
        return out

    def on_resident(self, block: Any) -> None:
        self._timed("on_resident", block)

    def pass_tensors(self, block: Any, p: int) -> Mapping[str, Any]:
        return self._timed("pass_tensors", block, p)

    def on_passes_done(self, block: Any) -> None:
        self._timed("on_passes_done", block)


def resident_loss(model: Any, batch: Any):
    """The batch's loss under the resident HF ``model`` (one forward pass), as a function of nothing."""
    from zoedge.train.batching import candidate_loss, token_logprobs_from_logits

    def loss() -> Any:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
        return candidate_loss(token_logprobs_from_logits(rows, batch.target_ids), batch)[0]

    return loss


def resident_forwards(model: Any, batch: Any, passes: int = 2):
    """The floor of a ZO step: its ``passes`` forward passes (with the loss) on the resident model, nothing else."""
    import torch

    loss = resident_loss(model, batch)

    @torch.no_grad()
    def step() -> float:
        return [float(loss()) for _ in range(passes)][0]

    return step


def resident_mezo(model: Any, batch: Any, eps: float = 1e-3, lr: float = 1e-6, seed: int = 0, noise: str = "gaussian"):
    """A plain resident MeZO step function (in-place ±εz regenerated from the seed, as the MeZO paper's code),
    with the noise variant ``noise`` (:mod:`zoedge.optim.noise`; pool noise is added straight from the pool)."""
    import torch

    from zoedge.optim.noise import make_noise

    source = make_noise(noise, seed)
    params = list(model.named_parameters())  # tied weights appear once
    state = {"t": 0}
    loss = resident_loss(model, batch)

    def perturb(scale: float, t: int) -> None:
        for n, p in params:
            source.add_(p, p, scale, t, n, "z0")

    @torch.no_grad()
    def step() -> float:
        t = state["t"]
        perturb(eps, t)
        lp = float(loss())
        perturb(-2 * eps, t)
        lm = float(loss())
        perturb(eps, t)
        g = (lp - lm) / (2 * eps)
        perturb(-lr * g, t)
        state["t"] += 1
        return lp

    return step


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from zoedge.optim.registry import build
    from zoedge.plan.accounting import synthetic_batch
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.train.trainer import _loss_passes

    from zoedge.runtime.threads import apply_threads, choose_threads

    threads = choose_threads(args.threads, args.tier)
    apply_threads(threads)
    human = sys.stderr if args.json == "-" else sys.stdout
    dev = torch.device(args.device)
    model = StreamedModel(args.store, device=dev, tier=args.tier, prefetch=args.prefetch, working_dir=args.working_dir)
    opt = build(args.optimizer, options(args.opt_arg), seed=0)
    batch = synthetic_batch(model.config.vocab_size, args.batch, args.seq, args.scored)
    noise = getattr(getattr(opt, "noise", None), "kind", "gaussian")  # the resident step draws the same variant
    visitor = TimedVisitor(opt, dev)
    state = {"t": 0}

    def sync() -> None:
        if dev.type == "cuda":
            torch.accelerator.synchronize(dev)

    def streamed_step() -> float:
        opt.begin_step(state["t"])
        losses = [loss for loss, _ in _loss_passes(model, visitor, batch)]
        values = list(torch.stack(losses).float().cpu())
        opt.finish_step(values)
        state["t"] += 1
        return float(values[0])

    resident_step = forwards = None
    if args.compare == "resident":
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype).eval()
        hf.load_state_dict(model.state_dict(), strict=False)
        hf.tie_weights()
        hf.to(dev)
        resident_step = resident_mezo(hf, batch.to(dev), noise=noise)
        forwards = resident_forwards(hf, batch.to(dev), opt.passes)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for _ in tqdm(range(args.warmup), desc="warm-up", leave=False, disable=args.no_progress):
        streamed_step()
        if resident_step:
            resident_step()
            forwards()
    for k in visitor.times:
        visitor.times[k] = 0.0
    t_str: list[float] = []
    t_res: list[float] = []
    t_fwd: list[float] = []
    for r in tqdm(range(args.steps), desc="bench", unit="step", disable=args.no_progress):
        if resident_step and r % 2:  # alternate the order: a load change affects all three alike
            t_fwd.append(timed(forwards))
            t_res.append(timed(resident_step))
        t_str.append(timed(streamed_step))
        if resident_step and not r % 2:
            t_res.append(timed(resident_step))
            t_fwd.append(timed(forwards))
    model.close()
    from zoedge.runtime.threads import load_average
    load_end = load_average()
    load_end = None if load_end is None else round(load_end, 2)
    tokens = args.batch * args.seq
    med = statistics.median(t_str)
    total = sum(t_str)
    hooks = {k: v / len(t_str) for k, v in visitor.times.items()}
    rest = total / len(t_str) - sum(hooks.values())
    result: dict[str, Any] = {
        "store": str(args.store), "device": str(dev), "optimizer": args.optimizer, "noise": noise, "load_average_end": load_end, "batch": args.batch,
        "seq": args.seq, "steps": args.steps, "threads": threads.to_dict(), "step_s": t_str,
        "median_step_s": med, "tokens_per_s": tokens / med,
        "breakdown_s": {"update + noise (on_resident)": hooks["on_resident"],
                        "perturbed weights (pass_tensors)": hooks["pass_tensors"],
                        "other hooks": hooks["on_passes_done"], "copies + forward passes + loss": rest}}
    print(f"{args.store} on {dev}: {args.optimizer} ({noise} noise), batch {args.batch} x seq {args.seq}, "
          f"{args.steps} timed steps, {threads.threads} threads ({threads.source}; {threads.cores} usable cores, "
          f"load average {threads.load_average if threads.load_average is None else round(threads.load_average, 2)} at start, {load_end} at the end)",
          file=human)
    if threads.warning:
        print(f"  warning: {threads.warning}", file=human)
    print(f"  streamed step   median {med:8.3f} s   {tokens / med:10.1f} tokens/s", file=human)
    for k, v in result["breakdown_s"].items():
        print(f"    {k:34s} {v:8.3f} s/step  ({100 * v / (total / len(t_str)):.0f}%)", file=human)
    if t_res:
        mr = statistics.median(t_res)
        result.update(resident_step_s=t_res, resident_median_step_s=mr, ratio_streamed_to_resident=med / mr)
        print(f"  resident MeZO   median {mr:8.3f} s   {tokens / mr:10.1f} tokens/s", file=human)
        mf = statistics.median(t_fwd)
        result.update(forwards_step_s=t_fwd, forwards_median_step_s=mf, ratio_streamed_to_forwards=med / mf)
        print(f"  {opt.passes} forwards alone median {mf:8.3f} s   (resident model, loss only: the floor)", file=human)
        print(f"  streamed / resident: {med / mr:.3f}   streamed / {opt.passes} forwards: {med / mf:.3f}", file=human)
    if args.json:
        out = json.dumps(result, indent=1)
        print(out) if args.json == "-" else Path(args.json).write_text(out + "\n")
    return 0

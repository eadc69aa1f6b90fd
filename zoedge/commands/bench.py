"""``zoedge bench STORE``: measured training-step throughput (tokens/s) with a time breakdown, optionally against a
resident MeZO step in the same process (``--compare resident``)."""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoedge.commands.memory import add_common, options
from zoedge.settings import BenchSettings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge bench``."""
    p = subparsers.add_parser(
        "bench", help="measure training-step throughput (tokens/s, time breakdown), optionally vs resident MeZO",
        description="Run --warmup untimed and --steps timed training steps on a synthetic batch and report the "
        "median step time, tokens/s and where the time goes: drawing noise, building the perturbed weights, "
        "applying the pending update, the forward passes, copies into and out of slots, stalls (waiting for the "
        "disk), emitting the schedule and the optimizer's step bookkeeping, which sum to the step (the small "
        "remainder is shown as unaccounted); "
        "and the disk I/O thread's read and write time, which overlaps them (--tier disk; without --working-dir "
        "dense updates go to a temporary working copy). "
        "--compare resident also times a plain resident MeZO step (the whole model on the device, perturbed in "
        "place, noise from torch's generator as in the MeZO paper's code; and again with the streamed step's own "
        "noise generator) and the step's forward passes alone (the floor) on the same batch, alternating with the "
        "streamed step, and reports the ratios. On CUDA the "
        "hook timings synchronise the device (the breakdown, not the total, is then approximate) and copies, "
        "forward passes and stalls are one part.")
    add_common(p, BenchSettings)
    p.set_defaults(command="bench")


class TimedNoise:
    """Wraps an optimizer's noise source and adds up the wall time of every call into it (drawing noise), and of
    the draws queued by such calls and made at the end of a :func:`~zoedge.noise.source.batched_draws` block."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds = 0.0

    @property
    def seconds(self) -> float:
        from zoedge.noise.source import batched_draw_seconds
        return self._calls + batched_draw_seconds() - self._batched_at_reset

    @seconds.setter
    def seconds(self, value: float) -> None:
        from zoedge.noise.source import batched_draw_seconds
        self._calls, self._batched_at_reset = value, batched_draw_seconds()

    def draw(self, step: int, name: str, stream: str) -> Any:
        """A draw whose fills come back through this wrapper (timed)."""
        from zoedge.noise.source import NoiseDraw
        return NoiseDraw(self, step, name, stream)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._calls += time.perf_counter() - t0

        return timed


class TimedVisitor:
    """Delegates every hook to the optimizer and adds up the time spent in each, and the part of it spent drawing
    noise (when the optimizer's ``noise`` is a :class:`TimedNoise`).

    A hook that runs on one of the ``workers`` of the concurrent decoder layers (:mod:`zoedge.runtime.pipeline`)
    counts ``1 / workers`` of its time: its share of the step's wall time while the workers run together. Its
    noise time, counted in full by the :class:`TimedNoise`, is kept in ``noise_off_thread`` too, so the breakdown
    can count that share of it.
    """

    HOOKS = ("on_resident", "pass_tensors", "on_passes_done")

    def __init__(self, opt: Any, device: Any) -> None:
        self.opt, self.device = opt, device
        self.passes = opt.passes
        self.times = {h: 0.0 for h in self.HOOKS}
        self.noise = {h: 0.0 for h in self.HOOKS}
        self.workers = 1
        self.noise_off_thread = 0.0

    @property
    def concurrent(self) -> bool:  # the runtime reads these two off the visitor
        return bool(getattr(self.opt, "concurrent", False))

    @property
    def grad_pass(self) -> int | None:
        return getattr(self.opt, "grad_pass", None)

    def reset(self) -> None:
        for h in self.HOOKS:
            self.times[h] = self.noise[h] = 0.0
        self.noise_off_thread = 0.0

    def _noise_s(self) -> float:
        return getattr(self.opt.noise, "seconds", 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch
            torch.accelerator.synchronize(self.device)

    def _timed(self, hook: str, *args: Any) -> Any:
        self._sync()
        n0, t0 = self._noise_s(), time.perf_counter()
        out = getattr(self.opt, hook)(*args)
        self._sync()
        seconds, noise = time.perf_counter() - t0, self._noise_s() - n0
        if threading.current_thread() is not threading.main_thread():  # a worker of the concurrent layers
            self.noise_off_thread += noise
            seconds, noise = seconds / self.workers, noise / self.workers
        self.times[hook] += seconds
        self.noise[hook] += noise
        return out

    def on_resident(self, block: Any) -> None:
        self._timed("on_resident", block)

    def pass_tensors(self, block: Any, p: int) -> Mapping[str, Any]:
        return self._timed("pass_tensors", block, p)

    def on_passes_done(self, block: Any) -> None:
        self._timed("on_passes_done", block)


#: how far the sum of a CPU step's parts may differ from the step's wall time (what no timer covers: the timers
#: themselves, the step's function call); tests/test_bench.py checks it on a tiny model
UNACCOUNTED_TOLERANCE = 0.05


def breakdown(step_s: float, passes_s: float, bookkeeping_s: float, visitor: TimedVisitor, noise_s: float,
              engine_s: Mapping[str, float] | None, waiting_s: float = 0.0) -> tuple[dict[str, float], dict[str, float]]:
    """Per-step seconds (arguments are per-step means): the parts of the step on the calling thread and,
    separately, the disk I/O thread's busy time (it overlaps them; ``stalls`` is the part the compute waited for).

    ``passes_s`` is the time in the streamed passes, ``bookkeeping_s`` the optimizer's begin/finish of the step
    and the loss readout. Without engine timings (an accelerator engine), copies, forward passes and the schedule
    are one part. While the decoder layers run on several workers, the calling thread waits for them: that time
    is shared among the parts by the workers' time in each (``visitor.workers``: see :class:`TimedVisitor`), and
    ``waiting_s`` is the workers' idle time divided by their number. The last part, ``unaccounted``, is ``step_s``
    minus the others.
    """
    h, hn = visitor.times, visitor.noise
    noise_s -= visitor.noise_off_thread * (1 - 1 / visitor.workers)  # the workers' share of their noise time
    parts = {"noise": noise_s,
             "perturbation": h["pass_tensors"] - hn["pass_tensors"],
             "update": h["on_resident"] - hn["on_resident"],
             "other hooks": h["on_passes_done"] - hn["on_passes_done"]}
    hooks = sum(h.values())
    io: dict[str, float] = {}
    if engine_s is None:
        parts["copies + forward passes + schedule"] = passes_s - hooks
    else:
        e = engine_s
        on_thread = e.get("compute", 0.0) + e.get("upload", 0.0) + e.get("offload", 0.0) + e.get("stall", 0.0)
        parts["forward passes"] = e.get("compute", 0.0) - hooks - waiting_s
        if waiting_s:
            parts["layer workers waiting for an item"] = waiting_s
        parts["copies (upload, write-back)"] = e.get("upload", 0.0) + e.get("offload", 0.0)
        parts["stalls (waiting for disk)"] = e.get("stall", 0.0)
        parts["schedule (emitting operations)"] = passes_s - on_thread
        io = {"disk reads": e.get("read", 0.0), "disk writes": e.get("write", 0.0)}
    parts["optimizer step (begin, losses, finish)"] = bookkeeping_s
    parts["unaccounted"] = step_s - sum(parts.values())
    return parts, io


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


def resident_mezo(model: Any, batch: Any, eps: float = 1e-3, lr: float = 1e-6, seed: int = 0, noise: str = "gaussian",
                  generator: str | None = None):
    """A plain resident MeZO step function (in-place ±εz regenerated from the seed, as the MeZO paper's code),
    with the noise variant ``noise`` (:mod:`zoedge.noise.source`; pool noise is added straight from the pool) drawn
    by ``generator``: by default torch's own, as the paper's code draws (``torch.normal``; here in parallel chunks,
    which is no slower than its single call)."""
    import torch

    from zoedge.noise.source import TORCH_GENERATOR, make_noise

    source = make_noise(noise, seed).reseeded(seed, generator or TORCH_GENERATOR)
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

    from zoedge.output_dir import result_file
    from zoedge.runtime.threads import apply_threads, choose_threads
    from zoedge.settings import from_args
    from zoedge.store.lease import StoreLease

    s, _ = from_args(BenchSettings, args)
    s.check()
    store = args.store
    result_file(s.json, {"the store": store})  # checked before the work
    threads = choose_threads(s.threads, s.tier)
    apply_threads(threads)
    human = sys.stderr if s.json == "-" else sys.stdout
    dev = torch.device(s.device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(StoreLease(store))  # no zoedge command deletes or rebuilds the store while it is timed
        working = Path(s.working_dir) if s.working_dir else None
        if s.tier == "disk" and working is None:  # dense updates need a writable copy; the store is never written
            working = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zoedge-bench-")))
        return _bench(s, store, threads, human, dev, working)


def _bench(s: BenchSettings, store: Path, threads: Any, human: Any, dev: Any, working: Path | None) -> int:
    import torch
    from tqdm.auto import tqdm

    from zoedge.noise import cache as noise_cache
    from zoedge.noise.source import TORCH_GENERATOR
    from zoedge.optim.registry import build
    from zoedge.plan.accounting import synthetic_batch
    from zoedge.runtime.engines import OpTimes, SyncEngine
    from zoedge.runtime.host import available_memory
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.train.trainer import _loss_passes

    engine_times = OpTimes() if dev.type == "cpu" else None
    # lean=False: noise is drawn and θ ± εz formed in the optimizer's hooks, where the breakdown times them (the lean
    # mode, an accelerator's default, forms them inside the forward passes, where they would count twice)
    model = StreamedModel(store, device=dev, tier=s.tier, prefetch=s.prefetch, working_dir=working,
                          engine=SyncEngine(engine_times) if engine_times is not None else None, lean=False,
                          workers=threads.workers, worker_threads=threads.worker_threads)
    opt = build(s.optimizer, options(s.opt), seed=0)
    noise_cache.attach(opt.noise, s.noise_cache, dev, s.tier, available_memory())
    opt.noise = noise = TimedNoise(opt.noise)
    batch = synthetic_batch(model.config.vocab_size, s.batch_size, s.max_length, s.scored)
    noise_kind = getattr(noise, "kind", "gaussian")  # the resident step draws the same variant
    visitor = TimedVisitor(opt, dev)
    visitor.workers = max(1, model.workers)
    state = {"t": 0}
    spent = {"passes": 0.0, "bookkeeping": 0.0}

    def sync() -> None:
        if dev.type == "cuda":
            torch.accelerator.synchronize(dev)

    def streamed_step() -> float:
        t0 = time.perf_counter()
        opt.begin_step(state["t"])
        t1 = time.perf_counter()
        losses = [loss for loss, _ in _loss_passes(model, visitor, batch)]
        t2 = time.perf_counter()
        values = list(torch.stack(losses).float().cpu())
        opt.finish_step(values)
        state["t"] += 1
        spent["passes"] += t2 - t1
        spent["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t2)
        return float(values[0])

    resident_step = resident_same = forwards = None
    if s.compare == "resident":
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype).eval()
        hf.load_state_dict(model.state_dict(), strict=False)
        hf.tie_weights()
        hf.to(dev)
        resident_step = resident_mezo(hf, batch.to(dev), noise=noise_kind)  # the paper's: torch's generator
        if noise.generator != TORCH_GENERATOR:  # ... and with the streamed step's noise generator
            resident_same = resident_mezo(hf, batch.to(dev), noise=noise_kind, generator=noise.generator)
        forwards = resident_forwards(hf, batch.to(dev), opt.passes)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for _ in tqdm(range(s.warmup), desc="warm-up", leave=False, disable=not s.progress):
        streamed_step()
        if resident_step:
            resident_step()
            forwards()
        if resident_same:
            resident_same()
    model.synchronize()
    visitor.reset()
    noise.seconds = spent["passes"] = spent["bookkeeping"] = 0.0
    if engine_times is not None:
        engine_times.reset()
    model.layer_seconds.clear()
    t_str: list[float] = []
    t_res: list[float] = []
    t_fwd: list[float] = []
    t_same: list[float] = []
    for r in tqdm(range(s.steps), desc="bench", unit="step", disable=not s.progress):
        if resident_step and r % 2:  # alternate the order: a load change affects all of them alike
            t_fwd.append(timed(forwards))
            t_res.append(timed(resident_step))
            if resident_same:
                t_same.append(timed(resident_same))
        t_str.append(timed(streamed_step))
        if resident_step and not r % 2:
            if resident_same:
                t_same.append(timed(resident_same))
            t_res.append(timed(resident_step))
            t_fwd.append(timed(forwards))
    model.synchronize()  # the last step's disk writes count in its I/O time
    io_mode = getattr(model.tier, "io_mode", None)  # disk tier: direct (O_DIRECT) or buffered
    model.close()
    from zoedge.runtime.threads import load_average
    load_end = load_average()
    load_end = None if load_end is None else round(load_end, 2)
    tokens = s.batch_size * s.max_length
    med = statistics.median(t_str)
    mean = sum(t_str) / len(t_str)
    n = len(t_str)
    visitor.times, visitor.noise = ({k: v / n for k, v in d.items()} for d in (visitor.times, visitor.noise))
    visitor.noise_off_thread /= n
    layers = {k: v / n for k, v in model.layer_seconds.items()}  # the concurrent layers' (none: not used)
    parts, io = breakdown(mean, spent["passes"] / n, spent["bookkeeping"] / n, visitor, noise.seconds / n,
                          {k: v / n for k, v in engine_times.seconds.items()} if engine_times else None,
                          layers.get("idle", 0.0) / visitor.workers)
    source = noise.describe()
    result: dict[str, Any] = {
        "store": str(store), "device": str(dev), "optimizer": s.optimizer, "noise": noise_kind,
        "load_average_end": load_end, "batch": s.batch_size,
        "seq": s.max_length, "steps": s.steps, "threads": threads.to_dict(), "step_s": t_str,
        "median_step_s": med, "mean_step_s": mean, "tokens_per_s": tokens / med, "tier": s.tier,
        "breakdown_s": parts, "io_thread_s": io, "io_mode": io_mode,
        "layer_workers": visitor.workers if layers else 0, "layer_workers_s": layers,
        "noise_source": source, "noise_cache": noise.cache.to_dict() if noise.cache is not None else None}
    print(f"{store} on {dev}: {s.optimizer} ({noise_kind} noise, {source['generator']} generator, CPU draws "
          f"{source['cpu_backend']}), batch {s.batch_size} x seq {s.max_length}, "
          f"{s.steps} timed steps, {threads.threads} threads ({threads.source}; {threads.cores} usable cores, "
          f"{f'decoder layers on {visitor.workers} workers, ' if layers else ''}"
          f"load average {threads.load_average if threads.load_average is None else round(threads.load_average, 2)} at start, {load_end} at the end)",
          file=human)
    if threads.warning:
        print(f"  warning: {threads.warning}", file=human)
    print(f"  streamed step   median {med:8.3f} s   {tokens / med:10.1f} tokens/s", file=human)
    if noise.cache is not None:
        c = noise.cache.to_dict()
        print(f"  noise cache     {c['bytes'] / 2**20:.0f} MiB of {c['budget_bytes'] / 2**20:.0f} MiB: {c['hits']} "
              f"draws kept from the step before, {c['misses']} drawn (all steps)", file=human)
    where = (f"the decoder layers on {visitor.workers} workers, each part's share of their time; the parts sum to it"
             if layers else "on this thread, the parts sum to it")
    print(f"  where a step's time goes (mean {mean:.3f} s; {where}):", file=human)
    for k, v in parts.items():
        print(f"    {k:40s} {v * 1e3:10.1f} ms/step  ({100 * v / mean:4.1f}%)", file=human)
    if any(io.values()):
        print(f"  on the I/O thread ({io_mode} I/O), overlapping the above (stalls are the part the compute waited "
              "for):", file=human)
        for k, v in io.items():
            print(f"    {k:40s} {v * 1e3:10.1f} ms/step", file=human)
    if t_res:
        mr = statistics.median(t_res)
        result.update(resident_step_s=t_res, resident_median_step_s=mr, ratio_streamed_to_resident=med / mr)
        print(f"  resident MeZO   median {mr:8.3f} s   {tokens / mr:10.1f} tokens/s   (as the MeZO paper's code: "
              "noise from torch's generator)", file=human)
        if t_same:
            ms = statistics.median(t_same)
            result.update(resident_same_noise_step_s=t_same, resident_same_noise_median_step_s=ms,
                          ratio_streamed_to_resident_same_noise=med / ms)
            print(f"  resident MeZO   median {ms:8.3f} s   {tokens / ms:10.1f} tokens/s   (noise from zoedge's "
                  f"{noise.generator} generator, as the streamed step)", file=human)
        mf = statistics.median(t_fwd)
        result.update(forwards_step_s=t_fwd, forwards_median_step_s=mf, ratio_streamed_to_forwards=med / mf)
        print(f"  {opt.passes} forwards alone median {mf:8.3f} s   (resident model, loss only: the floor)", file=human)
        same = f" ({med / statistics.median(t_same):.3f} with the same noise generator)" if t_same else ""
        print(f"  streamed / resident: {med / mr:.3f}{same}   streamed / {opt.passes} forwards: {med / mf:.3f}",
              file=human)
    if s.json:
        out = json.dumps(result, indent=1)
        from zoedge.output_dir import write_result
        print(out) if s.json == "-" else write_result(Path(s.json), out + "\n")
    return 0

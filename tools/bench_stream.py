#!/usr/bin/env python
"""Streamed vs resident forward time (and logits) on the real default model.

Runs the same batch through

* the resident Hugging Face model (``AutoModelForCausalLM``, all weights on the device), and
* the zoedge :class:`~zoedge.StreamedModel` (block store, ``--tier`` host tier, ``--prefetch`` slots ahead),

with the position convention zoedge uses (``cumsum(mask) - 1``), after ``--warmup`` untimed forwards of
each, then ``--repeat`` timed rounds. Each round times one resident and one streamed forward back to back
(alternating which goes first), so slow drift of a shared machine hits both alike; the reported ratio is
the median of the per-round ratios (target: ≤ 1.15). Also reports max |Δ| of the logits (CPU fp32: 0
expected) and, on CUDA, the peak ``torch.cuda.max_memory_allocated`` of each, each measured on its own
(the other model not on the GPU).

``--profile`` adds a breakdown of one streamed forward: cProfile's cumulative times of the runtime's own
functions, plus direct timings of the pieces that exist only in the streamed path (host→slot copies,
``adapter.begin``, one ``functional_call`` of an empty module).

Examples::

    python tools/bench_stream.py                      # SmolLM2-135M fp32, CPU, 8x64, ram tier, prefetch 1
    python tools/bench_stream.py --device cuda --repeat 20 --json out.json
    python tools/bench_stream.py --profile --repeat 3
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import zoedge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm.auto import tqdm

import zoedge
from zoedge.store.manifest import DTYPES

TARGET_RATIO = 1.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", type=Path, default=None,
                   help="HF checkpoint directory (default: the converted SmolLM2-135M, zoedge.models.default_model_dir())")
    p.add_argument("--store", type=Path, default=None,
                   help="prepared block store of --model (default: prepare one into a temp dir, or --workdir)")
    p.add_argument("--workdir", type=Path, default=None, help="where to prepare the store (kept; reused on re-runs)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="store and resident dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--tier", default="ram", choices=["ram", "disk"])
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--left-pad", type=int, default=0,
                   help="row r gets (r * left_pad) %% (seq // 2) padding tokens on the left (0: no padding)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards of each model first")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="also profile one streamed forward (always done when "
                                                          f"the ratio exceeds {TARGET_RATIO})")
    p.add_argument("--no-auto-profile", action="store_true", help="do not profile automatically on a miss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------- helpers
def make_batch(vocab: int, b: int, t: int, left_pad: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        for r in range(b):
            pad = (r * left_pad) % max(t // 2, 1)
            mask[r, :pad] = 0
    return ids, mask


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF forward with zoedge's positions (OPT computes them itself from the mask)."""
    with torch.no_grad():
        if model.config.model_type == "opt":
            return model(input_ids=ids, attention_mask=mask).logits
        pos = mask.cumsum(-1) * mask - 1
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def timed(fn, device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def peak_memory(fn, device: torch.device) -> dict[str, int]:
    """Allocated bytes before the call and the peak during it (CUDA only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return {"allocated_before": before, "peak": peak}


def prepare_store(args: argparse.Namespace, model_dir: Path) -> tuple[Path, Any]:
    """The store to stream: --store, or prepared from --model into --workdir / a temp dir."""
    if args.store is not None:
        return args.store, None
    tmp = None
    if args.workdir is not None:
        root = args.workdir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="zoedge-bench-stream-")
        root = Path(tmp.name)
    store = root / f"store-{args.dtype}"
    zoedge.prepare(model_dir, store, dtype=args.dtype, progress=True, log=lambda s: print("  " + s))
    return store, tmp


# ------------------------------------------------------------------------------------------------- profile
def profile_streamed(sm: zoedge.StreamedModel, ids: torch.Tensor, mask: torch.Tensor, forward_s: float) -> dict:
    """Where does a streamed forward spend the time that the resident one does not?"""
    from torch.func import functional_call

    device = sm.device
    out: dict[str, Any] = {}
    # 1. host -> slot copies: exactly what _upload does for every block, on its own.
    host = [sm.tier.read_block(i) for i in range(len(sm.blocks))]  # (disk tier: fresh buffers; the copy timing
    # is what matters here)
    slots = [sm._slot_for(i) for i in range(len(sm.blocks))]
    def copies() -> None:
        for h, s in zip(host, slots):
            s.raw[: h.numel()].copy_(h, non_blocking=True)
    copies()
    reps = 5
    dt, _ = timed(lambda: [copies() for _ in range(reps)], device)
    out["slot_copy_s"] = dt / reps
    out["slot_copy_bytes"] = int(sum(h.numel() for h in host))
    # 2. adapter.begin: masks + rotary tables, once per forward.
    dev_ids, dev_mask = ids.to(device), mask.to(device)
    sm.adapter.begin(dev_ids, dev_mask)
    dt, _ = timed(lambda: [sm.adapter.begin(dev_ids, dev_mask) for _ in range(reps)], device)
    out["begin_s"] = dt / reps
    # 3. functional_call's fixed cost (parametrisation swap), measured on a tiny module, times the calls.
    lin = torch.nn.Linear(4, 4, device=device)
    params = {"weight": torch.zeros(4, 4, device=device), "bias": torch.zeros(4, device=device)}
    x = torch.zeros(1, 4, device=device)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        functional_call(lin, params, (x,))
    fc = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n):
        lin(x)
    direct = (time.perf_counter() - t0) / n
    calls = len(sm.blocks) + 2  # one per block, plus norm + lm_head in the head (Llama) / embed positions (OPT)
    out["functional_call_overhead_per_call_s"] = fc - direct
    out["functional_call_overhead_s"] = (fc - direct) * calls
    # 4. cProfile of one whole streamed forward (cumulative time of the runtime's functions).
    prof = cProfile.Profile()
    sync(device)
    t0 = time.perf_counter()
    prof.enable()
    sm(ids, mask)
    sync(device)
    prof.disable()
    out["profiled_forward_s"] = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "zoedge" in file or func in ("functional_call", "copy_", "<method 'copy_' of 'torch._C.TensorBase' objects>"):
            rows.append({"function": f"{Path(file).name}:{line}:{func}", "calls": nc, "tottime_s": tt, "cumtime_s": ct})
        elif "copy_" in func:
            rows.append({"function": func, "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["cumtime_s"])
    out["cprofile_top"] = rows[:15]
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(25)
    out["cprofile_text"] = s.getvalue()
    out["forward_s"] = forward_s
    return out


def print_profile(p: dict) -> None:
    f = p["forward_s"]
    print("\nprofile of the streamed forward (pieces the resident forward does not have):")
    print(f"  host->slot copies : {p['slot_copy_s'] * 1e3:8.1f} ms  ({p['slot_copy_bytes'] / 2**20:.0f} MiB, "
          f"{p['slot_copy_bytes'] / 2**30 / max(p['slot_copy_s'], 1e-9):.1f} GiB/s)  = {100 * p['slot_copy_s'] / f:.1f}% of a forward")
    print(f"  adapter.begin     : {p['begin_s'] * 1e3:8.1f} ms  = {100 * p['begin_s'] / f:.1f}%")
    print(f"  functional_call   : {p['functional_call_overhead_s'] * 1e3:8.1f} ms  "
          f"({p['functional_call_overhead_per_call_s'] * 1e6:.0f} us per call) = {100 * p['functional_call_overhead_s'] / f:.1f}%")
    print("  cProfile (cumulative, runtime functions):")
    for r in p["cprofile_top"][:10]:
        print(f"    {r['cumtime_s'] * 1e3:9.1f} ms  {r['calls']:6d} calls  {r['function']}")


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False; use --device cpu", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    if args.model is None:
        from zoedge.models import default_model_dir
        model_dir = default_model_dir()
    else:
        model_dir = args.model
    print(f"model: {model_dir}")
    store, tmp = prepare_store(args, model_dir)
    dtype = DTYPES[args.dtype]

    resident = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    streamed = zoedge.load(store, device=device, tier=args.tier, prefetch=args.prefetch)
    ids, mask = make_batch(resident.config.vocab_size, args.batch, args.seq, args.left_pad, args.seed)
    ids, mask = ids.to(device), mask.to(device)

    def run_res() -> torch.Tensor:
        return resident_forward(resident, ids, mask)

    def run_str() -> torch.Tensor:
        return streamed(ids, mask)

    memory: dict[str, Any] = {}
    if device.type == "cuda":
        # Peaks measured one model at a time: the resident model is on the GPU only for its own measurement.
        run_str()
        memory["streamed"] = peak_memory(run_str, device)
        resident.to(device)
        run_res()
        memory["resident"] = peak_memory(run_res, device)
    else:
        resident.to(device)

    for _ in tqdm(range(args.warmup), desc="warm-up", leave=False):
        run_res()
        run_str()
    t_res: list[float] = []
    t_str: list[float] = []
    ratios: list[float] = []
    max_diff = 0.0
    for r in tqdm(range(args.repeat), desc="timed rounds"):
        if r % 2 == 0:
            a, ref = timed(run_res, device)
            b, got = timed(run_str, device)
        else:
            b, got = timed(run_str, device)
            a, ref = timed(run_res, device)
        t_res.append(a)
        t_str.append(b)
        ratios.append(b / a)
        max_diff = max(max_diff, (got.float() - ref.float()).abs().max().item())
        del ref, got

    med_res, med_str, med_ratio = statistics.median(t_res), statistics.median(t_str), statistics.median(ratios)
    nparams = sum(p.numel() for p in resident.parameters())
    result: dict[str, Any] = {
        "model": str(model_dir), "store": str(store), "parameters": nparams, "dtype": args.dtype,
        "device": str(device), "tier": args.tier, "prefetch": args.prefetch, "batch": args.batch, "seq": args.seq,
        "left_pad": args.left_pad, "threads": torch.get_num_threads(), "warmup": args.warmup, "repeat": args.repeat,
        "resident_s": t_res, "streamed_s": t_str, "ratios": ratios,
        "resident_median_s": med_res, "streamed_median_s": med_str, "ratio_median": med_ratio,
        "ratio_of_medians": med_str / med_res, "target_ratio": TARGET_RATIO, "meets_target": med_ratio <= TARGET_RATIO,
        "max_abs_logit_diff": max_diff, "memory": memory,
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    if device.type == "cuda":
        result["host"]["gpu"] = torch.cuda.get_device_name(device)

    print()
    print(f"{'':12s} {'median s':>10s} {'min s':>10s} {'max s':>10s}")
    print(f"{'resident':12s} {med_res:10.4f} {min(t_res):10.4f} {max(t_res):10.4f}")
    print(f"{'streamed':12s} {med_str:10.4f} {min(t_str):10.4f} {max(t_str):10.4f}")
    print(f"ratio streamed/resident: median of per-round ratios {med_ratio:.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}); ratio of medians {med_str / med_res:.3f}; target <= {TARGET_RATIO} "
          f"-> {'OK' if med_ratio <= TARGET_RATIO else 'MISSED'}")
    print(f"max |logits delta| = {max_diff:.3g}  ({args.dtype}, {device})")
    if memory:
        for k, v in memory.items():
            print(f"peak cuda memory {k:9s}: {v['peak'] / 2**20:9.1f} MiB (allocated before the forward "
                  f"{v['allocated_before'] / 2**20:.1f} MiB)")
    load = result["host"]["load_avg"]
    if load and load[0] > (os.cpu_count() or 1):
        print(f"note: load average {load[0]:.1f} > {os.cpu_count()} CPUs: other processes share this machine; "
              "timings are noisy (the paired per-round ratio is the robust figure)")

    if args.profile or (med_ratio > TARGET_RATIO and not args.no_auto_profile):
        result["profile"] = profile_streamed(streamed, ids, mask, med_str)
        print_profile(result["profile"])
        result["profile"].pop("cprofile_text", None)
    streamed.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Predicted step time of a streamed pass on a GPU, from the schedule zoedge really emits.

How: a *narrow twin* of the model (same family, layer count and tied embeddings, tiny width, zero weights)
is prepared and streamed, recording the operations the runtime emits without executing them (the schedule
does not depend on the width; :func:`zoedge.plan.timing.emitted_schedule`, as ``zoedge plan`` does). Each operation is then costed at the real model's size: its block's bytes over the
link's bandwidth, its block's forward FLOPs (``FlopCounterMode`` on a meta-device copy of the real model, for
``--batch`` x ``--seq``) times the passes per residency over the GPU's throughput. The second of two
recorded passes is placed on the upload / compute / offload lanes (:mod:`zoedge.runtime.timeline`): the
critical path gives the predicted time per pass, with transfer/compute overlap and compute stalls.

Hardware: the named GPUs of ``zoedge/hardware.py`` (``plan``'s figures: effective link rates, compute at
``gpu_flops × efficiency``); ``h200-measured`` takes its compute rate from the H200 measurement in
``docs/measurements/h200-2026-11-29`` (resident forward of 6 Llama-2-7B-width layers, fp16, 8x512: 24.0 ms).
Any rate can be overridden.

Examples::

    python tools/timeline.py                                  # Llama-2-7B width, 6 layers, h200, prefetch 1
    python tools/timeline.py --model llama2-7b --layers 32 --hardware rtx4090 --passes 2 --train
    python tools/timeline.py --layers 3 --png docs/timeline.png
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

try:
    import zoedge  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from zoedge.hardware import GPUS, Hardware
from zoedge.plan.timing import emitted_schedule
from zoedge.runtime.timeline import Costs, block_flops, predict

MODELS = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, num_hidden_layers=30, tie_word_embeddings=True),
}
H200_RESIDENT = dict(model="llama2-7b", layers=6, batch=8, seq=512, seconds=0.0240)  # measured, see docstring
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    p.add_argument("--layers", type=int, default=6, help="decoder layers (time per layer is constant)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--tier", choices=["ram", "disk"], default="ram")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--passes", type=int, default=1, help="forward passes per residency (MeZO: 2q)")
    p.add_argument("--train", action="store_true", help="dense updates: every block is written back")
    p.add_argument("--hardware", choices=sorted([*GPUS, "h200-measured"]), default="h200-measured")
    for name, unit in (("pcie", "bytes/s"), ("disk", "bytes/s"), ("disk_write", "bytes/s"), ("gpu_flops", "FLOP/s"),
                       ("efficiency", "fraction")):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None, help=f"override the GPU's ({unit})")
    p.add_argument("--png", type=Path, default=None, help="draw the lanes (needs matplotlib)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def model_config(name: str, layers: int, **override):
    from transformers import AutoConfig

    kw = {**MODELS[name], "num_hidden_layers": layers, **override}
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def hardware(args: argparse.Namespace) -> Hardware:
    if args.hardware == "h200-measured":
        ref = H200_RESIDENT
        cfg = model_config(ref["model"], ref["layers"])
        flops = sum(block_flops(cfg, _block_names(cfg), ref["batch"], ref["seq"]))
        hw = replace(GPUS["h200"], name="h200 (compute from the measured resident forward)",
                     gpu_flops=flops / ref["seconds"], efficiency=1.0)
    else:
        hw = GPUS[args.hardware]
    over = {k: getattr(args, k) for k in ("pcie", "disk", "disk_write", "gpu_flops", "efficiency")
            if getattr(args, k) is not None}
    return replace(hw, **over) if over else hw


def _block_names(cfg) -> list[str]:
    from zoedge.adapters import adapter_for
    return adapter_for(cfg, torch.float32, torch.device("meta"), where="config").block_names()


def block_bytes(cfg, dtype: str) -> list[int]:
    """Stored bytes per block of the real-width model (parameters on the meta device, tied ones once)."""
    from transformers import AutoModelForCausalLM

    from zoedge.adapters import adapter_for

    adapter = adapter_for(cfg, torch.float32, torch.device("meta"), where="config")
    names = adapter.block_names()
    out = [0] * len(names)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    for n, p in model.named_parameters():
        out[names.index(adapter.block_of(n))] += p.numel() * DTYPE_BYTES[dtype]
    return out


def record(args: argparse.Namespace):
    """The operations of one steady-state pass, as the runtime emits them (the narrow twin of
    :mod:`zoedge.plan.timing`, which ``zoedge plan`` costs the same way)."""
    return emitted_schedule(model_config(args.model, args.layers), args.layers, args.passes, args.train, args.tier,
                            args.prefetch)


def draw(tl, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = [q for q in ("io", "upload", "compute", "offload") if any(s.op.queue == q for s in tl.spans)]
    colors = {"io": "#8c6d31", "upload": "#3182bd", "compute": "#e6550d", "offload": "#31a354"}
    crit = {id(s) for s in tl.critical}
    fig, ax = plt.subplots(figsize=(10, 0.6 + 0.55 * len(lanes)))
    for s in tl.spans:
        if s.end <= s.start:
            continue
        y = len(lanes) - 1 - lanes.index(s.op.queue)
        ax.barh(y, (s.end - s.start) * 1e3, left=s.start * 1e3, height=0.6, color=colors[s.op.queue],
                edgecolor="black" if id(s) in crit else "white", linewidth=1.5 if id(s) in crit else 0.5)
        name = s.op.label.split(" ", 1)[1].replace("layers.", "L")
        if (s.end - s.start) / tl.total > 0.04:
            ax.text((s.start + s.end) / 2 * 1e3, y, name, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(lanes)), list(reversed(lanes)))
    ax.set_xlabel("ms (black outline: critical path)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hw = hardware(args)
    cfg = model_config(args.model, args.layers)
    names = _block_names(cfg)
    flops, nbytes = block_flops(cfg, names, args.batch, args.seq), block_bytes(cfg, args.dtype)
    ops = record(args)
    tl = predict(ops, Costs(hw, flops, passes=args.passes, block_bytes=nbytes))
    compute = args.passes * sum(flops) / hw.achieved_flops
    moved = sum(nbytes) * (2 if args.train else 1)
    result = {
        "model": args.model, "layers": args.layers, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
        "tier": args.tier, "prefetch": args.prefetch, "passes": args.passes, "train": args.train,
        "hardware": hw.__dict__, "bytes_per_block": nbytes, "flops_per_block": flops,
        "predicted_pass_s": tl.total, "compute_only_s": compute, "bytes_moved": moved,
        "ratio_to_compute": tl.total / compute if compute else None, **tl.summary(),
    }
    print(f"{args.model} width, {args.layers} layers, {args.dtype}, batch {args.batch}x{args.seq}, {args.tier} tier, "
          f"prefetch {args.prefetch}, {args.passes} pass(es){', dense write-backs' if args.train else ''}")
    print(f"hardware: {hw.name}: host link {hw.pcie / 1e9:g} GB/s each way, disk {hw.disk / 1e9:g}/"
          f"{hw.disk_write / 1e9:g} GB/s, {hw.achieved_flops / 1e12:.0f} TFLOP/s achieved")
    print(f"predicted pass: {tl.total * 1e3:.1f} ms   compute alone: {compute * 1e3:.1f} ms   "
          f"({tl.total / compute:.2f}x)   bytes moved: {moved / 2**20:.0f} MiB")
    print(f"busy: " + ", ".join(f"{q} {v * 1e3:.1f} ms" for q, v in tl.busy.items() if v)
          + f"; transfer/compute overlap {tl.overlap * 1e3:.1f} ms; compute stalled {tl.compute_stall * 1e3:.1f} ms")
    print("critical path: " + " -> ".join(s.op.label for s in tl.critical))
    if args.png:
        draw(tl, args.png, f"{args.model} width, {args.layers} layers, {args.dtype}, {args.batch}x{args.seq}, "
             f"prefetch {args.prefetch}, {hw.name.split(',')[0]}: predicted {tl.total * 1e3:.1f} ms per pass")
        print(f"wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

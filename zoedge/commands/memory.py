"""``zoedge memory STORE``: measured memory of real training steps (device peak counted by the tracker, host RSS,
pinned bytes; on CUDA beside ``torch.cuda.max_memory_allocated`` and NVML), next to ``zoedge plan``'s prediction."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zoedge.commands.values import AMOUNT, COUNT


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by ``zoedge memory`` and ``zoedge bench``."""
    p.add_argument("store", metavar="STORE", type=Path, help="prepared block store (`zoedge prepare`)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda[:n], or meta (host tier real, device side counted without memory or compute; "
                   "for widths that do not fit this machine) (default: cpu)")
    p.add_argument("--opt", dest="optimizer", default="mezo", help="optimizer plugin (default: mezo)")
    p.add_argument("--opt-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="plugin option, repeatable (as `zoedge finetune --opt`)")
    p.add_argument("--batch", type=COUNT, default=1, help="sequences per step (default 1)")
    p.add_argument("--seq", type=COUNT, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--scored", type=AMOUNT, default=0, help="scored positions per step; 0 = every position (default)")
    p.add_argument("--steps", type=COUNT, default=2, help="steps to run (the first allocates workspaces; default 2)")
    p.add_argument("--tier", choices=("ram", "disk"), default="ram", help="host tier (default ram)")
    p.add_argument("--prefetch", type=COUNT, default=1, help="blocks uploaded ahead (default 1)")
    p.add_argument("--working-dir", type=Path, default=None,
                   help="disk tier with dense updates: where the writable copy of the blocks goes")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="attention implementation (sdpa: fused kernels; eager: S x S scores) (default sdpa)")
    p.add_argument("--threads", type=COUNT, default=None,
                   help="torch CPU threads (default: the cores this process may use; see zoedge.runtime.threads)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON ('-' for stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge memory``."""
    p = subparsers.add_parser(
        "memory", help="measure the memory of real training steps (device peak, host RSS, pinned) beside the plan",
        description="Run training steps on a synthetic batch and report the device's peak bytes as counted by "
        "zoedge's tracker (every storage the device receives, host tier excluded on CPU), host RSS and pinned "
        "bytes, and on CUDA torch.cuda.max_memory_allocated and NVML device-used; beside `zoedge plan`'s "
        "prediction for the same step.")
    add_common(p)
    p.set_defaults(command="memory")


def options(items: list[str]) -> dict[str, str]:
    from zoedge.optim.registry import parse_opts
    return parse_opts(items)


def predicted(args: argparse.Namespace) -> int | None:
    """The plan's device peak for the same step, or None when the plan has no footprint for the plugin."""
    from zoedge.errors import ConfigError
    from zoedge.optim.registry import build
    from zoedge.plan.accounting import Workload, make_plan, method, model_spec
    from zoedge.hardware import hardware

    opt = build(args.optimizer, options(args.opt_arg), seed=0)
    try:
        m = method(args.optimizer, int(getattr(opt, "q", 1)))  # the plan's footprint table names the method
    except ConfigError:
        return None
    plan = make_plan(model_spec(str(args.store)), m,
                     Workload(args.batch, args.seq, args.scored, args.prefetch, args.tier, args.attention),
                     hardware(None))
    return plan.device_peak


def run(args: argparse.Namespace) -> int:
    from zoedge.plan.measure import measure_step
    from zoedge.runtime.threads import apply_threads, choose_threads

    from zoedge.output_dir import result_file, write_result
    target = result_file(args.json, {"the store": args.store})
    apply_threads(choose_threads(args.threads, args.tier))
    human = sys.stderr if args.json == "-" else sys.stdout
    m = measure_step(args.store, args.device, optimizer=args.optimizer, options=options(args.opt_arg),
                     batch=args.batch, seq=args.seq, scored=args.scored, steps=args.steps, tier=args.tier,
                     prefetch=args.prefetch, attention=args.attention, working_dir=args.working_dir,
                     progress=not args.no_progress)
    pred = predicted(args)
    mib = 2**20
    rows = [("device peak (tracker)", m.tracked_peak), ("device long-lived (tracker)", m.tracked_long_lived)]
    if pred is not None:
        rows.append(("device peak (plan, predicted)", pred))
    if m.cuda_max_allocated is not None:
        rows += [("torch.cuda.max_memory_allocated", m.cuda_max_allocated)]
        if m.nvml_used is not None:
            rows += [("NVML device used (all processes)", m.nvml_used)]
    rows += [("host tier buffers", m.host_tier_bytes), ("pinned host bytes", m.pinned_bytes),
             ("host RSS now", m.host_rss), ("host RSS max", m.max_host_rss)]
    print(f"{args.store} on {args.device}: {args.optimizer}, batch {args.batch} x seq {args.seq}, {args.steps} steps",
          file=human)
    for name, v in rows:
        print(f"  {name:34s} {v / mib:12.1f} MiB", file=human)
    ratio = m.tracked_peak / pred if pred else None
    print(f"  measured / predicted device peak: {ratio:.4f}" if ratio else
          f"  (no plan footprint for optimizer {args.optimizer!r})", file=human)
    if args.json:
        out = json.dumps({**m.to_dict(), "predicted_device_peak": pred, "ratio": ratio,
                          "store": str(args.store)}, indent=1)
        print(out) if target is None else write_result(target, out + "\n")
    return 0

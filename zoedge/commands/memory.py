"""``zoedge memory STORE``: measured memory of real training steps (device peak counted by the tracker, host RSS,
pinned bytes; on CUDA beside ``torch.cuda.max_memory_allocated`` and NVML), next to ``zoedge plan``'s prediction."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from zoedge.settings import MemorySettings, add_options

if TYPE_CHECKING:
    from zoedge.plan.accounting import Plan


def add_common(p: argparse.ArgumentParser, cls: type[MemorySettings]) -> None:
    """STORE and the options of ``cls`` (``zoedge memory`` and ``zoedge bench``)."""
    p.add_argument("store", metavar="STORE", type=Path, help="prepared block store (`zoedge prepare`)")
    add_options(p, cls)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge memory``."""
    p = subparsers.add_parser(
        "memory", help="measure the memory of real training steps (device peak, host RSS, pinned) beside the plan",
        description="Run training steps on a synthetic batch and report the device's peak bytes as counted by "
        "zoedge's tracker (every storage the device receives, host tier excluded on CPU), host RSS and pinned "
        "bytes, and on CUDA torch.cuda.max_memory_allocated and NVML device-used; beside `zoedge plan`'s "
        "prediction for the same step.")
    add_common(p, MemorySettings)
    p.set_defaults(command="memory")


def options(items: list[str]) -> dict[str, str]:
    from zoedge.optim.registry import parse_opts
    return parse_opts(items)


def predicted(store: Path, s: MemorySettings) -> Plan | None:
    """``zoedge plan``'s prediction of the same step (its device peak, the optimizer's declared state), or None when
    the plan has no footprint for the optimizer."""
    from zoedge.errors import ConfigError
    from zoedge.plan.accounting import Workload, model_spec, optimizer_plan
    from zoedge.hardware import hardware

    try:
        return optimizer_plan(model_spec(str(store)), s.optimizer, options(s.opt),
                              Workload(s.batch_size, s.max_length, s.scored, s.prefetch, s.tier, s.attention),
                              hardware(None))
    except ConfigError:
        return None


def run(args: argparse.Namespace) -> int:
    from zoedge.output_dir import result_file, write_result
    from zoedge.plan.measure import measure_step
    from zoedge.store.lease import StoreLease
    from zoedge.runtime.threads import apply_threads, choose_threads
    from zoedge.settings import from_args

    s, _ = from_args(MemorySettings, args)
    s.check()
    target = result_file(s.json, {"the store": args.store})
    apply_threads(choose_threads(s.threads, s.tier))
    human = sys.stderr if s.json == "-" else sys.stdout
    with StoreLease(args.store):  # no zoedge command deletes or rebuilds the store while it is measured
        m = measure_step(args.store, s.device, optimizer=s.optimizer, options=options(s.opt),
                         batch=s.batch_size, seq=s.max_length, scored=s.scored, steps=s.steps, tier=s.tier,
                         prefetch=s.prefetch, attention=s.attention,
                         working_dir=Path(s.working_dir) if s.working_dir else None, progress=s.progress)
    plan = predicted(args.store, s)
    pred = plan.device_peak if plan is not None else None
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
    if m.optimizer_state_bytes or (plan is not None and plan.optimizer_state):  # on the host tier, as plan counts it
        rows.append(("optimizer state (host tier)", m.optimizer_state_bytes))
        if plan is not None:
            rows.append(("optimizer state (plan, predicted)", plan.optimizer_state))
    print(f"{args.store} on {s.device}: {s.optimizer}, batch {s.batch_size} x {s.max_length} tokens, {s.steps} steps",
          file=human)
    for name, v in rows:
        print(f"  {name:34s} {v / mib:12.1f} MiB", file=human)
    ratio = m.tracked_peak / pred if pred else None
    print(f"  measured / predicted device peak: {ratio:.4f}" if ratio else
          f"  (no plan footprint for optimizer {s.optimizer!r})", file=human)
    if s.json:
        state = plan.optimizer_state if plan is not None else None
        out = json.dumps({**m.to_dict(), "predicted_device_peak": pred, "predicted_optimizer_state": state,
                          "ratio": ratio, "store": str(args.store)}, indent=1)
        print(out) if target is None else write_result(target, out + "\n")
    return 0

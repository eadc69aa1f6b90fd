"""``zoedge plan MODEL...``: device memory, host RAM, disk, bytes moved and a predicted step time for a model on
a GPU, for the runtime (lean: perturbations formed just in time) and its workspace mode, beside the design target of
streaming units finer than a decoder layer (see :mod:`zoedge.plan.accounting`)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from zoedge.settings import PlanSettings, add_options, deprecated

#: ZO2's published peak GPU memory (NVML device-used; OPT fp16, MeZO, batch 1, seq 2048, random weights)
ZO2_GB = {"opt-1.3b": 3.75, "opt-2.7b": 4.14, "opt-6.7b": 4.99, "opt-13b": 6.18, "opt-30b": 8.86, "opt-66b": 12.07,
          "opt-175b": 18.04}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge plan``."""
    p = subparsers.add_parser(
        "plan", help="predict device memory, host RAM, bytes moved and step time of fine-tuning a model on a GPU",
        description="Plan one training step without the weights: device bytes are counted exactly (long-lived "
        "buffers from the store layout and the runtime's allocation rules, transient tensors by running the "
        "model's blocks on the meta device); step time is predicted by placing the schedule the runtime emits "
        "for the step (uploads, compute, write-backs, disk reads and writes) on a timeline at the hardware's rates "
        "(zoedge.plan.timing), with its critical path. Device figures are given for "
        "the runtime as it runs on a GPU (lean: perturbations formed just in time per tensor or row chunk, no "
        "block-sized workspaces) and with lean=False (workspaces), streaming whole decoder layers or (--unit half) "
        "their attention and MLP halves; single-Linear units are a design target (not implemented), shown "
        "separately. Several MODELs give a one-line-per-model summary.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="GPUs (datasheet figures): rtx4090 24 GiB, 165.2 TFLOP/s fp16 (fp32 accumulate), PCIe 4.0 ~25 GB/s, "
        "memory 1008 GB/s; a100-80g 80 GiB, 312, PCIe 4.0 ~25, 2039; h100 80 GiB, 989, PCIe 5.0 ~50, 3350; h200 141 "
        "GB, 989, PCIe 5.0 ~52 (measured by zoedge), 4800. Disk: NVMe Gen4, 7 GB/s read, 5 GB/s write. Examples:\n  zoedge plan opt-175b\n  zoedge plan opt-175b --quant nf4 --optimizer hzo\n"
        "  zoedge plan opt-1.3b opt-13b opt-175b --json plan.json")
    p.add_argument("models", metavar="MODEL", nargs="+",
                   help="named shape (opt-1.3b, 2.7b, 6.7b, 13b, 30b, 66b, 175b, llama-2-7b/13b/70b, qwen2-72b, smollm2-135m), a Hugging "
                   "Face checkpoint directory, or a prepared store")
    add_options(p, PlanSettings)
    for old, key in (("--q", "q"), ("--rank", "rank")):  # before --opt q=N / --opt rank=N
        p.add_argument(old, dest="opt", action=_OptAlias, key=key, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(command="plan")


class _OptAlias(argparse.Action):
    """``--q N`` / ``--rank N``, the old spellings of ``--opt q=N`` / ``--opt rank=N``: warn, then append."""

    def __init__(self, option_strings: list[str], dest: str, key: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.key = key

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        deprecated(namespace, f"{option_string} N is deprecated: use --opt {self.key}=N")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), f"{self.key}={values}"])


def _g(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _by_unit(peaks: dict, runtime: list) -> str:
    done = [f"{u} {_g(peaks[u])}" for u in ("layer", "half", "linear") if u in runtime]
    design = [f"{u} {_g(peaks[u])}" for u in ("layer", "half", "linear") if u not in runtime]
    return (f"lean GPU peak by streaming unit: {', '.join(done)} (runtime)"
            + (f"; {', '.join(design)} (design target, not implemented)" if design else ""))


def rates_line(hw) -> str:
    """The hardware figures every prediction is made with."""
    return (f"hardware: {hw.name}: {'' if hw.gpu_memory is None else _g(hw.gpu_memory) + ', '}"
            f"{hw.gpu_flops / 1e12:.1f} TFLOP/s x {hw.efficiency}, memory {hw.memory_bw / 1e9:.0f} GB/s, PCIe "
            f"{hw.pcie / 1e9:.0f} GB/s, disk {hw.disk / 1e9:.0f} GB/s read / {hw.disk_write / 1e9:.0f} GB/s write")


def detail(plan) -> str:
    """The human-readable table of one plan."""
    hw, w = plan.hardware, plan.work
    depth = f"{plan.layers} layers" + (f" (source has {plan.measured_layers}; per-layer figures extrapolated)"
                                       if plan.measured_layers else "")
    lines = [f"{plan.model}: {plan.params / 1e9:.2f} G params, {depth}, {plan.dtype}"
             f"{'' if plan.quant == 'none' else ' + ' + plan.quant}, {plan.method.note}",
             f"step: batch {w.batch} x seq {w.seq}, {w.n_scored} scored positions, {w.attention} attention, "
             f"{w.tier} tier, prefetch {w.prefetch}, streaming unit {w.unit}",
             rates_line(hw), "",
             f"{'device memory (GB = 1e9 bytes)':40s} {'lean':>10s} {'workspaces':>11s}"]
    keys = list(dict.fromkeys([*plan.device_long_lived, *plan.workspace_long_lived]))
    for k in keys:
        lines.append(f"  {k:38s} {_g(plan.device_long_lived.get(k, 0)):>10s} "
                     f"{_g(plan.workspace_long_lived.get(k, 0)):>11s}")
    lines.append(f"  {'transient (activations, logits, loss)':38s} {_g(plan.transient_peak):>10s} "
                 f"{_g(plan.workspace_transient_peak):>11s}")
    lines.append(f"  {'peak (zoedge tensors)':38s} {_g(plan.device_peak):>10s} {_g(plan.workspace_device_peak):>11s}")
    lines.append(f"  {'peak on the GPU (+ cuBLAS workspace)':38s} {_g(plan.gpu_peak):>10s} "
                 f"{_g(plan.workspace_gpu_peak):>11s}")
    lines.append("  lean = the runtime on a GPU (default); workspaces = lean=False")
    lines.append("  " + _by_unit(plan.gpu_peak_by_unit, plan.runtime_units))
    t = plan.time
    lines += ["", f"host RAM {_g(plan.host_ram)} ({plan.host_ram / plan.stored_bytes:.3f} x the stored bytes), disk "
              f"{_g(plan.disk)} (stored model {_g(plan.stored_bytes)}"
              + (f"; optimizer state {_g(plan.optimizer_state)} on the {w.tier} tier" if plan.optimizer_state else "")
              + ")",
              f"moved per step: H2D {_g(plan.moved['h2d'])}, D2H {_g(plan.moved['d2h'])}, disk read "
              f"{_g(plan.moved['disk_read'])}, disk write {_g(plan.moved['disk_write'])}",
              *time_lines(t),
              "", "fits (GPU peak <= GPU memory, host tier <= host RAM):"]
    for f in plan.fits:
        lines.append(f"  {f['tier']:4s} prefetch {f['prefetch']} ({f['unit']}): lean {_g(f['device_peak']):>9s} "
                     f"{'fits' if f['fits'] else 'no':4s}  workspaces {_g(f['workspace_device_peak']):>9s} "
                     f"{'fits' if f['workspace_fits'] else 'no':4s}  step {f['step_s']:.3f} s (pred.)  lean units "
                     f"that fit: {', '.join(f['units_that_fit']) or 'none'}")
    return "\n".join(lines)


def time_lines(t: dict) -> list[str]:
    """The predicted step: total, what bounds it (the critical path by kind), stalls, the roofline beside it."""
    crit = ", ".join(f"{k} {v:.3f} s" for k, v in t["critical_path_s"].items() if v > 0)
    busy = ", ".join(f"{k} {v:.3f} s" for k, v in t["busy_s"].items() if v > 0)
    return [f"predicted step (timeline of the runtime's schedule at the rates above; not measured): {t['step_s']:.3f} s, "
            f"{t['tokens_per_s']:.0f} tokens/s, {t['bound']}-bound",
            f"  critical path: {crit}",
            f"  busy per queue: {busy}; transfer/compute overlap {t['overlap_s']:.3f} s; compute stalled "
            f"{t['compute_stall_s']:.3f} s",
            f"  of the compute: forward passes {t['forward_s']:.3f} s, noise + perturbation + update "
            f"{t['arithmetic_s']:.3f} s (bytes / memory bandwidth); roofline sum of max(transfer, compute) per "
            f"block {t['roofline_s']:.3f} s"]


def summary(plans) -> str:
    """One line per model (the README table's columns)."""
    head = (f"{'model':14s} {'params':>8s} {'lean':>10s} {'lean, half':>11s} {'workspaces':>11s} "
            f"{'linear units (design)':>22s} {'ZO2 (published)':>16s} {'host RAM (x stored)':>21s} {'step (pred.)':>12s} "
            f"{'bound':>9s}")
    lines = [rates_line(plans[0].hardware), head]
    for p in plans:
        zo2 = ZO2_GB.get(p.model)
        half = _g(p.gpu_peak_by_unit["half"]) + ("" if "half" in p.runtime_units else "*")
        lines.append(f"{p.model:14s} {p.params / 1e9:7.1f}B {_g(p.gpu_peak):>10s} {half:>11s} "
                     f"{_g(p.workspace_gpu_peak):>11s} {_g(p.gpu_peak_by_unit['linear']):>22s} "
                     f"{(f'{zo2:.2f} GB' if zo2 else '-'):>16s} {_g(p.host_ram) + f' ({p.host_ram / p.stored_bytes:.2f}x)':>21s} "
                     f"{p.time['step_s']:11.2f}s "
                     f"{p.time['bound']:>9s}")
    lines.append("(lean: --unit as given; lean, half: the runtime streaming attention/MLP halves; * design target, "
                 "not implemented for this family)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from zoedge.optim.registry import parse_opts
    from zoedge.plan.accounting import Workload, make_plan, method, method_for, model_spec, optimizer_plan
    from zoedge.hardware import hardware
    from zoedge.settings import from_args

    s, _ = from_args(PlanSettings, args)
    s.check()
    hw = hardware(s.gpu, gpu_memory_gb=s.gpu_memory, pcie_gbps=s.pcie_gbps, gpu_tflops=s.gpu_tflops,
                  disk_gbps=s.disk_gbps, host_ram_gb=s.host_ram, efficiency=s.efficiency,
                  disk_write_gbps=s.disk_write_gbps, memory_gbps=s.gpu_mem_gbps)
    from zoedge.runtime.lora import LoraSpec
    lora = LoraSpec(s.lora_rank, s.lora_alpha, LoraSpec.parse_targets(s.lora_targets)) if s.peft == "lora" else None
    optimizer = None if s.method == "forward" else _optimizer(s)
    m = method("forward") if optimizer is None else method_for(optimizer, parse_opts(s.opt), lora)  # before any model
    work = Workload(s.batch_size, s.max_length, s.scored, s.prefetch, s.tier, s.attention, unit=s.unit)
    work.check()
    from zoedge.output_dir import result_file, write_result
    target = result_file(s.json, {f"the model {i + 1}": m for i, m in enumerate(args.models) if Path(m).exists()})
    human = sys.stderr if s.json == "-" else sys.stdout
    plans = []
    for name in tqdm(args.models, desc="plan", unit="model", disable=len(args.models) < 2):
        spec = model_spec(name, s.dtype, s.quant, s.layers)
        chunk = int(s.chunk_mib * 2**20)
        plans.append(make_plan(spec, m, work, hw, chunk) if optimizer is None
                     else optimizer_plan(spec, optimizer, parse_opts(s.opt), work, hw, chunk, lora))
    text = detail(plans[0]) if len(plans) == 1 else summary(plans)
    print(text, file=human)
    print("\nPredictions. Device figures count every tensor exactly (GPU peak adds the cuBLAS workspace; NVML "
          "device-used adds the CUDA context too); 'lean' is the runtime on a GPU, 'workspaces' the same with "
          "lean=False; single-Linear units (and half layers outside OPT) are a design target, not implemented; "
          "step times place the runtime's schedule on a timeline at the stated rates (zoedge/plan/timing.py).",
          file=human)
    if s.json:
        data = [p.to_dict() for p in plans]
        out = json.dumps(data[0] if len(data) == 1 else data, indent=1, default=str)
        if target is None:
            print(out)
        else:
            write_result(target, out + "\n")
    return 0


def _optimizer(s: PlanSettings) -> str:
    """The optimizer planned for: --optimizer, or the one an old ``--method mezo`` / ``lowrank`` names."""
    old = {"mezo": "mezo", "lowrank": "hzo"}
    if s.method in old:
        logging.getLogger("zoedge").warning("--method %s is deprecated: use --optimizer %s", s.method, old[s.method])
        return old[s.method]
    return s.optimizer

#!/usr/bin/env python
"""Llama-2-7B width on the CPU disk tier: the per-layer step time against its floor, and an end-to-end
fine-tuning run of the full 32-layer checkpoint, which is larger than this machine's RAM.

``layers``: synthetic 7B-width checkpoints of two depths (default 1 and 3 decoder layers, ``zoedge synth``),
prepared (a prepared store left by ``--keep`` is reused); per depth, in one process: the streamed MeZO step
(``--noise``: its direction noise) on the disk tier with a working copy (what ``zoedge finetune --tier disk``
runs: on the CPU, blocks computed in place in the ring buffers their disk reads fill), the step's two forward
passes alone on the resident model (the compute floor), and one decoder layer's disk read (cold: its pages dropped first) and write-back (written and fsynced)
of the working copy. Per layer = the difference between the depths divided by the layers added; the check is
``step per layer <= 1.1 * max(two forwards per layer, read + write-back of a layer)``.

``paths``: on one synthetic checkpoint (``--layers``, default 3), in one process, alternating steps of the
CPU's disk-tier step as it is (blocks computed in place in the ring buffers, workspace mode) and as it was
before the CPU bound the ring in place (``in_place=False``: streamed through slots as on an accelerator, ring →
slot → staging copies, lean perturbations); per path the median step and where its time goes (noise draws,
hooks, the engine's operations, waits for the disk).

``e2e``: ``zoedge synth llama-2-7b`` at full depth (fp32: 27 GB), ``zoedge prepare`` (the source is deleted
once the store is verified, to bound the disk used), then ``zoedge finetune --tier disk`` on the demo task a
few steps in a child process whose peak RSS (``wait4``) is compared with the store's size (target <= 0.25),
and the per-step losses are read from its metrics. With ``--resume-check`` the run is SIGKILLed in the middle
of a step after its first checkpoint, resumed with ``--resume``, and its losses compared with an uninterrupted
run's; its checkpoints hold the log of updates (``--checkpoint-weights updates``, a few KB, replayed onto the
store on resume), so the disk holds the store and one working copy at a time (``--checkpoint-weights full``
needs three more copies of the weights). Without it the
run is SIGKILLed mid-step after ``--steps`` steps (the final checkpoint and export would need two more copies
of the weights on disk). The disk needed is checked with ``df`` before anything is written; the big
files are deleted at the end unless ``--keep``.

Heavy I/O runs under ``nice -n 10 ionice -c3``. Progress goes to stderr, a summary table to stdout, the results
as JSON to ``--json``.

Examples (2-core CPU; the e2e run takes about an hour)::

    python tools/bench_7b_disk.py layers --depths 1 3 --json docs/measurements/cpu-2026-11-30/layers_fp32.json
    python tools/bench_7b_disk.py paths --layers 3 --steps 2
    python tools/bench_7b_disk.py e2e --layers 32 --steps 3 --json docs/measurements/cpu-2026-11-30/e2e_fp32.json
    python tools/bench_7b_disk.py e2e --layers 4 --steps 4 --resume-check --json ...
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NICE = ["nice", "-n", "10", "ionice", "-c3"]
GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def zoedge(*args: str) -> list[str]:
    return [*NICE, sys.executable, "-m", "zoedge.cli", *args]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


# ------------------------------------------------------------------------------------------ checkpoints
def write_tokenizer(out: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer trained on the demo task's text, with fewer ids than the model's vocabulary.

    (Llama-2's own tokenizer is not available offline, and the default model's has 49152 ids, more than
    Llama-2's 32000 embedding rows.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from zoedge.train.demo_task import demo_examples

    texts = [e.prompt + "".join(e.candidates) for e in demo_examples()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=min(4000, vocab), special_tokens=["</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for f in out.glob("*token*"):  # the files `zoedge synth --tokenizer-from` may have copied
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>").save_pretrained(out)


def synth(shape: str, layers: int, dtype: str, src: Path) -> dict[str, Any]:
    if (src / "config.json").is_file():
        log(f"{src} already holds the checkpoint: reused")
    else:
        log(f"zoedge synth {shape} --layers {layers} --dtype {dtype} -> {src}")
        subprocess.run(zoedge("synth", shape, str(src), "--layers", str(layers), "--dtype", dtype, "--no-progress"),
                       check=True, stdout=sys.stderr)
    if not (src / "tokenizer.json").is_file() or "</s>" not in (src / "tokenizer.json").read_text()[:4000]:
        from transformers import AutoConfig
        write_tokenizer(src, AutoConfig.from_pretrained(src).vocab_size)
    return {"bytes": dir_bytes(src)}


def prepare(src: Path, store: Path, dtype: str) -> float:
    t0 = time.perf_counter()
    if not (store / "manifest.json").is_file() or (store / ".prepare-in-progress").exists():
        log(f"zoedge prepare {src} -> {store}")
        subprocess.run(zoedge("prepare", str(src), str(store), "--dtype", dtype, "--no-progress"), check=True,
                       stdout=sys.stderr)
    return time.perf_counter() - t0


def verify(store: Path) -> None:
    """Every block of ``store`` hashed against its manifest (stamped blocks are trusted; see zoedge.store.verify)."""
    from zoedge.store.manifest import load_manifest
    load_manifest(store)  # raises StoreError on any mismatch


# -------------------------------------------------------------------------------------------- layers part
class TimedEngine:
    """The CPU engine, with the time compute waited for the I/O thread and the I/O thread's busy time."""

    def __new__(cls):
        from zoedge.runtime.engines import SyncEngine
        from zoedge.runtime.schedule import IO

        class _Timed(SyncEngine):
            def __init__(self) -> None:
                super().__init__()
                self.stall = 0.0
                self.io_busy = {"read": 0.0, "write": 0.0}

            def issue(self, op) -> None:
                if op.queue == IO:
                    run, kind = op.run, op.kind

                    def timed():
                        t0 = time.perf_counter()
                        try:
                            return run()
                        finally:
                            self.io_busy[kind] = self.io_busy.get(kind, 0.0) + time.perf_counter() - t0
                    op.run = timed
                    return super().issue(op)
                t0 = time.perf_counter()
                for w in op.waits:
                    if w.producer.queue == IO:
                        w.producer.done.result()
                self.stall += time.perf_counter() - t0
                op.run()

        return _Timed()


def layer_io(path: Path, reps: int = 3) -> dict[str, float]:
    """Cold read and fsynced in-place write of one block file of the working copy (medians of ``reps``)."""
    import torch

    from zoedge.runtime.host import read_file_into, write_file_from

    buf = torch.empty(path.stat().st_size, dtype=torch.uint8)
    reads, writes = [], []
    for _ in range(reps):
        with open(path, "rb") as f:  # drop its (clean) pages: the read below comes from the disk
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        read_file_into(path, buf)
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        write_file_from(path, buf)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        writes.append(time.perf_counter() - t0)
    return {"bytes": buf.numel(), "read_s": statistics.median(reads), "write_s": statistics.median(writes)}


def measure_depth(store: Path, working: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from zoedge.commands.bench import resident_forwards
    from zoedge.optim.registry import build
    from zoedge.plan.accounting import synthetic_batch
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.train.trainer import _loss_passes

    engine = TimedEngine()
    model = StreamedModel(store, "cpu", tier="disk", prefetch=args.prefetch, working_dir=working, engine=engine)
    # a few layers fit in the page cache, the full model does not: read and write as the full model does
    model.tier.drop_cache = not args.page_cache
    opt = build("mezo", {"noise": args.noise}, seed=0)
    batch = synthetic_batch(model.config.vocab_size, args.batch, args.seq, args.scored)
    n_layers = model.config.num_hidden_layers

    def step(t: int) -> float:
        t0 = time.perf_counter()
        opt.begin_step(t)
        losses = [loss for loss, _ in _loss_passes(model, opt, batch)]
        opt.finish_step(list(torch.stack(losses).float()))
        return time.perf_counter() - t0

    log(f"{n_layers} layer(s): {args.warmup} warm-up + {args.steps} timed MeZO steps on the disk tier")
    for t in range(args.warmup):
        step(t)
    engine.stall, engine.io_busy = 0.0, {"read": 0.0, "write": 0.0}
    steps = []
    for t in range(args.steps):
        steps.append(step(args.warmup + t))
        log(f"  step {t + 1}/{args.steps}: {steps[-1]:.2f} s")
    model.synchronize()
    stall, io_busy = engine.stall / args.steps, {k: v / args.steps for k, v in engine.io_busy.items()}
    config, dtype = model.config, model.dtype
    layer_file = working / model.blocks[1].file.split("/")[-1]
    model.close()
    del model, opt, engine  # the streamed buffers (rings, slots, workspaces) go before the resident model comes
    gc.collect()
    log(f"{n_layers} layer(s): the step's two forward passes on the resident model")
    hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    streamed = StreamedModel(store, "cpu", tier="disk", working_dir=working)
    for chunk in streamed.weight_stream().chunks:  # one block at a time into the resident model
        hf.load_state_dict(dict(chunk), strict=False)
    streamed.close()
    del streamed
    fwd = resident_forwards(hf, batch, 2)
    fwd()
    fwds = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        fwd()
        fwds.append(time.perf_counter() - t0)
    del hf, fwd
    log(f"{n_layers} layer(s): read + write-back of one decoder layer ({layer_file.name})")
    io = layer_io(layer_file)
    return {"layers": n_layers, "step_s": steps, "median_step_s": statistics.median(steps), "forwards_s": fwds,
            "median_forwards_s": statistics.median(fwds), "compute_waited_for_io_s": stall, "io_thread_busy_s": io_busy,
            "layer_io": io, "uptime": uptime()}


def prepared_store(k: int, args: argparse.Namespace) -> Path:
    """The prepared, verified ``k``-layer store under ``--work`` (synthesized and prepared unless kept)."""
    base = args.work / f"{args.dtype}-{k}l"
    src, store = base / "src", base / "store"
    if not (store / "manifest.json").is_file() or (store / ".prepare-in-progress").exists():
        synth("llama-2-7b", k, args.dtype, src)
        prepare(src, store, args.dtype)
    verify(store)
    shutil.rmtree(src, ignore_errors=True)
    return store


def run_paths(args: argparse.Namespace) -> dict[str, Any]:
    """See the module docstring (``paths``)."""
    import torch

    from zoedge.commands.bench import TimedNoise, TimedVisitor
    from zoedge.optim.registry import build
    from zoedge.plan.accounting import synthetic_batch
    from zoedge.runtime.engines import OpTimes, SyncEngine
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.runtime.threads import apply_threads, choose_threads
    from zoedge.train.trainer import _loss_passes

    threads = choose_threads(args.threads, "disk")
    apply_threads(threads)
    store = prepared_store(args.layers, args)
    res: dict[str, Any] = {"part": "paths", "dtype": args.dtype, "layers": args.layers, "batch": args.batch,
                           "seq": args.seq, "noise": args.noise, "threads": threads.to_dict(), "uptime_start": uptime()}
    paths = {"ring in place": {}, "slots (before)": {"in_place": False}}
    runs = []
    for name, kw in paths.items():
        working = args.work / f"{args.dtype}-{args.layers}l" / f"working-{len(runs)}"
        shutil.rmtree(working, ignore_errors=True)
        times = OpTimes()
        model = StreamedModel(store, "cpu", tier="disk", working_dir=working, engine=SyncEngine(times), **kw)
        model.tier.drop_cache = not args.page_cache
        opt = build("mezo", {"noise": args.noise}, seed=0)
        opt.noise = TimedNoise(opt.noise)
        runs.append({"name": name, "model": model, "opt": opt, "visitor": TimedVisitor(opt, model.device),
                     "times": times, "working": working, "t": 0, "steps": []})
    batch = synthetic_batch(runs[0]["model"].config.vocab_size, args.batch, args.seq, args.scored)

    def step(r: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        r["opt"].begin_step(r["t"])
        losses = [loss for loss, _ in _loss_passes(r["model"], r["visitor"], batch)]
        r["opt"].finish_step(list(torch.stack(losses).float()))
        r["model"].synchronize()  # this step's disk writes count in it
        r["t"] += 1
        return time.perf_counter() - t0

    for r in runs:
        for _ in range(args.warmup):
            step(r)
        r["times"].reset(), r["visitor"].reset()
        r["opt"].noise.seconds = 0.0
    for k in range(args.steps):  # alternate the order: a load change affects both alike
        for r in (runs if k % 2 == 0 else runs[::-1]):
            r["steps"].append(step(r))
            log(f"  {r['name']}: step {len(r['steps'])}/{args.steps}: {r['steps'][-1]:.2f} s")
    res["paths"] = {}
    for r in runs:
        n = len(r["steps"])
        e = {k: v / n for k, v in r["times"].seconds.items()}
        hooks = {k: v / n for k, v in r["visitor"].times.items()}
        res["paths"][r["name"]] = {
            "step_s": r["steps"], "median_step_s": statistics.median(r["steps"]),
            "noise_s": r["opt"].noise.seconds / n, "hooks_s": hooks,
            "compute_s": e.get("compute", 0.0), "copies_s": e.get("upload", 0.0) + e.get("offload", 0.0),
            "waited_for_disk_s": e.get("stall", 0.0), "io_thread_s": {"read": e.get("read", 0.0), "write": e.get("write", 0.0)}}
        r["model"].close()
        shutil.rmtree(r["working"], ignore_errors=True)
    res["ratio_in_place_to_slots"] = (res["paths"]["ring in place"]["median_step_s"]
                                      / res["paths"]["slots (before)"]["median_step_s"])
    res["uptime_end"] = uptime()
    if not args.keep:
        shutil.rmtree(args.work / f"{args.dtype}-{args.layers}l")
    return res


def print_heading(what: str, res: dict[str, Any], columns: list[str]) -> None:
    """The run's conditions (model, batch, threads, load at start and end) and a Markdown table's header."""
    print(f"\nLlama-2-7B width, {what}, disk tier + working copy, MeZO ({res.get('noise', 'gaussian')} noise), "
          f"batch {res['batch']} x seq {res['seq']}, {res['threads']['threads']} threads\n"
          f"  load: {res['uptime_start']}\n        {res['uptime_end']}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def print_paths(res: dict[str, Any]) -> None:
    print_heading(f"{res['layers']} layers, {res['dtype']}", res,
                  ["path", "MeZO step (median)", "noise draws", "rest of the compute (forwards, θ ± εz, update)",
                   "copies", "waited for disk", "I/O thread (read / write)"])
    for name, p in res["paths"].items():  # every noise draw runs inside a compute operation (hook or forward)
        print(f"| {name} | {p['median_step_s']:.2f} s | {p['noise_s']:.2f} s | {p['compute_s'] - p['noise_s']:.2f} s | "
              f"{p['copies_s']:.2f} s | {p['waited_for_disk_s']:.2f} s | "
              f"{p['io_thread_s']['read']:.2f} / {p['io_thread_s']['write']:.2f} s |")
    print(f"in place / slots: {res['ratio_in_place_to_slots']:.3f}")


def run_layers(args: argparse.Namespace) -> dict[str, Any]:
    from zoedge.runtime.threads import apply_threads, choose_threads

    threads = choose_threads(args.threads, "disk")
    apply_threads(threads)
    res: dict[str, Any] = {"part": "layers", "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
                           "page_cache": args.page_cache, "noise": args.noise,
                           "threads": threads.to_dict(), "uptime_start": uptime(), "depths": []}
    for k in args.depths:
        base = args.work / f"{args.dtype}-{k}l"
        store, working = prepared_store(k, args), base / "working"
        res["depths"].append(measure_depth(store, working, args))
        if args.json:  # what is measured so far survives a later failure
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(base)
    lo, hi = res["depths"][0], res["depths"][-1]
    dk = hi["layers"] - lo["layers"]
    step = (hi["median_step_s"] - lo["median_step_s"]) / dk
    fwd = (hi["median_forwards_s"] - lo["median_forwards_s"]) / dk
    io = statistics.mean(d["layer_io"]["read_s"] + d["layer_io"]["write_s"] for d in res["depths"])
    floor = max(fwd, io)
    res["per_layer"] = {"step_s": step, "two_forwards_s": fwd, "read_plus_writeback_s": io, "floor_s": floor,
                        "ratio": step / floor, "target": 1.1, "embed_head_step_s": lo["median_step_s"] - step * lo["layers"]}
    res["uptime_end"] = uptime()
    return res


def print_layers(res: dict[str, Any]) -> None:
    print_heading(res["dtype"], res, ["layers", "MeZO step (median)", "two forwards, resident",
                                      "compute waited for I/O", "I/O thread busy (read / write)",
                                      "one layer: cold read / write+fsync"])
    for d in res["depths"]:
        io = d["layer_io"]
        print(f"| {d['layers']} | {d['median_step_s']:.2f} s | {d['median_forwards_s']:.2f} s | "
              f"{d['compute_waited_for_io_s']:.2f} s | {d['io_thread_busy_s'].get('read', 0):.2f} / "
              f"{d['io_thread_busy_s'].get('write', 0):.2f} s | {io['read_s']:.2f} / {io['write_s']:.2f} s "
              f"({io['bytes'] / 2**20:.0f} MiB) |")
    p = res["per_layer"]
    ok = "meets" if p["ratio"] <= p["target"] else "misses"
    print(f"per decoder layer: step {p['step_s']:.2f} s, two forwards {p['two_forwards_s']:.2f} s, read + write-back "
          f"{p['read_plus_writeback_s']:.2f} s -> step / max(...) = {p['ratio']:.2f} ({ok} the {p['target']} target); "
          f"embeddings + head + fixed cost {p['embed_head_step_s']:.2f} s per step")


# ----------------------------------------------------------------------------------------------- e2e part
def finetune_cmd(store: Path, out: Path, args: argparse.Namespace, steps: int, resume: bool = False) -> list[str]:
    cmd = zoedge("finetune", "--model", str(store), "--output", str(out), "--tier", "disk", "--dtype", args.dtype,
                 "--task", "demo", "--steps", str(steps), "--batch-size", str(args.batch), "--max-length",
                 str(args.seq), "--n-dev", str(args.n_dev), "--n-test", "0", "--eval-every", "0",
                 "--eval-batch-size", str(args.batch), "--save-every", str(args.save_every), "--keep-checkpoints",
                 "1", "--no-progress", "--no-plot", "--lr", str(args.lr), "--eps", str(args.eps),
                 "--checkpoint-weights", args.checkpoint_weights, "--no-export")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + (["--resume"] if resume else [])


def metrics_of(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def checkpointed_step(out: Path) -> int:
    """The step of the newest complete checkpoint in ``out`` (0: none yet)."""
    from zoedge.train.checkpoint import latest_checkpoint
    path = latest_checkpoint(out / "checkpoints")
    return int(path.name.split("-")[-1]) if path is not None else 0


def run_child(cmd: list[str], out: Path, log_path: Path, kill_after_steps: int | None = None,
              kill_delay: float = 0.0, after_checkpoint: bool = False) -> dict[str, Any]:
    """Run ``cmd``; with ``kill_after_steps`` SIGKILL it ``kill_delay`` s after that many steps are in its metrics
    or, ``after_checkpoint``, after its checkpoint of that step is complete (it follows the step's metrics: a
    checkpoint first flushes the pending update through every block).
    Returns wall time, exit status, peak RSS (``wait4``: the process's high-water mark), the steps' seconds, what
    its summary says of a replay and of the disk I/O, and an RSS timeline."""
    import psutil

    t0 = time.perf_counter()
    with open(log_path, "ab") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT)
    samples: list[tuple[float, int]] = []
    killed = threading.Event()

    def watch() -> None:
        seen_at = None
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                samples.append((round(time.perf_counter() - t0, 1), proc.memory_info().rss))
            except psutil.Error:
                pass
            if kill_after_steps is not None and not killed.is_set():
                done = checkpointed_step(out) if after_checkpoint else len(metrics_of(out))
                if done >= kill_after_steps and seen_at is None:
                    seen_at = time.perf_counter()
                    what = "checkpoint of step" if after_checkpoint else "steps done:"
                    log(f"  {what} {done}: SIGKILL in {kill_delay:.0f} s")
                if seen_at is not None and time.perf_counter() - seen_at >= kill_delay:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.set()
            time.sleep(1.0)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    except BaseException:
        p.kill()
        raise
    p.returncode = os.waitstatus_to_exitcode(status)
    w.join()
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return {"cmd": " ".join(cmd), "wall_s": time.perf_counter() - t0, "returncode": p.returncode,
            "killed": killed.is_set(), "peak_rss_bytes": ru.ru_maxrss * 1024,
            "step_seconds": [m["seconds"] for m in metrics_of(out)],  # every step in the metrics so far
            "replay": summary.get("replay"), "disk_io": summary.get("disk_io"), "start_step": summary.get("start_step"),
            "rss_timeline": samples[:: max(1, len(samples) // 200)]}


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    base = args.work / f"e2e-{args.dtype}-{args.layers}l"
    src, store, out = base / "src", base / "store", base / "run"
    res: dict[str, Any] = {"part": "e2e", "dtype": args.dtype, "layers": args.layers, "batch": args.batch,
                           "max_length": args.seq, "steps": args.steps, "uptime_start": uptime()}
    from zoedge.plan.shapes import full_parameters, parameters_by_block, shape_config
    per = parameters_by_block(shape_config("llama-2-7b", 1))
    size = (per["embed"] + per["head"] + per["layer"] * args.layers) * (4 if args.dtype == "fp32" else 2)
    # at the peak: source + store (prepare), then store + working copy; with --resume-check also two checkpoints
    # (the kept one and the one being written) and the exported model
    copies = 5 if args.resume_check and args.checkpoint_weights == "full" else 2
    have = free_bytes(args.work) + dir_bytes(src) + dir_bytes(store) + dir_bytes(out)
    need = copies * size + 3 * 2**30
    res["model_bytes"] = size
    log(f"{args.layers} layers, {args.dtype}: {size / GB:.1f} GB of weights; {have / GB:.1f} GB free for this run, "
        f"{need / GB:.1f} GB needed at the peak")
    if have < need or (args.max_disk and need > args.max_disk * GB):
        sys.exit(f"bench_7b_disk: not enough disk: the run needs {need / GB:.1f} GB at its peak (source, store, "
                 f"working copy{', checkpoint' if args.resume_check else ''}) and {have / GB:.1f} GB are free on "
                 f"{args.work} (limit --max-disk {args.max_disk} GB); free space or use --layers / --dtype bf16")
    if not (store / "manifest.json").is_file() or (store / ".prepare-in-progress").exists():
        res["synth"] = synth("llama-2-7b", args.layers, args.dtype, src)
        res["prepare_s"] = prepare(src, store, args.dtype)
    verify(store)
    res["store_bytes"] = dir_bytes(store / "blocks") or dir_bytes(store)
    if src.exists():
        log(f"store verified ({res['store_bytes'] / GB:.1f} GB): deleting the synthetic source {src}")
        shutil.rmtree(src)
    shutil.rmtree(out, ignore_errors=True)
    log_path = base / "finetune.log"
    runs: dict[str, Any] = {}
    if args.resume_check:
        # Uninterrupted reference, then: kill in the middle of the step after the first checkpoint, resume.
        ref = base / "ref"
        shutil.rmtree(ref, ignore_errors=True)
        log(f"reference run: {args.steps} steps")
        runs["reference"] = run_child(finetune_cmd(store, ref, args, args.steps), ref, log_path)
        runs["reference"]["losses"] = [m["loss"] for m in metrics_of(ref)]
        shutil.rmtree(ref / "working", ignore_errors=True)
        shutil.rmtree(ref / "model", ignore_errors=True)
        delay = 0.5 * statistics.median(m["seconds"] for m in metrics_of(ref))
        log(f"interrupted run: SIGKILL {delay:.0f} s into step {args.save_every + 1}")
        runs["killed"] = run_child(finetune_cmd(store, out, args, args.steps), out, log_path,
                                   kill_after_steps=args.save_every, kill_delay=delay, after_checkpoint=True)
        runs["killed"]["losses"] = [m["loss"] for m in metrics_of(out)]
        log("resume")
        runs["resumed"] = run_child(finetune_cmd(store, out, args, args.steps, resume=True), out, log_path)
        runs["resumed"]["losses"] = [m["loss"] for m in metrics_of(out)]
        # a resume that found no checkpoint would start over and match trivially: it must have continued
        res["resumed_from_step"] = runs["resumed"]["start_step"]
        res["resume_matches_reference"] = (runs["resumed"]["losses"] == runs["reference"]["losses"]
                                           and res["resumed_from_step"] == args.save_every)
    else:
        delay = args.kill_delay
        log(f"finetune: {args.steps} steps, then SIGKILL {delay:.0f} s into the next (the final checkpoint and "
            "export would need two more copies of the weights on disk)")
        runs["run"] = run_child(finetune_cmd(store, out, args, args.steps + 1), out, log_path,
                                kill_after_steps=args.steps, kill_delay=delay)
        runs["run"]["metrics"] = metrics_of(out)
        runs["run"]["losses"] = [m["loss"] for m in runs["run"]["metrics"]]
    res["runs"] = runs
    res["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs.values())
    res["peak_rss_over_store"] = res["peak_rss_bytes"] / res["store_bytes"]
    main = runs.get("resumed") or runs["run"]
    res["losses"] = main["losses"]
    res["loss_moves"] = len(set(main["losses"])) > 1
    res["uptime_end"] = uptime()
    res["log"] = str(log_path)
    if args.json:  # the runs' own log (replay, threads, I/O mode) next to the results: the run folder goes below
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, args.json.with_suffix(".log"))
        res["log"] = str(args.json.with_suffix(".log"))
    if not args.keep:
        log(f"deleting {base} (store, working copy, checkpoints)")
        for p in (store, out, base / "ref"):
            shutil.rmtree(p, ignore_errors=True)
    return res


def print_e2e(res: dict[str, Any]) -> None:
    print(f"\nLlama-2-7B shape, {res['layers']} layers, {res['dtype']}: store {res['store_bytes'] / GB:.2f} GB; "
          f"zoedge finetune --tier disk, demo task, batch {res['batch']}, max length {res['max_length']}\n"
          f"  load: {res['uptime_start']}\n        {res['uptime_end']}")
    print("| run | exit | wall | peak RSS | RSS / store | steps: loss (s/step) |")
    print("|---|---|---|---|---|---|")
    for name, r in res["runs"].items():
        secs = r.get("step_seconds") or []
        per = ", ".join(f"{x:.4f}" + (f" ({secs[k]:.0f} s)" if k < len(secs) else "") for k, x in enumerate(r["losses"]))
        exit_ = "SIGKILL (ours)" if r["killed"] else ("SIGKILL (not ours: OOM killer?)" if r["returncode"] == -9
                                                     else r["returncode"])
        print(f"| {name} | {exit_} | {r['wall_s']:.0f} s | {r['peak_rss_bytes'] / GB:.2f} GB | "
              f"{r['peak_rss_bytes'] / res['store_bytes']:.3f} | {per} |")
    ok = "meets" if res["peak_rss_over_store"] <= 0.25 else "misses"
    print(f"peak RSS / store = {res['peak_rss_over_store']:.3f} ({ok} the 0.25 target); loss moves: "
          f"{res['loss_moves']}" + (f"; resumed from step {res['resumed_from_step']}, losses equal the uninterrupted "
                                    f"run's: {res['resume_matches_reference']}" if "resume_matches_reference" in res
                                    else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="part", required=True)
    for name in ("layers", "paths", "e2e"):
        p = sub.add_parser(name)
        p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
        p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_7b", help="where the big files go")
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: zoedge's choice)")
        p.add_argument("--keep", action="store_true", help="keep the checkpoints, stores and runs")
        p.add_argument("--json", type=Path, default=None, help="write the results here")
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--seq", type=int, default=32, help="tokens per row (layers) / --max-length (e2e)")
    lp = sub.choices["layers"]
    lp.add_argument("--depths", type=int, nargs=2, default=[1, 3])
    lp.add_argument("--prefetch", type=int, default=1)
    sub.choices["paths"].add_argument("--layers", type=int, default=3)
    for p in (lp, sub.choices["paths"]):
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--scored", type=int, default=4, help="scored positions per step (default 4: one per row)")
        p.add_argument("--noise", choices=("gaussian", "rademacher", "pool"), default="gaussian",
                       help="MeZO's direction noise (zoedge/noise/source.py; default gaussian)")
        p.add_argument("--page-cache", action="store_true",
                       help="let the few-layer store sit in the page cache (default: drop its pages after each read "
                       "and write, as the disk tier does for a store larger than the available memory)")
    ep = sub.choices["e2e"]
    ep.add_argument("--layers", type=int, default=32)
    ep.add_argument("--steps", type=int, default=3)
    ep.add_argument("--n-dev", type=int, default=4)
    ep.add_argument("--lr", type=float, default=1e-5)
    ep.add_argument("--eps", type=float, default=1e-3)
    ep.add_argument("--save-every", type=int, default=0)
    ep.add_argument("--resume-check", action="store_true", help="kill after the first checkpoint and --resume")
    ep.add_argument("--checkpoint-weights", choices=("updates", "full", "auto"), default="updates",
                    help="finetune's checkpoint kind (default updates: a few KB, replayed onto the store on resume; "
                         "full needs three more copies of the weights on disk)")
    ep.add_argument("--kill-delay", type=float, default=30.0, help="seconds into the extra step at the SIGKILL")
    ep.add_argument("--max-disk", type=float, default=60.0, help="refuse to use more than this many GB of disk")
    args = ap.parse_args()
    if args.part == "e2e" and args.resume_check and not args.save_every:
        args.save_every = max(1, args.steps // 2)
    args.work.mkdir(parents=True, exist_ok=True)
    run, show = {"layers": (run_layers, print_layers), "paths": (run_paths, print_paths), "e2e": (run_e2e, print_e2e)}[args.part]
    res = run(args)
    res["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    show(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
        log(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

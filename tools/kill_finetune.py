#!/usr/bin/env python
"""Crash-safety check of ``zoedge finetune``: SIGKILL it at random moments, resume, compare with a clean run.

A tiny random Llama model (with the default model's tokenizer) is fine-tuned on the demo task once without
interruption (the reference), then ``--trials`` times with ``--kills`` SIGKILLs each at random moments
(before and after the first checkpoint, during checkpoint writes), every restart with ``--resume``. After
every kill each ``step-*`` checkpoint folder must load (checksums verified) and the run directory must not
be locked; at the end the exported weights must be bit-equal to the reference run's.

Prints one line per trial and a final tally; exits 1 on any corrupt checkpoint, failed resume or mismatch.

Example (about 5 minutes on 2 CPU cores)::

    python tools/kill_finetune.py --trials 20 --tier disk
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_model(work: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zoedge.models import default_model_dir

    src = default_model_dir()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "hf")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, work / "hf" / f.name)
    return work / "hf"


def command(model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "zoedge.cli", "finetune", "--model", str(model), "--output", str(out),
            "--steps", str(args.steps), "--save-every", str(args.save_every), "--tier", args.tier,
            "--batch-size", "8", "--n-dev", "16", "--n-test", "0", "--eval-every", "0", "--lr", "1e-3",
            "--eps", "1e-2", "--no-progress", "--no-plot", "--threads", "1"]  # bit-equal: one thread count


def checkpoints_ok(out: Path) -> tuple[bool, str]:
    from zoedge.errors import StoreError
    from zoedge.train.checkpoint import checkpoint_folders, load_checkpoint

    for folder in checkpoint_folders(out / "checkpoints"):
        try:
            load_checkpoint(folder)
        except StoreError as e:
            return False, f"{folder.name}: {e}"
    return True, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="interrupted runs (default 20)")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs per trial (default 3)")
    ap.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    ap.add_argument("--save-every", type=int, default=3, help="checkpoint interval (default 3)")
    ap.add_argument("--tier", choices=("ram", "disk"), default="ram", help="host tier (default ram)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="zoedge-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ZOEDGE_CACHE": str(work / "cache")}
    model = make_model(work)
    t0 = time.perf_counter()
    subprocess.run(command(model, work / "ref", args), env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    from safetensors.torch import load_file
    ref = load_file(str(work / "ref" / "model" / "model.safetensors"))
    print(f"reference run: {wall:.1f} s; killing at uniform random times in [0.5, {wall:.1f}] s", flush=True)
    tally = {"kills": 0, "corrupt": 0, "failed": 0, "equal": 0, "different": 0}
    for trial in range(args.trials):
        out = work / f"trial-{trial}"
        notes = []
        for k in range(args.kills + 1):
            cmd = command(model, out, args) + (["--resume"] if k else [])
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if k < args.kills:
                try:
                    proc.wait(timeout=rng.uniform(0.5, wall))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    tally["kills"] += 1
                    ok, why = checkpoints_ok(out)
                    if not ok:
                        tally["corrupt"] += 1
                        notes.append(f"corrupt after kill {k + 1}: {why}")
                    continue
            else:
                proc.wait()
            if proc.returncode != 0:
                tally["failed"] += 1
                notes.append(f"exit {proc.returncode}: {proc.stderr.read().strip().splitlines()[-1:]}")
            break
        final = out / "model" / "model.safetensors"
        if final.is_file():
            got = load_file(str(final))
            same = got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
            tally["equal" if same else "different"] += 1
            notes.append("bit-equal" if same else "DIFFERENT weights")
        print(f"trial {trial}: {'; '.join(notes)}", flush=True)
    print(f"{args.trials} trials, {tally['kills']} kills ({args.tier} tier): {tally['corrupt']} corrupt checkpoint "
          f"sets, {tally['failed']} failed resumes, {tally['equal']} bit-equal / {tally['different']} different "
          f"exports")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if tally["corrupt"] or tally["failed"] or tally["different"] else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Crash-safety check of ``zoedge prepare`` and ``zoedge finetune``: SIGKILL them at random moments, resume, compare.

Phases (``--phases``, default all three):

* ``prepare``: ``zoedge prepare`` of a small random Llama (10 blocks, 69 MB fp32) is killed at a uniform
  random moment of its write window (from the store folder's appearance to the end of an uninterrupted
  reference prepare), then re-run (prepare resumes) until it finishes. After every kill the store must either
  be refused cleanly as unfinished (a ``StoreError``, no manifest) or load with every block verified, and every
  finished block (one with its sidecar) must hash right; the finished store must be byte-equal (manifest and
  every block file) to the reference. A resumed prepare's kill is timed from the first change in its blocks
  folder. Kills that land after the manifest was written (the process was exiting) are counted apart.
* ``ram`` and ``disk``: ``zoedge finetune --tier T`` of a tiny random Llama (the default model's tokenizer),
  12 steps, a checkpoint every 3. A trial aims up to ``--per-trial`` kills at each of three moments, every
  restart with ``--resume``: first before the first checkpoint (a uniform moment after the process took the run
  folder's lock, within the reference run's time from its start-up to its first checkpoint), then alternately
  during a checkpoint write (as soon as a ``checkpoints/.tmp-step-*`` folder appears, plus 0–20 ms) and after the
  first checkpoint (a uniform moment after the run has trained a step); then the run finishes. Kills are counted by where they *landed*, read off the run folder right after the kill: a
  ``.tmp-step-*`` folder left behind is a kill during a checkpoint write; otherwise a complete ``step-*``
  folder means after the first checkpoint, none before it. After every kill every ``step-*`` checkpoint must
  load (checksums verified); every final run must succeed and export weights bit-equal to the reference run's.

* ``re-save`` (finetune phases): a finished run is resumed with its own ``--steps``, which re-saves its last step
  and re-exports; it is stopped as soon as the re-save's ``.tmp-step-*`` folder appears (plus 0–20 ms), up to
  ``--per-trial`` times, then resumed to the end. After every such stop the last step's checkpoint must still be
  there, whole.

``--signal TERM`` stops the runs with SIGTERM instead of SIGKILL: zoedge must then exit 143 (or 0 when it had just
finished) within 60 s, leaving the same guarantees. A restart uses ``--resume`` when the run folder holds a
checkpoint, else starts afresh (``--resume`` with no checkpoint is an error). A checkpoint is *lost* when the
newest intact step after a stop is older than the newest one before that run started.

Trials go on until every category has ``--kills`` kills (default 20; ``--max-trials`` caps it). Prints one line
per trial, a table per category and a final JSON line; exits 1 on any corrupt store or checkpoint, lost checkpoint,
failed resume or mismatch.

Example (15-30 minutes on 2 busy CPU cores)::

    python tools/kill_finetune.py                       # all phases, >= 20 kills per category
    python tools/kill_finetune.py --phases disk --kills 5
    nice -n 19 python tools/kill_finetune.py --phases ram --kills 5 --signal TERM
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

CATEGORIES = {"prepare": ("prepare", "after-manifest"), "ram": ("before", "during-write", "after", "re-save"),
              "disk": ("before", "during-write", "after", "re-save")}
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
STOP_SIGNAL = signal.SIGKILL  # set from --signal


# ------------------------------------------------------------------ models and commands
def make_model(work: Path, name: str, hidden: int, layers: int, tokenizer: bool) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work / name)
    if tokenizer:
        from zoedge.models import default_model_dir
        for f in default_model_dir().iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, work / name / f.name)
    return work / name


def prepare_command(model: Path, dst: Path) -> list[str]:
    return ["prepare", str(model), str(dst), "--no-progress"]


def finetune_command(model: Path, out: Path, tier: str, args: argparse.Namespace) -> list[str]:
    return ["finetune", "--model", str(model), "--output", str(out),
            "--steps", str(args.steps), "--save-every", str(args.save_every), "--tier", tier,
            "--batch-size", "8", "--n-dev", "16", "--n-test", "0", "--eval-every", "0", "--lr", "1e-3",
            "--eps", "1e-2", "--no-progress", "--no-plot", "--threads", "1"]  # bit-equal: one thread count


# ------------------------------------------------------------------ processes
def _run_cli(argv: list[str], env: dict[str, str], log: str) -> None:
    """A forked ``zoedge`` process: the command line's ``main`` with ``env``, output to ``log``."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from zoedge.cli import main
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Run:
    """One ``zoedge`` process, with the part of ``subprocess.Popen``'s interface the phases use."""

    def __init__(self, proc: mp.process.BaseProcess, log: Path) -> None:
        self.proc, self.log, self.pid = proc, log, proc.pid
        self.hung = False  # did not exit within 60 s of SIGTERM (then SIGKILLed)

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("zoedge", timeout or 0)
        return self.proc.exitcode

    def kill(self) -> None:
        """Stop with ``STOP_SIGNAL``: SIGKILL (kill -9, as a power cut or the OOM killer would) or SIGTERM (what
        a scheduler or `kill` sends; zoedge must stop cleanly)."""
        os.kill(self.pid, STOP_SIGNAL)
        self.proc.join(None if STOP_SIGNAL == signal.SIGKILL else 60)
        if self.proc.exitcode is None:
            self.hung = True
            os.kill(self.pid, signal.SIGKILL)
            self.proc.join()

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def last_lines(self, n: int = 3) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-n:]) if self.log.exists() else ""


class Launcher:
    """Starts ``zoedge`` commands as separate processes forked from a server that has already imported torch,
    transformers and zoedge (``multiprocessing``'s forkserver), so a run's seconds of imports do not dominate the
    time between kills. Each run is its own process, killed with SIGKILL like any ``zoedge`` command."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.count = env, logs, 0
        logs.mkdir(parents=True, exist_ok=True)
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "transformers", "safetensors.torch", "zoedge.cli",
                                         "zoedge.train.job", "zoedge.store.prepare", "zoedge.commands.finetune",
                                         "zoedge.commands.prepare"])

    def start(self, argv: list[str]) -> Run:
        self.count += 1
        log = self.logs / f"run-{self.count}.log"
        proc = self.ctx.Process(target=_run_cli, args=(argv, self.env, str(log)), daemon=False)
        proc.start()
        return Run(proc, log)


# ------------------------------------------------------------------ checks
def store_state(dst: Path) -> tuple[bool, str]:
    """(intact, why): a killed prepare's store is unfinished (refused cleanly) or verified; finished blocks hash."""
    from zoedge.errors import StoreError
    from zoedge.store.manifest import MANIFEST_NAME, load_manifest
    from zoedge.store.verify import sha256_file

    for side in sorted((dst / "blocks").glob("*.json")) if (dst / "blocks").is_dir() else []:
        try:
            entry = json.loads(side.read_text())["entry"]
        except (ValueError, KeyError, OSError) as e:
            return False, f"{side.name}: unreadable sidecar ({e})"
        data = side.with_suffix(".bin")
        if not data.is_file() or sha256_file(data) != entry["sha256"]:
            return False, f"{side.name}: its block file is missing or hashes wrong"
    try:
        load_manifest(dst, verify=True)
    except StoreError as e:
        if (dst / MANIFEST_NAME).is_file():
            return False, f"manifest written but the store fails verification: {e}"
        return True, "unfinished (refused cleanly)"
    return True, "finished and verified"


def stores_equal(a: Path, b: Path) -> bool:
    """Manifest and block files byte-equal (stamps and temporary files aside)."""
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.name != "verified.json" and not p.name.endswith(".tmp")}
    return files(a) == files(b)


def checkpoints_ok(out: Path) -> tuple[bool, str]:
    from zoedge.errors import StoreError
    from zoedge.train.checkpoint import checkpoint_folders, load_checkpoint

    for folder in checkpoint_folders(out / "checkpoints"):
        try:
            load_checkpoint(folder)
        except StoreError as e:
            return False, f"{folder.name}: {e}"
    return True, ""


def locked_by(out: Path, pid: int) -> bool:
    """Whether process ``pid`` holds the run folder (past its start-up: it wrote its pid into the lock file)."""
    from zoedge.train.run_record import LOCK
    try:
        return (out / LOCK).read_text().strip() == str(pid)
    except OSError:
        return False


def landed(out: Path, writing: bool) -> str:
    """Where a finetune kill landed: ``writing`` (a ``.tmp-step-*`` folder was there when the signal was sent, or
    is left after it), else read off the run folder."""
    ckpts = out / "checkpoints"
    if writing or any(ckpts.glob(".tmp-step-*")):
        return "during-write"
    from zoedge.train.checkpoint import checkpoint_folders
    return "after" if checkpoint_folders(ckpts) else "before"


def newest_step(out: Path) -> int:
    """The step of the newest intact checkpoint (-1: none)."""
    from zoedge.train.checkpoint import latest_checkpoint
    path = latest_checkpoint(out / "checkpoints")
    return -1 if path is None else int(path.name.rsplit("-", 1)[1])


def writing_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob(".tmp-step-*"))


def _tmp_folders(out: Path) -> set[tuple[int, int]]:
    found = set()
    for p in (out / "checkpoints").glob(".tmp-step-*"):
        try:
            st = p.stat()
        except OSError:
            continue
        found.add((st.st_ino, st.st_ctime_ns))
    return found


def new_write(out: Path) -> Callable[[], bool]:
    """A condition: a checkpoint write began (a ``.tmp-step-*`` folder that a stopped run did not leave)."""
    stale = _tmp_folders(out)
    return lambda: bool(_tmp_folders(out) - stale)


def wait_until(proc: Run, cond: Callable[[], bool], timeout: float, poll: float = 0.002) -> bool:
    """Poll ``cond`` until true (True) or the process exits / ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def kill_after(proc: Run, delay: float, out: Path | None = None) -> bool | str:
    """Stop ``proc`` after ``delay`` seconds unless it exits first; False when it exited first, else True, or (with
    ``out``) where the stop landed (see :func:`landed`)."""
    try:
        proc.wait(timeout=max(delay, 0.0))
        return False
    except subprocess.TimeoutExpired:
        writing = out is not None and writing_checkpoint(out)
        proc.kill()
        return True if out is None else landed(out, writing)


def stopped_cleanly(proc: Run) -> str:
    """'' when a stopped run ended as its signal demands (SIGKILL: killed; SIGTERM: exit 143, or 0 when it had just
    finished), else what went wrong."""
    if proc.hung:
        return "did not exit within 60 s of SIGTERM"
    code = proc.returncode
    if STOP_SIGNAL == signal.SIGTERM and code not in (143, 0):
        return f"exit {code} after SIGTERM (not 143): {proc.last_lines()}"
    return ""


def timeline(launch: Launcher, argv: list[str], marks: dict[str, Callable[[], bool]]) -> dict[str, float]:
    """Run ``argv`` uninterrupted; seconds from launch until each mark first held, and ``end``."""
    t0 = time.monotonic()
    proc = launch.start(argv)
    seen: dict[str, float] = {}
    while proc.poll() is None:
        for k, cond in marks.items():
            if k not in seen and cond():
                seen[k] = time.monotonic() - t0
        time.sleep(0.002)
    if proc.returncode:
        sys.exit(f"reference run failed (exit {proc.returncode}): {proc.last_lines(20)}")
    seen["end"] = time.monotonic() - t0
    return seen


# ------------------------------------------------------------------ phases
def run_prepare(args: argparse.Namespace, work: Path, launch: Launcher, rng: random.Random, tally: Counter,
                problems: list[str]) -> None:
    from zoedge.store.manifest import MANIFEST_NAME

    model = make_model(work, "hf-prepare", hidden=256, layers=8, tokenizer=False)
    ref = work / "store-ref"
    t = timeline(launch, prepare_command(model, ref), {"dst": lambda: (ref / "blocks").is_dir(),
                                                   "manifest": lambda: (ref / MANIFEST_NAME).is_file()})
    window = max(t.get("manifest", t["end"]) - t.get("dst", 0.0), 0.05)
    print(f"prepare reference: {t['end']:.1f} s, blocks written from {t.get('dst', 0):.1f} s to "
          f"{t.get('manifest', 0):.1f} s", flush=True)
    trial = 0
    while tally["prepare/prepare"] < args.kills and trial < args.max_trials:
        dst, notes = work / f"prepare-{trial}", []
        for k in range(args.per_trial + 1):
            blocks = dst / "blocks"
            before = set(os.listdir(blocks)) if blocks.is_dir() else None  # a resumed prepare: what is there

            def writing() -> bool:  # the store folder appeared, or (resumed) the blocks folder changed
                return blocks.is_dir() if before is None else set(os.listdir(blocks)) != before
            proc = launch.start(prepare_command(model, dst))
            if k < args.per_trial and wait_until(proc, writing, 300):
                if kill_after(proc, rng.uniform(0, window)):
                    finished = (dst / MANIFEST_NAME).is_file()
                    tally["prepare/after-manifest" if finished else "prepare/prepare"] += 1
                    ok, why = store_state(dst)
                    notes.append(why)
                    if not ok:
                        tally["prepare/corrupt"] += 1
                        problems.append(f"prepare trial {trial}: {why}")
                    continue
            proc.wait()
            if proc.returncode:
                tally["prepare/failed"] += 1
                problems.append(f"prepare trial {trial}: exit {proc.returncode}: {proc.last_lines()}")
            break
        same = stores_equal(dst, ref)
        tally["prepare/equal" if same else "prepare/different"] += 1
        print(f"prepare trial {trial}: {'; '.join(notes) or 'no kill landed'}; "
              f"{'byte-equal store' if same else 'DIFFERENT store'}", flush=True)
        if not same:
            problems.append(f"prepare trial {trial}: store differs from the reference")
        shutil.rmtree(dst, ignore_errors=True)
        trial += 1


def run_finetune(tier: str, args: argparse.Namespace, model: Path, work: Path, launch: Launcher, rng: random.Random,
                 tally: Counter, problems: list[str]) -> None:
    from safetensors.torch import load_file

    ref_out = work / f"ref-{tier}"
    timeline(launch, finetune_command(model, ref_out, tier, args), {})  # also prepares the cached store
    ref = load_file(str(ref_out / "model" / "model.safetensors"))
    timed = work / f"ref-{tier}-timed"  # timed with the store prepared, as the trials run
    ckpts = timed / "checkpoints"
    t = timeline(launch, finetune_command(model, timed, tier, args),
                 {"out": lambda: (timed / "run.json").is_file(), "ckpt": lambda: any(ckpts.glob("step-*"))})
    shutil.rmtree(timed, ignore_errors=True)
    print(f"{tier} reference: {t['end']:.1f} s; run folder at {t.get('out', 0):.1f} s, first checkpoint at "
          f"{t.get('ckpt', 0):.1f} s", flush=True)
    before_window = max(t.get("ckpt", t["end"]) - t.get("out", 0.0), 0.05)
    train_window = max(t["end"] - t.get("ckpt", 0.0), 0.05)
    trial = 0
    while (any(tally[f"{tier}/{c}"] < args.kills for c in CATEGORIES[tier]) and trial < args.max_trials):
        out, notes = work / f"{tier}-{trial}", []
        need = {c: args.kills - tally[f"{tier}/{c}"] for c in CATEGORIES[tier]}
        others = [c for i in range(args.per_trial) for c in ("during-write", "after") if need[c] > i]
        aims = ["before"] * max(0, min(need["before"], args.per_trial)) + others  # no checkpoint yet, then some
        for k in range(len(aims) + 1):
            had, writing = newest_step(out), new_write(out)
            cmd = finetune_command(model, out, tier, args) + (["--resume"] if had >= 0 else [])
            proc = launch.start(cmd)
            if k < len(aims):
                aim, killed = aims[k], False
                if aim == "before" and wait_until(proc, lambda: locked_by(out, proc.pid), 300):
                    killed = kill_after(proc, rng.uniform(0, before_window), out)
                elif aim == "during-write" and wait_until(proc, writing, 300, poll=0.001):
                    killed = kill_after(proc, rng.uniform(0, 0.02), out)
                elif aim == "after":
                    lines = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").is_file() else 0

                    def trained() -> bool:
                        m = out / "metrics.jsonl"
                        return (any((out / "checkpoints").glob("step-*")) and m.is_file()
                                and len(m.read_text().splitlines()) > lines)
                    if wait_until(proc, trained, 300, poll=0.01):
                        killed = kill_after(proc, rng.uniform(0, train_window / 2), out)
                if killed:
                    where = killed
                    tally[f"{tier}/{where}"] += 1
                    note = check_stop(proc, out, had, f"{tier} trial {trial}", tally, tier, problems)
                    notes.append(f"stopped {where}" + note)
                    continue
                if proc.poll() is None:
                    proc.wait()
            else:
                proc.wait()
            if proc.returncode != 0:
                tally[f"{tier}/failed"] += 1
                why = f"exit {proc.returncode}: {proc.last_lines()}"
                notes.append(why)
                problems.append(f"{tier} trial {trial}: {why}")
            break
        def exported_equal() -> bool:
            final = out / "model" / "model.safetensors"
            return final.is_file() and (lambda got: got.keys() == ref.keys() and all(
                torch.equal(got[n], ref[n]) for n in ref))(load_file(str(final)))
        same = exported_equal()
        if same and tally[f"{tier}/re-save"] < args.kills:  # stop the re-save of the finished run's last step
            for _ in range(args.per_trial):
                had, writing = newest_step(out), new_write(out)
                proc = launch.start(finetune_command(model, out, tier, args) + ["--resume"])
                if not wait_until(proc, writing, 300, poll=0.001):
                    proc.wait()
                    break
                if kill_after(proc, rng.uniform(0, 0.02), out):
                    tally[f"{tier}/re-save"] += 1
                    notes.append("stopped re-save" + check_stop(proc, out, had, f"{tier} trial {trial} re-save",
                                                                tally, tier, problems))
            proc = launch.start(finetune_command(model, out, tier, args) + ["--resume"])
            proc.wait()
            if proc.returncode != 0:
                tally[f"{tier}/failed"] += 1
                problems.append(f"{tier} trial {trial}: resume after the re-save stops: exit {proc.returncode}: "
                                f"{proc.last_lines()}")
            same = exported_equal()
        tally[f"{tier}/equal" if same else f"{tier}/different"] += 1
        if not same:
            problems.append(f"{tier} trial {trial}: exported weights differ from the reference")
        print(f"{tier} trial {trial}: {'; '.join(notes) or 'no kill landed'}; "
              f"{'bit-equal' if same else 'DIFFERENT weights'}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        trial += 1


def check_stop(proc: Run, out: Path, had: int, where: str, tally: Counter, tier: str, problems: list[str]) -> str:
    """After a stop: every checkpoint loads, none was lost, the signal was handled; returns a note."""
    note = ""
    ok, why = checkpoints_ok(out)
    if not ok:
        tally[f"{tier}/corrupt"] += 1
        problems.append(f"{where}: {why}")
        note += f" CORRUPT {why}"
    now = newest_step(out)
    if now < had:
        tally[f"{tier}/lost"] += 1
        problems.append(f"{where}: the newest checkpoint went from step {had} to {now}")
        note += f" LOST step {had} (now {now})"
    bad = stopped_cleanly(proc)
    if bad:
        tally[f"{tier}/unclean"] += 1
        problems.append(f"{where}: {bad}")
        note += f" UNCLEAN {bad}"
    return note


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", nargs="+", choices=tuple(CATEGORIES), default=list(CATEGORIES),
                    help="what to kill (default: prepare ram disk)")
    ap.add_argument("--kills", type=int, default=20, help="kills wanted per category (default 20)")
    ap.add_argument("--per-trial", type=int, default=4,
                    help="kills per trial (prepare), or per aim (finetune: before the first checkpoint, during a write, "
                    "after), before the run may finish (default 4)")
    ap.add_argument("--max-trials", type=int, default=60, help="trials per phase at most (default 60)")
    ap.add_argument("--steps", type=int, default=12, help="finetune steps per run (default 12)")
    ap.add_argument("--save-every", type=int, default=3, help="checkpoint interval (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times (default 0)")
    ap.add_argument("--signal", choices=tuple(SIGNALS), default="KILL",
                    help="how runs are stopped: KILL (SIGKILL, default) or TERM (SIGTERM: zoedge must exit 143)")
    ap.add_argument("--json", type=Path, default=None, help="also write the final JSON to this file")
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    global STOP_SIGNAL
    STOP_SIGNAL = SIGNALS[args.signal]
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="zoedge-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ZOEDGE_CACHE": str(work / "cache")}
    tally: Counter = Counter()
    problems: list[str] = []
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    launch = Launcher(env, work / "logs")
    if "prepare" in args.phases:
        run_prepare(args, work, launch, rng, tally, problems)
    tiers = [p for p in args.phases if p != "prepare"]
    if tiers:
        model = make_model(work, "hf", hidden=32, layers=2, tokenizer=True)
        for tier in tiers:
            run_finetune(tier, args, model, work, launch, rng, tally, problems)
    result = {"phases": args.phases, "signal": args.signal, "kills_wanted": args.kills, "seconds": round(time.monotonic() - t0, 1),
              "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2), "tally": dict(tally),
              "problems": problems}
    print(f"\n| phase | where the SIG{args.signal}s landed | kills | corrupt | lost checkpoints | unclean exits | "
          "failed resumes | final result equal / different |")
    print("|---|---|---|---|---|---|---|---|")
    for phase in args.phases:
        for c in CATEGORIES[phase]:
            key = f"{phase}/{c}"
            print(f"| {phase} | {c} | {tally[key]} | {tally[f'{phase}/corrupt']} | {tally[f'{phase}/lost']} | "
                  f"{tally[f'{phase}/unclean']} | {tally[f'{phase}/failed']} | "
                  f"{tally[f'{phase}/equal']} / {tally[f'{phase}/different']} |")
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    short = [f"{p}/{c}" for p in args.phases for c in CATEGORIES[p] if c != "after-manifest"
             and tally[f"{p}/{c}"] < args.kills]
    if short:
        print(f"fewer than {args.kills} kills in: {', '.join(short)} (raise --max-trials)", file=sys.stderr)
    return 1 if problems or short else 0


if __name__ == "__main__":
    sys.exit(main())

"""A ZO-LoRA step against a full-parameter ZO step on the same model and batches, alternating, in one run.

    nice -n 19 python tools/bench_lora_step.py --threads 1 --steps 6

Default model (SmolLM2-135M, fp32 store), the demo task's batches (batch 16, max length 256), MeZO with its
defaults for the full-parameter step and ``--peft lora`` (rank 8, alpha 16, q_proj,v_proj) for the LoRA step,
the same seed. Each step is the trainer's: the pending update applied at each block's residency, noise drawn,
both passes. The two models alternate step by step after one warm-up step each (so load changes on a shared
machine hit both alike); prints every step's seconds, the medians and their ratio (full / LoRA), and the bytes
each trains.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from zoedge.optim.registry import build
from zoedge.runtime.lora import LoraSpec
from zoedge.runtime.streamed import StreamedModel
from zoedge.settings import DataOptions
from zoedge.store.manifest import dtype_of
from zoedge.train.batching import collate
from zoedge.train.job import load_splits, load_tokenizer, resolve_store
from zoedge.train.trainer import _loss_passes, batch_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="store or HF directory (default: SmolLM2-135M)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each (default 6)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = resolve_store(args.model, progress=False)
    tok = load_tokenizer(store)
    train = load_splits(DataOptions()).train
    runs = {}
    for kind in ("full", "lora"):
        model = StreamedModel(store)
        if kind == "lora":
            model.attach_lora(LoraSpec())
        trained = (model.lora.nbytes_total() if model.lora is not None else
                   sum(t.numel * dtype_of(t.dtype).itemsize for b in model.blocks for t in b.tensors))
        runs[kind] = {"model": model, "opt": build("mezo", {}, seed=0), "seconds": [], "trained_bytes": trained}
    for t in range(args.steps + 1):
        idx = batch_indices(len(train), args.batch_size, 0, t)
        batch = collate(tok, [train[i] for i in idx], args.max_length, share_prompts=True)
        for kind, r in runs.items():
            t0 = time.perf_counter()
            r["opt"].begin_step(t)
            losses = [loss for loss, _ in _loss_passes(r["model"], r["opt"], batch)]
            r["opt"].finish_step(losses)
            dt = time.perf_counter() - t0
            if t > 0:  # step 0 warms up (first draws, workspaces) and applies no update
                r["seconds"].append(dt)
            print(f"step {t} {kind}: {dt:.3f} s", flush=True)
    med = {k: statistics.median(r["seconds"]) for k, r in runs.items()}
    out = {"threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
           "median_s": med, "ratio_full_over_lora": med["full"] / med["lora"],
           "seconds": {k: r["seconds"] for k, r in runs.items()},
           "trained_bytes": {k: r["trained_bytes"] for k, r in runs.items()}}
    print(f"median step: full {med['full']:.3f} s, lora {med['lora']:.3f} s, full / lora = "
          f"{out['ratio_full_over_lora']:.2f}x; trained bytes: full {runs['full']['trained_bytes'] / 2**20:.1f} MiB, "
          f"lora {runs['lora']['trained_bytes'] / 2**20:.2f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

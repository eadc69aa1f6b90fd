"""``--config FILE`` (YAML / JSON) and ``--print-config``: a config-file run equals the same run from flags
(settings and trained weights bit-equal), a run's summary.json reproduces it, the command line overrides the
file, unknown keys and wrong types are errors naming the key and the file."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from zoedge.cli import main
from zoedge.errors import ConfigError
from zoedge.settings import FinetuneSettings, read_config
from tests.tiny import save_cli_llama, write_demo_jsonl


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    save_cli_llama(tmp_path / "hf")
    write_demo_jsonl(tmp_path / "train.jsonl", 40)
    return tmp_path


def _weights(run) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out
    return out


def _settings(run) -> dict:
    settings = json.loads((run / "summary.json").read_text())["settings"]
    settings.pop("output")
    return settings


def test_a_config_file_run_equals_the_flags_run_and_summary_reproduces_it(tiny):
    flags = ["--model", str(tiny / "hf"), "--train", str(tiny / "train.jsonl"), "--batch-size", "4", "--n-train", "24",
             "--n-dev", "4", "--n-test", "4", "--steps", "2", "--eval-every", "0", "--seed", "3", "--lr", "1e-3",
             "--eps", "1e-2", "--opt", "weight_decay=0.1", "--threads", "1", "--no-progress", "--no-plot"]
    assert main(["finetune", *flags, "--output", str(tiny / "flags")]) == 0
    config = {"model": str(tiny / "hf"), "train": str(tiny / "train.jsonl"), "batch-size": 4, "n_train": 24,
              "n_dev": 4, "n_test": 4, "steps": 2, "eval_every": 0, "seed": 3, "lr": 1e-3, "eps": 0.01,
              "opt": {"weight_decay": 0.1}, "threads": 1, "progress": False, "plot": False,
              "output": str(tiny / "config")}
    (tiny / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["finetune", "--config", str(tiny / "run.yaml")]) == 0
    # the summary's settings block is itself a config; the command line overrides it (--output)
    assert main(["finetune", "--config", str(tiny / "flags" / "summary.json"), "--output", str(tiny / "again")]) == 0
    expected, trained = _settings(tiny / "flags"), _weights(tiny / "flags")
    for run in ("config", "again"):
        assert _settings(tiny / run) == expected, run
        weights = _weights(tiny / run)
        assert weights.keys() == trained.keys()
        for name, w in trained.items():
            assert torch.equal(weights[name], w), (run, name)
    untrained = AutoModelForCausalLM.from_pretrained(tiny / "hf").state_dict()
    assert any(not torch.equal(untrained[n], w) for n, w in trained.items() if n in untrained)  # it did train


def test_the_command_line_overrides_the_file_and_print_config_round_trips(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("batch_size: 8\nmax_length: 64\nopt: [q=2]\ndevice: cpu\n")
    assert main(["finetune", "--config", str(tmp_path / "c.yaml"), "--batch-size", "4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    assert (values["batch_size"], values["max_length"], values["opt"]) == (4, 64, ["q=2"])
    (tmp_path / "printed.yaml").write_text(printed)  # the printed settings are a config giving the same settings
    assert main(["finetune", "--config", str(tmp_path / "printed.yaml"), "--print-config", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == values
    (tmp_path / "c.json").write_text(json.dumps({"max_length": 16, "optimizer": "hzo"}))  # JSON; another command
    assert main(["plan", "opt-1.3b", "--config", str(tmp_path / "c.json"), "--print-config"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert (plan["max_length"], plan["optimizer"], plan["batch_size"]) == (16, "hzo", 1)


@pytest.mark.parametrize("text, match", [
    ("batch_size: 4\nbatchsize: 8\n", r"run.yaml: unknown setting 'batchsize'.*did you mean batch_size"),
    ("steps: ten\n", r"run.yaml: steps is 'ten' \(str\).*give a int"),
    ("progress: 1\n", r"run.yaml: progress is 1 \(int\).*give a bool"),
    ("steps: null\n", r"run.yaml: steps is null"),
    ("- steps\n", r"run.yaml holds a list, not a mapping"),
    ("steps: [1\n", r"run.yaml is not valid YAML"),
])
def test_bad_config_files_are_errors_naming_the_file_and_key(tmp_path, text, match):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_config(tmp_path / "run.yaml", FinetuneSettings)


def test_a_bad_config_is_refused_by_the_command(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"steps": 2, "warmup": 1}')  # bench's setting, not finetune's
    assert main(["finetune", "--config", str(tmp_path / "run.json"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "run.json: unknown setting 'warmup'" in err
    assert main(["finetune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: cannot be read" in capsys.readouterr().err
    (tmp_path / "low.yaml").write_text("steps: 0\n")  # a value the option itself refuses: the same check
    assert main(["finetune", "--config", str(tmp_path / "low.yaml"), "--print-config"]) == 2
    assert "--steps: 0 is too small" in capsys.readouterr().err

"""tools/bench_convergence.py: the steps-to-target and same-compute summaries, and a real run on a tiny model."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.test_tasks import _tokenizer

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_convergence.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_convergence", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_hf(tmp_path: Path, monkeypatch) -> Path:
    """A 2-block tiny Llama with the tests' tokenizer, saved as an HF folder (its store cached under tmp_path)."""
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    config = LlamaConfig(vocab_size=304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf)
    _tokenizer(bos=True).save_pretrained(hf)
    return hf


def result(name: str, points: list[tuple[int, float, float]], cpu_per_pass: float) -> dict:
    """A run's record: (passes, wall seconds, dev accuracy) per evaluation, CPU time proportional to passes."""
    curve = [{"passes": p, "steps": p // 2, "seconds": s, "cpu_seconds": p * cpu_per_pass, "dev_accuracy": a,
              "dev_loss": 1 - a} for p, s, a in points]
    last = curve[-1]
    return {"optimizer": name, "passes": last["passes"], "steps": last["steps"], "train_seconds": last["seconds"],
            "train_cpu_seconds": last["cpu_seconds"], "curve": curve, "peak_rss_bytes": 2**30,
            "up_bytes_per_step": 2**20, "down_bytes_per_step": 0}


def test_steps_to_target_and_same_compute(bench) -> None:
    ref = result("mezo", [(0, 0, 0.5), (40, 10, 0.55), (80, 20, 0.6)], cpu_per_pass=1.0)
    fast = result("loho", [(0, 0, 0.5), (40, 30, 0.8), (80, 60, 0.9)], cpu_per_pass=2.0)
    never = result("dizo", [(0, 0, 0.5), (40, 10, 0.52), (80, 20, 0.59)], cpu_per_pass=1.0)
    assert bench.first_reach(fast["curve"], 0.6)["passes"] == 40
    assert bench.first_reach(never["curve"], 0.6) is None
    # within the reference's 80 CPU s, loho did 40 passes (2 CPU s each): its accuracy there is 0.8
    assert bench.accuracy_within(fast["curve"], "cpu_seconds", 80.0) == 0.8
    assert bench.accuracy_within(fast["curve"], "seconds", 20.0) == 0.5
    text = bench.table([ref, fast, never])
    summary = text[text.index("steps to target"):]
    assert "final dev accuracy 0.600" in summary
    assert "| mezo | 80 | 40 | 20 | 80 | 1.00x |" in summary
    assert "| loho | 40 | 20 | 30 | 80 | 0.50x |" in summary
    assert "| dizo | not reached in 80 |" in summary
    assert "| 0.800 / 0.500 |" in text.splitlines()[3]  # loho within the reference's CPU time / wall time


def test_a_real_run_on_a_tiny_model(bench, tmp_path, monkeypatch, capsys) -> None:
    """Two optimizers at once on a tiny Llama and the codes task: pass counting, curves and the redraw."""
    hf = tiny_hf(tmp_path, monkeypatch)
    out = tmp_path / "run.json"
    argv = ["--model", str(hf), "--task", "codes", "--budget", "5", "--eval-every", "3", "--n-train", "24",
            "--n-dev", "6", "--batch-size", "4", "--threads", "1", "--jobs", "2", "--opt", "mezo:lr=1e-3",
            "--opt", "loho:fo_layers=1,fo_lr=1e-2", "--opt", "mezo:lr=1e-2,peft=lora", "--json", str(out)]
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    mezo, loho, lora = results
    assert mezo["down_bytes_per_step"] > 0 and lora["down_bytes_per_step"] == 0  # adapters: the base never written
    assert [p["passes"] for p in lora["curve"]] == [0, 4, 6] and lora["options"] == {"lr": "1e-2"}
    assert [p["passes"] for p in mezo["curve"]] == [0, 4, 6] and mezo["steps"] == 3  # 2 passes a step
    assert [p["passes"] for p in loho["curve"]] == [0, 3, 6] and loho["steps"] == 2  # 3 with the FO pass
    assert mezo["curve"][0]["dev_accuracy"] == loho["curve"][0]["dev_accuracy"]  # same model, same dev set
    for r in results:
        assert r["train_cpu_seconds"] > 0 and r["up_bytes_per_step"] > 0
        assert all(a["cpu_seconds"] <= b["cpu_seconds"] for a, b in zip(r["curve"], r["curve"][1:]))
    assert loho["fo_memory"] and not mezo["fo_memory"]
    first = capsys.readouterr().out
    assert bench.main(["--from-json", str(out)]) == 0
    assert capsys.readouterr().out == first  # the redraw prints the same table
    # --max-seconds stops a run after the step that crosses it, and evaluates there
    argv[argv.index("--budget") + 1] = "100"
    argv[argv.index("--jobs") + 1] = "0"  # in this process (the children's path ran above)
    argv = argv[:argv.index("--opt")] + ["--opt", "mezo", "--max-seconds", "1e-6", "--json", str(out)]
    assert bench.main(argv) == 0
    (stopped,) = json.loads(out.read_text())["results"]
    assert stopped["steps"] == 1 and [p["passes"] for p in stopped["curve"]] == [0, 2]


def test_first_order_reference_and_cpu_budget(bench, tmp_path, monkeypatch) -> None:
    """``first-order`` trains every decoder block on one unperturbed pass per step (no ZO passes: its time is
    plain AdamW's), and ``--max-cpu-seconds`` stops a run after the step that crosses it."""
    hf = tiny_hf(tmp_path, monkeypatch)
    out = tmp_path / "run.json"
    common = ["--model", str(hf), "--task", "codes", "--n-train", "24", "--n-dev", "6", "--batch-size", "4",
              "--threads", "1", "--jobs", "0", "--json", str(out)]
    assert bench.main([*common, "--budget", "4", "--eval-every", "2", "--opt", "first-order:fo_lr=1e-2"]) == 0
    (fo,) = json.loads(out.read_text())["results"]
    assert fo["steps"] == 4 and [p["passes"] for p in fo["curve"]] == [0, 2, 4]  # one pass a step
    assert set(fo["fo_memory"]) and fo["curve"][-1]["dev_loss"] != fo["curve"][0]["dev_loss"]  # the blocks train
    from zoedge.optim.registry import available
    assert "first-order" not in available()  # run in this process (--jobs 0), the tool's plugin is gone again
    assert bench.main([*common, "--budget", "100", "--opt", "mezo", "--max-cpu-seconds", "1e-6"]) == 0
    (stopped,) = json.loads(out.read_text())["results"]
    assert stopped["steps"] == 1 and [p["passes"] for p in stopped["curve"]] == [0, 2]

"""tools/bench_methods.py: tuning picks the best dev run, the seeds' summary against MeZO's target, a real run on a
tiny model (tuning on dev, seeds on a disjoint test split), and the compare task of bench_convergence."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.test_bench_convergence import tiny_hf

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_methods.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, accs: list[float], loss: float = 0.5, cpu_per_step: float = 2.0) -> dict:
    """A run's record: one evaluation every 10 steps (2 passes a step)."""
    curve = [{"passes": 20 * i, "steps": 10 * i, "seconds": 10.0 * i, "cpu_seconds": cpu_per_step * 10 * i,
              "dev_accuracy": a, "dev_loss": loss} for i, a in enumerate(accs)]
    return {"optimizer": name, "steps": curve[-1]["steps"], "passes": curve[-1]["passes"],
            "train_cpu_seconds": curve[-1]["cpu_seconds"], "curve": curve}


def test_choose_takes_the_best_final_dev_accuracy_then_the_lower_loss(bench):
    a, b, c = run("a", [0.5, 0.7]), run("b", [0.5, 0.9, 0.8]), run("c", [0.5, 0.8], loss=0.1)
    assert bench.choose([a, b, c])["optimizer"] == "c"  # b peaked higher, but its final accuracy is 0.8 at loss 0.5
    assert bench.choose([a, run("d", [0.5, 0.7], loss=0.4)])["optimizer"] == "d"


def test_summary_over_seeds(bench):
    seeds = [run("m", [0.5, 0.6, 0.7]), run("m", [0.5, 0.7, 0.9]), run("m", [0.5, 0.55, 0.6])]
    s = bench.summarize(seeds, target=0.7)
    assert s["accuracy"][0] == pytest.approx(0.7333333) and s["accuracy"][1] == pytest.approx(0.1527525)
    assert s["reached"] == 2 and s["seeds"] == 3  # the third never reaches 0.7
    assert s["steps_to_target"] == (15.0, pytest.approx(7.0710678))  # 20 and 10 steps
    assert s["cpu_seconds_to_target"][0] == 30.0 and s["passes_per_step"] == 2.0 and s["cpu_per_step"] == 2.0
    assert bench.summarize(seeds[2:], target=0.7)["steps_to_target"] is None


def test_table_flags_a_target_the_untrained_model_already_meets(bench):
    def report(mezo_accs):
        tests = [run("mezo", mezo_accs)]
        return {"tasks": {"codes": {"mezo": {"chosen": "mezo", "chosen_dev": 0.5, "tests": tests,
                                             "summary": {**bench.summarize(tests, mezo_accs[-1]),
                                                         "target": mezo_accs[-1]}}}}}
    assert "say nothing" in bench.table(report([0.5, 0.45]))
    assert "say nothing" not in bench.table(report([0.5, 0.6]))


def test_compare_task_is_balanced_unique_and_correct(bench):
    ex = bench.bc.compare_examples(101, seed=0)
    assert len({e.prompt for e in ex}) == 101 and sum(e.label for e in ex) == 50
    for e in ex:
        a, b = (int(x) for x in e.prompt.split(":")[0].split(" or "))
        assert e.label == int(b > a)
    assert ex == bench.bc.compare_examples(101, seed=0) != bench.bc.compare_examples(101, seed=1)


def test_a_real_run_on_a_tiny_model(bench, tmp_path, monkeypatch, capsys) -> None:
    """Two methods, a grid of 2, 2 seeds: 4 tuning runs on dev, then 4 test runs of the chosen settings."""
    hf = tiny_hf(tmp_path, monkeypatch)
    out = tmp_path / "m.json"
    assert bench.main(["--model", str(hf), "--task", "codes", "--method", "loho", "--grid", "2", "--seeds", "0", "1",
                       "--budget", "4", "--eval-every", "2", "--n-train", "16", "--n-dev", "6", "--n-test", "8",
                       "--batch-size", "4", "--threads", "1", "--jobs", "0", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    per = report["tasks"]["codes"]
    assert list(per) == ["mezo", "loho"]  # the reference first, always run
    for method, m in per.items():
        assert [r["optimizer"] for r in m["tuning"]] == list(bench.GRIDS[method][:2])
        assert all(r["eval_split"] == "dev" and r["seed"] == 100 for r in m["tuning"])
        assert m["chosen"] == bench.choose(m["tuning"])["optimizer"]
        assert [(r["eval_split"], r["seed"], r["optimizer"]) for r in m["tests"]] == [("test", 0, m["chosen"]),
                                                                                      ("test", 1, m["chosen"])]
        assert m["tests"][0]["passes"] >= 4
    # the same test set for every run: the untrained model's accuracy at pass 0 is the same everywhere
    starts = {r["curve"][0]["dev_accuracy"] for m in per.values() for r in m["tests"]}
    assert len(starts) == 1
    assert per["mezo"]["summary"]["target"] == pytest.approx(
        sum(r["curve"][-1]["dev_accuracy"] for r in per["mezo"]["tests"]) / 2)
    first = capsys.readouterr().out
    assert "| loho | `loho:" in first
    png, merged = tmp_path / "m.png", tmp_path / "merged.json"
    assert bench.main(["--from-json", str(out), "--png", str(png)]) == 0
    assert capsys.readouterr().out == first
    other = json.loads(out.read_text())
    other["tasks"] = {"demo": other["tasks"].pop("codes")}
    (tmp_path / "demo.json").write_text(json.dumps(other))
    assert bench.main(["--from-json", str(out), str(tmp_path / "demo.json"), "--json", str(merged)]) == 0
    assert list(json.loads(merged.read_text())["tasks"]) == ["codes", "demo"]
    assert "task codes:" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_dir_reuses_finished_runs_and_runs_only_the_rest(bench, tmp_path, monkeypatch):
    """An interrupted benchmark resumes: finished runs come from --runs-dir, the others run (and are kept)."""
    calls = []

    def fake_run_one(args):
        calls.append(args.one)
        return {"optimizer": args.one, "seed": args.seed}

    monkeypatch.setattr(bench.bc, "run_one", fake_run_one)
    runs = [(["--task", "demo", "--seed", str(s)], spec) for s in (0, 1) for spec in ("mezo", "dizo")]
    first = bench.run_many(runs[:3], jobs=0, runs_dir=tmp_path)
    assert calls == ["mezo", "dizo", "mezo"] and len(list(tmp_path.glob("*.json"))) == 3
    again = bench.run_many(runs, jobs=0, runs_dir=tmp_path)
    assert calls == ["mezo", "dizo", "mezo", "dizo"]  # only the fourth ran
    assert again[:3] == first and again[3] == {"optimizer": "dizo", "seed": 1}
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(bench, "code_identity", lambda: "other code")
    bench.run_many(runs[:1], jobs=0, runs_dir=tmp_path)
    assert calls[-1] == "mezo" and len(calls) == 5  # another code's results are never reused
    kept = tmp_path / bench.run_key(*runs[0], "other code")
    kept.write_text('{"optimizer": "me')  # a torn result: run again, and kept whole
    assert bench.run_many(runs[:1], jobs=0, runs_dir=tmp_path)[0] == {"optimizer": "mezo", "seed": 0}
    assert len(calls) == 6 and json.loads(kept.read_text())["optimizer"] == "mezo"

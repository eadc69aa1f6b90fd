"""The token-level layouts (completion, messages, text), data sources, column renaming, data-first checks,
answer metrics and eval of a file alone, on a tiny model."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoedge
from zoedge.cli import main
from zoedge.errors import ConfigError, DataError
from zoedge.train.answers import exact_match, greedy_decode, normalize_answer, token_f1
from zoedge.train.batching import collate
from zoedge.train.curves import read_curves, right_axis
from zoedge.train.demo_task import layout_records
from zoedge.train.sources import parse_columns, read_source
from zoedge.train.tasks import Example, detect_task, load_jsonl, load_records
from zoedge.train.trainer import Trainer, TrainSettings, evaluate
from zoedge_plugins.mezo import MeZO
from tests.test_tasks import _tokenizer, write_jsonl
from tests.tiny import save_cli_llama

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t = _tokenizer(bos=True)
    t.chat_template = CHAT
    return t


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    """A tiny llama with the chat tokenizer, as a Hugging Face directory, and its prepared store."""
    root = tmp_path_factory.mktemp("layouts")
    save_cli_llama(root / "hf", tok)
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def scored_mask(batch) -> torch.Tensor:
    """[R, T] 1 where a token is in the loss (the position after each predicting index)."""
    mask = torch.zeros_like(batch.input_ids)
    mask.view(-1)[batch.target_index + 1] = 1
    return mask


def hand_built(tok, pieces: list[tuple[str, bool]], eos: bool) -> tuple[list[int], list[int]]:
    """BOS + each piece's tokens (+ EOS): the row and its loss mask, written out by hand."""
    row, mask = [tok.bos_token_id], [0]
    for text, scored in pieces:
        row += ids(tok, text)
        mask += [int(scored)] * len(ids(tok, text))
    if eos:
        row, mask = row + [tok.eos_token_id], mask + [1]
    return row, mask


# ----------------------------------------------------------------------------- masks


CASES = {
    "completion": ({"prompt": "Capital of France?", "completion": " Paris"},
                   [("Capital of France?", False), (" Paris", True)], True),
    "generation": ({"text": "Capital of France?", "answer": " Paris"},
                   [("Capital of France?", False), (" Paris", True)], False),
    "text": ({"text": "Paris is the capital."}, [("Paris is the capital.", True)], True),
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "And?"},
                               {"role": "assistant", "content": "No"}]},
                 [("<|system|>Be brief.<eos><|user|>Hi<eos><|assistant|>", False), ("Yes<eos>", True),
                  ("<|user|>And?<eos><|assistant|>", False), ("No<eos>", True)], False),
}


@pytest.mark.parametrize("layout", sorted(CASES))
def test_loss_mask_is_exactly_the_answer_tokens(tmp_path, tok, layout):
    record, pieces, eos = CASES[layout]
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    assert detect_task([record]) == layout
    (example,) = load_jsonl(path, tokenizer=tok)
    batch = collate(tok, [example, Example.generation("a much longer prompt than the other", " x")])
    row, mask = hand_built(tok, pieces, eos)
    T = batch.input_ids.shape[1]
    assert batch.input_ids[0, T - len(row):].tolist() == row  # left padded
    assert scored_mask(batch)[0].tolist() == [0] * (T - len(row)) + mask
    assert batch.attention_mask[0].sum() == len(row)
    if layout != "text":
        assert example.reference == {"messages": "No"}.get(layout, " Paris")


def test_messages_prompt_and_errors(tmp_path, tok):
    (example,) = load_jsonl(write_jsonl(tmp_path / "c.jsonl", [CASES["messages"][0]]), tokenizer=tok)
    assert example.prompt == "<|system|>Be brief.<eos><|user|>Hi<eos><|assistant|>Yes<eos><|user|>And?<eos><|assistant|>"
    bare = _tokenizer(bos=True)  # no chat template
    path = write_jsonl(tmp_path / "m.jsonl", [CASES["messages"][0]])
    with pytest.raises(DataError, match="no chat template.*Fix: use a model whose tokenizer has one"):
        load_jsonl(path, tokenizer=bare)
    no_assistant = {"messages": [{"role": "user", "content": "Hi"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [CASES["messages"][0], no_assistant])
    with pytest.raises(DataError, match=f"{path}:2: 'messages' has no assistant turn"):
        load_jsonl(path, tokenizer=tok)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match=f"{path}:1:.*Fix: give \"messages\" as a list"):
        load_jsonl(path, tokenizer=tok)


def test_text_longer_than_max_length_keeps_its_head(tok):
    example = Example("", ("Paris is the capital of France.",), 0, "generation",
                      (("Paris is the capital of France.", True),), True)
    batch = collate(tok, [example], max_length=5)
    assert batch.input_ids[0].tolist() == hand_built(tok, [(example.candidates[0], True)], True)[0][:5]
    with pytest.raises(DataError, match="max_length=4"):  # an answer must fit whole
        collate(tok, [Example.generation("Capital of France?", " Paris is the capital of France", eos=True)],
                max_length=4)


def test_text_with_label_is_not_taken_for_plain_text():
    with pytest.raises(DataError, match="look like classification.*--task text"):
        detect_task([{"text": "great film", "label": 1}])


# ----------------------------------------------------------------------------- sources and columns


def test_every_source_kind_gives_the_same_examples(tmp_path, tok):
    import datasets
    records = [{"question": f"q{i}?", "answer": f"a{i}", "id": i} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.csv").write_text("question,answer,id\n" + "".join(f'"{r["question"]}",{r["answer"]},{r["id"]}\n'
                                                                      for r in records))
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    columns = parse_columns("prompt=question, completion=answer")
    want = [Example.generation(f"q{i}?", f"a{i}", eos=True) for i in range(5)]
    for source in (jsonl, tmp_path / "d.json", tmp_path / "d.csv", tmp_path / "d.parquet", tmp_path / "saved",
                   tmp_path / "dict", f"{tmp_path / 'dict'}:train"):
        assert load_jsonl(source, columns=columns) == want, source
    assert load_jsonl(f"{tmp_path / 'dict'}:test", columns=columns) == want[:1]
    name, rows = load_records(tmp_path / "dict", columns=columns, role="test")  # --test takes the test split
    assert name == "completion" and len(rows) == 1 and rows[0][0].endswith("dict:test row 1")
    assert read_source(tmp_path / "d.csv")[2][0] == f"{tmp_path / 'd.csv'}:4"  # file and line
    with pytest.raises(DataError, match="has no split 'dev'"):
        read_source(f"{tmp_path / 'dict'}:dev")
    with pytest.raises(DataError, match=r"d.jsonl:1: has no column 'prompt_text' \(asked for by --columns"):
        load_jsonl(jsonl, columns=parse_columns("prompt=prompt_text,completion=answer"))
    with pytest.raises(ConfigError, match="--columns.*FIELD=COLUMN"):
        parse_columns("prompt")


def test_hub_id_offline_names_the_setting(monkeypatch):
    import datasets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="zoedge-no-such/dataset:train: is not a local file and offline "
                                        r"\(HF_DATASETS_OFFLINE is set\)"):
        read_source("zoedge-no-such/dataset:train")
    with pytest.raises(DataError, match="does not exist"):
        read_source("missing/train.jsonl")


# ----------------------------------------------------------------------------- data first


def test_bad_file_fails_fast_before_the_model(tmp_path, hf_dir, capsys, monkeypatch):
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    good = layout_records("completion", 20)
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(r) for r in good[:5]] + ['{"prompt": "x"}'])
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(good[0]).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    broken_model = tmp_path / "broken"  # reading any weight of it would fail differently
    broken_model.mkdir()
    for path, pattern in ((bad, f"{bad}:6: lacks fields \\['completion'\\]"), (latin, f"{latin}:2: is not valid UTF-8")):
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "zoedge.cli", "finetune", "--model", str(broken_model),
                              "--train", str(path), "--output", str(tmp_path / "run")],
                             capture_output=True, text=True, timeout=60)
        wall = time.perf_counter() - t0
        assert run.returncode == 2 and run.stdout == "", run.stderr
        assert re.search(pattern, run.stderr) and "Fix:" in run.stderr, run.stderr
        assert wall < 3.0, wall
    assert not (tmp_path / "run").exists()
    # too long for --max-length: found with the tokenizer alone, before the store is prepared
    long = write_jsonl(tmp_path / "long.jsonl", good[:10] + [{"prompt": "p", "completion": " word" * 40}])
    capsys.readouterr()
    assert main(["finetune", "--model", str(hf_dir / "hf"), "--train", str(long), "--max-length", "48",
                 "--output", str(tmp_path / "run2"), "--no-progress"]) == 2
    assert re.search(f"{long}:11: is too long: needs \\d+ tokens.*--max-length 48", capsys.readouterr().err)
    assert not (tmp_path / "run2" / "checkpoints").exists()
    assert not (tmp_path / "cache").exists()  # the store was not prepared


# ----------------------------------------------------------------------------- training per layout


def _memorisation(layout: str) -> list[dict]:
    if layout == "generic":
        return [{"text": f"item {i} is", "candidates": [" no", " yes"], "label": i % 2} for i in range(8)]
    return layout_records(layout, 8, seed=1)


@pytest.mark.parametrize("layout", ["completion", "messages", "text", "generation", "generic"])
def test_twenty_mezo_steps_lower_the_training_loss(tmp_path, tok, hf_dir, layout):
    path = write_jsonl(tmp_path / "mem.jsonl", _memorisation(layout))
    train = load_jsonl(path, tokenizer=tok)
    model = zoedge.load(hf_dir / "store")
    before = evaluate(model, tok, train, max_length=128).loss
    lr = 2e-2 if layout == "generic" else 2e-3  # the tiny model's two-candidate loss moves less per step
    trainer = Trainer(model, tok, MeZO(seed=1, lr=lr, eps=1e-2), train, [], [],
                      TrainSettings(steps=20, batch_size=8, eval_every=0, max_length=128), tmp_path / "run",
                      progress=False, log=lambda s: None)
    for _ in range(20):
        trainer.train_step()
    trainer.flush()
    after = evaluate(model, tok, train, max_length=128).loss
    assert after < before - 0.01, (before, after)


# ----------------------------------------------------------------------------- answers


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert exact_match("the Paris.", "paris") == 1.0 and exact_match("Paris, France", "Paris") == 0.0
    assert token_f1("Paris France", "Paris") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("a", "the") == 1.0 and token_f1("Rome", "Paris") == 0.0


def test_greedy_decode_equals_transformers_generate(tok, hf_dir):
    hf = AutoModelForCausalLM.from_pretrained(hf_dir / "hf").eval()
    model = zoedge.load(hf_dir / "store")
    prompts = ["Capital of France?", "Is this review", "The soup was"]
    got = greedy_decode(model, tok, prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, got):
        row = torch.tensor([[tok.bos_token_id] + ids(tok, prompt)])
        want = hf.generate(row, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)[0, row.shape[1]:]
        want = want[: (want == tok.eos_token_id).nonzero()[0, 0]] if (want == tok.eos_token_id).any() else want
        assert text == tok.decode(want, skip_special_tokens=True)


def test_evaluation_reports_what_fits_the_layout(tmp_path, tok, hf_dir):
    model = zoedge.load(hf_dir / "store")
    completion = load_jsonl(write_jsonl(tmp_path / "c.jsonl", layout_records("completion", 4)), tokenizer=tok)
    ev = evaluate(model, tok, completion)
    assert ev.accuracy is None and ev.exact_match is not None and 0 <= ev.f1 <= 1
    assert ev.perplexity == pytest.approx(torch.tensor(ev.loss).exp().item(), rel=1e-6)
    text = load_jsonl(write_jsonl(tmp_path / "t.jsonl", layout_records("text", 4)), tokenizer=tok)
    ev = evaluate(model, tok, text)
    assert ev.exact_match is None and ev.perplexity is not None  # nothing to answer: loss and perplexity only
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "dev_loss": 1.7, "dev_perplexity": 5.5}\n')
    loss, dev = read_curves(metrics, {"0": {"loss": 2.1, "accuracy": None, "perplexity": 8.0}})
    assert dev["loss"] == [(0, 2.1), (2, 1.7)] and right_axis(dev) == ("perplexity",)
    assert right_axis({"f1": [(1, 0.5)], "exact_match": [(1, 0.0)], "perplexity": []}) == ("exact_match", "f1")


# ----------------------------------------------------------------------------- CLI: finetune and eval alone


def test_finetune_completion_then_eval_a_test_file_alone(tmp_path, hf_dir, capsys):
    rows = layout_records("completion", 60, seed=2)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:50])
    other = write_jsonl(tmp_path / "other.jsonl", rows[50:])
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(hf_dir / "hf"), "--train", str(train), "--steps", "2",
                 "--batch-size", "4", "--output", str(out), "--no-progress", "--eps", "1e-2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sizes = {k: summary["data"][k] for k in ("train", "dev", "test")}
    assert sizes == {"train": 36, "dev": 7, "test": 7}  # 50 examples, shared as 1000/200/200
    assert summary["layout"] == "completion" and summary["lr"]["loss"] == "token"
    assert summary["lr"] == {"value": 4e-5, "source": "the plugin's default", "loss": "token"}
    assert summary["dev_after"]["f1"] is not None and summary["dev_after"]["perplexity"] is not None
    assert (out / "curves.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--test", str(other), "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test"]["examples"] == 10 and "dev" not in res and res["test"]["exact_match"] is not None
    assert "accuracy" not in res["test"] and res["test"]["perplexity"] > 1  # the metrics that fit the layout
    assert main(["eval", "--model", str(out), "--test", str(train), "--no-progress"]) == 2
    assert re.search(r"holds 36 example\(s\) of the finetune run's training split.*--other-split",
                     capsys.readouterr().err)
    assert main(["eval", "--model", str(hf_dir / "hf"), "--test", str(train), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["examples"] == 50  # no run: the whole file


# ----------------------------------------------------------------------------- README "Your data"


def _readme_block(marker: str) -> list[str]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip()]


def _vary(value, i: int):
    """``value`` with `` i`` appended to its strings (roles kept)."""
    if isinstance(value, str):
        return f"{value} {i}"
    if isinstance(value, list):
        return [_vary(v, i) for v in value]
    if isinstance(value, dict):
        return {k: v if k == "role" else _vary(v, i) for k, v in value.items()}
    return value


def test_readme_your_data_section_is_true(tmp_path, hf_dir, capsys, monkeypatch):
    """Every record shown is one layout's (as --help shows it); the commands run as written on a tiny model."""
    from zoedge.train.tasks import TASKS
    monkeypatch.chdir(tmp_path)
    lines = _readme_block("your-data-layouts")
    layouts = [detect_task([json.loads(line)]) for line in lines]
    assert len(set(layouts)) == len(lines) >= 6
    assert all(TASKS[name].example == line for name, line in zip(layouts, lines))
    commands = _readme_block("your-data-command")
    assert [c.split()[:2] for c in commands] == [["zoedge", "finetune"]] * 2 + [["zoedge", "eval"]]
    tiny = ["--model", str(hf_dir / "hf"), "--steps", "1", "--batch-size", "2", "--no-progress", "--no-plot",
            "--eval-every", "0", "--n-dev", "2", "--n-test", "2"]
    rows = layout_records("completion", 24, seed=4)
    (tmp_path / "qa.csv").write_text("question,answer\n" + "".join(
        f'"{r["prompt"].strip()}","{r["completion"]}"\n' for r in rows))
    held_out = layout_records("completion", 6, seed=5)  # eval reads it with the run's --columns
    write_jsonl(tmp_path / "held_out.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in held_out])
    for name, line in zip(layouts, lines):  # the first command, on a file of each layout
        record = json.loads(line)
        write_jsonl(tmp_path / "my.jsonl", [_vary(record, i) for i in range(8)])  # 8 distinct examples
        out = tmp_path / "runs" / name
        assert main(commands[0].split()[1:] + tiny + ["--output", str(out)]) == 0, capsys.readouterr().err
        assert json.loads((out / "summary.json").read_text())["layout"] == name
    assert main(commands[1].split()[1:] + tiny) == 0  # writes runs/finetune, as the README says
    assert json.loads((tmp_path / "runs" / "finetune" / "summary.json").read_text())["layout"] == "completion"
    capsys.readouterr()
    assert main(commands[2].split()[1:] + ["--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["examples"] == 6


# ----------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_finetunes_your_data_with_defaults(tmp_path, smollm2_dir):
    """README's command, default settings but 8 steps of batch 8, 100 examples written here: the dev loss falls.

    One layout, messages: the one that needs the real model's chat template (the layouts' masks are checked
    token by token above, and every layout trains on the tiny model). 8 steps of batch 8 lower the dev loss by
    0.18, and raise it with MeZO's update sign flipped (test loss 0.92 -> 1.29); docs/measurements.md, "Test suite
    time"."""
    layout = "messages"
    train = write_jsonl(tmp_path / "my.jsonl", layout_records(layout, 100, seed=7))
    out = tmp_path / "run"
    assert main(["finetune", "--train", str(train), "--output", str(out), "--no-progress", "--no-export",
                 "--steps", "8", "--batch-size", "8"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [s["data"][k] for k in ("train", "dev", "test")] == [72, 14, 14] and s["layout"] == layout
    assert s["dev_after"]["loss"] < s["dev_before"]["loss"] - 0.05, (s["dev_before"], s["dev_after"])
    assert s["dev_after"]["f1"] is not None and s["lr"]["value"] == 4e-5

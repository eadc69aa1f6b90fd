"""Tasks, JSONL loading, sampling, collation and the candidate loss.

The tokenizer is a tiny byte-level BPE trained in a fixture (nothing is
downloaded); its small vocabulary splits many words into several tokens, which
exercises multi-token candidates.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zoedge.errors import DataError
from zoedge.train.batching import (Batch, candidate_loss, collate, select_targets,
                                   token_logprobs_from_logits)
from zoedge.train.demo_task import codes_examples, demo_examples
from zoedge.train.tasks import (TASKS, Example, builtin_task, detect_task, load_jsonl, split,
                                task_format)

# ----------------------------------------------------------------------------- fixtures

CORPUS = [e.prompt + c for e in demo_examples(200, seed=5) for c in e.candidates] + [
    "Does this mean that it is true? Yes or No?\n", "Yes, No, or Maybe?\n", "because so",
    "The answer is Paris. Question: what is the capital of France?",
]


def _tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                       pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")  # no pad: falls back to eos


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer(bos=False)


@pytest.fixture(scope="module")
def tok_bos() -> PreTrainedTokenizerFast:
    return _tokenizer(bos=True)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ids(tok: Any, text: str, special: bool = False) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


# ----------------------------------------------------------------------------- loaders

LAYOUTS: dict[str, tuple[dict, Example]] = {
    "generic": ({"text": "Q: 2+2?", "candidates": ["3", "4"], "label": "4"},
                Example("Q: 2+2?", ("3", "4"), 1)),
    "generation": ({"text": "Capital of France:", "answer": " Paris"},
                   Example("Capital of France:", (" Paris",), 0, "generation")),
    "completion": ({"prompt": "Capital of France:", "completion": " Paris"},
                   Example("Capital of France:", (" Paris",), 0, "generation", eos=True)),
    "text": ({"text": "Paris is in France."},
             Example("", ("Paris is in France.",), 0, "generation", (("Paris is in France.", True),), True)),
    "sst2": ({"sentence": "a charming film ", "label": 1},
             Example("a charming film It was", (" terrible", " great"), 1)),
    "rte": ({"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0},
            Example("A dog runs.\nDoes this mean that \"An animal moves.\" is true? Yes or No?\n",
                    ("Yes", "No"), 0)),
    "cb": ({"premise": "It rained.", "hypothesis": "The ground is wet.", "label": 2},
           Example("Suppose It rained. Can we infer that \"The ground is wet.\"? Yes, No, or Maybe?\n",
                   ("Yes", "No", "Maybe"), 2)),
    "boolq": ({"passage": "Paris is in France.", "question": "is paris in france", "label": True},
              Example("Paris is in France. is paris in france?", (" No", " Yes"), 1)),
    "copa": ({"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
              "choice2": "He got a hole in his sock.", "question": "cause", "label": 0},
             Example("The man broke his toe because",
                     (" he dropped a hammer on his foot.", " he got a hole in his sock."), 0)),
    "wic": ({"sentence1": "He sat on the bank.", "sentence2": "The bank was closed.", "word": "bank",
             "label": 0},
            Example("Does the word \"bank\" have the same meaning in these two sentences? Yes, No?\n"
                    "He sat on the bank.\nThe bank was closed.\n", ("No", "Yes"), 0)),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_loads_explicit_and_detected(tmp_path: Path, name: str) -> None:
    record, expected = LAYOUTS[name]
    path = write_jsonl(tmp_path / "d.jsonl", [record, "", "   ", record])
    assert load_jsonl(path, name) == [expected, expected]
    assert load_jsonl(path) == [expected, expected]  # auto-detected


def test_registry_covers_layouts() -> None:
    assert set(TASKS) == set(LAYOUTS) | {"messages"}  # messages: tests/test_layouts.py (needs a tokenizer)
    assert task_format("SST-2") is TASKS["sst2"]
    with pytest.raises(DataError, match="sst3"):
        task_format("sst3")


@pytest.mark.parametrize("label,expected", [("1", 1), ("0", 0), (" 1 ", 1), ("positive", 1), (False, 0)])
def test_label_forms(tmp_path: Path, label: Any, expected: int) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": "ok", "label": label}])
    assert load_jsonl(path, "sst2")[0].label == expected


def test_label_names_and_copa_effect(tmp_path: Path) -> None:
    rte = write_jsonl(tmp_path / "rte.jsonl", [{"premise": "a", "hypothesis": "b", "label": "not_entailment"}])
    assert load_jsonl(rte)[0].label == 1
    boolq = write_jsonl(tmp_path / "b.jsonl", [{"passage": "p", "question": "q?", "label": "false"}])
    assert load_jsonl(boolq)[0] == Example("p q?", (" No", " Yes"), 0)
    copa = write_jsonl(tmp_path / "c.jsonl", [{"premise": "It rained.", "choice1": "A", "choice2": "B",
                                               "question": "effect", "label": "1"}])
    assert load_jsonl(copa)[0] == Example("It rained so", (" a", " b"), 1)


def test_detection_rte_vs_cb_and_specificity() -> None:
    assert detect_task([{"premise": "a", "hypothesis": "b", "label": 0}] * 3) == "rte"
    assert detect_task([{"premise": "a", "hypothesis": "b", "label": 0},
                        {"premise": "a", "hypothesis": "b", "label": "neutral"}]) == "cb"
    # COPA's fields include RTE-like premise/label: the most specific layout wins.
    assert detect_task([dict(LAYOUTS["copa"][0], hypothesis="x")]) == "copa"
    assert detect_task([{"sentence": "s", "label": 1, "idx": 7}]) == "sst2"  # extra fields are fine


def test_detection_failure_names_fields_and_layouts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"review": "nice", "stars": 5}])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    msg = str(err.value)
    assert str(path) in msg and "'review'" in msg and "'stars'" in msg
    for name in TASKS:
        assert f"{name}:" in msg


def test_ambiguous_layout_asks_for_task() -> None:
    record = {"text": "t", "answer": "a", "sentence": "s", "label": 1}  # generation and sst2, 2 fields each
    with pytest.raises(DataError, match="several layouts"):
        detect_task([record])


@pytest.mark.parametrize("bad_line,pattern", [
    ('{"sentence": "x", "label": 1', "not valid JSON"),
    ('[1, 2]', "JSON list, not an object"),
    ('{"sentence": "x", "label": 2}', "out of range 0..1"),
    ('{"sentence": "x", "label": "maybe"}', "not an integer 0..1"),
    ('{"sentence": 3, "label": 1}', "not a string"),
    ('{"text": "x", "label": 1}', r"lacks fields \['sentence'\]"),
])
def test_errors_name_file_and_line(tmp_path: Path, bad_line: str, pattern: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"sentence": "ok", "label": 0}', "", bad_line])
    with pytest.raises(DataError, match=pattern) as err:
        load_jsonl(path, "sst2" if "lacks" not in pattern else None)
    assert f"{path}:3" in str(err.value)
    assert "Fix:" in str(err.value)


def test_generic_label_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "t", "candidates": ["a", "b"], "label": "c"}])
    with pytest.raises(DataError, match=f"{path}:1.*'c'"):
        load_jsonl(path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "t", "candidates": ["a", "b"], "label": 5}])
    with pytest.raises(DataError, match=f"{path}:1.*out of range"):
        load_jsonl(path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "t", "candidates": [], "label": 0}])
    with pytest.raises(DataError, match=f"{path}:1.*candidates"):
        load_jsonl(path)
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "t", "answer": ""}])
    with pytest.raises(DataError, match=f"{path}:1.*empty"):
        load_jsonl(path)


def test_missing_empty_and_undecodable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*Fix: give the path") as err:
        load_jsonl(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(err.value)
    with pytest.raises(DataError, match="directory"):
        load_jsonl(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"sentence": "ok", "label": 0}\n{"sentence": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: is not valid UTF-8"):
        load_jsonl(tmp_path / "latin.jsonl")


def test_example_validation() -> None:
    with pytest.raises(DataError, match="label 2"):
        Example("p", ("a", "b"), 2)
    with pytest.raises(DataError, match="kind"):
        Example("p", ("a",), 0, "regression")
    with pytest.raises(DataError, match="generation"):
        Example("p", ("a", "b"), 0, "generation")
    assert Example("p", ["a", "b"], 1).candidates == ("a", "b")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sampling


def _pool(n: int, tag: str = "x") -> list[Example]:
    return [Example(f"{tag}{i}", ("a", "b"), i % 2) for i in range(n)]


def test_split_sizes_disjoint_deterministic() -> None:
    pool = _pool(3000)
    s = split(pool, 1000, 500, 1000, seed=42)
    assert (len(s.train), len(s.dev), len(s.test)) == (1000, 500, 1000)
    prompts = [e.prompt for part in (s.train, s.dev, s.test) for e in part]
    assert len(set(prompts)) == 2500
    again = split(pool, 1000, 500, 1000, seed=42)
    assert again == s
    assert split(pool, 1000, 500, 1000, seed=13).train != s.train
    # dev/test do not depend on how much train data is requested
    small = split(pool, 10, 500, 1000, seed=42)
    assert small.dev == s.dev and small.test == s.test and small.train == s.train[:10]


def test_split_caps_proportionally_when_short() -> None:
    s = split(_pool(100), 1000, 500, 1000, seed=0)
    assert (len(s.train), len(s.dev), len(s.test)) == (40, 20, 40)
    s = split(_pool(3), 1000, 1, 1000, seed=0)
    assert len(s.dev) == 1 and len(s.train) + len(s.dev) + len(s.test) == 3


def test_split_with_separate_sources() -> None:
    train, dev, test = _pool(50, "tr"), _pool(30, "dv"), _pool(2000, "te")
    s = split(train, 1000, 500, 1000, seed=1, dev=dev, test=test)
    assert len(s.train) == 50 and len(s.dev) == 30 and len(s.test) == 1000
    assert all(e.prompt.startswith("te") for e in s.test)
    assert sorted(e.prompt for e in s.train) == sorted(e.prompt for e in train)
    s2 = split(train, 40, 5, 1000, seed=1, test=test)  # dev carved from train
    assert len(s2.train) == 40 and len(s2.dev) == 5
    assert not {e.prompt for e in s2.train} & {e.prompt for e in s2.dev}
    with pytest.raises(DataError, match="n_dev"):
        split(train, 10, -1, 10)
    with pytest.raises(DataError, match="empty"):
        split([], 10, 1, 10)


# ----------------------------------------------------------------------------- built-in task


def test_builtin_demo_is_deterministic_unique_balanced() -> None:
    a = builtin_task("demo", n=2500, seed=7)
    assert a == builtin_task("demo", n=2500, seed=7)
    assert a != builtin_task("demo", n=2500, seed=8)
    assert len({e.prompt for e in a}) == 2500
    assert sum(e.label for e in a) == 1250
    assert all(e.prompt.endswith(" It was") and e.candidates == (" terrible", " great") for e in a)
    s = split(a, 1000, 500, 1000, seed=7)
    train = {e.prompt for e in s.train}
    assert not train & {e.prompt for e in s.test} and not train & {e.prompt for e in s.dev}
    assert builtin_task(n=300, seed=0)[:3] == builtin_task(n=300, seed=0)[:3]
    with pytest.raises(DataError, match="does not exist"):
        builtin_task("sst2")
    assert len(demo_examples(1000, weights=(1, 0, 0, 0))) == 1000  # 28 subjects x 36 adjectives = 1008
    with pytest.raises(DataError, match="exceeds the unique sentences"):
        demo_examples(1100, weights=(1, 0, 0, 0))


def test_builtin_codes_is_the_demo_reviews_under_arbitrary_label_words() -> None:
    codes, demo = builtin_task("codes", n=2500, seed=7), builtin_task("demo", n=2500, seed=7)
    assert codes == builtin_task("codes", n=2500, seed=7) != builtin_task("codes", n=2500, seed=8)
    assert all(c.prompt.endswith(" Answer:") and c.candidates == (" A", " B") for c in codes)
    # the same reviews, labels (" A" = negative = 0) and order as the demo task: only the question changes
    assert [(c.prompt.removesuffix(" Answer:"), c.label) for c in codes] == \
        [(d.prompt.removesuffix(" It was"), d.label) for d in demo]
    assert sum(c.label for c in codes) == 1250 and len({c.prompt for c in codes}) == 2500
    assert codes_examples(50, seed=0, weights=(0, 0, 1, 0))[0].prompt.count(" not ") == 1
    with pytest.raises(DataError, match="exceeds the unique sentences"):
        codes_examples(1100, weights=(1, 0, 0, 0))


def test_demo_sentence_kinds() -> None:
    negated = demo_examples(50, seed=0, weights=(0, 0, 1, 0))
    assert all(" not " in e.prompt for e in negated)
    contrast = demo_examples(50, seed=0, weights=(0, 0, 0, 1))
    assert all(", but " in e.prompt for e in contrast)


# ----------------------------------------------------------------------------- collation

CLS = [Example("The soup was cold. It was", (" terrible", " great"), 0),
       Example("Fine", (" Yes", " No", " Maybe"), 2),
       Example("The staff were kind and the view was lovely. It was", (" terrible", " great"), 1)]


def test_collate_shapes_padding_and_targets(tok: Any) -> None:
    b = collate(tok, CLS)
    R = 7
    assert b.kind == "classification" and b.input_ids.shape[0] == R and b.attention_mask.shape == b.input_ids.shape
    assert b.row_example.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert b.row_candidate.tolist() == [0, 1, 0, 1, 2, 0, 1]
    assert b.labels.tolist() == [0, 2, 1] and b.num_candidates.tolist() == [2, 3, 2] and b.max_candidates == 3
    pad = tok.eos_token_id  # tokenizer has no pad token
    T = b.input_ids.shape[1]
    r = 0
    for e in CLS:
        for c in e.candidates:
            row = ids(tok, e.prompt) + ids(tok, c)
            assert b.input_ids[r, T - len(row):].tolist() == row
            assert (b.input_ids[r, :T - len(row)] == pad).all()
            assert b.attention_mask[r].tolist() == [0] * (T - len(row)) + [1] * len(row)
            sel = b.target_row == r
            assert b.target_ids[sel].tolist() == ids(tok, c)  # exactly the candidate's tokenization
            r += 1
    assert torch.equal(b.input_ids.view(-1)[b.target_index + 1], b.target_ids)
    assert torch.equal(b.target_index // T, b.target_row)
    assert b.n_tokens == int(b.attention_mask.sum())
    assert b.position_ids()[0, -1] == int(b.attention_mask[0].sum()) - 1


def test_collate_generation_and_errors(tok: Any) -> None:
    gen = [Example.generation("Capital of France:", " Paris"), Example.generation("2+2=", " 4")]
    b = collate(tok, gen, pad_to_multiple_of=8)
    assert b.kind == "generation" and b.input_ids.shape[0] == 2 and b.input_ids.shape[1] % 8 == 0
    assert b.target_ids.tolist() == ids(tok, " Paris") + ids(tok, " 4")
    assert torch.equal(b.input_ids.view(-1)[b.target_index + 1], b.target_ids)
    with pytest.raises(DataError, match="mixes kinds"):
        collate(tok, [CLS[0], gen[0]])
    with pytest.raises(DataError, match="no examples"):
        collate(tok, [])
    with pytest.raises(DataError, match="max_length"):
        collate(tok, [Example("hi", (" great great great great",), 0)], max_length=3)


def test_collate_truncates_prompt_from_left_keeping_bos(tok_bos: Any) -> None:
    e = CLS[2]
    full = collate(tok_bos, [e])
    assert full.input_ids[0, 0] == tok_bos.bos_token_id  # the longer row has no padding
    p, c = ids(tok_bos, e.prompt, special=True), ids(tok_bos, " terrible")
    assert p[0] == tok_bos.bos_token_id and len(p) > 6
    b = collate(tok_bos, [e], max_length=len(c) + 4)
    row = [tok_bos.bos_token_id] + p[len(p) - 3:] + c
    assert b.input_ids[0, -len(row):].tolist() == row
    assert max(b.attention_mask.sum(1).tolist()) <= len(c) + 4
    assert torch.equal(b.input_ids.view(-1)[b.target_index + 1], b.target_ids)
    assert b.input_ids[1, -len(ids(tok_bos, " great")) - 1] == p[-1]  # last prompt token kept


# ----------------------------------------------------------------------------- loss


def _naive_loss(lp: torch.Tensor, b: Batch) -> tuple[torch.Tensor, list[int]]:
    total, preds = torch.zeros((), dtype=torch.float64), []
    for e in range(b.num_examples):
        scores = []
        for r in range(b.num_rows):
            if b.row_example[r] == e:
                vals = [float(lp[i]) for i in range(len(lp)) if b.target_row[i] == r]
                scores.append(sum(vals) / len(vals))
        lse = math.log(sum(math.exp(s) for s in scores))
        total += lse - scores[int(b.labels[e])]
        preds.append(max(range(len(scores)), key=lambda k: (scores[k], -k)))
    return total / b.num_examples, preds


def test_candidate_loss_matches_naive(tok: Any) -> None:
    b = collate(tok, CLS)
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(b.target_ids.numel(), generator=gen, dtype=torch.float32) * 5
    loss, preds = candidate_loss(lp, b)
    ref, ref_preds = _naive_loss(lp, b)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref.float())
    assert preds.tolist() == ref_preds
    # FO methods backprop through the loss: the -inf padding of missing candidates stays finite.
    lp.requires_grad_(True)
    candidate_loss(lp, b)[0].backward()
    assert torch.isfinite(lp.grad).all()


def test_generation_loss(tok: Any) -> None:
    b = collate(tok, [Example.generation("Capital of France:", " Paris"), Example.generation("2+2=", " 4")])
    lp = -torch.arange(1.0, b.target_ids.numel() + 1)
    loss, preds = candidate_loss(lp, b)
    torch.testing.assert_close(loss, -lp.mean())
    assert preds.tolist() == [-1, -1]


def test_token_logprobs_from_logits() -> None:
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    target = torch.tensor([0, 3, 10, 3, 7])
    out = token_logprobs_from_logits(logits, target)
    ref = torch.log_softmax(logits.float(), -1)[torch.arange(5), target]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_loss_on_tiny_llama_matches_full_logits(tok_bos: Any) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok_bos), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok_bos.pad_token_id, bos_token_id=tok_bos.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    examples = CLS + [Example("The fries were stale, but the music was fun. It was", (" terrible", " great"), 1)]
    b = collate(tok_bos, examples)
    with torch.no_grad():
        out = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                          position_ids=b.position_ids())
        hidden = select_targets(out.last_hidden_state, b)  # [N, H]: only the scored positions
        lp = token_logprobs_from_logits(model.lm_head(hidden), b.target_ids)
        loss, preds = candidate_loss(lp, b)
        # Reference: every (example, candidate) alone, unpadded, full logits.
        ref_loss, ref_preds = torch.zeros(()), []
        for e in examples:
            p = ids(tok_bos, e.prompt, special=True)
            scores = []
            for c in e.candidates:
                seq = torch.tensor([p + ids(tok_bos, c)])
                logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), -1)  # [L, V]
                k = len(ids(tok_bos, c))
                toks = seq[0, -k:]
                scores.append(logp[len(p) - 1:len(p) - 1 + k].gather(1, toks[:, None]).mean())
            s = torch.stack(scores)
            ref_loss += torch.logsumexp(s, 0) - s[e.label]
            ref_preds.append(int(s.argmax()))
    torch.testing.assert_close(loss, ref_loss / len(examples), rtol=1e-5, atol=1e-5)
    assert preds.tolist() == ref_preds


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_builtin_zero_shot_on_default_model(smollm2_dir: Path) -> None:
    """SmolLM2-135M-Instruct is clearly above chance on the demo task but not perfect, and at chance on the
    codes task (the label words say nothing: it must learn them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    def accuracy(task: str, n: int) -> float:
        test = split(builtin_task(task, n=2500, seed=0), seed=0).test[:n]
        test.sort(key=lambda e: len(e.prompt))  # batches of similar lengths: less padding to compute
        correct = 0
        with torch.no_grad():
            for i in range(0, len(test), 100):
                b = collate(tokenizer, test[i:i + 100], share_prompts=True)  # as eval scores: one row each
                out = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                  position_ids=b.position_ids())
                lp = token_logprobs_from_logits(model.lm_head(select_targets(out.last_hidden_state, b)),
                                                b.target_ids)
                correct += int((candidate_loss(lp, b)[1] == b.labels).sum())
        return correct / len(test)

    demo = accuracy("demo", 100)  # 0.72 (0.693 on 150, 0.687 on 300)
    assert 0.6 < demo < 0.9, demo
    codes = accuracy("codes", 100)  # 0.47 (0.485 on 200)
    assert 0.4 <= codes <= 0.6, codes

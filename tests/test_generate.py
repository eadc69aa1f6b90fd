"""Streamed decoding (`zoedge generate`, `zoedge.load(...).generate`) against transformers' own `generate`.

Greedy output must equal `model.generate(do_sample=False)` token for token, and seeded sampling must equal
`torch.manual_seed(seed); model.generate(do_sample=True, ...)` (same warpers, same draws), on tiny Llama and OPT
models in the RAM and disk tiers with left-padded prompts of different lengths; the slow test does the same on
the default model.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoedge
from tests.test_tasks import _tokenizer
from tests.tiny import batch, tiny_config
from zoedge.cli import main
from zoedge.errors import ConfigError, DataError
from zoedge.generation import generate, read_prompts
from zoedge.runtime.decoding import Sampling, decode


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf_tokens(model, ids, mask, n, eos=None, **sample):
    """transformers' new tokens per row, cut after the first ``eos`` (kept)."""
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=1,
                             do_sample=bool(sample), **sample)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[:r.index(eos) + 1] if eos is not None and eos in r else r for r in rows]


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_greedy_equals_transformers(tiny, tier):
    model, store = tiny
    ids, mask = batch(b=3, t=9)  # left padding of 0, 2 and 4 tokens
    assert len(set(mask.sum(1).tolist())) == 3
    streamed = zoedge.load(store, tier=tier)
    try:
        free = decode(streamed, ids, mask, 12, pad_id=1)
        assert free.tokens == _hf_tokens(model, ids, mask, 12) and free.ended == ["length"] * 3
        assert free.passes == 12
        eos = free.tokens[0][3]  # a token row 0 emits: rows end at different steps
        ended = decode(streamed, ids, mask, 12, eos_ids=[eos], pad_id=1)
        assert ended.tokens == _hf_tokens(model, ids, mask, 12, eos)
        assert ended.tokens[0] == free.tokens[0][:free.tokens[0].index(eos) + 1] and ended.ended[0] == "eos"
    finally:
        streamed.close()


def test_greedy_with_half_units_equals_layers(tiny):
    """OPT streamed as attention and MLP halves hands the cache to the attention half: same tokens."""
    model, store = tiny
    if model.config.model_type != "opt":
        pytest.skip("only OPT streams half layers")
    ids, mask = batch(b=3, t=9)
    halves = zoedge.load(store, unit="half")
    try:
        assert decode(halves, ids, mask, 8, pad_id=1).tokens == _hf_tokens(model, ids, mask, 8)
    finally:
        halves.close()


def test_sampling_equals_transformers_and_repeats(tiny):
    model, store = tiny
    ids, mask = batch(b=3, t=9)
    streamed = zoedge.load(store)
    try:
        for s in (Sampling(temperature=0.8, top_k=10, top_p=0.9, seed=5), Sampling(temperature=1.3, seed=2)):
            got = decode(streamed, ids, mask, 10, s, pad_id=1).tokens
            torch.manual_seed(s.seed)
            assert got == _hf_tokens(model, ids, mask, 10, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
            assert decode(streamed, ids, mask, 10, s, pad_id=1).tokens == got  # the same seed: the same tokens
        other = decode(streamed, ids, mask, 10, Sampling(temperature=1.3, seed=3), pad_id=1).tokens
        assert other != decode(streamed, ids, mask, 10, Sampling(temperature=1.3, seed=2), pad_id=1).tokens
    finally:
        streamed.close()


@pytest.mark.gpu
def test_gpu_offloaded_cache_equals_transformers(tiny):
    """On an accelerator the cache is transformers' offloaded DynamicCache (host memory, one layer prefetched to the
    device at a time), filled while the layers stream through device slots: the same tokens as transformers' own
    generate on that device."""
    model, store = tiny
    ids, mask = batch(b=3, t=9)
    streamed = zoedge.load(store, device="cuda")
    try:
        got = decode(streamed, ids, mask, 12, pad_id=1).tokens
        assert got == _hf_tokens(model.to("cuda"), ids.cuda(), mask.cuda(), 12)
    finally:
        model.to("cpu")
        streamed.close()


# --------------------------------------------------------------------------- the command and the Python API
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture()
def hf_dir(tmp_path, monkeypatch):
    """A tiny Llama with a real (BPE) tokenizer that has a chat template, and its resident twin."""
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.vocab_size = 320
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "hf")
    tok = _tokenizer(bos=True)
    tok.chat_template = CHAT
    tok.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model, tok


def _reference(model, tok, texts, n, chat=False):
    """transformers' greedy completions of ``texts`` one by one (no padding), decoded."""
    out = []
    for t in texts:
        if chat:
            t = tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(t, add_special_tokens=not chat)["input_ids"]])
        row = _hf_tokens(model, ids, torch.ones_like(ids), n, tok.eos_token_id)[0]
        out.append(tok.decode(row, skip_special_tokens=True))
    return out


def test_cli_generate_prompts_file_and_json(hf_dir, tmp_path, capsys):
    hf, model, tok = hf_dir
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "a pear and", "completion": "an apple"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]})
        + "\n")
    args = ["generate", "--model", str(hf), "--prompt", "the quick brown fox jumps", "--prompts",
            str(tmp_path / "p.jsonl"), "--max-new-tokens", "6", "--batch-size", "2", "--threads", "1",
            "--json", str(tmp_path / "out.json")]
    assert main(args) == 0
    res = json.loads((tmp_path / "out.json").read_text())
    got = [c["completion"] for c in res["completions"]]
    want = _reference(model, tok, ["the quick brown fox jumps", "a pear and"], 6) + _reference(model, tok, ["the cat"], 6,
                                                                                               chat=True)
    assert got == want  # batched with left padding (two batches), yet each equals its own unpadded greedy run
    assert [c["prompt"] for c in res["completions"]][:2] == ["the quick brown fox jumps", "a pear and"]
    assert res["completions"][1]["reference"] == "an apple" and res["completions"][2]["reference"] == "sat"
    assert res["completions"][2]["prompt"] == [{"role": "user", "content": "the cat"}]  # the assistant turn dropped
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True)
    assert res["completions"][2]["prompt_tokens"] == len(chat_ids if isinstance(chat_ids, list) else chat_ids["input_ids"])
    assert res["new_tokens"] == sum(c["new_tokens"] for c in res["completions"]) > 0
    assert res["tokens_per_s"] > 0 and res["batches"] == 2
    out = capsys.readouterr().out
    assert all(c in out for c in got)


def test_stop_text_ends_a_completion(hf_dir, tmp_path):
    hf, model, tok = hf_dir
    streamed = zoedge.load(hf)
    try:
        full = generate(streamed, "the quick brown fox", max_new_tokens=8).completions[0]
        text = full.completion
        assert full.finish == "length" and len(text) > 4
        stop = text[2:4]
        cut = generate(streamed, "the quick brown fox", max_new_tokens=8, stop=[stop]).completions[0]
        assert cut.completion == text[:text.find(stop)] and cut.finish == "stop"
        assert cut.new_tokens < full.new_tokens  # decoding ended once the stop text appeared (within 4 tokens)
        with pytest.raises(ConfigError, match="64 positions"):  # the tiny model's max_position_embeddings
            generate(streamed, "the quick brown fox", max_new_tokens=62)
    finally:
        streamed.close()


def test_load_generate_api(hf_dir):
    """zoedge.load takes a Hugging Face directory; its model completes text, one prompt or a list."""
    hf, model, tok = hf_dir
    streamed = zoedge.load(hf)
    try:
        assert streamed.generate("the quick brown fox jumps", max_new_tokens=5) == \
            _reference(model, tok, ["the quick brown fox jumps"], 5)[0]
        texts = streamed.generate(["a pear and", "the cat"], max_new_tokens=5, chat=True)
        assert texts == _reference(model, tok, ["a pear and", "the cat"], 5, chat=True)
        sampled = [streamed.generate(["the cat"], max_new_tokens=6, temperature=1.5, seed=7) for _ in range(2)]
        assert sampled[0] == sampled[1]
    finally:
        streamed.close()
    run = hf.parent / "run"  # a finetune run's output directory: its model/ is loaded
    shutil.copytree(hf, run / "model")
    (run / "summary.json").write_text("{}")
    from_run = zoedge.load(run)
    try:
        assert from_run.generate(["a pear and"], max_new_tokens=5) == _reference(model, tok, ["a pear and"], 5)
    finally:
        from_run.close()


def test_bad_prompts_fail_before_the_model_loads(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "?"}) + "\n")
    missing_model = str(tmp_path / "no-such-model")  # never reached: the prompts are checked first
    assert main(["generate", "--model", missing_model, "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "prompt" in err and "messages" in err
    assert main(["generate", "--model", missing_model]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_prompts(tmp_path / "latin1.txt")
    (tmp_path / "lines.txt").write_text("first prompt\n\n{not json\n")
    assert [p.text for p in read_prompts(tmp_path / "lines.txt")] == ["first prompt", "{not json"]


def test_chat_without_template_is_refused(hf_dir, tmp_path):
    hf, _, tok = hf_dir
    tok.chat_template = None
    tok.save_pretrained(hf)
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    (hf / "chat_template.jinja").unlink(missing_ok=True)
    streamed = zoedge.load(hf)
    try:
        with pytest.raises(DataError, match="chat template"):
            streamed.generate({"messages": [{"role": "user", "content": "hi"}]}, max_new_tokens=2)
    finally:
        streamed.close()


# --------------------------------------------------------------------------- slow: the default model
@pytest.mark.slow
def test_default_model_greedy_equals_transformers(smollm2_dir):
    """SmolLM2-135M: 5 prompts of different lengths, 32 new tokens, batched with left padding, RAM and disk tiers
    (transformers' reference computed once)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.padding_side = "left"
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village far away,",
               "Water boils at", "The three primary colours are red,"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                          pad_token_id=tok.pad_token_id)
    del hf
    want = [r[:r.index(eos) + 1] if eos in r else r for r in out[:, ids.shape[1]:].tolist()]
    assert sum(len(r) for r in want) > 5 * 8  # real completions, not immediate ends
    for tier in ("ram", "disk"):
        streamed = zoedge.load(smollm2_dir, tier=tier)
        try:
            assert decode(streamed, ids, mask, 32, eos_ids=[eos], pad_id=tok.pad_token_id).tokens == want, tier
        finally:
            streamed.close()

"""ZO-LoRA: adapters on a frozen streamed base, trained by unchanged plugins (fp32, CPU, tiny models).

For MeZO, DiZO, HiZOO-L and an out-of-tree plugin, on the RAM and disk tiers and on int8 / nf4 stores: the store's
bytes and the base weights are unchanged after training, only adapter tensors move, the streamed run equals the
same plugin driven on a resident PEFT model (hand-made resident holding every adapter), and N steps straight equal
N/2 + checkpoint + resume + N/2. The PEFT forward, the adapter directory ``finetune`` writes and its merge are
checked against ``peft`` itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Mapping

import pytest
import torch
from torch.func import functional_call

import zoedge
from zoedge.errors import ConfigError
from zoedge.optim import registry
from zoedge.optim.api import Update, ZOOptimizer, register_optimizer
from zoedge.optim.registry import build
from zoedge.runtime.lora import LoraSpec, init_a
from zoedge.runtime.streamed import Resident
from zoedge.train.batching import candidate_loss, token_logprobs_from_logits
from zoedge.train.trainer import TrainSettings, Trainer
from tests.plugin_harness import batches
from tests.tiny import CharTokenizer, batch, save_tiny, toy_examples

peft = pytest.importorskip("peft")

STEPS, BS, SEED = 4, 4, 3
SPEC = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))


class OutOfTreeSPSA(ZOOptimizer):
    """A third-party plugin written against the API only: Rademacher SPSA, its own noise from torch generators."""

    def __init__(self, *, seed: int = 0, lr: float = 1e-2, eps: float = 1e-2) -> None:
        super().__init__(seed=seed, lr=lr)
        self.eps = eps

    def _z(self, step: int, name: str, like: torch.Tensor) -> torch.Tensor:
        key = int.from_bytes(hashlib.sha256(f"{self.seed}/{step}/{name}".encode()).digest()[:7], "little")
        g = torch.Generator().manual_seed(key)
        return (torch.randint(0, 2, like.shape, generator=g) * 2 - 1).to(like.dtype)

    def perturb(self, block, p):
        sign = self.eps if p == 0 else -self.eps
        return {n: t + sign * self._z(self.t, n, t) for n, t in block.tensors.items()}

    def end_step(self, losses):
        return Update({"g": (float(losses[0]) - float(losses[1])) / (2 * self.eps), "lr": self.lr})

    def apply(self, block, update):
        for n, t in block.tensors.items():
            t.sub_(self._z(update.step, n, t), alpha=update["lr"] * update["g"])


@pytest.fixture
def oot(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_optimizer("oot-spsa")(OutOfTreeSPSA)
    return "oot-spsa"


PLUGINS = {
    "mezo": {"lr": "5e-2", "eps": "1e-2"},
    "dizo": {"lr": "5e-2", "eps": "1e-2", "cycle": "2", "iters": "2", "gamma_lr": "1e2"},
    "hizoo-l": {"lr": "5e-2", "eps": "1e-2", "alpha": "1e-3"},
    "oot-spsa": {"lr": "5e-2", "eps": "1e-2"},
}
#: (store quantization, tier, runtime layout): the CPU's in-place binding, the accelerator's slots with
#: just-in-time perturbations of the adapters (lean), the disk tier, int8 / nf4 stores
STORES = {"ram": ("none", "ram", {}), "lean": ("none", "ram", {"in_place": False, "chunk_bytes": 256}),
          "disk": ("none", "disk", {}), "int8": ("int8", "ram", {}), "nf4": ("nf4", "ram", {})}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    save_tiny("llama", root / "hf", tie=True)
    out = {}
    for quant in ("none", "int8", "nf4"):
        out[quant] = root / f"store-{quant}"
        zoedge.prepare(root / "hf", out[quant], dtype="fp32", quant=quant, progress=False, log=lambda s: None)
    return out


def store_digest(store) -> dict[str, str]:
    """sha256 of every file of the store (but the verification record a first load may write)."""
    return {p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and p.name != "verified.json"}


def load_lora(store, tier, **kw):
    model = zoedge.load(store, tier=tier, **kw)
    model.attach_lora(SPEC, seed=SEED)
    return model


def make_trainer(store, tier, out, name, steps=STEPS, **kw):
    ex = toy_examples()
    return Trainer(load_lora(store, tier, **kw), CharTokenizer(), build(name, PLUGINS[name], seed=SEED), ex, ex[:4], [],
                   TrainSettings(steps=steps, batch_size=BS, seed=SEED, eval_every=0), out, progress=False,
                   log=lambda s: None)


# ----------------------------------------------------------------------------- the resident reference
def peft_name(n: str) -> str:
    return "base_model.model." + n.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")


def peft_model(base_weights: Mapping[str, torch.Tensor], hf_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    model.load_state_dict(base_weights, strict=False)  # the store's (dequantized) base
    cfg = peft.LoraConfig(r=SPEC.rank, lora_alpha=SPEC.alpha, target_modules=list(SPEC.targets), lora_dropout=0.0)
    return peft.get_peft_model(model, cfg).eval()


def peft_loss(model, adapters, b):
    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update({peft_name(n): t for n, t in adapters.items()})
    pos = b.attention_mask.cumsum(-1) * b.attention_mask - 1
    logits = functional_call(model, params, (), {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                                                 "position_ids": pos}).logits
    at = logits.reshape(-1, logits.shape[-1])[b.target_index]
    return candidate_loss(token_logprobs_from_logits(at, b.target_ids), b)[0]


class _Runtime:
    """What a hand-made resident needs from the runtime: workspaces and the adapters' initial values."""

    lean = False

    def __init__(self):
        self.bufs = {}

    def workspace(self, key, block):
        return {n: self.bufs.setdefault((key, n), torch.empty_like(t)) for n, t in block.tensors.items()}

    def stored(self, i, name, out):
        return out.zero_() if name.endswith("lora_B.weight") else out.copy_(init_a(tuple(out.shape), SEED, name))


def resident_run(opt, model, adapters, examples, steps):
    """The trainer's sequence of hooks on one resident block holding every adapter; losses from the PEFT model."""
    block = Resident("all", 0, adapters, frozenset(adapters), runtime=_Runtime())
    losses = []

    def flush():
        opt.on_resident(block)
        opt.on_passes_done(block)
        opt.flushed()

    with torch.no_grad():
        for t, b in enumerate(batches(examples, steps, BS, SEED)):
            flushed = False
            for phase in opt.extra_phases(t):
                if not flushed:
                    flush()
                    flushed = True
                phase.on_resident(block)
                ls = [peft_loss(model, dict(phase.pass_tensors(block, p)), b) for p in range(phase.passes)]
                phase.on_passes_done(block)
                opt.finish_phase(phase, ls)
            opt.begin_step(t)
            opt.on_resident(block)
            ls = [peft_loss(model, dict(opt.pass_tensors(block, p)), b) for p in range(opt.passes)]
            opt.on_passes_done(block)
            losses.append([float(x) for x in ls])
            opt.finish_step(ls)
        flush()
    return losses


def streamed_run(opt, model, examples, steps):
    from zoedge.train.trainer import _loss_passes
    losses = []
    for t, b in enumerate(batches(examples, steps, BS, SEED)):
        flushed = False
        for phase in opt.extra_phases(t):
            if not flushed:
                model.run(opt)
                opt.flushed()
                flushed = True
            if phase.passes:
                opt.finish_phase(phase, [l for l, _ in _loss_passes(model, phase, b)])
            else:
                model.run(phase)
                opt.finish_phase(phase, [])
        opt.begin_step(t)
        ls = [l for l, _ in _loss_passes(model, opt, b)]
        losses.append([float(x) for x in ls])
        opt.finish_step(ls)
    model.run(opt)
    opt.flushed()
    return losses


# ----------------------------------------------------------------------------- acceptance
@pytest.mark.parametrize("where", list(STORES))
@pytest.mark.parametrize("name", list(PLUGINS))
def test_only_adapters_train_and_streamed_equals_resident(stores, tmp_path, oot, name, where):
    quant, tier, layout = STORES[where]
    store = stores[quant]
    digest = store_digest(store)
    model = load_lora(store, tier, **layout)
    base = model.state_dict()
    init = model.lora.state_dict()
    ex = toy_examples()
    losses = streamed_run(build(name, PLUGINS[name], seed=SEED), model, ex, STEPS)
    after = model.lora.state_dict()
    # the base is untouched: store bytes (hash), the weights the model streams; nothing was written back
    assert store_digest(store) == digest
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "working").exists()
    # only adapter tensors moved (B from zero, and A)
    assert set(after) == set(init) and any(n.endswith("lora_B.weight") for n in after)
    assert all(not torch.equal(after[n], init[n]) for n in after if n.endswith("lora_B.weight")), name
    # streamed == the same plugin on a resident PEFT model
    ref_model = peft_model(base, store.parent / "hf")
    ref_adapters = {n: t.clone() for n, t in init.items()}
    ref_losses = resident_run(build(name, PLUGINS[name], seed=SEED), ref_model, ref_adapters, ex, STEPS)
    if "chunk_bytes" not in layout:  # the same floats: the LoRA forward is PEFT's op for op
        assert losses == ref_losses
        assert all(torch.equal(after[n], ref_adapters[n]) for n in after)
    else:  # adapters formed in row chunks: the products' summation order differs
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        for n in after:
            torch.testing.assert_close(after[n], ref_adapters[n], rtol=1e-4, atol=1e-5)
    model.close()


@pytest.mark.parametrize("where", list(STORES))
@pytest.mark.parametrize("name", list(PLUGINS))
def test_resume_is_bit_equal(stores, tmp_path, oot, name, where):
    quant, tier, layout = STORES[where]
    store = stores[quant]
    straight = make_trainer(store, tier, tmp_path / "a", name, **layout)
    straight.fit()
    half = make_trainer(store, tier, tmp_path / "b", name, **layout)
    first = [half.train_step()["loss"] for _ in range(STEPS // 2)]
    half.save()
    ckpt = next((tmp_path / "b" / "checkpoints").glob("step-*"))
    assert (ckpt / "model.safetensors").stat().st_size < 64 * 1024  # the adapters only
    resumed = make_trainer(store, tier, tmp_path / "b", name, **layout)
    assert resumed.resume()
    resumed.fit()
    straight_losses = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert straight_losses == first + resumed_losses
    a, b = straight.model.lora.state_dict(), resumed.model.lora.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(k for k in a if k.endswith("lora_B.weight"))],
                           torch.zeros_like(a[next(k for k in a if k.endswith("lora_B.weight"))]))


# ----------------------------------------------------------------------------- PEFT compatibility
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_forward_and_adapter_dir_match_peft(tmp_path, family):
    from transformers import AutoModelForCausalLM
    hf = save_tiny(family, tmp_path / "hf")
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    model = zoedge.load(tmp_path / "store")
    lora = model.attach_lora(SPEC, seed=SEED)
    g = torch.Generator().manual_seed(0)
    for t in lora.tensors.values():  # B = 0 would make the adapter invisible
        t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    lora.save_peft(tmp_path / "adapter", base_model=str(tmp_path / "hf"))
    ids, mask = batch()
    mine = model(ids, mask)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                            tmp_path / "adapter").eval()
    with torch.no_grad():
        kw = {} if family == "opt" else {"position_ids": mask.cumsum(-1) * mask - 1}
        ref = loaded(input_ids=ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(mine[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-4)
    assert (mine - hf(input_ids=ids, attention_mask=mask, **kw).logits.detach())[mask.bool()].abs().max() > 1e-3
    # the merged export is the same function
    merged = {n: t for chunk in model.merged_stream().chunks for n, t in chunk.items()}
    full = dict(merged)
    full.update({a: full[s] for a, s in model.aliases.items()})
    with torch.no_grad():
        m = functional_call(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), full, (),
                            {"input_ids": ids, "attention_mask": mask, **kw}).logits
    torch.testing.assert_close(m[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-4)


def test_first_order_plugins_are_refused_with_the_fix(stores, tmp_path):
    with pytest.raises(ConfigError, match="fo_layers=0"):
        Trainer(load_lora(stores["none"], "ram"), CharTokenizer(), build("loho", {"fo_layers": "1"}, seed=0),
                toy_examples(), [], [], TrainSettings(steps=1, batch_size=4), tmp_path, progress=False)


def test_bad_targets_name_the_option(stores):
    model = zoedge.load(stores["none"])
    with pytest.raises(ConfigError, match="--lora-targets.*matches no nn.Linear.*q_proj"):
        model.attach_lora(LoraSpec(targets=("query",)))
    with pytest.raises(ConfigError, match="--lora-rank"):
        LoraSpec(rank=0)
    lora = model.attach_lora(SPEC)
    wrong = {n: torch.zeros(t.shape[0] + 1, *t.shape[1:]) for n, t in lora.tensors.items()}
    with pytest.raises(ConfigError, match="same rank and targets"):
        lora.load_state_dict(wrong, "adapter dir")


# ----------------------------------------------------------------------------- finetune / eval end to end
@pytest.mark.parametrize("family,tier", [("llama", "ram"), ("opt", "disk")])
def test_finetune_writes_a_peft_adapter_and_eval_takes_it(tmp_path, monkeypatch, family, tier):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from zoedge.cli import main
    from zoedge.train.demo_task import demo_examples
    from tests.test_tasks import _tokenizer

    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    common = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    cfg = (LlamaConfig(**common, intermediate_size=64, num_key_value_heads=2, tie_word_embeddings=True)
           if family == "llama" else OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    _tokenizer(bos=True).save_pretrained(tmp_path / "hf")
    rows = [{"sentence": e.prompt[: -len(" It was")], "label": e.label} for e in demo_examples(40, seed=1)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    data = ["--train", str(tmp_path / "train.jsonl"), "--n-train", "24", "--n-dev", "8", "--n-test", "0",
            "--no-progress"]
    assert main(["finetune", "--model", str(tmp_path / "hf"), *data, "--batch-size", "4", "--steps", "3",
                 "--lr", "5e-2", "--eps", "1e-2", "--tier", tier, "--peft", "lora", "--lora-rank", "4", "--merge",
                 "--no-plot", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_dir"] == str(out / "adapter") and 0 < summary["adapter_bytes"] < 64 * 1024
    assert not (out / "working").exists()  # the base is read-only: no working copy on the disk tier
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 16.0, ["q_proj", "v_proj"])
    # peft loads it onto the base with the logits of zoedge's forward (the store is the base, fp32)
    store = zoedge.load(summary["store"])
    store.attach_lora(LoraSpec(4, 16.0)).load_peft(out / "adapter")
    assert any(t.abs().sum() > 0 for n, t in store.lora.tensors.items() if "lora_B" in n)  # trained
    ids, mask = batch(vocab=320)
    mine = store(ids, mask)
    kw = {} if family == "opt" else {"position_ids": mask.cumsum(-1) * mask - 1}
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        ref_model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        ref = ref_model(input_ids=ids, attention_mask=mask, **kw).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model")(input_ids=ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(mine[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-4)
    torch.testing.assert_close(merged[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-4)
    # zoedge eval --adapter: the run's dev figures
    assert main(["eval", "--model", summary["store"], "--adapter", str(out / "adapter"), *data,
                 "--json", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["dev"]["loss"] == pytest.approx(summary["dev_after"]["loss"], abs=1e-6)
    assert ev["dev"]["loss"] != pytest.approx(summary["dev_before"]["loss"], abs=1e-7)
    if family == "llama":  # the run directory itself: its store and adapter, its split (no --merge model here)
        shutil.rmtree(out / "model")
        assert main(["eval", "--model", str(out), "--no-progress", "--json", str(tmp_path / "run.json")]) == 0
        assert json.loads((tmp_path / "run.json").read_text())["dev"] == ev["dev"]
        # generate from the run (its store + adapter), from --adapter, and zoedge.load: PEFT's greedy tokens
        tok = _tokenizer(bos=True)
        prompt = rows[0]["sentence"]
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            want = ref_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=6, min_new_tokens=6, pad_token_id=0)[0, ids.shape[1]:]
        want = tok.decode(want, skip_special_tokens=True)
        for how in (["--model", str(out)], ["--model", summary["store"], "--adapter", str(out / "adapter")]):
            assert main(["generate", *how, "--prompt", prompt, "--max-new-tokens", "6", "--threads", "1",
                         "--json", str(tmp_path / "gen.json")]) == 0
            assert json.loads((tmp_path / "gen.json").read_text())["completions"][0]["completion"] == want
        with contextlib.closing(zoedge.load(out)) as loaded:
            assert loaded.lora is not None and loaded.generate(prompt, max_new_tokens=6) == want


def test_plan_counts_adapters_and_no_write_back(tmp_path):
    from zoedge.plan.accounting import Workload, make_plan, method, model_spec
    from zoedge.hardware import hardware

    save_tiny("llama", tmp_path / "hf", tie=True)
    spec = model_spec(str(tmp_path / "hf"), "fp32")
    work = Workload(batch=2, seq=16)
    lora = LoraSpec(rank=4, alpha=8.0)
    full = make_plan(spec, method("mezo"), work, hardware("rtx4090"))
    plan = make_plan(spec, method("mezo", lora=lora), work, hardware("rtx4090"))
    # q_proj 32 -> 32, v_proj 32 -> 16 (2 kv heads of 8): r * (in + out) fp32 values each, 3 layers
    assert plan.device_long_lived["LoRA adapters (fp32)"] == 3 * 4 * ((32 + 32) + (32 + 16)) * 4
    assert plan.moved["d2h"] == 0 and plan.moved["disk_write"] == 0 and full.moved["d2h"] > 0
    assert plan.disk == plan.stored_bytes and plan.time["step_s"] < full.time["step_s"]
    with pytest.raises(ConfigError, match="--peft lora"):
        method("lowrank", lora=lora)


def test_hzo_factors_are_written_as_an_exact_peft_adapter(tmp_path):
    """HZO keeps every period's A and V: its change is [A_1 … A_K][V_1 … V_K]ᵀ, written with no SVD."""
    from transformers import AutoModelForCausalLM

    from zoedge.optim.lora import factors_adapter

    save_tiny("llama", tmp_path / "hf", tie=True)
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    ex = toy_examples()
    opts = {"nu": "3", "rank": "2", "vector": "frozen", "freeze": "embed", "lr": "5e-2", "eps": "1e-2"}
    model = zoedge.load(tmp_path / "store")
    trainer = Trainer(model, CharTokenizer(), build("hzo", opts, seed=SEED), ex, ex[:4], [],
                      TrainSettings(steps=7, batch_size=BS, seed=SEED, eval_every=2), tmp_path / "run",
                      progress=False, log=lambda s: None)
    trainer.fit()  # periods 0, 3, 6; flushes (evals) merge mid-period too
    factors = trainer.opt.lora_factors()
    assert {tuple(b.shape[1:]) for b, _ in factors.values()} == {(2 * 3,)}
    factors_adapter(factors, model.config, tmp_path / "adapter", str(tmp_path / "hf"))
    ids, mask = batch()
    mine = model(ids, mask)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        before = base(input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(-1) * mask - 1).logits
        ref = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(
            input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(-1) * mask - 1).logits
    torch.testing.assert_close(mine[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-4)
    assert (mine - before)[mask.bool()].abs().max() > 1e-3  # it trained
    dense = build("hzo", {**opts, "vector": "dense"}, seed=SEED)  # 1-D deltas: not all factors, no adapter
    dense.dense_merged = True
    assert dense.lora_factors() == {}


def test_concurrent_layers_train_the_same_adapters(stores):
    """The CPU's concurrent decoder layers (workers) see the same adapters and give the same floats."""
    runs = []
    for workers in (0, 2):
        model = load_lora(stores["none"], "ram", workers=workers)
        losses = streamed_run(build("mezo", PLUGINS["mezo"], seed=SEED), model, toy_examples(), STEPS)
        runs.append((losses, model.lora.state_dict(), model.layer_mode()))
    assert runs[1][2].startswith("concurrent") and runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())


def test_lora_defaults_fill_only_missing_options_a_plugin_has(oot):
    from zoedge.train.job import LORA_DEFAULTS, peft_options

    assert peft_options("mezo", {}) == LORA_DEFAULTS
    assert peft_options("mezo", {"lr": 1.0}) == {**LORA_DEFAULTS, "lr": 1.0}
    assert peft_options("oot-spsa", {"eps": 0.5}) == {"lr": LORA_DEFAULTS["lr"], "eps": 0.5}

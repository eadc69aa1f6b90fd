"""LoRA export: HZO's factor-mode delta as a PEFT adapter that `peft` loads onto the base model with the same
outputs as zoedge's merged model; tensors a LoRA cannot hold are refused."""
from __future__ import annotations

import pytest
import torch

import zoedge
from zoedge.errors import ConfigError
from zoedge.optim.lora import export_peft_adapter, lora_factors
from zoedge.train.job import export_model
from zoedge.train.trainer import TrainSettings, Trainer
from zoedge_plugins.hzo import HZO
from zoedge_plugins.mezo import MeZO
from tests.tiny import CharTokenizer, batch, resident_logits, save_tiny, toy_examples

peft = pytest.importorskip("peft")


def train(store, out, opt, steps=3):
    ex = toy_examples()
    t = Trainer(zoedge.load(store), CharTokenizer(), opt, ex, ex[:4], [],
                TrainSettings(steps=steps, batch_size=4, seed=1), out, progress=False, log=lambda s: None)
    for _ in range(steps):
        t.train_step()
    t.flush()
    return t.model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_peft_adapter_equals_merged_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    save_tiny(family, tmp_path / "hf")
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    opt = HZO(seed=2, lr=0.05, eps=1e-2, rank=2, nu=50, vector="frozen", freeze="embed")
    model = train(tmp_path / "store", tmp_path / "run", opt)
    export_model(model, tmp_path / "merged")
    base = zoedge.load(tmp_path / "store").state_dict()
    export_peft_adapter(base, model.state_dict(), model.config, tmp_path / "adapter", rank=2)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapter = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                                                  tmp_path / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = batch()
    want = resident_logits(merged, ids, mask)
    got = resident_logits(with_adapter, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (resident_logits(plain, ids, mask) - want).abs().max() > 1e-4  # the adapter carries the training


def test_export_refuses_what_lora_cannot_hold(tmp_path):
    save_tiny("llama", tmp_path / "hf")
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    model = train(tmp_path / "store", tmp_path / "run", MeZO(seed=1, lr=1e-3, eps=1e-2), steps=1)
    base = zoedge.load(tmp_path / "store").state_dict()
    with pytest.raises(ConfigError, match="cannot hold"):
        export_peft_adapter(base, model.state_dict(), model.config, tmp_path / "a", rank=2)
    linear_only = {k: (v if k.endswith("proj.weight") else base[k]) for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="not rank 2"):  # a dense MeZO delta is full rank
        export_peft_adapter(base, linear_only, model.config, tmp_path / "a", rank=2)


def test_lora_factors_exact_for_low_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g)
    b, a, err = lora_factors(delta, 3)
    assert err < 1e-6 and b.shape == (6, 3) and a.shape == (3, 5)
    torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-6)

"""First-order blocks: resident, trained by autograd + a torch optimizer on the unperturbed pass, while the
streamed blocks run MeZO without grad; equal to a resident hybrid written here; bit-equal resume; memory counted."""
from __future__ import annotations

import json

import pytest
import torch

import zoedge
from zoedge.errors import ConfigError
from zoedge.optim.first_order import FOSettings
from zoedge.noise.source import NoiseSource
from zoedge.train.batching import collate
from zoedge.train.trainer import TrainSettings, Trainer, batch_indices
from zoedge_plugins.mezo import MeZO
from tests.test_mezo import resident_loss
from tests.plugin_harness import zo_sgd_
from tests.tiny import CharTokenizer, toy_examples

STEPS, BS, LR, EPS, FO_LR, SEED = 5, 4, 1e-3, 1e-2, 0.05, 11


class HybridMeZO(MeZO):
    """Test plugin: pass 0 unperturbed (the FO pass), passes 1/2 MeZO ±εz; the last decoder block is FO."""

    fo_pass = 0

    def __init__(self, *, seed: int = 0, lr: float = LR, eps: float = EPS, fo_optimizer: str = "sgd") -> None:
        super().__init__(seed=seed, lr=lr, eps=eps)
        self.passes, self.fo_optimizer = 3, fo_optimizer

    def fo_blocks(self, blocks):
        return [blocks[-2].name]

    def fo_settings(self):
        return FOSettings(self.fo_optimizer, FO_LR)

    def perturb(self, block, p):
        return block.tensors if p == 0 else super().perturb(block, p - 1)

    def end_step(self, losses):
        return super().end_step(losses[1:])


def trainer(store, out, steps=STEPS, fo_optimizer="sgd"):
    ex = toy_examples()
    return Trainer(zoedge.load(store), CharTokenizer(), HybridMeZO(seed=SEED, fo_optimizer=fo_optimizer), ex, ex[:4],
                   [], TrainSettings(steps=steps, batch_size=BS, seed=SEED), out, progress=False, log=lambda s: None)


def resident_hybrid(model, examples, fo_prefix):
    """MeZO on every tensor outside ``fo_prefix`` (eager), SGD by autograd on the tensors inside it."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    fo = {n for n in params if n.startswith(fo_prefix)}
    for n in fo:
        params[n].requires_grad_(True)
    sgd = torch.optim.SGD([params[n] for n in params if n in fo], lr=FO_LR)
    noise, losses = NoiseSource(SEED), []
    for t in range(STEPS):
        batch = collate(CharTokenizer(), [examples[i] for i in batch_indices(len(examples), BS, SEED, t)])
        l0 = resident_loss(model, params, batch)
        with torch.no_grad():
            zs = {n: noise.normal(p.shape, t, n, "z0") for n, p in params.items() if n not in fo}
            step = [float(l0)]
            for a in (EPS, -EPS):
                step.append(float(resident_loss(model, {n: torch.add(p, zs[n], alpha=a) if n in zs else p
                                                        for n, p in params.items()}, batch)))
        l0.backward()
        sgd.step()
        sgd.zero_grad()
        with torch.no_grad():
            g = (step[1] - step[2]) / (2 * EPS)
            for n, z in zs.items():
                zo_sgd_(params[n], [(z, g)], 1, LR, 0.0)
        losses.append(step)
    return losses, params


def test_fo_blocks_equal_resident_hybrid(tiny, tmp_path):
    model, store = tiny
    t = trainer(store, tmp_path / "run")
    got = []
    for _ in range(STEPS):
        t.train_step()
        got.append([float(x) for x in t.last_losses])
    t.flush()
    prefix = "model.decoder.layers.2." if model.config.model_type == "opt" else "model.layers.2."
    ref, params = resident_hybrid(model, toy_examples(), prefix)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-6, atol=1e-6)
    state = t.model.state_dict()
    changed = 0
    for n, p in params.items():
        torch.testing.assert_close(state[n], p.detach(), rtol=1e-5, atol=1e-6)
        changed += n.startswith(prefix)
    w = prefix + ("fc1.weight" if "decoder" in prefix else "mlp.up_proj.weight")
    assert changed and not torch.equal(state[w], dict(model.named_parameters())[w])  # the FO block trained


def test_fo_resume_is_bit_equal_with_adamw(tiny, tmp_path):
    _, store = tiny
    straight = trainer(store, tmp_path / "a", steps=6, fo_optimizer="adamw")
    straight.fit()
    half = trainer(store, tmp_path / "b", steps=6, fo_optimizer="adamw")
    first = [half.train_step()["loss"] for _ in range(3)]
    half.save()
    resumed = trainer(store, tmp_path / "b", steps=6, fo_optimizer="adamw")
    assert resumed.resume()
    resumed.fit()
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert losses(tmp_path / "a") == first + losses(tmp_path / "b")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fo_memory_is_counted(tiny, tmp_path):
    _, store = tiny
    t = trainer(store, tmp_path / "run", steps=1, fo_optimizer="adamw")
    block_bytes = sum(v.numel() * 4 for v in t.fo.params[t.fo.blocks[0]].values())
    assert t.fo.memory() == {"weights": block_bytes, "grads": 0, "optimizer_state": 0, "total": block_bytes}
    r = t.fit()
    n_tensors = len(t.fo.params[t.fo.blocks[0]])
    # AdamW: exp_avg + exp_avg_sq (2x weights) and one fp32 step counter per tensor
    assert r.fo_memory == {"weights": block_bytes, "grads": block_bytes,
                           "optimizer_state": 2 * block_bytes + 4 * n_tensors,
                           "total": 4 * block_bytes + 4 * n_tensors}


def test_fo_block_must_be_a_decoder_block(tiny, tmp_path):
    _, store = tiny

    class Bad(HybridMeZO):
        def fo_blocks(self, blocks):
            return ["head"]

    ex = toy_examples()
    with pytest.raises(ConfigError, match="'head' is not a decoder block"):
        Trainer(zoedge.load(store), CharTokenizer(), Bad(), ex, ex, [], TrainSettings(batch_size=4), tmp_path)

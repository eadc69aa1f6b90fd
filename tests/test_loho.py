"""LoHO: 0 FO layers is MeZO; inter and intra streamed == resident hybrids written here; intra memory is linear
in p and its backward never forms a dense weight gradient; fo_layers=auto fits the budget."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zoedge
from zoedge.optim.first_order import FirstOrder
from zoedge.noise.source import NoiseSource, stream_seed
from zoedge.optim.sparse_delta import sample_entries
from zoedge.train.trainer import TrainSettings, Trainer
from zoedge_plugins.loho import LoHO
from zoedge_plugins.mezo import MeZO
from tests.plugin_harness import batches, run_streamed, zo_sgd_
from tests.test_first_order import resident_hybrid
from tests.test_mezo import resident_loss
from tests.tiny import CharTokenizer, toy_examples

STEPS, BS, LR, EPS, FO_LR, SEED = 5, 4, 1e-3, 1e-2, 0.05, 11


def trainer(store, out, steps=STEPS, in_place=None, **opts):
    ex = toy_examples()
    opt = LoHO(seed=SEED, lr=LR, eps=EPS, fo_lr=FO_LR, **opts)
    return Trainer(zoedge.load(store, in_place=in_place), CharTokenizer(), opt, ex, ex[:4], [],
                   TrainSettings(steps=steps, batch_size=BS, seed=SEED), out, progress=False, log=lambda s: None)


def train(t, steps=STEPS):
    got = []
    for _ in range(steps):
        t.train_step()
        got.append(t.last_losses)
    t.flush()
    return got


def layer_prefix(model, i):
    return f"model.decoder.layers.{i}." if model.config.model_type == "opt" else f"model.layers.{i}."


@pytest.mark.parametrize("mode", ["inter", "intra"])
def test_zero_fo_layers_is_mezo(tiny, mode):
    _, store = tiny
    ex = toy_examples()
    a = run_streamed(LoHO(seed=SEED, lr=LR, eps=EPS, fo_layers="0", mode=mode), store, ex, STEPS, BS, SEED)
    b = run_streamed(MeZO(seed=SEED, lr=LR, eps=EPS), store, ex, STEPS, BS, SEED)
    assert a[0] == b[0]
    for k in b[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def test_inter_equals_resident(tiny, tmp_path):
    model, store = tiny
    got = train(trainer(store, tmp_path, fo_layers="1"))
    ref, params = resident_hybrid(model, toy_examples(), layer_prefix(model, 2))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-6, atol=1e-6)


def resident_intra(model, examples, p, fo_prefix):
    """MeZO with z zeroed on a fraction p of each FO-layer matrix; those entries trained by SGD on the dense grad."""
    params = {n: q.detach().clone() for n, q in model.named_parameters()}
    entries = {}
    for n, q in params.items():
        if n.startswith(fo_prefix) and q.ndim == 2:
            name = n  # the store names tensors like the checkpoint
            rows, cols = sample_entries(tuple(q.shape), p, torch.Generator().manual_seed(
                stream_seed(SEED, 0, name, "fo_entries")))
            entries[n] = rows * q.shape[1] + cols
            q.requires_grad_(True)
    noise, losses = NoiseSource(SEED), []
    for t, batch in enumerate(batches(examples, STEPS, BS, SEED)):
        l0 = resident_loss(model, params, batch)
        l0.backward()
        with torch.no_grad():
            zs = {n: noise.normal(q.shape, t, n, "z0") for n, q in params.items()}
            for n, idx in entries.items():
                zs[n].view(-1)[idx] = 0
            step = [float(l0)] + [float(resident_loss(model, {n: q + a * zs[n] for n, q in params.items()}, batch))
                                  for a in (EPS, -EPS)]
            g = (step[1] - step[2]) / (2 * EPS)
            for n, q in params.items():
                zo_sgd_(q, [(zs[n], g)], 1, LR, 0.0)
                if n in entries:
                    q.view(-1).index_add_(0, entries[n], -FO_LR * q.grad.view(-1)[entries[n]])
                    q.grad = None
        losses.append(step)
    return losses, params


def test_intra_equals_resident(tiny, tmp_path):
    model, store = tiny
    t = trainer(store, tmp_path, fo_layers="1", mode="intra", intra_p=0.3)
    got = train(t)
    ref, params = resident_intra(model, toy_examples(), 0.3, layer_prefix(model, 2))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    state = t.model.state_dict()
    for n, q in params.items():
        torch.testing.assert_close(state[n], q.detach(), rtol=1e-5, atol=1e-6)


def test_intra_memory_linear_in_p_and_no_dense_grad(tiny, tmp_path, monkeypatch):
    model, store = tiny
    shapes = {tuple(q.shape) for n, q in model.named_parameters() if n.startswith(layer_prefix(model, 2)) and q.ndim == 2}
    seen = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # e.g. the transposed base weight: no new memory
                return out
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor):
                    seen.append(tuple(o.shape))
            return out

    real_step = FirstOrder.step

    def logged_step(self, loss):
        with Shapes():
            loss.backward()
        loss.backward = lambda: None  # already done
        real_step(self, loss)

    monkeypatch.setattr(FirstOrder, "step", logged_step)
    totals = {}
    for p in (0.1, 0.2, 0.4):
        t = trainer(store, tmp_path / str(p), steps=1, fo_layers="1", mode="intra", intra_p=p, fo_optimizer="adamw")
        totals[p] = t.fit().fo_memory["total"]
    assert seen and not shapes & set(seen)  # no dense (m, n) tensor is allocated in the FO backward
    assert totals[0.2] / totals[0.1] == pytest.approx(2, rel=0.05)
    assert totals[0.4] / totals[0.1] == pytest.approx(4, rel=0.05)
    dense = trainer(store, tmp_path / "inter", steps=1, fo_layers="1", fo_optimizer="adamw").fit().fo_memory["total"]
    assert totals[0.4] < 0.5 * dense


def test_auto_fo_layers_fits_the_budget(tiny):
    _, store = tiny
    blocks = zoedge.load(store).blocks
    per_block = sum(q.numel() * 4 for n, q in tiny[0].named_parameters() if n.startswith(layer_prefix(tiny[0], 2)))
    opt = LoHO(fo_layers="auto", fo_budget_mb=2.5 * 2 * per_block / 2**20)  # SGD: weights + grads
    assert opt.fo_blocks(blocks) == ["layers.1", "layers.2"]
    opt = LoHO(fo_layers="auto", fo_budget_mb=2.5 * 4 * per_block / 2**20, fo_optimizer="adamw")
    assert opt.fo_blocks(blocks) == ["layers.1", "layers.2"]
    with pytest.raises(ValueError, match="fo_budget_mb"):
        LoHO(fo_layers="auto")


def test_intra_several_fo_blocks_survive_slot_reuse(tiny, tmp_path):
    """Regression (found on an H200 and then on the CPU): with more FO blocks than the slots hold, autograd's
    saved weights of the grad pass were overwritten by later uploads before the backward ("modified by an
    inplace operation"). Three FO blocks (every layer), prefetch 1: the steps run and give the losses and weights
    of the CPU's in-place binding (no slot reused there)."""
    _, store = tiny
    # through slots, as on the GPU (bound in place on the CPU, no slot is reused)
    t = trainer(store, tmp_path / "slots", steps=2, fo_layers="3", mode="intra", intra_p=0.3, in_place=False)
    losses = train(t, steps=2)
    ref = trainer(store, tmp_path / "in-place", steps=2, fo_layers="3", mode="intra", intra_p=0.3)
    assert losses == train(ref, steps=2)
    got, want = t.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)

"""The framework owns the lazy update: each block gets a step's update exactly once, and it survives checkpoints."""
from __future__ import annotations

import pytest
import torch

from zoedge.cli import main
from zoedge.errors import PluginError
from zoedge.optim.api import Update, ZOOptimizer
from zoedge.optim.registry import register_optimizer
from zoedge.runtime.streamed import Resident
from zoedge_plugins.mezo import MeZO


class Workspaces:
    """The runtime's ``workspace`` for hand-made residents: one buffer per (key, tensor name)."""

    def __init__(self):
        self.bufs = {}

    def workspace(self, key, block):
        return {n: self.bufs.setdefault((key, n), torch.empty_like(t)) for n, t in block.tensors.items()}


def blocks():
    g, ws = torch.Generator().manual_seed(0), Workspaces()
    return [Resident(f"layers.{i}", i, {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)},
                     frozenset({"w", "b"}), runtime=ws) for i in range(2)]


def one_step(opt, bs, t=0):
    opt.begin_step(t)
    for b in bs:
        opt.on_resident(b)
        opt.pass_tensors(b, 0)
    return opt.finish_step([torch.tensor(1.5), torch.tensor(1.0)])


def test_double_application_is_refused():
    opt, bs = MeZO(seed=1, lr=0.1, eps=0.1), blocks()
    one_step(opt, bs)
    before = bs[0].tensors["w"].clone()
    opt.on_resident(bs[0])                          # the flush (or next step) applies it
    after = bs[0].tensors["w"].clone()
    assert not torch.equal(before, after) and bs[0].dirty
    with pytest.raises(PluginError, match="layers.0.*second time"):
        opt.apply_pending(bs[0])                    # the public API refuses a second application
    opt.on_resident(bs[0])                          # a second residency is a no-op
    assert torch.equal(bs[0].tensors["w"], after)


def test_an_update_cannot_be_dropped():
    opt, bs = MeZO(seed=1, lr=0.1, eps=0.1), blocks()
    one_step(opt, bs)
    opt.on_resident(bs[0])                          # layers.1 never resident again
    with pytest.raises(PluginError, match=r"never applied to \['layers.1'\]"):
        opt.flushed()
    with pytest.raises(PluginError, match=r"never applied to \['layers.1'\]"):
        one_step(opt, bs[:1], t=1)


def test_pending_update_survives_state_dict():
    """A checkpoint taken mid-application: the restored optimizer applies the rest, once."""
    a, ba = MeZO(seed=2, lr=0.1, eps=0.1), blocks()
    one_step(a, ba)
    a.on_resident(ba[0])
    b, bb = MeZO(seed=2, lr=0.1, eps=0.1), [Resident(x.name, x.index, {k: v.clone() for k, v in x.tensors.items()},
                                                      x.writable, runtime=x.runtime) for x in ba]
    b.load_state_dict(a.state_dict())
    for opt, bs in ((a, ba), (b, bb)):
        for blk in bs:
            opt.on_resident(blk)
        opt.flushed()
    for x, y in zip(ba, bb):
        for k in x.tensors:
            assert torch.equal(x.tensors[k], y.tensors[k])


def test_plugin_may_not_override_framework_methods():
    with pytest.raises(PluginError, match="overrides the framework method.*on_resident"):
        @register_optimizer("sneaky")
        class Sneaky(ZOOptimizer):
            def on_resident(self, block):
                pass

            def perturb(self, block, p):
                return block.tensors

            def end_step(self, losses):
                return Update()

            def apply(self, block, update):
                pass


def test_end_step_must_return_an_update():
    class Bad(MeZO):
        def end_step(self, losses):
            return {"g": 1.0}

    opt = Bad()
    opt.begin_step(0)
    with pytest.raises(PluginError, match="not an Update"):
        opt.finish_step([torch.tensor(1.0), torch.tensor(1.0)])


def test_cli_lr_eps_only_for_plugins_that_have_them(tmp_path, capsys):
    @register_optimizer("noeps")
    class NoEps(MeZO):
        def __init__(self, *, seed: int = 0, lr: float = 1e-3) -> None:
            super().__init__(seed=seed, lr=lr)

    code = main(["finetune", "--optimizer", "noeps", "--eps", "0.1", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--eps" in err and "has no option 'eps'" in err and "lr" in err

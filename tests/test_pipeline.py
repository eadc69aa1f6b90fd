"""Concurrent decoder layers (zoedge/runtime/pipeline.py): the scheduler's rules; training on them equals training
one layer after another for every built-in plugin that allows it (up to the matrix kernels' rounding of smaller
batches), and is itself deterministic, bit for bit."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import zoedge
from zoedge.optim.registry import build
from zoedge.runtime import pipeline as pl
from zoedge.runtime.streamed import LAYER_SET, BlockVisitor
from zoedge.runtime.threads import ThreadChoice
from zoedge.train.trainer import TrainSettings, Trainer, _loss_passes
from tests.plugin_harness import batches
from tests.tiny import CharTokenizer, save_tiny, toy_examples


class Recorder:
    """A synthetic pipeline: layer j adds j + 1 to a chain's state (pass p's weights add 100·p more); records every
    hook with the set of chains that had run each layer when it ran, and how many hooks ran at once."""

    def __init__(self, layers: int, chains: int, passes: int = 2, slow_worker: int | None = None) -> None:
        self.layers, self.chains, self.passes, self.slow = layers, chains, passes, slow_worker
        self.events: list[tuple[str, int]] = []
        self.ran = [[False] * layers for _ in range(chains)]
        self.active = self.most_active = 0
        self.by_worker: dict[int, int] = {}
        self.lock = threading.Lock()

    def _hook(self, kind: str, j: int) -> None:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.events.append((kind, j))
        time.sleep(0.001)
        with self.lock:
            self.active -= 1

    def prep(self, j: int, slot: int):
        assert slot == j % pl.SLOTS
        self._hook("prep", j)
        return [{"w": torch.tensor(float(j + 1 + 100 * p))} for p in range(self.passes)]

    def step(self, w: int, j: int, k: int, weights, x):
        assert ("prep", j) in self.events and ("done", j) not in self.events
        assert torch.get_num_threads() == 1  # the worker's own intra-op threads
        with self.lock:
            self.ran[k][j] = True
            self.by_worker[w] = self.by_worker.get(w, 0) + 1
        time.sleep(0.004 if w == self.slow else 0.001)
        return x + weights["w"]

    def done(self, j: int) -> None:
        assert all(self.ran[k][j] for k in range(self.chains)), f"layer {j} done before every chain ran it"
        self._hook("done", j)


def run_recorder(rec: Recorder, workers: int = 2):
    pass_of = [k % rec.passes for k in range(rec.chains)]
    pipe = pl.LayerPipeline(rec.layers, [torch.zeros(()) for _ in range(rec.chains)], pass_of, rec.prep, rec.step,
                            rec.done, workers)
    return pipe, pipe.run(), pass_of


def test_every_chain_runs_every_layer_with_its_pass_weights_and_hooks_keep_their_order():
    rec = Recorder(layers=9, chains=4)
    pipe, ends, pass_of = run_recorder(rec)
    for k, x in enumerate(ends):
        assert float(x) == sum(j + 1 + 100 * pass_of[k] for j in range(9))
    preps = [j for kind, j in rec.events if kind == "prep"]
    dones = [j for kind, j in rec.events if kind == "done"]
    assert preps == list(range(9)) and dones == list(range(9))
    for j in range(pl.SLOTS, 9):  # a layer's workspaces are reused only after the layer SLOTS back is done
        assert rec.events.index(("done", j - pl.SLOTS)) < rec.events.index(("prep", j))
    assert rec.most_active == 1  # the visitor's hooks never ran at the same time
    assert pipe.seconds["chain"] > 0 and pipe.seconds["wall"] > 0
    assert sum(pipe.seconds[k] for k in ("prep", "chain", "done", "idle")) == pytest.approx(2 * pipe.seconds["wall"])


def test_a_slow_worker_takes_fewer_items():
    """The work is shared as it goes, not split in advance: a worker whose items take four times as long (a
    core shared with another process) runs fewer of them, and the chains still finish together."""
    rec = Recorder(layers=20, chains=4, slow_worker=1)
    run_recorder(rec)
    assert rec.by_worker[0] > 2 * rec.by_worker.get(1, 0)
    assert sum(rec.by_worker.values()) == 20 * 4


def test_a_worker_error_reaches_the_caller():
    rec = Recorder(layers=6, chains=2)
    step = rec.step

    def failing(w, j, k, weights, x):
        if j == 3:
            raise RuntimeError("layer 3 broke")
        return step(w, j, k, weights, x)

    rec.step = failing
    with pytest.raises(RuntimeError, match="layer 3 broke"):
        run_recorder(rec)
    assert ("done", 3) not in rec.events  # nothing ran past the failure


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two usable cores")
def test_workers_are_pinned_one_per_core():
    cores: dict[int, set[int]] = {}

    def step(w, j, k, weights, x):
        cores.setdefault(w, set()).update(os.sched_getaffinity(0))
        return x

    pipe = pl.LayerPipeline(4, [torch.zeros(())] * 2, [0, 1], lambda j, s: [{}, {}], step, lambda j: None, 2)
    pipe.run()
    allowed = sorted(os.sched_getaffinity(0))
    assert {w: sorted(c) for w, c in cores.items()} == {w: [allowed[w]] for w in cores}
    assert len(os.sched_getaffinity(0)) == len(allowed)  # the caller's own affinity is untouched


def test_row_ranges_cover_the_batch():
    assert pl.row_ranges(16) == [(0, 8), (8, 16)]
    assert pl.row_ranges(3, 2) == [(0, 1), (1, 3)]
    assert pl.row_ranges(1) == [(0, 1)]


def test_workers_follow_the_policy_cap_or_threads():
    """One single-threaded worker per core the policy allows, busy or not (they share work as it goes), or per
    ``--threads``; past MAX_LAYER_WORKERS, workers of several threads."""
    quiet = ThreadChoice(2, 2, "affinity", 0.1, cap=2)
    busy = ThreadChoice(1, 2, "idle cores (1.0 of 2 busy with other processes)", 1.0, others_busy=1.0, cap=2)
    forced = ThreadChoice(3, 2, "--threads", 0.1, cap=3)
    big = ThreadChoice(16, 16, "affinity", 0.1, cap=16)
    assert [(c.workers, c.worker_threads) for c in (quiet, busy, forced, big)] == [(2, 1), (2, 1), (3, 1), (4, 4)]
    assert busy.to_dict()["workers"] == 2 and big.to_dict()["worker_threads"] == 4


def test_workers_are_pinned_only_one_per_core_single_threaded():
    def pins(workers, threads, cpus):
        return pl.LayerPipeline(1, [], [], None, None, None, workers, threads, cpus).cpus

    assert pins(2, 1, [0, 1]) == [0, 1]
    assert pins(2, 1, [0, 1, 2, 3]) == []  # fewer workers than cores (ranks sharing a box): the OS places them
    assert pins(4, 4, list(range(16))) == []  # several threads each: they would share the pinned core


# ------------------------------------------------------------------------------------------ on a streamed model
STEPS, BS, SEED = 4, 4, 3
#: case -> (plugin, options): every built-in that declares ``concurrent`` (DiZO with its projection phases)
PLUGINS = {"mezo": ("mezo", {"lr": 1e-3, "eps": 1e-2, "weight_decay": 0.1}), "mezo-q2": ("mezo", {"q": 2, "lr": 1e-3}),
           "mezo-pool": ("mezo", {"noise": "pool"}), "hzo": ("hzo", {"nu": 2, "lr": 1e-3}),
           "hizoo-l": ("hizoo-l", {"lr": 1e-3}), "dizo": ("dizo", {"cycle": 2, "iters": 2})}


def train(store, tmp, plugin: str, options: dict, workers: int):
    """STEPS trainer steps then a flush; (per-step pass losses, weights, the concurrent layers' seconds)."""
    model = zoedge.load(store, workers=workers)
    opt = build(plugin, options, seed=SEED)
    ex = toy_examples()
    trainer = Trainer(model, CharTokenizer(), opt, ex, ex[:4], [], TrainSettings(steps=STEPS, batch_size=BS, seed=SEED),
                      tmp / f"run-{workers}", progress=False, log=lambda s: None)
    losses = []
    for _ in range(STEPS):
        trainer.train_step()
        losses.append(list(trainer.last_losses))
    trainer.flush()
    return losses, model.state_dict(), model.layer_seconds


@pytest.fixture(scope="module", params=["llama", "opt"])
def store(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    save_tiny(request.param, d / "hf", layers=4)
    zoedge.prepare(d / "hf", d / "store", progress=False, log=lambda s: None)
    return d / "store"


@pytest.mark.parametrize("case", sorted(PLUGINS))
def test_concurrent_layers_train_as_sequential(store, case, tmp_path):
    """Every loss and every final weight with the layers on two workers equal to one layer after another (left
    padding and scored positions included: toy batches have both), up to the matrix kernels' rounding; and a
    second concurrent run repeats the first bit for bit (what a resumed run relies on)."""
    plugin, options = PLUGINS[case]
    ref_losses, ref_state, ref_seconds = train(store, tmp_path / "a", plugin, options, 0)
    losses, state, seconds = train(store, tmp_path / "b", plugin, options, 2)
    assert not ref_seconds and seconds["chain"] > 0  # the pipeline ran (and only in the second run)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert state.keys() == ref_state.keys()
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-5, atol=1e-6, msg=k)
    again_losses, again_state, _ = train(store, tmp_path / "c", plugin, options, 2)
    assert again_losses == losses
    assert all(torch.equal(again_state[k], state[k]) for k in state)


def test_only_visitors_that_allow_it_run_concurrently(store):
    model = zoedge.load(store, workers=2)
    from zoedge.runtime.run_loop import PassState as _PassState
    state = _PassState(model, BlockVisitor(), None)
    state.compute = True
    assert model._concurrent_layers(BlockVisitor(), state) is None  # a plain visitor does not declare it
    opt = build("mezo", {}, seed=0)
    assert model._concurrent_layers(opt, state) is not None
    model.workers = 1
    assert model._concurrent_layers(opt, state) is None
    model.workers = 2
    lean = zoedge.load(store, workers=2, in_place=False)
    assert lean._concurrent_layers(opt, _PassState(lean, opt, None)) is None


def test_each_resident_layer_and_pass_has_its_own_scratch(store):
    """The workspaces of concurrently resident layers are their set's own, and ``scratch`` is per pass while a
    pass's weights are formed; all sized to the largest decoder layer, not to the embedding."""
    model = zoedge.load(store, workers=2)
    opt = build("mezo", {"lr": 1e-3}, seed=0)
    opt.begin_step(0)
    batch = batches(toy_examples(), 1, BS, SEED)[0]
    opt.finish_step([l for l, _ in _loss_passes(model, opt, batch)])
    keys = sorted(k for k in model._workspaces if k.startswith(LAYER_SET))
    assert {f"{LAYER_SET}{s}.scratch.pass{p}" for s in range(pl.SLOTS) for p in range(2)} <= set(keys)
    largest = max(b.nbytes for b in model.blocks if b.name.startswith("layers."))
    assert all(model._workspaces[k].numel() <= largest for k in keys)


@pytest.mark.parametrize("rows", [6, 5])
def test_the_plain_forward_runs_concurrently_and_equals_the_sequential_one(store, rows):
    """Evaluation's forward (left padding, every position's logits) on two workers equals it one layer after
    another, up to the matrix kernels' rounding of fewer rows at a time (seen: a unit in the last place)."""
    from tests.tiny import batch
    ids, mask = batch(b=rows, t=9)
    one, two = zoedge.load(store), zoedge.load(store, workers=2)
    expected = one.forward(ids, mask)
    got = two.forward(ids, mask)
    assert two.layer_seconds["chain"] > 0 and not one.layer_seconds
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_a_hook_error_on_a_worker_reaches_the_caller_with_its_message(tmp_path):
    """A plugin error raised in a layer's preparation on a worker (a dense perturbation of an int8 store) is the
    same clear error the sequential loop gives, raised in the caller's thread."""
    save_tiny("llama", tmp_path / "hf", layers=3)
    zoedge.prepare(tmp_path / "hf", tmp_path / "int8", quant="int8", progress=False, log=lambda s: None)
    opt = build("mezo", {}, seed=0)
    batch = batches(toy_examples(), 1, BS, SEED)[0]
    for workers in (0, 2):
        model = zoedge.load(tmp_path / "int8", workers=workers)
        opt.begin_step(0)
        with pytest.raises(zoedge.errors.ConfigError, match="stored quantized"):
            _loss_passes(model, opt, batch)
        assert bool(model.layer_seconds) == (workers == 2)  # raised by a worker of the concurrent layers


def test_the_layers_run_one_after_another_where_their_workspaces_would_not_fit(store, monkeypatch):
    """Before the concurrent layers first allocate their workspaces (3 sets of every pass's scratch and a noise
    buffer), the runtime checks them against half the memory available; too little, and the layers run one after
    another for the rest of the run, with the reason in ``layer_mode`` (the run summary's ``threads.layers``)."""
    import zoedge.runtime.concurrent_layers as streamed
    batch = batches(toy_examples(), 1, BS, SEED)[0]
    opt = build("mezo", {}, seed=0)
    roomy = zoedge.load(store, workers=2)
    opt.begin_step(0)
    opt.finish_step([l for l, _ in _loss_passes(roomy, opt, batch)])
    assert roomy.layer_mode() == "concurrent, 2 workers"
    monkeypatch.setattr(streamed, "available_memory", lambda: 1000)
    tight = zoedge.load(store, workers=2)
    opt.begin_step(1)
    opt.finish_step([l for l, _ in _loss_passes(tight, opt, batch)])
    assert not tight.layer_seconds and not any(k.startswith(LAYER_SET) for k in tight._workspaces)
    assert tight.layer_mode().startswith("one after another: their workspaces (3 layers x (2 passes + noise)")
    assert "0.0 GiB" in tight.layer_mode()  # the memory available, as found

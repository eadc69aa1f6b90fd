"""Data-parallel ZO on torch.distributed (2 gloo processes on 127.0.0.1) against one process with the same batch.

Tolerance: the ranks all-reduce each pass's (mean loss · count, count) and divide, and shard batches are padded to
their own length, so a pass's loss differs from the one-process mean by floating-point rounding (~1e-7 relative);
the projected gradient (L+ - L-) / 2ε turns that into ~1e-5 of g, and the weights differ by lr·Δg·z: measured 1.2e-7 at most (fp32 rounding of the updated weights), losses 1.6e-7 relative.
The ranks themselves must agree bit for bit (they apply the same update from the same all-reduced scalars).

Direction-split mode (``dp_mode="directions"``): every rank computes its directions' passes on the whole batch, as
one process does, and the gathered losses are copied exactly (float64), so losses and weights are bit-equal to one
process with the same intra-op thread count (the reference runs with the ranks' one thread: a matrix product's
summation order may depend on it).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zoedge
from zoedge.train.trainer import TrainSettings, Trainer
from tests.tiny import CharTokenizer, save_tiny, toy_examples

STEPS, BATCH = 6, 5  # shards of 3 and 2 examples: uneven on purpose


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


def make_trainer(store, out, world=None, steps=STEPS, plugin="mezo", q=1, **kw):
    from zoedge_plugins.hizoo import HiZOOL
    from zoedge_plugins.loho import LoHO
    from zoedge_plugins.mezo import MeZO
    ex = toy_examples()
    opt = (MeZO(seed=3, lr=1e-3, eps=1e-2, weight_decay=0.01, q=q) if plugin == "mezo" else
           HiZOOL(seed=3, lr=1e-3) if plugin == "hizoo-l" else
           LoHO(seed=3, lr=1e-3, eps=1e-2, fo_layers="1", fo_lr=0.05))  # the last block trained first-order
    return Trainer(zoedge.load(store), CharTokenizer(), opt, ex,
                   ex[:7], ex[:4], TrainSettings(steps=steps, batch_size=BATCH, seed=3, eval_batch_size=2, **kw),
                   out, progress=False, log=lambda s: None, world=world)


def _worker(rank: int, size: int, port: int, store: str, out: str, mode: str, kw: dict) -> None:
    """One rank: join the gloo group from the environment (as torchrun sets it), train, save its weights."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size))
    from zoedge.errors import ZoedgeError
    from zoedge.train.world import World
    # a silent rank is reported after timeout_s: the dead-rank test waits it out once, the others never reach it
    world = World.from_env("cpu", timeout_s=12 if mode == "die" else 20, check_every=2)
    try:
        t = make_trainer(Path(store), Path(out), world, **kw)
        if mode == "resume":
            t.resume()
        if mode == "diverge" and rank == 1:  # a rank whose weights drifted (e.g. a different kernel)
            w = t.model.state_dict()
            w["model.layers.0.mlp.up_proj.weight"][0, 0] += 1e-3
            t.model.load_state_dict(w)
        if mode == "die" and rank == 1:
            step = t.train_step
            t.train_step = lambda: os._exit(9) if t.step == 3 else step()  # type: ignore[method-assign]
        result = t.fit()
        torch.save({"weights": t.model.state_dict(), "after": result.after}, Path(out) / f"rank{rank}.pt")
    except ZoedgeError as e:
        (Path(out) / f"rank{rank}.err").write_text(str(e))
        os._exit(e.exit_code)
    finally:
        world.close()


def launch(store, out: Path, mode: str = "plain", size: int = 2, timeout: float = 120, **kw) -> list[int | None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("forkserver")  # a fresh process per rank, forked from one that has imported these once
    ctx.set_forkserver_preload(["torch", "transformers", "zoedge.train.trainer", __name__])
    procs = [ctx.Process(target=_worker, args=(r, size, port, str(store), str(out), mode, kw)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def losses_of(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    t = make_trainer(store, out)
    result = t.fit()
    return losses_of(out), t.model.state_dict(), result.after


def assert_close_weights(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_two_ranks_equal_one_process(store, reference, tmp_path):
    assert launch(store, tmp_path) == [0, 0]
    ref_losses, ref_weights, ref_after = reference
    losses = losses_of(tmp_path)  # rank 0 alone writes: one line per step
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["weights"]:  # the ranks agree bit for bit
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert_close_weights(r0["weights"], ref_weights)
    moved = (r0["weights"]["model.layers.0.mlp.up_proj.weight"] - zoedge.load(store).state_dict()[
        "model.layers.0.mlp.up_proj.weight"]).abs().max()
    assert moved > 1e-4  # the tolerance above is far below what training changed
    # sharded evaluation, gathered: same figures as one process
    assert r0["after"]["examples"] == ref_after["examples"] == 7
    assert r0["after"]["accuracy"] == ref_after["accuracy"]
    assert r0["after"]["loss"] == pytest.approx(ref_after["loss"], rel=1e-5)
    ckpts = list((tmp_path / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1  # written once, by rank 0


def test_diverged_rank_stops_every_rank_naming_the_step(store, tmp_path):
    codes = launch(store, tmp_path, "diverge")
    assert codes == [3, 3]
    for r in (0, 1):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "step 2" in err and "diverged" in err and "[1]" in err, err


def test_dead_rank_is_named_and_resume_matches(store, reference, tmp_path):
    t0 = time.monotonic()
    codes = launch(store, tmp_path, "die", save_every=2)
    assert codes[1] == 9 and codes[0] == 3, codes
    assert time.monotonic() - t0 < 90
    err = (tmp_path / "rank0.err").read_text()
    assert "rank(s) [1] stopped answering" in err and "--resume" in err, err
    assert losses_of(tmp_path)[:2] == pytest.approx(reference[0][:2], rel=1e-5)
    assert launch(store, tmp_path, "resume", save_every=2) == [0, 0]
    assert_close_weights(torch.load(tmp_path / "rank0.pt", weights_only=True)["weights"], reference[1])


def test_first_order_blocks_all_reduce_their_gradients(store, tmp_path):
    """LoHO: the first-order block's gradient is the global-batch mean's (local shares summed over ranks)."""
    ref = make_trainer(store, tmp_path / "ref", plugin="loho")
    ref.fit()
    assert launch(store, tmp_path / "dp", plugin="loho") == [0, 0]
    torch.testing.assert_close(torch.tensor(losses_of(tmp_path / "dp")), torch.tensor(losses_of(tmp_path / "ref")),
                               rtol=1e-5, atol=0)
    got, want = torch.load(tmp_path / "dp" / "rank0.pt", weights_only=True)["weights"], ref.model.state_dict()
    assert_close_weights(got, want)
    name = "model.layers.2.mlp.down_proj.weight"  # in the first-order block: moved by the gradient steps
    assert (want[name] - zoedge.load(store).state_dict()[name]).abs().max() > 1e-4


# ------------------------------------------------------------------ direction-split mode
@pytest.mark.parametrize("q", [2, 3])  # 3 directions on 2 ranks: an uneven split (2 and 1)
def test_direction_split_equals_one_process_bit_for_bit(store, tmp_path, q):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        ref = make_trainer(store, tmp_path / "ref", q=q)
        ref.fit()
    finally:
        torch.set_num_threads(threads)
    assert launch(store, tmp_path / "dp", q=q, dp_mode="directions") == [0, 0]
    assert losses_of(tmp_path / "dp") == losses_of(tmp_path / "ref")  # exact
    want = ref.model.state_dict()
    for r in (0, 1):
        got = torch.load(tmp_path / "dp" / f"rank{r}.pt", weights_only=True)["weights"]
        for k in want:
            assert torch.equal(got[k], want[k]), (r, k)
    metrics = [json.loads(x) for x in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    ref_metrics = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [m["projected_grad"] for m in metrics] == [m["projected_grad"] for m in ref_metrics]
    assert [m["tokens"] for m in metrics] == [m["tokens"] for m in ref_metrics]  # the whole batch, once


def test_direction_split_draws_only_this_ranks_directions(store, tmp_path):
    from zoedge.train.world import World
    t = make_trainer(store, tmp_path, World(1, 2), q=3, dp_mode="directions")  # rank 1 of 2: direction 2
    assert t.split.order == [4, 5] and t.split.visitor.passes == 2
    assert [t.opt.evaluates(k) for k in range(3)] == [False, False, True]
    assert t.shares() == {"per_rank_batch": [BATCH, BATCH], "per_rank_directions": [2, 1]}
    t.opt.begin_step(0)
    t.model.run(t.split.visitor)  # a visit during a step: draws the step's noise
    assert {k for k in t.model._workspaces if k.startswith("z")} == {"z2"}  # memory for its own direction only


@pytest.mark.parametrize("plugin, q, size, message", [
    ("mezo", 1, 2, "1 direction(s) per step cannot be split across 2 ranks"),
    ("mezo", 2, 3, "2 direction(s) per step cannot be split across 3 ranks"),
    ("hizoo-l", 1, 2, "cannot split its passes by direction"),
    ("loho", 1, 2, "trains first-order tensors"),
])
def test_direction_split_refuses_what_it_cannot_split(store, tmp_path, plugin, q, size, message):
    from zoedge.errors import ConfigError
    from zoedge.train.world import World
    with pytest.raises(ConfigError) as e:
        make_trainer(store, tmp_path, World(0, size), plugin=plugin, q=q, dp_mode="directions")
    assert "--dp-mode" in str(e.value) and message in str(e.value), str(e.value)
    make_trainer(store, tmp_path, World(0, size), plugin=plugin, q=q)  # the batch split takes them all


# ------------------------------------------------------------------ accelerate launch, end to end
def test_accelerate_launch_two_cpu_processes_split_directions_like_one_process(tmp_path, monkeypatch):
    """`accelerate launch --multi_gpu` is torchrun underneath and needs no GPU: 2 CPU processes (gloo), direction-split
    mode through the command line, bit-equal to one `zoedge finetune` process (both with one thread)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zoedge.cli import main
    from zoedge.train.demo_task import demo_examples
    from tests.test_tasks import _tokenizer
    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path / "hf")
    _tokenizer(bos=True).save_pretrained(tmp_path / "hf")
    rows = [{"sentence": e.prompt[: -len(" It was")], "label": e.label} for e in demo_examples(40, seed=1)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["finetune", "--model", str(tmp_path / "hf"), "--train", str(tmp_path / "train.jsonl"), "--batch-size", "4",
            "--n-train", "24", "--n-dev", "8", "--n-test", "0", "--steps", "3", "--eval-every", "0", "--lr", "1e-3",
            "--eps", "1e-2", "--opt", "q=2", "--threads", "1", "--no-progress", "--no-plot"]
    threads = torch.get_num_threads()
    try:
        assert main(args + ["--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(port), "--no_python", "zoedge", *args,
                          "--dp-mode", "directions", "--output", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["per_rank_directions"] == [1, 1]
    assert summary["per_rank_batch"] == [4, 4] and summary["settings"]["dp_mode"] == "directions"
    assert losses_of(tmp_path / "two") == losses_of(tmp_path / "one")
    one, two = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_direction_split_runs_shared_passes_on_every_rank_and_checks_the_plugins_declaration(store, tmp_path):
    """A plugin with an unperturbed pass 0 shared by all directions: every rank runs it; a bad declaration is refused."""
    from zoedge.errors import ConfigError
    from zoedge.train.world import DirectionSplit, World
    from zoedge_plugins.mezo import MeZO

    class Centered(MeZO):  # pass 0 at θ, then the ± passes of each direction
        def __init__(self, *, seed: int = 0, bad: bool = False) -> None:
            super().__init__(seed=seed, q=3)
            self.passes, self.bad = 7, bad

        def direction_passes(self):
            return [[1, 2], [2, 3], [5, 6]] if self.bad else [[1 + 2 * k, 2 + 2 * k] for k in range(3)]

    split = DirectionSplit(Centered(), World(1, 2))  # rank 1 of 2: direction 2
    assert split.order == [0, 5, 6] and split.visitor.passes == 3
    assert split.longest == 5  # rank 0: pass 0 and directions 0, 1
    with pytest.raises(ConfigError, match="must name distinct passes"):
        DirectionSplit(Centered(bad=True), World(0, 2))

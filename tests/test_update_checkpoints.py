"""Checkpoints of updates (``--checkpoint-weights updates``): a few KB of update log instead of the weights, replayed
onto the base store on resume, bit-equal to the uninterrupted run and to a resume from full weights; refused onto
another store, with a plugin that cannot replay, and after a checkpoint without a log; ``auto`` picks by free disk.
"""
from __future__ import annotations

import json

import pytest
import torch

import zoedge
from zoedge.errors import ConfigError, PluginError, StoreError
from zoedge.optim.api import Update
from zoedge.optim.registry import build
from zoedge.train import trainer as trainer_module
from zoedge.train.checkpoint import latest_checkpoint
from zoedge.train.trainer import TrainSettings, Trainer
from tests.test_cli_finetune import setup  # noqa: F401 (a fixture: a tiny model with a tokenizer and data)
from tests.tiny import CharTokenizer, save_tiny, toy_examples
from zoedge_plugins.mezo import MeZO

STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("updates")
    out = {}
    for family, seed in (("llama", 0), ("opt", 0), ("llama", 1)):
        save_tiny(family, root / f"hf-{family}-{seed}", seed=seed)
        zoedge.prepare(root / f"hf-{family}-{seed}", root / f"store-{family}-{seed}", progress=False,
                       log=lambda s: None)
        out[family, seed] = root / f"store-{family}-{seed}"
    return out


def make(store, out, tier="ram", optimizer="mezo", opts=None, log=None, **kw):
    working = out / "working" if tier == "disk" else None
    model = zoedge.load(store, tier=tier, working_dir=working)
    opts = opts or {"lr": "1e-3", "eps": "1e-2", "weight_decay": "0.01"}
    ex = toy_examples()
    settings = TrainSettings(**{"steps": STEPS, "batch_size": 4, "seed": 5, "schedule": "linear",
                                "eval_every": 0, **kw})
    return Trainer(model, CharTokenizer(), build(optimizer, opts, seed=5), ex, ex[:4], [], settings, out,
                   progress=False, log=log or (lambda s: None))


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def interrupted(store, out, tier, kind, stale_steps=2):
    """SAVE_AT steps, a checkpoint, then ``stale_steps`` more steps whose write-backs (the disk tier's working
    copy) outlive the 'killed' run, which never checkpoints them; then a resumed run to STEPS."""
    run = make(store, out, tier, checkpoint_weights=kind)
    first = [run.train_step()["loss"] for _ in range(SAVE_AT)]
    run.save()
    for _ in range(stale_steps):  # step SAVE_AT+1 applies update SAVE_AT to every block: written back
        run.train_step()
    run.model.close()
    messages: list[str] = []
    resumed = make(store, out, tier, checkpoint_weights=kind, log=messages.append)
    assert resumed.resume() and resumed.step == SAVE_AT
    resumed.fit()
    return first + losses(out), resumed, messages


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_resume_from_updates_is_bit_equal(stores, tmp_path, family, tier):
    """Killed after a checkpoint of updates and resumed == uninterrupted (and, llama, == resumed from weights)."""
    store = stores[family, 0]
    straight = make(store, tmp_path / "straight", tier, checkpoint_weights="full")
    straight.fit()
    got, resumed, messages = interrupted(store, tmp_path / "updates", tier, "updates")
    assert got == losses(tmp_path / "straight")
    others = [straight.model.state_dict()]
    if family == "llama":  # the same as a resume from a checkpoint of the weights
        got_full, from_full, _ = interrupted(store, tmp_path / "full", tier, "full")
        assert got_full == got
        full = latest_checkpoint(tmp_path / "full" / "checkpoints")
        assert full is not None and (full / "model.safetensors").is_file()
        others.append(from_full.model.state_dict())
    b = resumed.model.state_dict()
    for a in others:
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert resumed.replayed is not None and resumed.replayed["updates"] == SAVE_AT
    assert resumed.replayed["block_updates"] == SAVE_AT * len(resumed.model.blocks)
    assert any(m.startswith(f"replaying {SAVE_AT} update(s)") for m in messages)
    # the checkpoints hold no weights and are a few KB
    ckpt = latest_checkpoint(tmp_path / "updates" / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step-{STEPS:08d}"
    assert not (ckpt / "model.safetensors").exists()
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 16_000
    state = json.loads((ckpt / "state.json").read_text())
    assert state["weights"] == "updates" and len(state["updates"]["log"]) == STEPS
    assert [e["step"] for e in state["updates"]["log"]] == list(range(STEPS))


def test_disk_replay_ignores_the_stale_working_copy(stores, tmp_path, monkeypatch):
    """A killed run's working copy holds update SAVE_AT (written back after the checkpoint): replaying onto it
    instead of the store gives other weights, so the reset to the base is what makes the resume right."""
    from zoedge.runtime.host import DiskTier
    store = stores["llama", 0]
    straight = make(store, tmp_path / "straight", "disk", checkpoint_weights="full")
    for _ in range(SAVE_AT):
        straight.train_step()
    straight.flush()
    run = make(store, tmp_path / "run", "disk", checkpoint_weights="updates")
    for _ in range(SAVE_AT):
        run.train_step()
    run.save()
    run.train_step()
    run.train_step()  # applies update SAVE_AT to every block: the working copy moves past the checkpoint
    run.model.close()
    assert any((tmp_path / "run" / "working").iterdir())
    monkeypatch.setattr(DiskTier, "reset_to_base", lambda self: None)  # what a resume without the reset does
    bad = make(store, tmp_path / "run", "disk", checkpoint_weights="updates")
    bad.resume()
    assert not all(torch.equal(v, bad.model.state_dict()[k]) for k, v in straight.model.state_dict().items())
    bad.model.close()
    monkeypatch.undo()
    good = make(store, tmp_path / "run", "disk", checkpoint_weights="updates")
    good.resume()
    a, b = straight.model.state_dict(), good.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_replay_onto_another_store_is_refused(stores, tmp_path):
    run = make(stores["llama", 0], tmp_path, checkpoint_weights="updates")
    run.train_step()
    path = run.save()
    other = make(stores["llama", 1], tmp_path, checkpoint_weights="updates")
    with pytest.raises(StoreError) as e:
        other.resume()
    text = str(e.value)
    assert str(path) in text and str(stores["llama", 1]) in text and str(stores["llama", 0]) in text


@pytest.mark.parametrize("name,opts", [("hizoo-l", {"lr": "1e-3"}), ("dizo", {"cycle": "2"}),
                                       ("hzo", {"rank": "2"}), ("loho", {"fo_layers": "1"})])
def test_non_replayable_plugins_refuse_updates_and_auto_writes_weights(stores, tmp_path, name, opts, monkeypatch):
    with pytest.raises(ConfigError) as e:
        make(stores["llama", 0], tmp_path / "u", optimizer=name, opts=opts, checkpoint_weights="updates")
    text = str(e.value)
    assert "--checkpoint-weights" in text and name in text and "full" in text
    monkeypatch.setattr(trainer_module, "free_disk", lambda path: 0)  # no room: still the weights
    run = make(stores["llama", 0], tmp_path / "a", optimizer=name, opts=opts, checkpoint_weights="auto")
    assert run.checkpoint_kind() == "full" and "cannot be replayed" in run.checkpoint_choice["reason"]


def test_auto_picks_by_free_disk(stores, tmp_path, monkeypatch):
    free = {"bytes": 10**15}
    monkeypatch.setattr(trainer_module, "free_disk", lambda path: free["bytes"])
    messages: list[str] = []
    run = make(stores["llama", 0], tmp_path, checkpoint_weights="auto", log=messages.append, keep_checkpoints=3)
    run.train_step()
    full = run.save()
    assert (full / "model.safetensors").is_file() and run.checkpoint_choice["kind"] == "full"
    free["bytes"] = 10_000  # the disk filled up: the next checkpoint holds the updates
    run.train_step()
    small = run.save()
    assert not (small / "model.safetensors").exists() and run.checkpoint_choice["kind"] == "updates"
    assert "does not fit" in run.checkpoint_choice["reason"]
    assert [m for m in messages if m.startswith("checkpoints hold")] == [
        m for m in messages if "the weights (auto" in m or "the update log (auto" in m]
    # resuming from the full checkpoint (it carries the log under auto) can go on writing updates
    (tmp_path / "checkpoints" / small.name).rename(tmp_path / "elsewhere")
    (tmp_path / "checkpoints" / "latest").write_text(full.name)
    again = make(stores["llama", 0], tmp_path, checkpoint_weights="updates")
    assert again.resume() and again.step == 1 and again.updates is not None and len(again.updates) == 1


def test_updates_after_a_checkpoint_of_weights_without_log_is_refused(stores, tmp_path):
    run = make(stores["llama", 0], tmp_path, checkpoint_weights="full")
    run.train_step()
    path = run.save()
    assert "updates" not in json.loads((path / "state.json").read_text())  # a full run's checkpoint: as before
    with pytest.raises(ConfigError, match="written with full"):
        make(stores["llama", 0], tmp_path, checkpoint_weights="updates").resume()
    auto = make(stores["llama", 0], tmp_path, checkpoint_weights="auto")
    assert auto.resume() and auto.checkpoint_kind() == "full"


def test_cli_run_with_updates_checkpoints_resumes_and_reports(setup, capsys):
    """`zoedge finetune --checkpoint-weights updates` on the disk tier: small checkpoints, --resume replays them,
    summary.json says which kind and what the replay cost; the export equals an uninterrupted run's (--no-export
    writes none)."""
    from safetensors.torch import load_file
    from zoedge.cli import main
    tmp, _, base = setup
    base = base + ["--tier", "disk", "--eval-every", "0", "--n-dev", "4", "--n-test", "0", "--no-plot"]
    assert main(base + ["--steps", "3", "--output", str(tmp / "straight")]) == 0
    out = tmp / "run"
    assert main(base + ["--steps", "2", "--output", str(out), "--checkpoint-weights", "updates", "--no-export"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_dir"] is None and not (out / "model").exists()  # --no-export: no copy of the weights
    assert summary["checkpoint_weights"] == {"setting": "updates", "kind": "updates",
                                             "reason": "--checkpoint-weights updates"}
    assert not (out / "checkpoints" / "step-00000002" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(base + ["--steps", "3", "--output", str(out), "--checkpoint-weights", "updates", "--resume"]) == 0
    assert "replaying 2 update(s)" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["replay"]["updates"] == 2 and summary["replay"]["seconds"] > 0
    a = load_file(str(tmp / "straight" / "model" / "model.safetensors"))
    b = load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a changed plugin option would replay the log with the new value: refused, naming it
    capsys.readouterr()
    record = (out / "run.json").read_text()
    assert main(base + ["--steps", "4", "--output", str(out), "--resume", "--allow-changes", "--eps", "0.02"]) == 2
    assert "--eps 0.02" in capsys.readouterr().err
    assert (out / "run.json").read_text() == record  # refused before the run record changed


def test_no_replay_across_changed_plugin_options(stores, tmp_path):
    """--allow-changes of a plugin option or the seed: the plugin would replay old updates with new values."""
    run = make(stores["llama", 0], tmp_path / "u", checkpoint_weights="updates")
    run.train_step()
    run.save()
    with pytest.raises(ConfigError, match="--opt q=2"):
        make(stores["llama", 0], tmp_path / "u", checkpoint_weights="updates").resume(["--opt q=2"])
    run = make(stores["llama", 0], tmp_path / "a", checkpoint_weights="auto")
    run.train_step()
    run.save()  # the weights, with the log (auto)
    again = make(stores["llama", 0], tmp_path / "a", checkpoint_weights="auto")
    assert again.resume(["--seed 9"]) and again.updates is None and again.checkpoint_kind() == "full"


class HalfStepMeZO(MeZO):
    """A subclass that changes the update and says nothing about replay."""

    def apply(self, block, update: Update) -> None:
        super().apply(block, Update({**update.data, "lr": update["lr"] / 2}, update.metrics, update.step))


class RestatedMeZO(MeZO):
    replayable = True

    def apply(self, block, update: Update) -> None:
        super().apply(block, update)


def test_a_subclass_changing_the_update_cannot_resume_from_updates_silently(stores, tmp_path, monkeypatch):
    assert MeZO.replayable and not HalfStepMeZO.replayable and RestatedMeZO.replayable
    model = zoedge.load(stores["llama", 0])
    ex = toy_examples()
    settings = dict(steps=STEPS, batch_size=4, seed=5, eval_every=0)
    opt = HalfStepMeZO(seed=5, lr=1e-3, eps=1e-2)
    with pytest.raises(ConfigError, match="checkpoint-weights"):
        Trainer(model, CharTokenizer(), opt, ex, ex[:4], [], TrainSettings(**settings, checkpoint_weights="updates"),
                tmp_path / "u", progress=False, log=lambda s: None)
    monkeypatch.setattr(trainer_module, "free_disk", lambda path: 0)  # auto would pick updates for MeZO
    run = Trainer(model, CharTokenizer(), opt, ex, ex[:4], [], TrainSettings(**settings, checkpoint_weights="auto"),
                  tmp_path / "a", progress=False, log=lambda s: None)
    assert run.checkpoint_kind() == "full"
    with pytest.raises(PluginError, match="not replayable"):
        opt.replay(None, [])

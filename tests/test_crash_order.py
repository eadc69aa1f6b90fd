"""Crash order, not only crash outcome: a checkpoint save, a store prepare and a model export are killed before
each of their file-system operations in turn (tests/crash_fs.py), with and without a power cut after the kill;
every prefix must leave the old or the new state visible and complete, and the finished operation the new one.

What is checked is what a user sees (the public readers), never the writer's internals."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import zoedge
from zoedge.errors import ZoedgeError
from zoedge.train.checkpoint import checkpoint_folders, latest_checkpoint, load_checkpoint, save_checkpoint, \
    verify_checkpoint
from tests.crash_fs import CrashFS
from tests.tiny import save_tiny


def weights(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"a": torch.randn(64, 32, generator=g), "b": torch.randn(300, generator=g)}


def state(step: int) -> dict:
    return {"step": step, "optimizer": {"m": torch.full((5,), float(step))}, "scheduler": {"last": step}}


def every_prefix(run, roots, check, power: bool) -> list[str]:
    """Run ``run`` once to log its operations, then once per prefix killed before operation k (k = number of
    operations: the whole run), after a fresh ``roots`` setup each time; ``check(k, finished)`` judges the result."""
    with CrashFS(*roots()) as fs:
        run()
    ops = fs.ops()
    assert ops, "the operation under test did nothing the harness sees"
    for k in range(len(ops) + 1):
        with CrashFS(*roots(), at=k if k < len(ops) else None) as fs:
            run()
        if power:
            fs.power_loss()
        check(k, not fs.crashed, ops)
    return ops


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("power", [False, True], ids=["kill", "power-cut"])
@pytest.mark.parametrize("resave", [False, True], ids=["next-step", "resave"])
def test_checkpoint_save_every_prefix(tmp_path, power, resave):
    """Save step 2 over a run holding step 1 (or re-save step 1 with other weights): after a kill before any
    operation, the newest visible checkpoint folder is intact (a partial one is never under a final name) and the one
    resumed from is step 1's or the new one, bit for bit; once the save returned, the new one survives a power cut."""
    template, root = tmp_path / "template", tmp_path / "ckpt"
    save_checkpoint(template, 1, weights(1), state(1), keep=1)
    new = 1 if resave else 2
    new_weights = weights(2) if resave else weights(new)

    def setup():
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root)
        return [root]

    def run():
        save_checkpoint(root, new, new_weights, state(2), keep=1)

    def check(k, finished, ops):
        where = f"killed before operation {k} of {ops}" if not finished else "after the save returned"
        folders = checkpoint_folders(root)
        assert folders, f"no checkpoint {where}"
        verify_checkpoint(folders[-1])  # the newest visible one is whole (an older one may be half pruned)
        got = latest_checkpoint(root)
        assert got is not None, f"no intact checkpoint {where}"
        w, s = load_checkpoint(got)
        old_ok = s["step"] == 1 and all(torch.equal(w[n], t) for n, t in weights(1).items())
        new_ok = s["scheduler"]["last"] == 2 and all(torch.equal(w[n], t) for n, t in new_weights.items())
        assert old_ok or new_ok, f"neither the old nor the new checkpoint {where}"
        if finished:
            assert new_ok, f"the new checkpoint was lost {where}"
        assert torch.equal(s["optimizer"]["m"], torch.full((5,), float(s["scheduler"]["last"])))

    every_prefix(run, setup, check, power)


# ------------------------------------------------------------------------------------------------ the store
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = save_tiny("llama", root / "hf", layers=2)
    return root / "hf", {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.mark.parametrize("power", [False, True], ids=["kill", "power-cut"])
def test_store_prepare_every_prefix(tmp_path, hf, power):
    """Prepare killed before any operation: the store is refused with a clear error (nothing yet) or loads with
    exactly the source's weights; prepare run again then finishes it; once prepare returned, the store survives a
    power cut."""
    src, ref = hf
    store = tmp_path / "store"

    def setup():
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir()
        return [store]

    def run():
        zoedge.prepare(src, store, progress=False, log=lambda s: None)

    def loaded():
        m = zoedge.load(store)
        try:
            got = m.state_dict()
            return all(torch.equal(got[n], t) for n, t in ref.items() if n in got) and len(got) > 0
        finally:
            m.close()

    def check(k, finished, ops):
        where = f"killed before operation {k} of {ops}" if not finished else "after prepare returned"
        try:
            complete = loaded()
        except ZoedgeError:
            complete = None  # refused, with zoedge's error: the old state (no store)
        assert complete is not False, f"a store with wrong weights loads {where}"
        if finished:
            assert complete, f"the finished store does not load {where}"
        zoedge.prepare(src, store, progress=False, log=lambda s: None)  # resumes
        assert loaded(), f"prepare re-run does not finish the store {where}"

    every_prefix(run, setup, check, power)


# ------------------------------------------------------------------------------------------------ exports
@pytest.mark.parametrize("power", [False, True], ids=["kill", "power-cut"])
def test_export_every_prefix(tmp_path, hf, power):
    """Re-export over an earlier export: the output folder always holds the old export or the new one, whole."""
    from zoedge.train.job import export_model
    src, ref = hf
    store = tmp_path / "store"
    zoedge.prepare(src, store, progress=False, log=lambda s: None)
    model = zoedge.load(store)
    old = {n: t.clone() for n, t in model.state_dict().items()}
    template, out = tmp_path / "template", tmp_path / "model"
    export_model(model, template)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(1.0)  # the host tier's working copy: the new weights
    new = {n: t.clone() for n, t in model.state_dict().items()}

    def setup():
        for p in (out, out.with_name(out.name + ".tmp")):
            shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(template, out)
        return [tmp_path]

    def run():
        export_model(model, out)

    def check(k, finished, ops):
        where = f"killed before operation {k} of {ops}" if not finished else "after the export returned"
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file(), f"no export {where}"
        got = load_file(out / "model.safetensors")
        is_old = all(torch.equal(got[n], old[n]) for n in got)
        is_new = all(torch.equal(got[n], new[n]) for n in got)
        assert got and (is_old or is_new), f"neither the old nor the new export {where}"
        if finished:
            assert is_new, f"the new export was lost {where}"

    every_prefix(run, setup, check, power)
    model.close()


# ------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("power", [False, True], ids=["kill", "power-cut"])
def test_adapter_every_prefix(tmp_path, power):
    """Re-writing a PEFT adapter directory: it always holds the old adapter or the new one, whole."""
    from zoedge.runtime.lora import read_peft_dir, write_peft_dir
    out, config = tmp_path / "adapter", {"peft_type": "LORA", "r": 2}
    old, new = {"x.lora_A.weight": torch.zeros(2, 3)}, {"x.lora_A.weight": torch.ones(2, 3)}

    def setup():
        for p in (out, out.with_name("adapter.tmp")):
            shutil.rmtree(p, ignore_errors=True)
        write_peft_dir(out, old, config)
        return [tmp_path]

    def check(k, finished, ops):
        where = f"killed before operation {k} of {ops}" if not finished else "after the write returned"
        got = read_peft_dir(out)[1]["x.lora_A.weight"]
        assert torch.equal(got, new["x.lora_A.weight"]) or (not finished and torch.equal(got, old["x.lora_A.weight"])), where

    every_prefix(lambda: write_peft_dir(out, new, config), setup, check, power)


def test_adapter_write_never_replaces_a_folder_that_is_not_an_adapter(tmp_path):
    from zoedge.runtime.lora import write_peft_dir
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ZoedgeError, match="not a PEFT adapter directory"):
        write_peft_dir(tmp_path / "mine", {"x.lora_A.weight": torch.zeros(2, 3)}, {"peft_type": "LORA"})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

"""The disk tier's working copy (made at each block's first write-back) and its page-cache policy (direct I/O:
tests/test_direct_io.py)."""
from __future__ import annotations

import pytest
import torch

import zoedge
from zoedge.runtime import host
from tests.tiny import batch, save_tiny


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


class Scale(zoedge.BlockVisitor):
    """A dense update: every tensor of the named blocks (all when None) times ``factor``."""

    def __init__(self, factor: float = 2.0, blocks: set[str] | None = None) -> None:
        self.factor, self.blocks = factor, blocks

    def on_resident(self, block):
        if self.blocks is None or block.name in self.blocks:
            for t in block.tensors.values():
                t.mul_(self.factor)
            block.mark_dirty()


def store_bytes(store):
    return {p.name: p.read_bytes() for p in (store / "blocks").iterdir()}


def test_working_copy_is_made_at_first_write_back(store, tmp_path):
    before = store_bytes(store)
    m = zoedge.load(store, tier="disk", working_dir=tmp_path / "w")
    base = m.state_dict()
    assert list((tmp_path / "w").iterdir()) == []  # nothing copied up front
    first = m.blocks[1].name
    m.run(Scale(2.0, {first}))
    m.synchronize()
    assert [p.name for p in (tmp_path / "w").iterdir()] == [m.blocks[1].file.split("/")[-1]]
    m.run(Scale(3.0))  # block 1 again (in place), every other block for the first time
    got = m.state_dict()
    for b in m.blocks:
        for t in b.tensors:
            if t.name in m.aliases:
                continue
            factor = 6.0 if b.name == first else 3.0
            torch.testing.assert_close(got[t.name], base[t.name] * factor, rtol=0, atol=0)
    m.close()
    assert store_bytes(store) == before  # the prepared store is never written
    # a new model on the same working copy reads the trained blocks
    m2 = zoedge.load(store, tier="disk", working_dir=tmp_path / "w")
    for k, v in m2.state_dict().items():
        assert torch.equal(v, got[k]), k
    m2.close()


def test_stale_or_partial_working_files_are_not_used(store, tmp_path):
    """A working file of the wrong size (another store's) and an interrupted first write are discarded."""
    w = tmp_path / "w"
    w.mkdir()
    m0 = zoedge.load(store, tier="disk")
    name = m0.blocks[0].file.split("/")[-1]
    base = m0.state_dict()
    m0.close()
    (w / name).write_bytes(b"\0" * 10)
    (w / name).with_suffix(".tmp").write_bytes(b"\0" * 10)
    m = zoedge.load(store, tier="disk", working_dir=w)
    assert not (w / name).exists() and not (w / name).with_suffix(".tmp").exists()
    for k, v in m.state_dict().items():
        assert torch.equal(v, base[k]), k
    m.close()


@pytest.mark.parametrize("direct_io", [None, False])
def test_page_cache_policy(store, tmp_path, monkeypatch, direct_io):
    """When the blocks exceed the available memory, buffered I/O (``direct_io=False``) drops the pages after every
    read and write, and the default, direct I/O where the filesystem takes it, has none to drop; the results are the
    same. When the blocks fit, I/O is buffered and the page cache is left alone."""
    dropped = []
    real = host._drop_pages
    monkeypatch.setattr(host, "_drop_pages", lambda fd: (dropped.append(fd), real(fd)))
    ids, mask = batch()
    results = {}
    for avail in (None, 1 << 40, 1):
        monkeypatch.setattr(host, "available_memory", lambda: avail)
        dropped.clear()
        m = zoedge.load(store, tier="disk", working_dir=tmp_path / f"w{avail}")
        assert m.tier.drop_cache == (avail == 1)
        m.tier.direct_io = direct_io
        direct = m.tier.io_mode == "direct"
        assert not direct or (avail == 1 and direct_io is None)
        m.run(Scale(0.5))
        results[avail] = m(ids, mask)
        m.close()
        # buffered: every block (direct: a block smaller than one O_DIRECT unit), each dropped after its reads by
        # the update pass and the forward (the tied embedding's owner stays in RAM) and after its write
        buffered = [i for i, b in enumerate(m.blocks) if not direct or b.nbytes < host.ALIGN]
        assert not direct or len(buffered) < len(m.blocks)
        read = [i for i in buffered if i not in m.tier.cache]
        assert len(dropped) == (2 * len(read) + len(buffered) if avail == 1 else 0)
    assert torch.equal(results[1], results[None]) and torch.equal(results[1], results[1 << 40])


@pytest.mark.parametrize("prefetch", [1, 2])
def test_cpu_training_holds_the_ring_and_no_slot_or_staging(store, tmp_path, prefetch):
    """On the CPU a disk-tier training run computes in the ring buffers its disk reads fill and writes back from
    them: it allocates the ring (prefetch + 1 buffers, sized to the largest streamed block), the tied embedding's
    owner in RAM and the optimizer's workspaces, and no slot and no staging buffer."""
    from collections import Counter

    from tests.tiny import CharTokenizer, toy_examples
    from zoedge.memory import ALLOCATIONS
    from zoedge.train.trainer import TrainSettings, Trainer
    from zoedge_plugins.mezo import MeZO

    count, nbytes = Counter(ALLOCATIONS.count), Counter(ALLOCATIONS.nbytes)
    m = zoedge.load(store, tier="disk", working_dir=tmp_path / "w", prefetch=prefetch)
    ex = toy_examples(8)
    trainer = Trainer(m, CharTokenizer(), MeZO(seed=0, lr=1e-2, eps=1e-2), ex, ex[:2], [],
                      TrainSettings(steps=2, batch_size=2, seed=0, max_length=32), tmp_path / "run", progress=False,
                      log=lambda s: None)
    for _ in range(2):
        trainer.train_step()
    trainer.flush()
    m.synchronize()
    new = {k: ALLOCATIONS.count[k] - count[k] for k in ALLOCATIONS.count if ALLOCATIONS.count[k] > count[k]}
    assert new == {"pinned": prefetch + 1, "host": 1, "workspace": new.get("workspace", 0)}, new
    owner = {m._block_index(m.adapter.block_of(src)) for src in m.aliases.values()}
    assert m.aliases and set(m.tier.cache) == owner  # the tiny Llama ties its embedding
    largest = max(b.nbytes for i, b in enumerate(m.blocks) if i not in owner)
    assert ALLOCATIONS.nbytes["pinned"] - nbytes["pinned"] == (prefetch + 1) * largest
    assert m.tier._staging is None and not m.ring and not m.dedicated
    assert len(list((tmp_path / "w").iterdir())) == len(m.blocks)  # every updated block was written back
    m.close()


# ------------------------------------------------------------------ checkpoints and exports, block by block
def test_write_streamed_round_trip_and_order(tmp_path):
    from safetensors.torch import load_file

    from zoedge.store.safetensors_io import WeightStream, write_streamed

    a = {"x": torch.randn(3, 4), "y": torch.arange(5)}
    b = {"z": torch.randn(6, dtype=torch.bfloat16), "e": torch.empty(0)}
    entries = [(k, v.dtype, tuple(v.shape)) for d in (a, b) for k, v in d.items()]
    write_streamed(tmp_path / "w.safetensors", WeightStream(entries, [a, b]), metadata={"format": "pt"})
    got = load_file(str(tmp_path / "w.safetensors"))
    assert set(got) == {"x", "y", "z", "e"}
    for k, v in {**a, **b}.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with pytest.raises(ValueError, match="expected"):
        write_streamed(tmp_path / "bad.safetensors", WeightStream(entries, [b, a]))
    with pytest.raises(ValueError, match="ended before"):
        write_streamed(tmp_path / "short.safetensors", WeightStream(entries, [a]))


def test_checkpoint_export_and_resume_hold_one_block(store, tmp_path, monkeypatch):
    """A disk-tier model is checkpointed and exported holding one block's bytes at a time (a model larger than
    memory must not be gathered), bit-equal to its state_dict; a checkpoint restores it lazily."""
    import gc
    import weakref

    from safetensors.torch import load_file

    import zoedge.train.checkpoint as checkpoint
    import zoedge.train.job as job
    from zoedge.train.checkpoint import load_checkpoint, save_checkpoint

    m = zoedge.load(store, tier="disk", working_dir=tmp_path / "w")
    m.run(Scale(0.5))
    want = {k: v for k, v in m.state_dict().items() if k not in m.aliases}
    alive: list[list[weakref.ref]] = []  # per block read: its tensors (views of the block's bytes)
    real_block_state = m._block_state

    def block_state(i):
        out = real_block_state(i)
        alive.append([weakref.ref(t) for t in out.values()])
        return out

    monkeypatch.setattr(m, "_block_state", block_state)
    peak = []
    real_check = checkpoint.check_finite_weights

    def counting_check(chunk, what, where):
        if "optimizer state" not in what:
            gc.collect()
            peak.append(sum(any(r() is not None for r in refs) for refs in alive))
        return real_check(chunk, what, where)

    monkeypatch.setattr(checkpoint, "check_finite_weights", counting_check)
    monkeypatch.setattr(job, "check_finite_weights", counting_check)
    state = {"step": 1, "optimizer": {}, "scheduler": {}}
    path = save_checkpoint(tmp_path / "ck", 1, m.weight_stream(), state)
    job.export_model(m, tmp_path / "model")
    assert len(peak) == 2 * len(m.blocks) and max(peak) == 1
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    weights, _ = load_checkpoint(path)
    assert set(exported) == set(weights) == set(want)
    for k, v in want.items():
        assert torch.equal(exported[k], v) and torch.equal(weights[k], v), k
    m2 = zoedge.load(store, tier="disk", working_dir=tmp_path / "w2")
    m2.load_state_dict(weights)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, m.state_dict()[k]), k
    m.close()
    m2.close()


def test_non_finite_block_midway_leaves_no_checkpoint_or_export(store, tmp_path):
    from zoedge.errors import TrainingError
    from zoedge.train.checkpoint import checkpoint_folders, latest_checkpoint, save_checkpoint
    from zoedge.train.job import export_model

    m = zoedge.load(store, tier="disk", working_dir=tmp_path / "w")
    state = {"step": 1, "optimizer": {}, "scheduler": {}}
    save_checkpoint(tmp_path / "ck", 1, m.weight_stream(), state)
    last = m.blocks[-1].name
    m.run(Scale(float("nan"), {last}))  # only the last block: found after the others were written
    with pytest.raises(TrainingError, match="NaN"):
        save_checkpoint(tmp_path / "ck", 2, m.weight_stream(), {**state, "step": 2})
    assert [p.name for p in checkpoint_folders(tmp_path / "ck")] == ["step-00000001"]
    assert latest_checkpoint(tmp_path / "ck").name == "step-00000001"
    assert not list((tmp_path / "ck").glob(".tmp-*"))
    with pytest.raises(TrainingError, match="NaN"):
        export_model(m, tmp_path / "model")
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.tmp").exists()
    m.close()

"""The disk tier's direct I/O (``O_DIRECT``): the same bytes and the same training as buffered I/O, a buffered
fallback where the filesystem refuses it, and atomic creation of working files."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import zoedge
from zoedge.runtime import host
from zoedge.memory import page_aligned
from tests.tiny import save_tiny

ALIGN = host.ALIGN
SIZES = [1, 100, ALIGN - 1, ALIGN, ALIGN + 1, 2 * ALIGN - 1, 3 * ALIGN, 3 * ALIGN + 17, (1 << 20) + 123]


@pytest.fixture(scope="module")
def direct_dir(tmp_path_factory):
    """A directory whose filesystem takes O_DIRECT: pytest's temporary one, else one under the repository (when
    the temporary directory is a tmpfs that refuses it), else skip."""
    base = tmp_path_factory.mktemp("direct")
    if host.probe_direct_io(base / "probe"):
        yield base
        return
    # one per process: xdist workers may both run this module's tests
    local = Path(tempfile.mkdtemp(prefix=".pytest-direct-io-", dir=Path(__file__).resolve().parent.parent))
    try:
        if not host.probe_direct_io(local / "probe"):
            pytest.skip(f"no filesystem here takes O_DIRECT (tried {base} and {local})")
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


@pytest.fixture
def opened(monkeypatch):
    """Every file the I/O functions open: (name, O_DIRECT asked for, O_DIRECT used)."""
    seen: list[tuple[str, bool, bool]] = []
    real = host._open

    def spy(path, flags, direct):
        fd, used = real(path, flags, direct)
        seen.append((Path(path).name, direct, used))
        return fd, used

    monkeypatch.setattr(host, "_open", spy)
    return seen


def _bytes(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", SIZES)
def test_direct_bytes_equal_buffered_bytes(direct_dir, opened, n):
    """Around the 4 KiB unit (tails of 1..4095 bytes, whole units, files smaller than one unit): a direct write
    (creating, then overwriting) leaves the exact bytes and size, and a direct read returns them; buffered reads and
    writes agree both ways. Direct transfers really happen for files of at least one unit."""
    path = direct_dir / f"f{n}.bin"
    path.unlink(missing_ok=True)
    data, data2 = _bytes(n, 0), _bytes(n, 1)
    src = page_aligned(n)
    src.copy_(data)
    host.write_file_from(path, src, drop_cache=True, direct=True)  # created (tmp + rename)
    assert path.stat().st_size == n and path.read_bytes() == bytes(data.numpy())
    assert not path.with_suffix(".tmp").exists()
    got = page_aligned(n)
    host.read_file_into(path, got, drop_cache=True, direct=True)
    assert torch.equal(got, data)
    src.copy_(data2)
    host.write_file_from(path, src, direct=True)  # overwritten in place
    assert path.stat().st_size == n and path.read_bytes() == bytes(data2.numpy())
    buffered = torch.empty(n, dtype=torch.uint8)
    host.read_file_into(path, buffered)
    assert torch.equal(buffered, data2)
    host.write_file_from(path, data, drop_cache=True)  # buffered write, direct read
    host.read_file_into(path, got, direct=True)
    assert torch.equal(got, data)
    assert all(used == (n >= ALIGN) for _, asked, used in opened if asked), opened
    assert not any(used for _, asked, used in opened if not asked)
    assert host.direct_io_accepted(path)  # no transfer was refused (which would have fallen back to buffered)


def test_unaligned_buffer_or_short_file(direct_dir, opened):
    """A buffer not starting on a page boundary is read and written buffered (same bytes); a file shorter than the
    block is a clear error whether it ends on a unit boundary or not."""
    n = 3 * ALIGN + 5
    data = _bytes(n, 2)
    odd = page_aligned(n + 1)[1:]
    odd.copy_(data)
    path = direct_dir / "odd.bin"
    path.unlink(missing_ok=True)
    host.write_file_from(path, odd, direct=True)
    odd.zero_()
    host.read_file_into(path, odd, direct=True)
    assert torch.equal(odd, data) and not any(used for *_, used in opened)
    for short in (2 * ALIGN, 2 * ALIGN + 7):
        path.write_bytes(bytes(data.numpy())[:short])
        with pytest.raises(zoedge.errors.StoreError, match=f"ends after {short} of {n} bytes"):
            host.read_file_into(path, page_aligned(n), direct=True)


def test_interrupted_first_write_leaves_no_working_file(direct_dir, monkeypatch):
    """A first write-back that fails part way (here: the disk fills after the first chunk) leaves neither the
    working file nor its temporary; an overwrite of an existing file keeps the file."""
    n = 4 * ALIGN + 9
    real = os.pwrite
    calls = []

    def failing(fd, chunk, at):
        calls.append(at)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, chunk[:ALIGN], at)  # a partial transfer: the loop comes back for the rest

    monkeypatch.setattr(os, "pwrite", failing)
    for direct in (True, False):
        calls.clear()
        path = direct_dir / f"first-{direct}.bin"
        with pytest.raises(OSError, match="No space"):
            host.write_file_from(path, page_aligned(n), direct=direct)
        assert calls == [0, ALIGN]
        assert not path.exists() and not path.with_suffix(".tmp").exists()


def test_refused_direct_io_falls_back_to_buffered(direct_dir, monkeypatch):
    """A filesystem that refuses O_DIRECT at open (tmpfs: EINVAL) or at the transfer is asked once, remembered,
    and served buffered with the same bytes."""
    monkeypatch.setattr(host, "_refused", set())
    n = 2 * ALIGN + 3
    data = _bytes(n, 3)
    path = direct_dir / "refused.bin"
    host.write_file_from(path, data)
    real_preadv = os.preadv

    def refuse_transfer(fd, buffers, at):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & host.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, at)

    monkeypatch.setattr(os, "preadv", refuse_transfer)
    got = page_aligned(n)
    host.read_file_into(path, got, direct=True)
    assert torch.equal(got, data) and not host.direct_io_accepted(path)
    monkeypatch.setattr(os, "preadv", real_preadv)
    monkeypatch.setattr(host, "_refused", set())
    real_open, attempts = os.open, []

    def refuse_open(p, flags, *rest):
        if flags & host.O_DIRECT:
            attempts.append(p)
            raise OSError(errno.EINVAL, "Invalid argument", str(p))
        return real_open(p, flags, *rest)

    monkeypatch.setattr(os, "open", refuse_open)
    assert not host.probe_direct_io(path)
    for _ in range(2):
        got.zero_()
        host.read_file_into(path, got, direct=True)
        assert torch.equal(got, data)
    assert len(attempts) == 1  # asked once, then remembered


# ------------------------------------------------------------------ the disk tier
@pytest.fixture(scope="module")
def store(direct_dir):
    root = direct_dir / "tiny"
    save_tiny("llama", root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return root / "store"


def _train(store: Path, working: Path, direct_io: bool, opened: list, steps: int = 3):
    from tests.tiny import CharTokenizer, toy_examples
    from zoedge.train.trainer import TrainSettings, Trainer
    from zoedge_plugins.mezo import MeZO

    shutil.rmtree(working, ignore_errors=True)
    m = zoedge.load(store, tier="disk", working_dir=working)
    m.tier.drop_cache, m.tier.direct_io = True, direct_io  # as for blocks larger than the memory available
    assert m.tier.io_mode == ("direct" if direct_io else "buffered")
    opened.clear()  # the filesystem probes of the load
    ex = toy_examples(8)
    trainer = Trainer(m, CharTokenizer(), MeZO(seed=0, lr=1e-2, eps=1e-2), ex, ex[:2], [],
                      TrainSettings(steps=steps, batch_size=2, seed=0, max_length=32),
                      working.parent / f"run-{working.name}", progress=False, log=lambda s: None)
    losses = []
    for _ in range(steps):
        trainer.train_step()
        losses.append(trainer.last_losses)
    trainer.flush()
    m.synchronize()
    state = m.state_dict()
    assert m.tier.io_mode == ("direct" if direct_io else "buffered")  # no refusal on the way
    sizes = {b.file.split("/")[-1]: b.nbytes for b in m.blocks}
    m.close()
    return losses, state, {p.name: p.read_bytes() for p in working.iterdir()}, sizes


def test_disk_tier_training_direct_equals_buffered(store, direct_dir, opened):
    """MeZO steps on the disk tier with direct I/O forced on give bit-identical losses, weights and working-copy
    files to buffered I/O; the direct run really read and wrote block files with O_DIRECT."""
    buffered = _train(store, direct_dir / "wb", False, opened)
    assert opened and not any(used for *_, used in opened)
    direct = _train(store, direct_dir / "wd", True, opened)
    sizes = direct[3]
    whole = {name for name, n in sizes.items() if n >= ALIGN}  # blocks of at least one 4 KiB unit
    assert whole and whole != set(sizes)  # the tiny model has both kinds
    used = {name for name, _, u in opened if u}
    assert {Path(name).stem + ".tmp" for name in whole} <= used  # every first write-back was direct
    assert whole <= used  # and the reads (store files, then the working copy's)
    assert not used & set(sizes).difference(whole)
    assert direct[0] == buffered[0]
    assert direct[1].keys() == buffered[1].keys()
    for k, v in buffered[1].items():
        assert torch.equal(direct[1][k], v), k
    assert direct[2] == buffered[2] and set(direct[2]) == set(sizes)
    # the weights written block by block (load_state_dict: aligned reads, direct writes) read back the same
    m = zoedge.load(store, tier="disk", working_dir=direct_dir / "wl")
    m.tier.direct_io = True
    m.load_state_dict(direct[1])
    assert m.tier.io_mode == "direct"
    for k, v in m.state_dict().items():
        assert torch.equal(v, direct[1][k]), k
    m.close()

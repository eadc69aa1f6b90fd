"""The GPU schedule verified on the CPU: simulated interleavings, the race checker, mutation of every wait.

The scenarios of ``tests/test_gpu.py`` (delayed uploads, delayed compute, delayed write-backs, disk ring
reuse) are what the simulated engine explores here: it runs each queue in FIFO order but interleaves the
queues in any order the schedule's waits allow, and operations have their real effects, so a missing wait
reads stale or overwritten bytes.

CI cost (2-core box): a tiny tied Llama (2 layers, hidden 32), sessions of a few passes. Per configuration
the adversarial interleaving + 10 seeded ones (the seeds that matter: in test_every_wait_is_needed, the
mutation test of this suite's detection power, the adversarial order and seeds 0-7 show every data-changing
removed wait, of 40 seeds tried); 12 dense MeZO configurations (ram/disk x prefetch 1-3 x
q 1-2) and 6 int8 configurations (ram/disk x prefetch 1-3, a visitor that updates the unquantized blocks);
and the CPU's disk tier bound in place (compute on the ring buffers, written back from them): 3 configurations.
"""
from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import zoedge
from tests.tiny import CharTokenizer, batch, save_tiny, toy_examples
from zoedge.errors import ZoedgeError
from zoedge.runtime.engines import SimulatedEngine, SyncEngine
from zoedge.runtime.races import find_races
from zoedge.runtime.schedule import Op, describe
from zoedge.train.trainer import TrainSettings, Trainer
from zoedge_plugins.mezo import MeZO

INTERLEAVINGS = 10
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    save_tiny("llama", root / "hf", layers=2)
    out = {}
    for quant in ("none", "int8"):
        zoedge.prepare(root / "hf", root / quant, quant=quant, progress=False, log=lambda s: None)
        out[quant] = root / quant
    return out


class Touch(zoedge.BlockVisitor):
    """Two passes (pass 1 sees the weights scaled by 1.5) and a dense in-place update of every block that has
    no quantized tensor, so write-backs run on a quantized store too."""

    passes = 2

    def on_resident(self, block):
        if len(block.writable) == len(block.tensors):
            for t in block.tensors.values():
                t.mul_(0.75).add_(0.01)
            block.mark_dirty()

    def pass_tensors(self, block, p):
        return block.tensors if p == 0 else {k: v * 1.5 for k, v in block.tensors.items()}


@dataclass(frozen=True)
class Config:
    tier: str
    prefetch: int
    quant: str = "none"
    q: int = 1
    in_place: bool = False  # False: blocks stream through slots, as on an accelerator (the schedule under test)

    def __str__(self) -> str:
        return f"{self.tier}-p{self.prefetch}-{self.quant}-q{self.q}" + ("-in-place" if self.in_place else "")


CONFIGS = [Config(t, p, "none", q) for t in ("ram", "disk") for p in (1, 2, 3) for q in (1, 2)]
CONFIGS += [Config(t, p, "int8") for t in ("ram", "disk") for p in (1, 2, 3)]
# The CPU default with the disk tier: blocks bound in the ring buffers their disk reads filled, written back to
# disk from there (the ring buffer's reuse waits for the compute; the disk write for the compute that updated it).
DISK_IN_PLACE = [Config("disk", 1, "none", 2, in_place=True), Config("disk", 2, "none", 1, in_place=True),
                 Config("disk", 1, "int8", in_place=True)]
CONFIGS += DISK_IN_PLACE
# The CPU default with the RAM tier: blocks bound in the host buffers, compute only (no waits to explore, but
# the results must equal the slot path's bit for bit).
IN_PLACE = [Config("ram", 1, "none", 2, in_place=True), Config("ram", 1, "int8", in_place=True), *DISK_IN_PLACE[:2]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Sessions:
    """One streamed model per configuration; each session starts from the stored weights with a new engine."""

    def __init__(self, store: Path, cfg: Config, tmp: Path) -> None:
        self.cfg = cfg
        work = {"working_dir": tmp / "work"} if cfg.tier == "disk" else {}
        self.model = zoedge.load(store, tier=cfg.tier, prefetch=cfg.prefetch, in_place=cfg.in_place, **work)
        self.initial = self.model.state_dict()
        self.tmp = tmp

    def run(self, engine, drop: set[tuple[int, int]] | None = None, record: bool = False) -> tuple[list, list[Op] | None]:
        """A plain forward (no write-backs), two training steps (the second applies the first's update:
        write-backs), then a flush (re-uploads the written-back blocks). Returns every observable result:
        logits, losses and metrics, the trained weights."""
        m, cfg = self.model, self.cfg
        m.use_engine(engine)
        m.load_state_dict(self.initial)
        if drop:
            m.schedule.drop = set(drop)
        ops = m.schedule.record() if record else None
        ids, mask = batch(b=2, t=6)
        out: list = [m(ids, mask)]
        if cfg.quant == "none":
            examples = toy_examples(8)
            opt = MeZO(seed=3, lr=1e-2, eps=1e-2, weight_decay=0.1, q=cfg.q)
            trainer = Trainer(m, CharTokenizer(), opt, examples, examples[:2], [],
                              TrainSettings(steps=2, batch_size=2, seed=3, max_length=32), self.tmp / "run",
                              progress=False, log=lambda s: None)
            for _ in range(2):
                metrics = trainer.train_step()
                out.append({k: v for k, v in metrics.items() if k != "seconds"})
            trainer.flush()
        else:
            for _ in range(2):
                out.append([x.clone() for x in m.run(Touch(), ids, mask)])
            m.run(Touch())
        m.synchronize()
        out.append(m.state_dict())
        return out, ops


@pytest.fixture
def sessions(stores, cfg, tmp_path):
    s = Sessions(stores[cfg.quant], cfg, tmp_path)
    yield s
    s.model.close()


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------ every wait in place
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_interleavings_equal_sync(sessions, cfg):
    ref, ops = sessions.run(SyncEngine(), record=True)
    assert find_races(ops) == []
    if not cfg.in_place:
        assert any(op.kind == "offload" and not op.skipped for op in ops), "the session must write blocks back"
    if cfg.tier == "disk":
        assert any(op.kind == "write" and not op.skipped for op in ops)
    engines = [SimulatedEngine(adversarial=True)] + [SimulatedEngine(seed=s) for s in range(INTERLEAVINGS)]
    orders = set()
    for k, engine in enumerate(engines):
        got, _ = sessions.run(engine)
        assert equal(got, ref), f"{cfg}: interleaving {k} ({'adversarial' if k == 0 else f'seed {k - 1}'}) differs"
        orders.add(tuple(engine.order))
    assert len(orders) > INTERLEAVINGS // 2, "the seeds should explore different interleavings"


@pytest.mark.parametrize("cfg", IN_PLACE, ids=str)
def test_in_place_binding_equals_the_slot_path(stores, cfg, tmp_path):
    """Bound in place, a session emits only compute operations (no upload, slot or device-to-host write-back; the
    disk tier adds its disk reads and writes), its updates land in the host buffers (the disk tier's ring buffers),
    and every result equals the slot path's, bit for bit."""
    slots = Sessions(stores[cfg.quant], Config(cfg.tier, cfg.prefetch, cfg.quant, cfg.q), tmp_path / "slots")
    try:
        ref, _ = slots.run(SyncEngine())
    finally:
        slots.model.close()
    s = Sessions(stores[cfg.quant], cfg, tmp_path / "in-place")
    try:
        assert s.model.in_place and not s.model.ring and not s.model.dedicated
        got, ops = s.run(SyncEngine(), record=True)
        queues = {"compute", "io"} if cfg.tier == "disk" else {"compute"}
        assert {op.queue for op in ops} == queues and find_races(ops) == []
        host = "ring[" if cfg.tier == "disk" else "host["
        assert any(host in b for op in ops if op.queue == "compute" for b in op.writes), \
            "updates are declared on the host buffers"
        assert equal(got, ref)
        for k in range(3):
            again, _ = s.run(SimulatedEngine(seed=k))
            assert equal(again, ref)
    finally:
        s.model.close()


def test_in_place_needs_cpu(stores):
    with pytest.raises(zoedge.ConfigError, match="in_place"):
        zoedge.load(stores["none"], device="meta", in_place=True)
    for tier in ("ram", "disk"):
        m = zoedge.load(stores["none"], tier=tier)
        try:
            assert m.in_place  # the CPU default
        finally:
            m.close()


# ------------------------------------------------------------------------------------- mutation
def _bytes_changed(sessions: Sessions) -> tuple[list, list[Op], dict[int, set[str]], list[tuple[int, Op]]]:
    """A reference session in emission order that notes, per operation, which written buffers changed."""

    class Tracing(SimulatedEngine):
        def __init__(self) -> None:
            super().__init__()
            self.model: zoedge.StreamedModel | None = None
            self.changed: dict[int, set[str]] = {}
            self.syncs: list[tuple[int, Op]] = []  # (ops emitted so far, the pass's last compute) at each pass end

        def issue(self, op: Op) -> None:
            super().issue(op)
            if op.queue == "compute":
                self.last_compute = op

        def outputs_ready(self) -> None:
            super().outputs_ready()
            self.syncs.append((self.model.schedule.seq, self.last_compute))

        def _step(self) -> None:  # emission order, like the synchronous engine
            heads = [q[0] for q in self.queues.values() if q]
            op = min(heads, key=lambda o: o.seq)
            before = {b: self.resolve(b).clone() for b in op.writes}
            self.queues[op.queue].popleft()
            del self.pending[op.seq]
            op.run()
            op.done = True
            self.changed[op.seq] = {b for b in op.writes if not torch.equal(before[b], self.resolve(b))}

        def resolve(self, name: str) -> torch.Tensor:
            m = self.model
            kind, _, idx = name.rstrip("]").partition("[")
            if kind == "host":
                i = int(idx)
                return m.tier.buffers[i] if cfg.tier == "ram" else m.tier.cache[i]
            if kind == "ring":
                return m.tier.ring[int(idx)]
            if kind == "staging":
                return m.tier.staging
            if kind == "file":
                return torch.frombuffer(bytearray(m.tier.paths[int(idx)].read_bytes()), dtype=torch.uint8)
            if kind == "slot":
                return next(s for s in [*m.ring, *m.dedicated.values()] if s.index == int(idx)).raw
            if kind == "tied":
                return torch.cat([v.flatten() for k, v in m._workspaces.items() if k.startswith(f"tied.{idx}.")]
                                 or [torch.zeros(0, dtype=torch.uint8)])
            raise AssertionError(name)

    cfg = sessions.cfg
    engine = Tracing()
    engine.model = sessions.model
    ref, ops = sessions.run(engine, record=True)
    return ref, ops, engine.changed, engine.syncs


def _rewritten_unread(op: Op, ops: list[Op]) -> bool:
    """``op`` writes only files that a later operation rewrites before any operation reads them: what it wrote
    never reaches a result (a block the disk tier keeps in RAM is read from its file only after a sync)."""
    files = [b for b in op.writes if b.startswith("file[")]
    if not files or len(files) != len(op.writes):
        return False
    later = [o for o in ops if o.seq > op.seq]
    for b in files:
        nxt = next((o for o in later if b in o.reads or b in o.writes), None)
        if nxt is None or b in nxt.reads:
            return False
    return True


def _can_change_data(consumer: Op, wait, changed: dict[int, set[str]], syncs: list[tuple[int, Op]],
                     ops: list[Op]) -> bool:
    """The wait protects a write that changed bytes in the reference run (RAW/WAW: the producer's write;
    WAR: the consumer's overwrite), and nothing else orders the two: the caller reads each pass's results
    (a host sync on the compute queue) before it starts the next pass, which orders every operation that
    the pass's last compute waited for before everything emitted after it; and what the consumer writes
    reaches a result (not a disk write that the next one rewrites before the file is read). (Such a wait
    still matters to a caller that enqueues passes without reading their results, or that reads the file
    between; the checker covers it.)"""
    if all(h == "RAW" for _, h in wait.reasons) and _rewritten_unread(consumer, ops):
        return False
    for emitted, last in syncs:
        if emitted <= consumer.seq and (wait.producer is last or wait.producer.happens_before(last)):
            return False
    for buf, hazard in wait.reasons:
        writer = consumer if hazard == "WAR" else wait.producer
        if buf in changed.get(writer.seq, set()):
            return True
    return False


def _kinds(consumer: Op, wait) -> set[str]:
    return {f"{wait.producer.kind} -> {consumer.kind}: {b.partition('[')[0]} {h}" for b, h in wait.reasons}


#: every kind of wait the schedule derives (producer -> consumer: buffer hazard), per tier. A new kind of wait fails
#: the mutation test until it is listed here (and it is then mutated like every other).
EXPECTED_KINDS = {
    "ram": {
        "upload -> compute: slot RAW",  # slot.uploaded
        "upload -> compute: slot WAW",  # (the same wait) compute may update the slot in place
        "compute -> upload: slot WAR",  # slot.free: the next block's upload after the compute that read the slot
        "offload -> upload: slot WAR",  # slot.free: after the write-back that read the slot
        "compute -> offload: slot RAW",  # write back what compute wrote
        "offload -> upload: host RAW",  # host_ready: re-upload a block after its write-back
    },
    # Disk: an upload host-waits for its disk read, which the I/O thread runs after the disk write of the
    # previous write-back (FIFO), which waited for that write-back: slot.free after a write-back is implied.
    "disk": {
        "upload -> compute: slot RAW",
        "upload -> compute: slot WAW",
        "compute -> upload: slot WAR",
        "compute -> offload: slot RAW",
        "read -> upload: ring RAW",  # the upload copies what the disk read
        "upload -> read: ring WAR",  # the ring buffer is refilled after its upload
        "offload -> write: staging RAW",  # the disk write persists what the write-back copied
        "write -> offload: staging WAR",  # the staging buffer is reused after the disk write
    },
    # Disk, bound in place (the CPU): compute host-waits for the disk read into its ring buffer, the ring buffer
    # is read into again only after the compute on it (and, FIFO on the I/O thread, after its disk write), the disk
    # write persists what the compute updated. The tied embedding's owner stays in RAM (host[0]); its next update
    # waits for its disk write through a later block's read (FIFO after that write), so no wait of its own.
    "disk-in-place": {
        "read -> compute: ring RAW",
        "read -> compute: ring WAW",  # (the same wait) compute updates the ring buffer in place
        "compute -> read: ring WAR",  # the ring buffer's reuse
        "compute -> write: ring RAW",
        "compute -> write: host RAW",
    },
}


@pytest.mark.parametrize("cfg", [Config("ram", 1, q=1), Config("disk", 2, q=1), Config("disk", 1, q=1, in_place=True)],
                         ids=str)
def test_every_wait_is_needed(sessions, cfg):
    """Remove each wait of a session in turn: the checker reports the race on the wait's buffer, and when
    the wait protects bytes that change (and the caller's sync between passes does not order the two), a
    simulated interleaving produces different results."""
    ref, ops, changed, syncs = _bytes_changed(sessions)
    assert find_races(ops) == []
    waits = [(op, w) for op in ops for w in op.waits]
    kinds = {k for op, w in waits for k in _kinds(op, w)}
    assert kinds == EXPECTED_KINDS[cfg.tier + ("-in-place" if cfg.in_place else "")], \
        f"wait kinds changed: {sorted(kinds)}"
    removed, data_changing, unchanged = [], 0, []
    for op, w in waits:
        op.waits.remove(w)
        try:
            races = find_races(ops)
        finally:
            op.waits.append(w)
        assert any(r.buffer in w.buffers for r in races), f"checker missed the removal of: {describe(op, w)}"
        removed.append(describe(op, w))
        if not _can_change_data(op, w, changed, syncs, ops):
            unchanged.append(describe(op, w))
            continue
        data_changing += 1
        engines = [SimulatedEngine(adversarial=True)] + [SimulatedEngine(seed=s) for s in range(INTERLEAVINGS)]
        for engine in engines:
            try:
                got, _ = sessions.run(engine, drop={(op.seq, w.producer.seq)})
            except ZoedgeError:  # e.g. a non-finite loss from garbage weights: the error is visible too
                sessions.model.engine = SyncEngine()  # drop the failed session's leftovers unexecuted
                break
            if not equal(got, ref):
                break
        else:
            pytest.fail(f"no interleaving shows the removal of: {describe(op, w)}")
    print(f"\n{cfg}: removed {len(removed)} waits ({data_changing} protect changing bytes):\n  " + "\n  ".join(removed))
    assert len(removed) == len(waits) > 0 and data_changing > len(waits) // 2


# ------------------------------------------------------------------------------------- torch.cuda
ALLOWED_CUDA = {"zoedge/runtime/races.py"}  # imports the pure-Python race detector torch.cuda._sanitizer


def test_no_torch_cuda_outside_the_accelerator_engine():
    """Device streams, events and queries go through torch's device-generic API in the accelerator engine."""
    offenders = []
    for path in sorted((ROOT / "zoedge").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED_CUDA:
            continue
        tree = ast.parse(path.read_text(), filename=rel)
        for node in ast.walk(tree):
            hit = (isinstance(node, ast.Attribute) and node.attr == "cuda" and isinstance(node.value, ast.Name)
                   and node.value.id == "torch")
            hit = hit or (isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (getattr(node, "module", None) or "").startswith("torch.cuda") or a.name.startswith("torch.cuda")
                for a in node.names))
            if hit:
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, f"torch.cuda used outside zoedge/runtime/accelerator.py: {offenders}"


@pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the error on a machine without an accelerator")
def test_accelerator_device_without_one_is_a_clear_error(stores):
    with pytest.raises(zoedge.ConfigError, match="--device.*use --device cpu"):
        zoedge.load(stores["none"], device="cuda")


@pytest.mark.parametrize("in_place", [None, False])
def test_cpu_default_engine_and_checker_on_a_forward(stores, in_place):
    m = zoedge.load(stores["none"], tier="disk", prefetch=2, in_place=in_place)
    try:
        assert isinstance(m.engine, SyncEngine)
        ops = m.schedule.record()
        m(*batch(b=2, t=6))
        # a plain forward writes nothing back; the CPU's default computes in the ring buffers (no uploads)
        assert {op.queue for op in ops} == ({"io", "compute"} if in_place is None else {"io", "upload", "compute"})
        assert find_races(ops) == []
    finally:
        m.close()


def test_operations_do_not_accumulate(stores):
    """Without recording, a long run keeps only the latest operations reachable (not every pass's history)."""
    import gc

    def live_ops() -> int:
        gc.collect()
        return sum(isinstance(o, Op) for o in gc.get_objects())

    m = zoedge.load(stores["none"], tier="disk", prefetch=1)
    try:
        ids, mask = batch(b=2, t=6)
        for _ in range(2):
            m(ids, mask)
        after_two = live_ops()
        for _ in range(6):
            m(ids, mask)
        assert live_ops() <= after_two
    finally:
        m.close()

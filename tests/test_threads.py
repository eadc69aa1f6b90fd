"""Thread policy: the default follows the affinity mask, the disk tier leaves the I/O thread a core on 4+ cores,
--threads overrides, a loaded box is warned about, bad values are clear errors."""
from __future__ import annotations

import pytest

from zoedge.errors import ConfigError
from zoedge.runtime import threads as th


@pytest.fixture
def box(monkeypatch):
    """A fake machine: ``box(cores, load)`` sets the affinity mask size and the 1-minute load average."""
    def make(cores: int, load: float) -> None:
        monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(th.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(th, "_proc_stat", lambda: None)  # no /proc/stat: the affinity rule alone
    return make


def test_default_is_the_affinity_mask_not_the_machine(box):
    box(3, 0.5)
    c = th.choose_threads()
    assert (c.threads, c.cores, c.source, c.warning) == (3, 3, "affinity", None)


@pytest.mark.parametrize("cores,expected", [(2, 2), (3, 3), (4, 3), (16, 15)])
def test_disk_tier_leaves_a_core_to_the_io_thread_on_four_or_more(box, cores, expected):
    box(cores, 0.0)
    assert th.choose_threads(tier="disk").threads == expected
    assert th.choose_threads(tier="ram").threads == cores


def test_override_and_bad_value(box):
    box(2, 0.0)
    c = th.choose_threads(1, "disk")
    assert (c.threads, c.source) == (1, "--threads")
    assert "more than the 2 cores" in th.choose_threads(4).warning
    with pytest.raises(ConfigError, match="--threads.*0"):
        th.choose_threads(0)


def test_oversubscribed_box_is_warned_about(box):
    box(2, 2.0)
    assert th.choose_threads().warning is None  # exactly busy: not over
    box(2, 3.5)
    c = th.choose_threads()
    assert "load average (3.5) exceeds the 2 cores" in c.warning
    assert c.to_dict()["load_average"] == 3.5


def test_local_ranks_share_the_cores(monkeypatch):
    """Under torchrun, ranks on one machine split its cores instead of each taking all of them."""
    monkeypatch.setattr(th, "usable_cores", lambda: 8)
    monkeypatch.setattr(th, "_proc_stat", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert th.choose_threads(None, "ram").threads == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert th.choose_threads(None, "ram").threads == 8


# ------------------------------------------------------------------ idle cores (/proc/stat), re-evaluation
class FakeCpus:
    """Fake /proc/stat counters of 2 CPUs and this process's CPU time; ``run(seconds, others, own)`` advances
    the clock with ``others`` cores busy with other processes and ``own`` with this one."""

    def __init__(self, monkeypatch, cores=2):
        self.busy, self.total, self.own, self.wall, self.cores, self.reads = [0] * cores, [0] * cores, 0.0, 0.0, cores, 0
        monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(th.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
        monkeypatch.setattr(th, "_proc_stat", self.stat)
        monkeypatch.setattr(th.time, "process_time", lambda: self.own)
        monkeypatch.setattr(th.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(th.time, "sleep", lambda s: self.run(s, self.others, 0.0))
        self.others = 0.0

    def stat(self):
        self.reads += 1
        return {c: (self.busy[c], self.total[c]) for c in range(self.cores)}

    def run(self, seconds, others, own):
        hz, load = 100, others + own
        for c in range(self.cores):  # spread the busy time over the CPUs, each at most fully busy
            share = min(1.0, max(0.0, load - c))
            self.busy[c] += round(share * seconds * hz)
            self.total[c] += round(seconds * hz)
        self.own += own * seconds
        self.wall += seconds


def test_others_busy_subtracts_this_process():
    a = th.CpuSample({0: (0, 0), 1: (0, 0)}, own=0.0, wall=0.0)
    b = th.CpuSample({0: (100, 100), 1: (50, 100)}, own=0.5, wall=1.0)  # 1.5 cores busy, 0.5 of them ours
    assert th.others_busy(a, b) == pytest.approx(1.0)
    assert th.threads_for(2, 2, 1.0) == 1 and th.threads_for(2, 2, 0.2) == 2 and th.threads_for(2, 2, 2.0) == 1
    assert th.threads_for(4, 8, 0.0) == 4  # never above the cap (e.g. local ranks)


@pytest.mark.parametrize("others,threads", [(0.0, 2), (0.2, 2), (1.0, 1), (1.9, 1)])
def test_start_uses_the_cores_other_processes_leave_idle(monkeypatch, others, threads):
    cpus = FakeCpus(monkeypatch)
    cpus.others = others
    c = th.choose_threads()
    assert c.threads == threads and c.cap == 2 and c.others_busy == pytest.approx(others, abs=0.05)
    assert c.source.startswith("idle cores" if threads < 2 else "affinity")


def test_threads_override_neither_samples_nor_changes(monkeypatch):
    cpus = FakeCpus(monkeypatch)
    c = th.choose_threads(2)
    assert cpus.reads == 0 and c.others_busy is None
    gov = th.ThreadGovernor(c, every=1)
    cpus.run(10, others=1.0, own=1.0)
    assert gov.after_step(1) == 2 and gov.changes == []


def test_governor_follows_other_jobs_during_training(monkeypatch, restore_threads):
    import torch
    cpus = FakeCpus(monkeypatch)
    choice = th.choose_threads()  # quiet start: 2 threads
    th.apply_threads(choice)
    logs = []
    gov = th.ThreadGovernor(choice, every=5, log=logs.append)
    for step in range(1, 5):
        cpus.run(3, others=1.0, own=1.3)  # another job takes a core
        assert gov.after_step(step) == 2  # not a re-evaluation step
    cpus.run(3, others=1.0, own=1.3)
    assert gov.after_step(5) == 1 and torch.get_num_threads() == 1
    for step in range(6, 11):
        cpus.run(3, others=0.0, own=1.0)  # it ended
        gov.after_step(step)
    assert gov.threads == 2 and torch.get_num_threads() == 2
    assert [(c["step"], c["threads"]) for c in gov.changes] == [(5, 1), (10, 2)]
    assert "2 -> 1 after step 5" in logs[0]
    d = gov.to_dict()
    assert d["final_threads"] == 2 and d["threads"] == 2 and len(d["changes"]) == 2


@pytest.fixture
def restore_threads():
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)

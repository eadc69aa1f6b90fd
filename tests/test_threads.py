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
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert th.choose_threads(None, "ram").threads == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert th.choose_threads(None, "ram").threads == 8

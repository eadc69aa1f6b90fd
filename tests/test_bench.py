"""``zoedge bench``'s time breakdown on the CPU: the parts sum to the step, and each lands where it belongs."""
from __future__ import annotations

import json
import time

import pytest

import zoedge
from tests.tiny import save_tiny
from zoedge.cli import main
from zoedge.commands.bench import UNACCOUNTED_TOLERANCE

PARTS = ("noise", "perturbation", "update", "other hooks", "forward passes", "copies (upload, write-back)",
         "stalls (waiting for disk)", "schedule (emitting operations)", "optimizer step (begin, losses, finish)")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    save_tiny("llama", root / "hf", layers=3, tie=False)
    zoedge.prepare(root / "hf", root / "store", dtype="fp32", progress=False, log=lambda s: None)
    return root / "store"


def _bench(store, tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["bench", str(store), "--batch-size", "4", "--max-length", "32", "--steps", "4", "--warmup", "1", "--threads",
                 "1", "--no-progress", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_parts_sum_to_the_step(store, tmp_path, tier):
    """Every part is timed on its own (hooks, noise calls, the engine's operations and host waits, the passes, the
    optimizer's begin/finish); together they cover the mean step within UNACCOUNTED_TOLERANCE (5%)."""
    b = _bench(store, tmp_path, "--tier", tier)
    parts, step = b["breakdown_s"], b["mean_step_s"]
    assert step == pytest.approx(sum(b["step_s"]) / len(b["step_s"]))
    assert set(parts) == {*PARTS, "unaccounted"}
    assert abs(sum(parts[k] for k in PARTS) - step) <= UNACCOUNTED_TOLERANCE * step
    assert min(parts[k] for k in PARTS) >= -1e-4  # a part derived as a difference is never (really) negative
    for k in ("noise", "perturbation", "update", "forward passes"):
        assert parts[k] > 0, k
    # the CPU binds blocks in place (the RAM tier's host buffers, the disk tier's ring buffers): no copies
    assert parts["copies (upload, write-back)"] == 0
    if tier == "disk":  # the I/O thread read every block and wrote back every updated one
        assert b["io_thread_s"]["disk reads"] > 0 and b["io_thread_s"]["disk writes"] > 0
    else:  # no disk
        assert parts["stalls (waiting for disk)"] == 0


def test_a_slow_disk_shows_as_io_time_and_stalls(store, tmp_path, monkeypatch):
    """Each disk read takes 30 ms more: 5 blocks read per step on the I/O thread, which the compute (a few ms per
    block) waits for; the wait appears as stalls, not as forward time, and the parts still sum to the step."""
    from zoedge.runtime import host

    real = host.read_file_into

    def slow(path, buf, *rest):
        time.sleep(0.03)
        real(path, buf, *rest)

    monkeypatch.setattr(host, "read_file_into", slow)
    b = _bench(store, tmp_path, "--tier", "disk")
    parts, step, io = b["breakdown_s"], b["mean_step_s"], b["io_thread_s"]
    assert io["disk reads"] >= 5 * 0.03
    assert parts["stalls (waiting for disk)"] >= 0.5 * io["disk reads"]
    assert parts["stalls (waiting for disk)"] > parts["forward passes"]
    assert abs(sum(parts[k] for k in PARTS) - step) <= UNACCOUNTED_TOLERANCE * step

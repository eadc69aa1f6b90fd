"""CPU thread policy: how many intra-op threads a run uses, chosen from the cores this process may use.

* The default is the number of cores in this process's affinity mask (``os.sched_getaffinity``: a container's
  or ``taskset``'s limit, not the machine's core count, which torch's own default follows).
* With the disk tier on 4 or more cores one core is left to the I/O thread (disk reads and write-backs), so
  it does not preempt a compute thread in the middle of a block; with fewer cores the I/O thread, mostly
  blocked in system calls, shares them.
* Of those, only the cores other processes leave idle are used: ``/proc/stat`` is sampled for
  :data:`SAMPLE_S` at the start, and the cores busy with *other* processes (busy time of the usable cores
  minus this process's own CPU time) are subtracted; a core counts as free while others use less than
  70% of it (:func:`threads_for`). Intra-op threads wait for each other at every operation's end, so one
  thread sharing a core with a busy process stalls all of them: on a 2-core box with one core busy, one
  thread is faster than two.
* During training a :class:`ThreadGovernor` re-evaluates the choice every :data:`RECHECK_STEPS` steps from
  the ``/proc/stat`` counters since its last look (two file reads, no waiting) and changes torch's
  intra-op threads when other jobs started or stopped; the changes go to the run summary.
* ``--threads N`` overrides the choice (no sampling, no changes).
* The decoder layers of a training step on the CPU's RAM tier run on :attr:`ThreadChoice.workers` workers
  instead (:mod:`zoedge.runtime.pipeline`): one per core the policy allows, loaded or not, since they share
  work as it goes (up to :data:`MAX_LAYER_WORKERS`; beyond that each worker gets several intra-op threads);
  the intra-op threads above serve the rest of the step.
* When the 1-minute load average already exceeds the usable cores before the run starts, other jobs compete
  for them: step times will be longer and vary, and the choice is reported with a warning.

The choice is a value (:class:`ThreadChoice`) that run summaries record.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from zoedge.errors import ConfigError


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS does not report one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


#: seconds /proc/stat is sampled at the start of a run to find the cores other processes keep busy
SAMPLE_S = 0.25
#: steps between two re-evaluations of the thread count during training
RECHECK_STEPS = 5
#: a core counts as free while other processes use less than 1 - SLACK of it
SLACK = 0.3
#: the most workers of the concurrent decoder layers: a MeZO step has four chains of work (two passes, two row
#: chunks) and a layer being prepared; more workers would wait, so larger boxes give each worker several threads
MAX_LAYER_WORKERS = 4


def affinity_cpus() -> set[int] | None:
    """The CPU ids this process may run on, or None where the OS does not say."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _proc_stat() -> dict[int, tuple[int, int]] | None:
    """Per CPU id: (busy, total) jiffies since boot from ``/proc/stat`` (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out: dict[int, tuple[int, int]] = {}
    for line in lines:
        head, _, rest = line.partition(" ")
        if head.startswith("cpu") and head[3:].isdigit():
            v = [int(x) for x in rest.split()]
            idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            total = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
            out[int(head[3:])] = (total - idle, total)
    return out


@dataclass(frozen=True)
class CpuSample:
    """Counters at one instant: per-CPU jiffies of the usable CPUs, this process's CPU seconds, the wall clock."""

    cpus: dict[int, tuple[int, int]]
    own: float
    wall: float


def cpu_sample() -> CpuSample | None:
    """The counters now (None where ``/proc/stat`` is unavailable)."""
    stat = _proc_stat()
    if stat is None:
        return None
    allowed = affinity_cpus()
    cpus = {c: v for c, v in stat.items() if allowed is None or c in allowed}
    return CpuSample(cpus, time.process_time(), time.monotonic())


def others_busy(before: CpuSample, after: CpuSample) -> float | None:
    """Cores' worth of CPU time that *other* processes used on the usable CPUs between two samples."""
    wall = after.wall - before.wall
    busy = 0.0
    for c, (b1, t1) in after.cpus.items():
        if c in before.cpus and t1 > before.cpus[c][1]:
            busy += (b1 - before.cpus[c][0]) / (t1 - before.cpus[c][1])
    if wall <= 0:
        return None
    own = (after.own - before.own) / wall
    return max(0.0, busy - own)


def threads_for(cap: int, cores: int, others: float | None) -> int:
    """Threads for ``cores`` usable cores of which other processes keep ``others`` busy, at most ``cap``."""
    if others is None:
        return cap
    return max(1, min(cap, math.floor(cores - others + SLACK)))


@dataclass(frozen=True)
class ThreadChoice:
    """Intra-op threads of a run and why."""

    threads: int
    cores: int                 # usable cores (affinity)
    source: str                # "--threads", "affinity" or "idle cores" (affinity minus cores busy with others)
    load_average: float | None  # 1-minute load average when the choice was made
    warning: str | None = None
    others_busy: float | None = None  # cores busy with other processes when sampled (None: not sampled)
    cap: int = 0               # the most threads the policy allows (affinity, disk tier, local ranks)

    @property
    def _layer_threads(self) -> int:
        return self.threads if self.source == "--threads" else max(self.cap, 1)

    @property
    def workers(self) -> int:
        """Workers of the concurrent decoder layers (:mod:`zoedge.runtime.pipeline`): as many as ``--threads``, else
        as every core the policy allows (``cap``), busy or not, at most :data:`MAX_LAYER_WORKERS`. Unlike intra-op
        threads they do not wait for each other at every operation: a worker sharing its core with another
        process takes fewer items, so they need no re-evaluation."""
        return min(self._layer_threads, MAX_LAYER_WORKERS)

    @property
    def worker_threads(self) -> int:
        """Intra-op threads of each layer worker: the cores beyond :data:`MAX_LAYER_WORKERS`, shared out."""
        return max(1, self._layer_threads // self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "workers": self.workers, "worker_threads": self.worker_threads}


def choose_threads(requested: int | None = None, tier: str = "ram", sample_s: float = SAMPLE_S) -> ThreadChoice:
    """The thread count for a run (see the module docstring).

    Args:
        requested: ``--threads`` (None: choose).
        tier: the host tier (``disk`` may leave a core to the I/O thread).
        sample_s: how long to watch the other processes' CPU use first (0: do not; only without ``requested``).

    Raises:
        ConfigError: ``requested`` is below 1.
    """
    cores = usable_cores()
    if requested is not None:
        if requested < 1:
            raise ConfigError("--threads", f"{requested}", f"use 1 or more (this process may use {cores} cores)")
        threads, source = requested, "--threads"
    else:
        threads, source = (cores - 1 if tier == "disk" and cores >= 4 else cores), "affinity"
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun: ranks sharing this machine
        if local_ranks > 1:
            threads, source = max(1, threads // local_ranks), f"affinity / {local_ranks} local ranks"
    cap, others = threads, None
    if requested is None and sample_s > 0:
        first = cpu_sample()
        if first is not None:
            time.sleep(sample_s)
            second = cpu_sample()
            others = None if second is None else others_busy(first, second)
            idle = threads_for(cap, cores, others)
            if idle < threads:
                threads, source = idle, f"idle cores ({others:.1f} of {cores} busy with other processes)"
    load = load_average()
    warning = None
    if load is not None and load > cores:
        warning = (f"the load average ({load:.1f}) exceeds the {cores} cores this process may use: other jobs "
                   f"compete for them, so steps will be slower and vary; run on a quieter machine, or pin this "
                   f"run to free cores (taskset) and set --threads to their number")
    elif threads > cores:
        warning = f"--threads {threads} is more than the {cores} cores this process may use: threads will contend"
    return ThreadChoice(threads, cores, source, load, warning, others, cap)


def apply_threads(choice: ThreadChoice) -> None:
    """Set torch's intra-op thread count to the choice."""
    import torch
    torch.set_num_threads(choice.threads)


@dataclass
class ThreadGovernor:
    """Re-evaluates a run's thread count during training (see the module docstring).

    Args:
        choice: the choice made at the start (a ``--threads`` choice is never changed).
        every: steps between re-evaluations.
        log: where a change is reported.
    """

    choice: ThreadChoice
    every: int = RECHECK_STEPS
    log: Callable[[str], None] = lambda message: None
    threads: int = 0
    changes: list[dict[str, Any]] = field(default_factory=list)
    _last: CpuSample | None = None

    def __post_init__(self) -> None:
        self.threads = self.choice.threads
        self._last = cpu_sample() if self.active else None

    @property
    def active(self) -> bool:
        return self.choice.source != "--threads" and self.every > 0

    def after_step(self, step: int) -> int:
        """Called after each training step (``step`` steps done); returns the thread count now in use."""
        if not self.active or step % self.every:
            return self.threads
        now = cpu_sample()
        if now is None or self._last is None:
            return self.threads
        others = others_busy(self._last, now)
        self._last = now
        target = threads_for(self.choice.cap or self.choice.threads, self.choice.cores, others)
        if target != self.threads:
            import torch
            torch.set_num_threads(target)
            self.changes.append({"step": step, "threads": target, "others_busy": round(others or 0.0, 2)})
            self.log(f"threads: {self.threads} -> {target} after step {step} (other processes keep "
                     f"{others:.1f} of {self.choice.cores} cores busy)")
            self.threads = target
        return self.threads

    def to_dict(self) -> dict[str, Any]:
        """The start choice, every change (step, threads, cores busy with others) and the final count."""
        return {**self.choice.to_dict(), "changes": list(self.changes), "final_threads": self.threads}

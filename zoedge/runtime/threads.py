"""CPU thread policy: how many intra-op threads a run uses, chosen from the cores this process may use.

* The default is the number of cores in this process's affinity mask (``os.sched_getaffinity``: a container's
  or ``taskset``'s limit, not the machine's core count, which torch's own default follows).
* With the disk tier on 4 or more cores one core is left to the I/O thread (disk reads and write-backs), so
  it does not preempt a compute thread in the middle of a block; with fewer cores the I/O thread, mostly
  blocked in system calls, shares them.
* ``--threads N`` overrides the choice.
* When the 1-minute load average already exceeds the usable cores before the run starts, other jobs compete
  for them: step times will be longer and vary, and the choice is reported with a warning.

The choice is a value (:class:`ThreadChoice`) that run summaries record.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class ThreadChoice:
    """Intra-op threads of a run and why."""

    threads: int
    cores: int                 # usable cores (affinity)
    source: str                # "--threads" or "affinity"
    load_average: float | None  # 1-minute load average when the choice was made
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_threads(requested: int | None = None, tier: str = "ram") -> ThreadChoice:
    """The thread count for a run (see the module docstring).

    Args:
        requested: ``--threads`` (None: choose).
        tier: the host tier (``disk`` may leave a core to the I/O thread).

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
    load = load_average()
    warning = None
    if load is not None and load > cores:
        warning = (f"the load average ({load:.1f}) exceeds the {cores} cores this process may use: other jobs "
                   f"compete for them, so steps will be slower and vary; run on a quieter machine, or pin this "
                   f"run to free cores (taskset) and set --threads to their number")
    elif threads > cores:
        warning = f"--threads {threads} is more than the {cores} cores this process may use: threads will contend"
    return ThreadChoice(threads, cores, source, load, warning)


def apply_threads(choice: ThreadChoice) -> None:
    """Set torch's intra-op thread count to the choice."""
    import torch
    torch.set_num_threads(choice.threads)

"""``zoedge finetune`` that pauses after its first step, for tests of commands run against a live run.

Usage: ``python tests/paused_finetune.py PAUSE_DIR FINETUNE_ARGS...``. After step 1 the run writes
``PAUSE_DIR/started`` and waits (up to 120 s) for ``PAUSE_DIR/go``, then finishes; the exit code is zoedge's.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> int:
    pause, argv = Path(sys.argv[1]), sys.argv[2:]
    from zoedge.cli import main as zoedge_main
    from zoedge.train.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_wait(self):
        metrics = real_step(self)
        if self.step == 1:
            (pause / "started").write_text("1")
            deadline = time.monotonic() + 120
            while not (pause / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return metrics

    Trainer.train_step = step_then_wait
    return zoedge_main(["finetune", *argv])


if __name__ == "__main__":
    sys.exit(main())

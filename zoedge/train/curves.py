"""``curves.png``: dev accuracy and training loss against steps, from a run's metrics and evaluations."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from zoedge.store.atomic import write_error

log = logging.getLogger(__name__)


def read_curves(metrics: Path, evals: dict[str, dict[str, Any]]) -> tuple[list[tuple[int, float]],
                                                                          list[tuple[int, float]]]:
    """(step, training loss) per step and (step, dev accuracy) per evaluation, sorted by step."""
    loss: list[tuple[int, float]] = []
    acc: dict[int, float] = {int(k): v["accuracy"] for k, v in evals.items() if v and v.get("accuracy") is not None}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if isinstance(m.get("loss"), (int, float)):
                loss.append((int(m["step"]), float(m["loss"])))
            if isinstance(m.get("dev_accuracy"), (int, float)):
                acc[int(m["step"])] = float(m["dev_accuracy"])
    return sorted(loss), sorted(acc.items())


def plot_curves(metrics: Path, evals: dict[str, dict[str, Any]], path: Path) -> str | None:
    """Draw the curves into ``path`` (PNG); returns its path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib, or the demo extra)", path.name)
        return None
    loss, acc = read_curves(metrics, evals)
    fig, ax_loss = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    steps, values = [s for s, _ in loss], [v for _, v in loss]
    ax_loss.plot(steps, values, color="tab:blue", lw=0.8, alpha=0.4, label="training loss (batch)")
    k = 5
    mean = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]
    ax_loss.plot(steps, mean, color="tab:blue", lw=1.6, label=f"training loss ({k}-step mean)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss", color="tab:blue")
    ax_acc = ax_loss.twinx()
    ax_acc.plot([s for s, _ in acc], [v for _, v in acc], color="tab:red", marker="o", label="dev accuracy")
    ax_acc.set_ylabel("dev accuracy", color="tab:red")
    lines = ax_loss.get_lines() + ax_acc.get_lines()
    ax_loss.legend(lines, [ln.get_label() for ln in lines], loc="lower left", fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, "the plot", e, "free disk space or fix permissions, then re-run the same command "
                          "with --resume (or add --no-plot)") from None
    finally:
        plt.close(fig)
    return str(path)

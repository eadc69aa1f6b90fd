"""``curves.png``: what a run measured against steps: the training loss and the dev loss (left axis), and the
dev score that fits the layout (right axis): accuracy (classification), else exact match and token F1 of greedy
answers, else perplexity (the ``text`` layout)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from zoedge.store.atomic import write_error

log = logging.getLogger(__name__)

#: the dev figures a curve can show, in metrics.jsonl's names (``dev_`` + an Evaluation field)
DEV_FIELDS = ("loss", "accuracy", "exact_match", "f1", "perplexity")
_LABELS = {"accuracy": "dev accuracy", "exact_match": "dev exact match", "f1": "dev token F1",
           "perplexity": "dev perplexity"}


def read_curves(metrics: Path, evals: dict[str, dict[str, Any]]) -> tuple[list[tuple[int, float]],
                                                                          dict[str, list[tuple[int, float]]]]:
    """(step, training loss) per step, and per dev figure of :data:`DEV_FIELDS` its (step, value) points, sorted."""
    loss: list[tuple[int, float]] = []
    dev: dict[str, dict[int, float]] = {k: {} for k in DEV_FIELDS}
    for step, ev in evals.items():
        for k in DEV_FIELDS:
            if ev and isinstance(ev.get(k), (int, float)):
                dev[k][int(step)] = float(ev[k])
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if isinstance(m.get("loss"), (int, float)):
                loss.append((int(m["step"]), float(m["loss"])))
            for k in DEV_FIELDS:
                if isinstance(m.get(f"dev_{k}"), (int, float)):
                    dev[k][int(m["step"])] = float(m[f"dev_{k}"])
    return sorted(loss), {k: sorted(v.items()) for k, v in dev.items() if v}


def right_axis(dev: dict[str, list[tuple[int, float]]]) -> tuple[str, ...]:
    """The dev figures drawn on the right axis: accuracy, else exact match and F1, else perplexity."""
    for keys in (("accuracy",), ("exact_match", "f1"), ("perplexity",)):
        if any(k in dev for k in keys):
            return tuple(k for k in keys if k in dev)
    return ()


def plot_curves(metrics: Path, evals: dict[str, dict[str, Any]], path: Path) -> str | None:
    """Draw the curves into ``path`` (PNG); returns its path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib, or the demo extra)", path.name)
        return None
    loss, dev = read_curves(metrics, evals)
    fig, ax_loss = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    steps, values = [s for s, _ in loss], [v for _, v in loss]
    ax_loss.plot(steps, values, color="tab:blue", lw=0.8, alpha=0.4, label="training loss (batch)")
    k = 5
    mean = [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]
    ax_loss.plot(steps, mean, color="tab:blue", lw=1.6, label=f"training loss ({k}-step mean)")
    if "loss" in dev:
        ax_loss.plot([s for s, _ in dev["loss"]], [v for _, v in dev["loss"]], color="tab:green", marker="s",
                     label="dev loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss", color="tab:blue")
    lines = ax_loss.get_lines()
    shown = right_axis(dev)
    if shown:
        ax_right = ax_loss.twinx()
        for key, color in zip(shown, ("tab:red", "tab:orange")):
            ax_right.plot([s for s, _ in dev[key]], [v for _, v in dev[key]], color=color, marker="o",
                          label=_LABELS[key])
        ax_right.set_ylabel(" / ".join(_LABELS[k] for k in shown), color="tab:red")
        lines = lines + ax_right.get_lines()
    ax_loss.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize="small")
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

"""The diagnostic run's figures: per-task normalized return by method, and the worst task against each sweep."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


_NONE = {"mean": np.nan, "low": np.nan, "high": np.nan}  # a task without a scale: no bar, no point


def _error(intervals: list[dict]) -> np.ndarray:
    means = np.array([i["mean"] for i in intervals])
    return np.array([means - [i["low"] for i in intervals], [i["high"] for i in intervals] - means])


def per_task_figure(point: dict, task_names: list[str], path: Path) -> Path:
    """Grouped bars: for each task and the worst task, each method's normalized return with its 95% interval."""
    methods = [(n, m) for n, m in sorted(point["methods"].items()) if m["kind"] != "specialist"]
    groups = [name if name in point["normalized_tasks"] else f"{name}\n(no scale)" for name in task_names]
    groups.append("worst task")
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 0.25 * len(methods)), 4.0))
    for j, (name, m) in enumerate(methods):
        intervals = [i or _NONE for i in (*m["normalized"], m["worst"])]
        x = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
        ax.bar(x, [i["mean"] for i in intervals], width, yerr=_error(intervals), capsize=2, label=name,
               color=plt.cm.tab20(j % 20))  # the default cycle repeats after 10 methods
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1, color="gray", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("normalized return (0 reference, 1 specialist)")
    ax.set_title("Per-task normalized return, mean and 95% interval over seeds")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_figure(summary: dict, points: list, path: Path) -> Path:
    """One panel per (knob, loss): each method's worst-task normalized return against the knob's value."""
    panels = sorted({(p.sweep, p.loss.loss_type) for p in points if p.sweep is not None})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (knob, loss) in zip(axes[0], panels):
        chosen = sorted((p for p in points if (p.sweep, p.loss.loss_type) == (knob, loss)), key=lambda p: p.value)
        methods = [n for n, m in summary[chosen[0].name]["methods"].items() if m["kind"] != "specialist"]
        for name in methods:
            intervals = [summary[p.name]["methods"][name]["worst"] or _NONE for p in chosen]
            values = [p.value for p in chosen]
            ax.plot(values, [i["mean"] for i in intervals], marker="o", label=name)
            ax.fill_between(values, [i["low"] for i in intervals], [i["high"] for i in intervals], alpha=0.2)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel(knob)
        ax.set_title(f"{knob} ({loss})", fontsize=9)
        if knob == "imbalance":
            ax.set_xscale("log", base=2)
    axes[0][0].set_ylabel("worst task, normalized return\n(main reference 0, main specialists 1)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Figures of an LLM experiment, drawn from its run folder alone (summary.json and each run's metrics.jsonl).

    task_excess.png     held-out clipped excess over the specialist, per task and method (mean, seed range)
    task_accuracy.png   held-out preference accuracy, likewise
    generation_success.png  verifier success of greedy generations on the verifiable tasks, likewise
    worst_excess.png    the worst-task excess per method, every seed shown
    weights.png         the adaptive mixers' running-average task weights over training, every seed
    eval_curves.png     held-out excess per task against steps, seed 0 of every method
    paired_differences.png  AMA minus standard and minus the best merge, same seed: mean, 95% interval, seeds
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from amalab.atomic_write import write_atomic  # noqa: E402
from amalab.llm.paired_comparison import METRICS  # noqa: E402

ADAPTIVE = ("ama-r", "ama-r-sim", "ama-s", "doremi", "odm")


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _bars(ax, summary: dict, metric: str, ylabel: str) -> None:
    names, methods = summary["tasks"], list(summary["methods"])
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(names))
    for j, method in enumerate(methods):
        entries = [summary["methods"][method]["tasks"][n].get(metric) for n in names]
        means = np.array([e["mean"] if e else np.nan for e in entries])
        low = np.array([e["mean"] - e["min"] if e else 0 for e in entries])
        high = np.array([e["max"] - e["mean"] if e else 0 for e in entries])
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, means, width, yerr=[low, high], capsize=2, label=method)
    ax.set_xticks(x, names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


def _task_bars(folder: Path, summary: dict) -> list[Path]:
    """task_excess.png, task_accuracy.png and, with verifiable tasks, generation_success.png."""
    paths = []
    for metric, label, name in (("excess", "held-out excess over the specialist (bars: seed min-max)", "task_excess"),
                                ("accuracy", "held-out preference accuracy (bars: seed min-max)", "task_accuracy")):
        fig, ax = plt.subplots(figsize=(7, 4))
        _bars(ax, summary, metric, label)
        ax.set_title(f"per-task {metric}, mean over seeds")
        paths.append(_save(fig, folder / f"{name}.png"))
    generated = [n for n in summary["tasks"]
                 if any("success" in m["tasks"][n] for m in summary["methods"].values())]
    if generated:
        fig, ax = plt.subplots(figsize=(7, 4))
        _bars(ax, {**summary, "tasks": generated}, "success", "verifier success of greedy generations")
        ax.set_title("generation on the verifiable tasks' held-out prompts, mean over seeds")
        paths.append(_save(fig, folder / "generation_success.png"))
    return paths


def _worst_excess(folder: Path, summary: dict) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    methods = list(summary["methods"])
    for j, method in enumerate(methods):
        values = [r.get("worst_excess", np.nan) for r in summary["runs"] if r["method"] == method]
        ax.scatter(np.full(len(values), j), values, color="k", s=12, zorder=3)
        ax.bar(j, np.mean(values), color=f"C{j}", alpha=0.7)
    ax.set_xticks(range(len(methods)), methods, rotation=20)
    ax.set_ylabel("worst-task held-out excess (dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder / "worst_excess.png")


def _weights(out: Path, folder: Path, summary: dict) -> list[Path]:
    """weights.png: the adaptive mixers' running-average weights over training, one line style per seed (the
    seeds can disagree: an in-sample AMA-R seed may settle on one task); none without an adaptive method."""
    adaptive = [m for m in summary["methods"] if m.removesuffix("-in-sample") in ADAPTIVE]
    if not adaptive:
        return []
    cols = min(3, len(adaptive))
    rows = -(-len(adaptive) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(adaptive):]:
        ax.axis("off")
    styles = ("-", "--", ":", "-.")
    for ax, method in zip(axes.flat, adaptive):
        seed_dirs = sorted((out / "generalists" / method).glob("seed*"), key=lambda d: int(d.name[4:]))
        for s, seed_dir in enumerate(seed_dirs):
            train = [r for r in _metrics(seed_dir) if r.get("kind") == "train"]
            if not train:
                continue
            steps, average = [r["step"] for r in train], np.array([r["average_weights"] for r in train])
            for i, name in enumerate(summary["tasks"]):
                ax.plot(steps, average[:, i], color=f"C{i}", ls=styles[s % len(styles)], lw=1.5,
                        label=name if s == 0 else None)
        shown = ", ".join(f"{d.name[4:]} {styles[s % len(styles)]}" for s, d in enumerate(seed_dirs))
        ax.set_title(f"{method}: running-average weights (seeds {shown})", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    return [_save(fig, folder / "weights.png")]


def _eval_curves(out: Path, folder: Path, summary: dict) -> Path:
    names = summary["tasks"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for j, method in enumerate(summary["methods"]):
        evals = [r for r in _metrics(out / "generalists" / method / "seed0") if r.get("kind") == "eval"]
        for ax, name in zip(axes[0], names):
            points = [(r["step"], r["tasks"][name]["excess"]) for r in evals if "excess" in r["tasks"].get(name, {})]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, color=f"C{j}", label=method)
    for ax, name in zip(axes[0], names):
        ax.set_title(f"{name}: held-out excess (seed 0)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, folder / "eval_curves.png")


def _paired(folder: Path, summary: dict) -> list[Path]:
    """paired_differences.png: each AMA method minus standard, the best merge and its in-sample variant, per
    seed (dots) and the mean with its 95% t-interval (bars); none without a comparison."""
    rows = summary.get("paired", [])
    if not rows:
        return []
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 0.5 * len(rows) / len(metrics) + 1.8),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        mine = [r for r in rows if r["metric"] == metric]
        for y, r in enumerate(mine):
            ax.scatter(r["differences"], np.full(len(r["differences"]), y), color="k", s=10, zorder=3)
            low, high = (r["mean"], r["mean"]) if r["low"] is None else (r["low"], r["high"])
            color = "C3" if r["against"] == "standard" else "C2" if r["against"].endswith("-in-sample") else "C0"
            ax.errorbar(r["mean"], y, xerr=[[r["mean"] - low], [high - r["mean"]]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(mine)), [f"{r['method']} - {r['against']}" for r in mine], fontsize=8)
        what, higher_better = METRICS[metric]
        ax.set_xlabel(f"difference in {what}\n({'right' if higher_better else 'left'} of 0: method better)",
                      fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("paired differences (same seed): mean and 95% t-interval, dots: seeds", fontsize=9)
    return [_save(fig, folder / "paired_differences.png")]


def make_figures(out: Path, summary: dict) -> list[Path]:
    """Every figure of the module docstring that the summary has data for; their paths."""
    out = Path(out)
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return (_task_bars(folder, summary) + [_worst_excess(folder, summary)] + _weights(out, folder, summary)
            + [_eval_curves(out, folder, summary)] + _paired(folder, summary))

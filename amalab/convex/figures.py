"""Figures of the convex rate reproduction, made from a saved results record (results.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"ama-r-full": "tab:blue", "ama-r": "tab:green", "ama-s": "tab:red", "standard": "tab:gray",
          "uniform": "tab:brown", "mixture": "tab:olive", "doremi": "tab:purple", "odm": "tab:orange"}


def rates_figure(record: dict, path: Path) -> Path:
    """Gap of theta_bar against T per loss: median over seeds, interquartile band, bound dashed."""
    losses = list(record["rates"])
    fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.9), squeeze=False)
    for ax, loss in zip(axes[0], losses):
        entry = record["rates"][loss]
        T = np.asarray(entry["horizons"])
        for algorithm, r in entry["algorithms"].items():
            color = COLORS.get(algorithm)
            ax.plot(T, r["median"], "o-", color=color, ms=3.5, label=f"{algorithm} (slope {r['slope']:.2f})")
            ax.axvline(entry["slope_from"], color="gray", lw=0.6, ls=":")
            ax.fill_between(T, np.maximum(r["q25"], 1e-12), np.maximum(r["q75"], 1e-12), color=color, alpha=0.2)
            ax.plot(T, r["bound"], "--", color=color, lw=1.0)
        ref = entry["algorithms"][next(iter(entry["algorithms"]))]["median"][0] * np.sqrt(T[0] / T)
        ax.plot(T, ref, ":", color="black", lw=1.0, label=r"$\propto T^{-1/2}$")
        ax.set(xscale="log", yscale="log", xlabel="horizon T", title=f"{loss}   OPT = {entry['opt']:.4g}")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0][0].set_ylabel(r"$\max_i E_i(\bar\theta_T) - \mathrm{OPT}$")
    fig.suptitle("Primal gap of the averaged iterate, median and quartiles over seeds (dashed: theoretical "
                 "bounds; slopes fitted right of the dotted line)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def worst_task_figure(record: dict, path: Path) -> Path:
    """Worst-task excess over training, and per-task excess at the horizon, AMA against the baselines."""
    wt = record["worst_task"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw=dict(width_ratios=[1.1, 1]))
    for algorithm, r in wt["algorithms"].items():
        left.plot(r["checkpoints"], np.median(r["curve"], axis=0), color=COLORS.get(algorithm), label=algorithm)
    left.axhline(wt["opt"], color="black", ls="--", lw=1, label="OPT (cvxpy)")
    left.set(xscale="log", yscale="log", xlabel="step t", ylabel=r"$\max_i E_i(\bar\theta_t)$ (median over seeds)",
             title=f"Worst-task excess, {wt['problem']['loss']} with sizes {wt['problem']['sizes']}, "
                   f"angle {wt['problem']['conflict_angle']:g}°")
    left.title.set_fontsize(9)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    names = list(wt["algorithms"])
    k = len(wt["task_names"])
    width = 0.8 / k
    x = np.arange(len(names))
    for i in range(k):
        means = [np.mean(np.asarray(wt["algorithms"][a]["task_excess"])[:, i]) for a in names]
        right.bar(x + (i - (k - 1) / 2) * width, means, width, label=wt["task_names"][i])
    right.axhline(wt["opt"], color="black", ls="--", lw=1, label="OPT")
    right.set_xticks(x, names)
    right.set(ylabel=r"$E_i(\bar\theta_T)$ (mean over seeds)", title=f"Per-task excess at T = {wt['horizon']}")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def exp3_figure(record: dict, path: Path) -> Path:
    """EXP3's mean regret against (e - 1) gamma G_max + k ln k / gamma, per gain sequence."""
    fig, ax = plt.subplots(figsize=(6, 4.3))
    for i, (sequence, r) in enumerate(record["exp3"]["sequences"].items()):
        color = f"C{i}"
        ax.errorbar(r["horizons"], r["mean_regret"], yerr=r["stderr"], fmt="o-", ms=3.5, color=color,
                    label=f"{sequence}: mean regret")
        ax.plot(r["horizons"], r["bound"], "--", color=color, lw=1, label=f"{sequence}: bound")
    ax.set(xscale="log", yscale="log", xlabel="horizon T", ylabel="regret",
           title=f"EXP3 regret against Auer et al.'s bound (k = {record['exp3']['k']})")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def make_figures(record: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [rates_figure(record, out_dir / "rates.png"), worst_task_figure(record, out_dir / "worst_task.png"),
            exp3_figure(record, out_dir / "exp3_regret.png")]

"""Figures of the convex rate reproduction, made from a saved results record (results.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from amalab.atomic_write import write_atomic  # noqa: E402

COLORS = {"ama-r-full": "tab:blue", "ama-r": "tab:green", "ama-r-sim": "tab:cyan", "ama-s": "tab:red", "standard": "tab:gray",
          "uniform": "tab:brown", "mixture": "tab:olive", "doremi": "tab:purple", "odm": "tab:orange"}


def rates_figure(record: dict, path: Path) -> Path:
    """Top: primal gap of theta_bar against T per loss (median over seeds, interquartile band, bound
    dashed). Bottom: the duality gap of the averaged pair (theta_bar, alpha_bar) of deterministic runs."""
    losses = list(record["rates"])
    fig, axes = plt.subplots(2, len(losses), figsize=(4.4 * len(losses), 7.6), squeeze=False,
                             gridspec_kw=dict(height_ratios=[1.5, 1]))
    for top, bottom, loss in zip(axes[0], axes[1], losses):
        entry = record["rates"][loss]
        T = np.asarray(entry["horizons"])
        n = entry["slope_horizons"]
        for algorithm, r in entry["algorithms"].items():
            color = COLORS.get(algorithm)
            top.plot(T, r["median"], "o-", color=color, ms=3.5,
                     label=f"{algorithm}: slope {r['slope']:.2f} ± {r['slope_se']:.2f}")
            top.fill_between(T, np.maximum(r["q25"], 1e-12), np.maximum(r["q75"], 1e-12), color=color, alpha=0.2)
            top.plot(T, r["bound"], "--", color=color, lw=1.0, label=f"{algorithm}: bound")
            if "duality_gap" in r:
                bottom.plot(T, r["duality_gap"], "s-", color=color, ms=3.5,
                            label=f"{algorithm}: duality gap, slope {r['duality_slope']:.2f} ± "
                                  f"{r['duality_slope_se']:.2f}")
                bottom.plot(T, r["median"], "o:", color=color, ms=3, lw=1, label=f"{algorithm}: primal gap")
        top.axvline(T[-n], color="gray", lw=0.6, ls=":")
        bottom.axvline(T[-n], color="gray", lw=0.6, ls=":")
        ref = entry["algorithms"][next(iter(entry["algorithms"]))]["median"][0] * np.sqrt(T[0] / T)
        top.plot(T, ref, ":", color="black", lw=1.0, label=r"$\propto T^{-1/2}$")
        top.set(yscale="log", title=f"{loss}   OPT = {entry['opt']:.4g}")
        bottom.set(yscale="log", xlabel="horizon T")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=6.5, loc="lower left")
    axes[0][0].set_ylabel(r"primal gap $\max_i E_i(\bar\theta_T) - \mathrm{OPT}$")
    axes[1][0].set_ylabel(r"$\max_i E_i(\bar\theta) - \min_\theta \sum_i \bar\alpha_i E_i(\theta)$")
    fig.suptitle("Top: primal gap of the averaged iterate, median and quartiles over seeds, bounds dashed. "
                 "Bottom: duality gap of the averaged pair (deterministic AMA-R). "
                 "Slopes (± standard error) fitted right of the dotted line.", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)
    return path


def worst_task_figure(record: dict, path: Path) -> Path:
    """Worst-task excess over training and per-task excess at the horizon: medians over seeds, with the
    interquartile range (band, error bars) and every seed (dots) to show the spread."""
    wt = record["worst_task"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw=dict(width_ratios=[1.1, 1]))
    for algorithm, r in wt["algorithms"].items():
        curve, color = np.asarray(r["curve"]), COLORS.get(algorithm)
        left.plot(r["curve_steps"], np.median(curve, axis=0), color=color, label=algorithm)
        left.fill_between(r["curve_steps"], np.quantile(curve, 0.25, axis=0), np.quantile(curve, 0.75, axis=0),
                          color=color, alpha=0.2)
    left.axhline(wt["opt"], color="black", ls="--", lw=1, label="OPT (cvxpy)")
    left.set(xscale="log", yscale="log", xlabel="step t",
             ylabel=r"$\max_i E_i(\bar\theta_t)$ (median, quartile band)",
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
        per_seed = [np.asarray(wt["algorithms"][a]["task_excess"])[:, i] for a in names]
        median = np.array([np.median(v) for v in per_seed])
        q25 = np.array([np.quantile(v, 0.25) for v in per_seed])
        q75 = np.array([np.quantile(v, 0.75) for v in per_seed])
        xs = x + (i - (k - 1) / 2) * width
        right.bar(xs, median, width, yerr=[median - q25, q75 - median], capsize=2, color=f"C{i}", alpha=0.75,
                  label=wt["task_names"][i])
        for xi, v in zip(xs, per_seed):
            right.plot(np.full(len(v), xi), v, ".", color="black", ms=2)
    right.axhline(wt["opt"], color="black", ls="--", lw=1, label="OPT")
    right.set_xticks(x, names)
    right.set(ylabel=r"$E_i(\bar\theta_T)$ (median, quartiles, seeds)", title=f"Per-task excess at T = {wt['horizon']}")
    right.legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)
    return path


def exp3_figure(record: dict, path: Path) -> Path:
    """EXP3's mean regret against (e - 1) gamma G_max + k ln k / gamma, per gain sequence.

    The y axis is symmetric-log: regret can be negative (on the sinusoid every arm is best in turn, so a
    learner that follows the leader beats the best fixed arm), and a log axis would silently drop it.
    """
    fig, ax = plt.subplots(figsize=(6, 4.3))
    for i, (sequence, r) in enumerate(record["exp3"]["sequences"].items()):
        color = f"C{i}"
        ax.errorbar(r["horizons"], r["mean_regret"], yerr=r["stderr"], fmt="o-", ms=3.5, color=color,
                    label=f"{sequence}: mean regret")
        ax.plot(r["horizons"], r["bound"], "--", color=color, lw=1, label=f"{sequence}: bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=10.0)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set(xlabel="horizon T", ylabel="regret (symlog: linear in [-10, 10])",
           title=f"EXP3 regret against Auer et al.'s bound (k = {record['exp3']['k']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)
    return path


def make_rate_figures(record: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [rates_figure(record, out_dir / "rates.png"), worst_task_figure(record, out_dir / "worst_task.png"),
            exp3_figure(record, out_dir / "exp3_regret.png")]

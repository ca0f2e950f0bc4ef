"""The benchmark figure: per model, step time per variant (median, bars from min to max) and training peak
memory growth; then the log-prob memory comparison and cache-building throughput."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from amalab.atomic_write import write_atomic  # noqa: E402


def _bars(ax, names, medians, lows, highs, title, ylabel, color):
    positions = range(len(names))
    errors = [[m - lo for m, lo in zip(medians, lows)], [hi - m for m, hi in zip(medians, highs)]]
    ax.bar(positions, medians, yerr=errors, capsize=3, color=color)
    ax.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)


def draw(results: dict, path: Path) -> None:
    models = list(results["step_time"])
    rows = len(models) + 1
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.4 * rows), squeeze=False)
    for row, model in enumerate(models):
        variants = {n: v for n, v in results["step_time"][model]["variants"].items()
                    if v["step_seconds"]["n"]}
        names = list(variants)
        s = [variants[n]["step_seconds"] for n in names]
        colors = ["tab:orange" if n.startswith("trl") else "tab:blue" for n in names]
        _bars(axes[row][0], names, [x["median"] for x in s], [x["min"] for x in s], [x["max"] for x in s],
              f"{model}: step time (median, min-max)", "seconds / step", colors)
        ratio = results["step_time"][model].get("ratio_vs_trl")
        if ratio is not None:
            axes[row][0].text(0.02, 0.95, f"amalab standard / TRL = {ratio:.2f}",
                              transform=axes[row][0].transAxes, va="top", fontsize=8)
        key = "peak_cuda_allocated_mib" if all("peak_cuda_allocated_mib" in variants[n] for n in names) \
            else "peak_rss_growth_mib"
        m = [variants[n][key] for n in names]
        _bars(axes[row][1], names, [x["median"] for x in m], [x["min"] for x in m], [x["max"] for x in m],
              f"{model}: training peak memory ({key})", "MiB", colors)
    memory_ax, cache_ax = axes[-1]
    entries = [(model, method, block[method]) for model, block in results["logprob_memory"].items()
               for method in ("sequence_logps", "full_log_softmax") if "memory" in block.get(method, {})]
    if entries:
        on_cuda = "peak_cuda_growth_mib" in entries[0][2]["memory"]
        key = "peak_cuda_growth_mib" if on_cuda else "peak_rss_growth_mib"
        values = [e[2]["memory"][key] for e in entries]
        _bars(memory_ax, [f"{m}\n{meth}" for m, meth, _ in entries], values, values, values,
              f"log-prob forward+backward peak growth (vocab {entries[0][2]['vocab_size']})", "MiB",
              ["tab:blue" if meth == "sequence_logps" else "tab:gray" for _, meth, _ in entries])
    else:
        memory_ax.set_axis_off()
    entries = [(model, method, block[method]) for model, block in results["cache_throughput"].items()
               for method in ("length_sorted", "data_order") if method in block]
    if entries:
        _bars(cache_ax, [f"{m}\n{meth}" for m, meth, _ in entries],
              [e[2]["median_pairs_per_s"] for e in entries], [min(e[2]["pairs_per_s"]) for e in entries],
              [max(e[2]["pairs_per_s"]) for e in entries], "reference-cache building (median, min-max)",
              "pairs / s", ["tab:blue" if meth == "length_sorted" else "tab:gray" for _, meth, _ in entries])
    else:
        cache_ax.set_axis_off()
    machine = results["machine"]
    hardware = machine.get("gpu") or machine.get("cpu_model", "")
    fig.suptitle(f"amalab vs TRL DPOTrainer - {machine['device']}, {hardware}, {machine['cpu_count']} cores, "
                 f"torch {machine['torch']}", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)

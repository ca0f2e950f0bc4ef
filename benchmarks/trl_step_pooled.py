"""The per-round ratios of several ``benchmarks.trl_step`` runs pooled: one median over every round of every run,
with an interval that holds the run-to-run variation too.

    PYTHONPATH=. python -m benchmarks.trl_step_pooled benchmarks/results-trl-steps \\
        benchmarks/results-trl-steps-pooled/run1 ... --model smollm2 --variant ama-ama-s

A run's own interval (``median_interval_95`` in its results.json) resamples its rounds only, so it says
nothing of how far the next run's median will land; repeated runs of the same command land further apart
than their intervals. Here the rounds are resampled in two stages (a cluster bootstrap): draw as many runs as
were given, with replacement, then in each drawn run as many of its rounds as it has, with replacement; the
median of the drawn rounds, 10,000 times (seeded); the 2.5 and 97.5 percentiles of those medians. With few
runs (three, say: ten distinct draws of runs) the interval is itself rough and tends to be too narrow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESAMPLES = 10_000


def per_round_ratios(folder: Path, model: str, variant: str, kind: str = "cycle") -> list[float]:
    """The per-round ratios to TRL of one run (``results.json`` in ``folder``), without the rounds that have
    none (a CPU-time ratio where a step took no time)."""
    results = json.loads((folder / "results.json").read_text())
    try:
        values = results["models"][model]["ratio_vs_trl"][variant][kind]["per_round"]
    except KeyError as e:
        raise ValueError(f"{folder / 'results.json'}: no {kind} ratios of {variant!r} on model {model!r} "
                         f"(missing key {e})") from None
    known = [float(x) for x in values if x is not None]
    if not known:
        raise ValueError(f"{folder / 'results.json'}: no round has a {kind} ratio of {variant!r}")
    return known


def cluster_interval(runs: list[list[float]], resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """A 95 % two-stage bootstrap interval of the pooled median (module docstring), or None under 2 runs."""
    if len(runs) < 2:
        return None
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    for i in range(resamples):
        drawn = rng.integers(len(runs), size=len(runs))
        medians[i] = np.median(np.concatenate([rng.choice(runs[j], len(runs[j])) for j in drawn]))
    return [float(x) for x in np.percentile(medians, [2.5, 97.5])]


def pooled(runs: list[list[float]]) -> dict:
    values = np.concatenate(runs)
    return {"runs": [{"rounds": len(r), "median": float(np.median(r))} for r in runs],
            "rounds": int(values.size), "median": float(np.median(values)),
            "slower_rounds": int((values > 1).sum()), "median_interval_95": cluster_interval(runs)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="result folders of benchmarks.trl_step")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variant", default="ama-ama-s")
    parser.add_argument("--kind", choices=("cycle", "step", "user", "system"), default="cycle",
                        help="wall time of the cycle or the step, or the cycle's user or system CPU time")
    args = parser.parse_args(argv)
    try:
        runs = [per_round_ratios(folder, args.model, args.variant, args.kind) for folder in args.folders]
    except (OSError, ValueError) as e:
        sys.exit(f"trl_step_pooled: {e}")
    summary = pooled(runs)
    for folder, run in zip(args.folders, summary["runs"]):
        print(f"{folder}: median {run['median']:.3f} over {run['rounds']} rounds")
    interval = summary["median_interval_95"]
    shown = f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "(one run: no interval)"
    print(f"pooled: median {summary['median']:.3f} {shown} over {summary['rounds']} rounds of {len(runs)} runs, "
          f"{args.variant} slower in {summary['slower_rounds']}")
    return summary


if __name__ == "__main__":
    main()

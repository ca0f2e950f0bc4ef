"""Choosing a body's settings apart from the comparison that reports on them.

Tuning the tasks, behaviour policies and training settings of a body until every specialist beats its
reference, then reporting the comparison on the same seeds, would select the seeds' luck along with the
settings. ``amalab diagnose CONFIG --selection`` runs the part of the config that the choice needs (the
behaviour policies, segments, references and specialists of the main comparison, and the scale check of
docs/maths.md (62)) on seeds the comparison never uses: the config's seed (which every data seed hashes)
and the evaluation seed moved by :data:`SEED_OFFSET` (so new behaviour policies, segments, training seeds
and evaluation episodes), into ``out/selection``. A body's README states the settings tried and the
selection's verdicts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from amalab.atomic_write import write_json_atomic
from amalab.control.config import DiagnoseConfig, SweepsConfig
from amalab.control.diagnose import shared_points, specialist_stage
from amalab.control.run import Run, run_points, use_workspace

#: the selection's seeds: far from every seed the comparison uses (training seeds seed + 0..seeds-1; the data
#: seeds hash the config's seed, so they move with it)
SEED_OFFSET = 1_000_000


def selection_config(config: DiagnoseConfig) -> DiagnoseConfig:
    """``config`` on the selection's seeds, main comparison only, writing into ``out/selection``."""
    return replace(config, seed=config.seed + SEED_OFFSET, out=str(Path(config.out) / "selection"), figures="",
                   evaluation=replace(config.evaluation, seed=config.evaluation.seed + SEED_OFFSET),
                   sweeps=SweepsConfig())


def select(config: DiagnoseConfig, show_progress: bool = True) -> dict:
    """Run the selection of ``config``; print one line per task and write ``selection.json``: the scale
    (reference and specialist returns, gains with their intervals, which tasks have one)."""
    chosen = selection_config(config)
    run = Run(chosen, show_progress)
    use_workspace(run)
    points = run_points(chosen)[:1]
    _, _, scale = specialist_stage(chosen, points, shared_points(points), show_progress)
    for i, task in enumerate(chosen.tasks):
        gain = scale["specialist_gain"][i]
        print(f"selection {task.name}: reference {scale['reference_returns'][i]:.1f}, specialists "
              f"{scale['specialist_returns'][i]:.1f}, gain {gain['mean']:+.2f} [{gain['low']:+.2f}, {gain['high']:+.2f}]"
              f", floor {scale['gain_floor'][i]:.2f}: {'scale' if scale['scaled'][i] else 'NO SCALE'}")
    write_json_atomic(Path(chosen.out) / "selection.json",
                      {"environment": chosen.environment, "seed": chosen.seed, "scale": scale}, indent=1)
    return scale

"""The diagnostic run: behaviour policies, segment pools, then for each dataset of the run (the main one
and every sweep value) the reference, the specialists, every method and every merge, each seed evaluated by
true returns and held-out losses (docs/maths.md sections 7, 8 and 11, with a Gaussian policy for the LM).

Everything lands under ``out``: ``behaviour/`` and ``pool/`` (cached arrays with manifests),
then under ``models/<hash of the training settings>/``: ``references/`` (one behaviour-cloned reference
per dataset), ``<dataset and loss>/models`` (the trained policies) and ``<dataset and loss>/records`` (one
JSON per evaluated model and seed). An interrupted run
resumes: a record or model on disk is never recomputed, and every file is written atomically.

The points and the run's workspace are :mod:`amalab.control.run`; one point's models and records,
:mod:`amalab.control.comparison`; the numbers and tables, :mod:`amalab.control.summary`.
"""

from __future__ import annotations

import time
from pathlib import Path

from amalab.atomic_write import write_json_atomic, write_text_atomic
from amalab.control.comparison import compare
from amalab.control.config import DiagnoseConfig
from amalab.control.figures import per_task_figure, sweep_figure
from amalab.control.run import Run, run_points
from amalab.control.summary import summarize_point, tables


def diagnose(config: DiagnoseConfig, show_progress: bool = True) -> dict:
    """Run (or resume) every point; write ``summary.json``, the tables and the figures into ``out`` and, if
    the config names one, into ``figures``. Returns the summary."""
    began = time.perf_counter()
    run = Run(config, show_progress)
    points = run_points(config)
    names = [t.name for t in config.tasks]
    summary = {"main": summarize_point(compare(run, points[0]), names)}  # the scale of every sweep point
    for point in points[1:]:
        summary[point.name] = summarize_point(compare(run, point), names, summary["main"])
    text = tables(summary, points, names)
    for folder in {Path(config.out), *([Path(config.figures)] if config.figures else [])}:
        write_json_atomic(folder / "summary.json", summary, indent=1)
        write_text_atomic(folder / "table.md", text)
        per_task_figure(summary["main"], names, folder / "per_task.png")
        if len(points) > 1:
            sweep_figure(summary, points, folder / "sweeps.png")
    run.log(text)
    run.log(f"finished in {time.perf_counter() - began:.0f} s; wrote {config.out}"
            + (f" and {config.figures}" if config.figures else ""))
    return summary

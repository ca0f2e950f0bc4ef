"""The diagnostic run: for each training seed its own behaviour policies and segment pools, then for each
dataset of the run (the main one and every sweep value) the seed's reference, specialists, methods and
merges, each seed evaluated by true returns and held-out losses (docs/maths.md sections 7, 8 and 11, with a
Gaussian policy for the LM).

Everything lands under ``out``: ``behaviour/<task>/seed-<s>`` and ``pool/<task>/seed-<s>`` (cached arrays
with manifests), then under ``models/<hash of the training settings>/``: ``references/`` (one
behaviour-cloned reference per dataset and seed), ``<dataset and loss>/models`` (the trained policies) and ``<dataset and loss>/records`` (one
JSON per evaluated model and seed). An interrupted run
resumes: a record or model on disk is never recomputed, and every file is written atomically.

The behaviour policies and segments (one per task and seed), the references (one per dataset and seed),
then each seed's reference record and specialists, then each seed's methods and merges, are jobs of :mod:`amalab.runner`, run as ``[run]`` says (in this process, over
worker processes or on a Dask cluster): each job trains with its own seeds, so the summary does not depend
on the number of workers or their order. Between the specialists and the generalists the run checks the
main comparison's scale (docs/maths.md (62)): a task whose specialists do not beat the reference gets one
line and no normalized score, and a run where no task has a scale stops there.

The points and the run's workspace are :mod:`amalab.control.run`; one point's models and records,
:mod:`amalab.control.comparison`; the numbers and tables, :mod:`amalab.control.summary`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from amalab.atomic_write import write_json_atomic, write_text_atomic
from amalab.control.comparison import data_job, method_job, reference_job, specialist_job
from amalab.control.config import DiagnoseConfig
from amalab.control.figures import per_task_figure, sweep_figure
from amalab.control.run import Point, Run, run_points, use_workspace
from amalab.control.summary import summarize_point, tables, task_scales, unscaled_lines
from amalab.errors import ConfigError
from amalab.runner import Job, run_jobs


def diagnose(config: DiagnoseConfig, show_progress: bool = True) -> dict:
    """Run (or resume) every point; write ``summary.json``, the tables and the figures into ``out`` and, if
    the config names one, into ``figures``. Returns the summary."""
    began = time.perf_counter()
    run = Run(config, show_progress)
    use_workspace(run)
    points, names = run_points(config), [t.name for t in config.tasks]
    shared = shared_points(points)
    specialists, where, scale = specialist_stage(config, points, shared, show_progress)
    if not any(scale["scaled"]):
        raise ConfigError("no task's specialists beat the reference in the main comparison, so no return can be "
                          "normalized (docs/maths.md (62)): " + "; ".join(unscaled_lines(scale, names))
                          .replace("; the worst task is taken over none", ""))
    jobs, method_where = record_jobs(config, shared, method_job)
    methods = _run(config, jobs, show_progress, "generalists and merges")
    records = [point_records(point, specialists, where, methods, method_where) for point in points]
    floor = config.evaluation.min_gain
    summary = {"main": summarize_point(records[0], names, min_gain=floor)}  # the scale of every sweep point
    for point, found in zip(points[1:], records[1:]):
        summary[point.name] = summarize_point(found, names, summary["main"], min_gain=floor)
    _write(config, summary, points, names, run)
    run.log(f"finished in {time.perf_counter() - began:.0f} s; wrote {config.out}"
            + (f" and {config.figures}" if config.figures else ""))
    return summary


def specialist_stage(config: DiagnoseConfig, points: list[Point], shared: dict[str, Point], show_progress: bool
                     ) -> tuple[list, dict, dict]:
    """Each seed's behaviour policies and segments, its references, then its reference record and
    specialists; the last jobs' outputs, where each lies, and the main comparison's scale (docs/maths.md
    (62)), with one printed line per task it leaves out."""
    names = [t.name for t in config.tasks]
    _run(config, data_jobs(config, points), show_progress, "behaviour policies and segments")
    _run(config, reference_jobs(config, points), show_progress, "references")
    jobs, where = record_jobs(config, shared, specialist_job)
    specialists = _run(config, jobs, show_progress, "specialists")
    scale = task_scales(point_records(points[0], specialists, where), names, config.evaluation.min_gain)
    for line in unscaled_lines(scale, names):
        tqdm.write(line)
    return specialists, where, scale


def _write(config: DiagnoseConfig, summary: dict, points: list[Point], names: list[str], run: Run) -> None:
    """summary.json, table.md and the figures, into ``out`` and ``figures``."""
    text = tables(summary, points, names)
    for folder in {Path(config.out), *([Path(config.figures)] if config.figures else [])}:
        write_json_atomic(folder / "summary.json", summary, indent=1)
        write_text_atomic(folder / "table.md", text)
        per_task_figure(summary["main"], names, folder / "per_task.png")
        if len(points) > 1:
            sweep_figure(summary, points, folder / "sweeps.png")
    run.log(text)


def _run(config: DiagnoseConfig, jobs: list[Job], show_progress: bool, desc: str) -> list:
    """The jobs' outputs; each job saves its models and records itself, so an interrupted run resumes."""
    return run_jobs(jobs, config.run.workers or None, config.run.backend, config.run.scheduler,
                    show_progress=show_progress, desc=desc)


def data_jobs(config: DiagnoseConfig, points: list[Point]) -> list[Job]:
    """One job per task and training seed: its behaviour policies (CEM) and segments, which every point's
    dataset of that seed draws from (progress counts CEM iterations)."""
    seeds = max(point.seeds for point in points)
    return [Job(f"behaviour {task.name}/seed-{seed}", data_job, {"config": config, "task_index": i, "seed": seed},
                config.behaviour.iterations) for seed in range(seeds) for i, task in enumerate(config.tasks)]


def reference_jobs(config: DiagnoseConfig, points: list[Point]) -> list[Job]:
    """One job per dataset and seed: its reference, which the points on that dataset (differing in the loss)
    share."""
    seeds = {}
    for point in points:
        first, most = seeds.get(point.dataset, (point, 0))
        seeds[point.dataset] = (first, max(most, point.seeds))
    return [Job(f"reference {dataset}/seed-{seed}", reference_job, {"config": config, "point": point, "seed": seed},
                config.reference.max_steps) for dataset, (point, most) in seeds.items() for seed in range(most)]


def shared_points(points: list[Point]) -> dict[str, Point]:
    """Per folder, one point that trains every method and merge any of its points lists, with the most
    seeds: points that share a folder (a sweep value equal to the main settings) share its jobs, so no model
    trains twice at once."""
    shared = {}
    for point in points:
        other = shared.get(point.folder, point)
        shared[point.folder] = replace(other, methods=_union(other.methods, point.methods),
                                       merges=_union(other.merges, point.merges), seeds=max(other.seeds, point.seeds))
    return shared


def record_jobs(config: DiagnoseConfig, shared: dict[str, Point], job) -> tuple[list[Job], dict]:
    """Per folder, a ``job`` per seed (``specialist_job``: the reference's record and the specialists, or
    ``method_job``); and where each (folder, seed) job lies."""
    jobs, where = [], {}
    for folder, point in shared.items():
        steps = (len(config.tasks) * config.specialists.max_steps if job is specialist_job
                 else len(point.methods) * config.train.max_steps + len(point.merges))
        for seed in range(point.seeds):
            where[folder, seed] = len(jobs)
            jobs.append(Job(f"{folder}/seed-{seed}", job, {"config": config, "point": point, "seed": seed}, steps))
    return jobs, where


def _union(first: list[str], second: list[str]) -> list[str]:
    """``first``, then the names of ``second`` it lacks (each list's own order is kept: standard stays
    before doremi)."""
    return first + [name for name in second if name not in first]


def point_records(point: Point, specialists: list, where: dict, methods: list | None = None,
                  method_where: dict | None = None) -> list[dict]:
    """``point``'s records, in its order: per seed the reference's and the specialists' and (given the
    method jobs' outputs) its methods' and its merges' (a shared job may hold more)."""
    records = []
    for seed in range(point.seeds):
        records += specialists[where[point.folder, seed]]
        if methods is not None:
            by_method = {r["method"]: r for r in methods[method_where[point.folder, seed]]}
            records += [by_method[name] for name in point.methods + point.merges]
    return records

"""The convex rate reproduction: solve the problems, run every job, assemble and write the results.

Three experiments, each a set of independent jobs spread over worker processes by the project's job
runner, :mod:`amalab.runner` (docs/maths.md section 6):
  rates       the primal gap of theta_bar against the cvxpy OPT for T = 2^8 ... 2^18, per loss and
              algorithm, with its bound, and the duality gap of deterministic runs;
  worst_task  worst-task excess of AMA against the baselines on an imbalanced, conflicting problem;
  exp3        EXP3's regret on adversarial gain sequences against its bound.
The config lives in :mod:`amalab.convex.config`, the jobs in :mod:`amalab.convex.jobs`, the record in
:mod:`amalab.convex.record` and the files in :mod:`amalab.convex.results_io`. Each job draws from its own
seeded generator (:func:`amalab.convex.jobs.job_rng`), so the results do not depend on the workers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from amalab.convex.algorithms import train_algorithm
from amalab.convex.config import ReproductionConfig
from amalab.convex.exp3_regret import exp3_regret
from amalab.convex.jobs import Checkpoints, exp3_job, job_description, numerics_version, rate_job, worst_task_job
from amalab.convex.optimum import solve
from amalab.convex.problems import make_problem
from amalab.convex.record import build_record
from amalab.runner import Job, run_jobs


def plan_jobs(config: ReproductionConfig, solved: dict, worst_solved) -> tuple[list[tuple], list[tuple]]:
    """The ``(fn, kwargs, steps)`` jobs of a reproduction and their names (experiment, ...)."""
    rates, worst, exp3 = config.rates, config.worst_task, config.exp3
    jobs, names = [], []
    for loss in rates.losses:
        for algorithm in rates.algorithms:
            for horizon in rates.horizons:  # one job per horizon: see rate_job
                jobs.append((rate_job, dict(solved=solved[loss], algorithm=algorithm, horizons=[horizon],
                                            seeds=rates.seeds, batch_size=rates.batch_size, seed=config.seed,
                                            loss=loss), horizon))
                names.append(("rates", loss, algorithm, str(horizon)))
    for algorithm in worst.algorithms:
        jobs.append((worst_task_job, dict(solved=worst_solved, algorithm=algorithm, horizon=worst.horizon,
                                          seeds=worst.seeds, batch_size=worst.batch_size,
                                          gain_scale=worst.ama_s_gain_scale, seed=config.seed,
                                          gamma=worst.gamma), worst.horizon))
        names.append(("worst_task", algorithm))
    for sequence in exp3.sequences:
        jobs.append((exp3_job, dict(sequence=sequence, k=exp3.k, horizons=exp3.horizons, seeds=exp3.seeds,
                                    seed=config.seed), max(exp3.horizons)))
        names.append(("exp3", sequence))
    return jobs, names


def compile_kernels(solved) -> None:
    """Compile the numba kernels (or load them from numba's cache) once, here, before the workers start:
    otherwise every worker would compile them at the same time on a first run."""
    train_algorithm("ama-s", solved, [2], 3 * solved.problem.k, np.random.default_rng(0))
    exp3_regret("switching", 2, [2], 2, np.random.default_rng(0))


def _resumable(names, jobs, checkpoint_dir: Path, show_progress: bool) -> tuple[dict, object]:
    """The jobs already checkpointed under their current key, and the function that checkpoints a job."""
    numerics = numerics_version()
    checkpoints = Checkpoints(checkpoint_dir, ["/".join(name) for name in names],
                              [job_description(name, kwargs, numerics) for name, (_, kwargs, _) in zip(names, jobs)])
    done, stale = checkpoints.load()
    if show_progress and done:
        print(f"resuming: {len(done)} of {len(jobs)} jobs were already done ({checkpoint_dir})")
    if stale:  # said even with --quiet: results are never silently mixed across problems or code
        print(f"recomputing {len(stale)} jobs whose checkpoints in {checkpoint_dir} came from another problem, "
              f"other settings or other code: {', '.join('/'.join(names[i]) for i in stale[:5])}"
              + (", ..." if len(stale) > 5 else ""))
    return done, checkpoints.save


def run_reproduction(config: ReproductionConfig, show_progress: bool = True,
                     checkpoint_dir: Path | None = None) -> dict:
    """Run all three experiments; return the results record (see :func:`amalab.convex.record.build_record`).

    With ``checkpoint_dir``, every finished job is saved there at once and jobs already saved under the
    same key (same problem, solve, settings and numerical code) are not rerun, so an interrupted
    reproduction resumes where it stopped.
    """
    start = time.perf_counter()
    rates, worst = config.rates, config.worst_task
    solved = {loss: solve(make_problem(loss, seed=config.seed, settings=rates.problem)) for loss in rates.losses}
    worst_solved = solve(make_problem(worst.loss, seed=config.seed, settings=worst.problem))
    jobs, names = plan_jobs(config, solved, worst_solved)
    done, save = ({}, None) if checkpoint_dir is None else _resumable(names, jobs, checkpoint_dir, show_progress)
    compile_kernels(worst_solved)
    runner_jobs = [Job("/".join(name), fn, kwargs, steps) for name, (fn, kwargs, steps) in zip(names, jobs)]
    outputs = run_jobs(runner_jobs, config.workers or None, on_done=save, done=done, show_progress=show_progress,
                       desc="convex rates")
    return build_record(config, solved, worst_solved, names, outputs, time.perf_counter() - start)

"""The reproduction's jobs (each independent, run in a worker) and the checkpoints of finished jobs.

  rate_job        primal gaps max_i E_i(theta_bar) - OPT for every horizon and seed (and, for deterministic
                  runs, the duality gap of the averaged pair (theta_bar, alpha_bar));
  worst_task_job  per-task excess of theta_bar and the worst-task curve over training;
  exp3_job        EXP3's regret on an adversarial gain sequence.

A job's random numbers depend on the config seed and its name, never on the order jobs run in, so a job
gives the same numbers alone, in a pool, or resumed from a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np

import amalab
from amalab.convex.algorithms import DETERMINISTIC, train_algorithm
from amalab.convex.exp3_regret import exp3_regret
from amalab.convex.optimum import SolvedProblem


def job_rng(seed: int, *names: str) -> np.random.Generator:
    """A generator per job that depends on the config seed and the job's name, not on job order."""
    return np.random.default_rng([seed] + [zlib.crc32(n.encode()) for n in names])


def rate_job(solved: SolvedProblem, algorithm: str, horizons: list[int], seeds: int, batch_size: int,
             seed: int, loss: str, progress=None) -> dict:
    """Primal gaps, shape (horizons, seeds); deterministic runs get 1 seed and their duality gaps.

    The reproduction gives each horizon its own job (rows of one job all run to its longest horizon, so
    one job per horizon costs sum T steps instead of len(horizons) x max T); the random numbers depend on
    the horizons asked for, so a horizon's gaps are the same whichever other horizons a config lists.
    """
    n_seeds = 1 if algorithm in DETERMINISTIC else seeds
    rows = np.repeat(horizons, n_seeds)
    rng = job_rng(seed, "rates", loss, algorithm, *(str(T) for T in horizons))
    result = train_algorithm(algorithm, solved, rows, batch_size, rng, progress=progress)
    output = dict(gap=(result.worst_excess - solved.opt_value).reshape(len(horizons), n_seeds).tolist())
    if algorithm in DETERMINISTIC:
        output["duality_gap"] = solved.duality_gap(result.theta_bar, result.average_weights).tolist()
    return output


def worst_task_job(solved: SolvedProblem, algorithm: str, horizon: int, seeds: int, batch_size: int,
                   gain_scale: str, seed: int, gamma: float | None = None, progress=None) -> dict:
    """Per-task excess of theta_bar at the horizon and the worst-task curve over training."""
    checkpoints = np.unique(np.geomspace(16, horizon, 40).astype(int))
    result = train_algorithm(algorithm, solved, np.full(seeds, horizon), batch_size,
                             job_rng(seed, "worst_task", algorithm), gain_scale, gamma, checkpoints, progress)
    return dict(task_excess=result.task_excess.tolist(), average_weights=result.average_weights.tolist(),
                checkpoints=result.checkpoints.tolist(), curve=result.curve.tolist())


def exp3_job(sequence: str, k: int, horizons: list[int], seeds: int, seed: int, progress=None) -> dict:
    return exp3_regret(sequence, k, horizons, seeds, job_rng(seed, "exp3", sequence), progress)


def job_key(name: tuple, kwargs: dict) -> str:
    """A file name for job ``name`` that changes whenever anything it computes from changes."""
    described = {k: (dict(problem=v.problem.settings, clip=v.clip) if isinstance(v, SolvedProblem) else v)
                 for k, v in kwargs.items()}
    text = json.dumps(dict(version=amalab.__version__, job=name, kwargs=described), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class Checkpoints:
    """Finished jobs saved one JSON file each, so an interrupted reproduction resumes where it stopped."""

    def __init__(self, folder: Path, keys: list[str]):
        self.folder = folder
        self.paths = [folder / f"{key}.json" for key in keys]

    def load(self) -> dict[int, dict]:
        """The results already saved, by job index (unreadable leftovers are ignored and rerun)."""
        done = {}
        for i, path in enumerate(self.paths):
            if path.is_file():
                try:
                    done[i] = json.loads(path.read_text())
                except (OSError, ValueError):
                    pass
        return done

    def save(self, index: int, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.paths[index].with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(self.paths[index])  # atomic: an interrupted write never leaves a half file

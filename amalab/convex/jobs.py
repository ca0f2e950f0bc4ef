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
import importlib
import json
import zlib
from pathlib import Path

import numpy as np

from amalab.atomic_write import write_json_atomic
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
    curve_steps = np.unique(np.geomspace(16, horizon, 40).astype(int))
    result = train_algorithm(algorithm, solved, np.full(seeds, horizon), batch_size,
                             job_rng(seed, "worst_task", algorithm), gain_scale, gamma, curve_steps, progress)
    return dict(task_excess=result.task_excess.tolist(), average_weights=result.average_weights.tolist(),
                curve_steps=result.curve_steps.tolist(), curve=result.curve.tolist())


def exp3_job(sequence: str, k: int, horizons: list[int], seeds: int, seed: int, progress=None) -> dict:
    return exp3_regret(sequence, k, horizons, seeds, job_rng(seed, "exp3", sequence), progress)


#: the modules whose code determines a job's numbers: a change to any of them makes every checkpoint stale
NUMERICAL_MODULES = (
    "amalab.convex.jobs", "amalab.convex.training", "amalab.convex.compiled_steps",
    "amalab.convex.compiled_engine", "amalab.convex.algorithms", "amalab.convex.bounds",
    "amalab.convex.exp3_regret", "amalab.convex.losses", "amalab.convex.problems", "amalab.convex.optimum",
    "amalab.objectives.margin", "amalab.mixers.ama_r", "amalab.mixers.ama_s", "amalab.mixers.base",
    "amalab.mixers.baselines", "amalab.mixers.excess", "amalab.mixers.exp3",
    "amalab.mixers.exponentiated_gradient", "amalab.mixers.logspace", "amalab.mixers.registry",
    "amalab.mixers.task_batches",
)


def numerics_version() -> str:
    """A digest of the numerical code (the source of :data:`NUMERICAL_MODULES`) and of numpy's version."""
    digest = hashlib.sha256(np.__version__.encode())
    for name in NUMERICAL_MODULES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:16]


def _array_digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a, dtype=float).tobytes())
    return digest.hexdigest()[:16]


def describe_solved(solved: SolvedProblem) -> dict:
    """What a job's numbers depend on in a solved problem: its settings, a digest of its data, its solve."""
    problem = solved.problem
    return dict(problem=problem.settings, clip=solved.clip,
                data=_array_digest(problem.features, problem.targets, problem.task),
                opt=solved.opt_value, G=solved.G, Bl=solved.Bl, specialist_losses=_array_digest(solved.spec_losses),
                standard_losses=_array_digest(solved.base_losses()))


def job_description(name: tuple, kwargs: dict, numerics: str) -> dict:
    """Everything that determines job ``name``'s numbers: its settings, its problem and solve, the code."""
    described = {k: (describe_solved(v) if isinstance(v, SolvedProblem) else v) for k, v in kwargs.items()}
    return dict(job=list(name), kwargs=described, numerics=numerics)


def job_key(description: dict) -> str:
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class Checkpoints:
    """Finished jobs saved one JSON file each (named after the job), so an interrupted reproduction resumes
    where it stopped. A file holds the job's key (:func:`job_key` of its description) and is reused only
    for the same key: a checkpoint from another problem, other settings or other code is recomputed."""

    def __init__(self, folder: Path, names: list[str], descriptions: list[dict]):
        self.folder = folder
        self.paths = [folder / f"{name.replace('/', '-')}.json" for name in names]
        self.descriptions = descriptions
        self.keys = [job_key(d) for d in descriptions]

    def load(self) -> tuple[dict[int, dict], list[int]]:
        """The results saved under their job's current key, by job index, and the indices of the jobs whose
        saved result has another key (stale: recomputed). Unreadable leftovers are ignored and rerun."""
        done, stale = {}, []
        for i, path in enumerate(self.paths):
            if not path.is_file():
                continue
            try:
                saved = json.loads(path.read_text())
                key, result = saved["key"], saved["result"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if key == self.keys[i]:
                done[i] = result
            else:
                stale.append(i)
        return done, stale

    def save(self, index: int, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.paths[index], dict(key=self.keys[index], description=self.descriptions[index],
                                                  result=result))

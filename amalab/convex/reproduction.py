"""The convex rate reproduction: its config, its runs and the results files the figures are made from.

Three experiments, each a set of independent jobs spread over worker processes:
  rates       the primal gap of theta_bar against the cvxpy OPT for T = 2^8 ... 2^16, per loss and
              algorithm, with the bound of spec section 5 and the fitted log-log slope;
  worst_task  worst-task excess of AMA against the baselines on an imbalanced, conflicting problem;
  exp3        EXP3's regret on adversarial gain sequences against its bound.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing
import os
import platform
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import amalab
from amalab.config import load_section, read_toml
from amalab.convex.algorithms import ALGORITHMS, RATE_ALGORITHMS, gap_bound, train_algorithm
from amalab.convex.exp3_regret import SEQUENCES, exp3_regret
from amalab.convex.losses import LOSSES
from amalab.convex.optimum import SolvedProblem, solve
from amalab.convex.problems import make_problem
from amalab.errors import ConfigError
from amalab.mixers.excess import check_clip


def _check_names(names: list[str], known, what: str) -> None:
    if not names:
        raise ValueError(f"{what}: give at least one")
    for name in names:
        if name not in known:
            raise ValueError(f"{what}: unknown {name!r}; known: {', '.join(known)}")


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_horizons(horizons: list[int]) -> None:
    if not horizons or any(T < 1 for T in horizons) or sorted(set(horizons)) != horizons:
        raise ValueError(f"horizons must be distinct increasing integers >= 1, got {horizons}")


@dataclass(frozen=True)
class ProblemConfig:
    """Knobs of the synthetic problem generator (:func:`amalab.convex.problems.make_problem`)."""

    k: int = 3
    dim: int = 8
    sizes: list[int] = field(default_factory=lambda: [200, 120, 60])
    conflict_angle: float = 100.0
    noise: float = 0.1
    reward_scale: float = 4.0
    radius: float = 1.0
    beta: float = 1.0
    clip: str = "example"

    def check_for(self, loss: str) -> None:
        check_clip(self.clip)
        make_problem(loss, **self.generator_args())  # validates every knob; cheap

    def generator_args(self) -> dict:
        args = asdict(self)
        args.pop("clip")
        return args


@dataclass(frozen=True)
class RatesConfig:
    losses: list[str] = field(default_factory=lambda: ["dpo", "ipo", "hinge", "least_squares"])
    algorithms: list[str] = field(default_factory=lambda: list(RATE_ALGORITHMS))
    horizons: list[int] = field(default_factory=lambda: [2**j for j in range(8, 17)])
    seeds: int = 16
    batch_size: int = 12
    #: the rate slope is fitted on horizons >= this (O(1/sqrt T) is an asymptotic statement)
    slope_from: int = 8192
    problem: ProblemConfig = field(default_factory=ProblemConfig)

    def check(self) -> None:
        _check_names(self.losses, LOSSES, "losses")
        _check_names(self.algorithms, RATE_ALGORITHMS, "algorithms (rate checks)")
        _check_horizons(self.horizons)
        if sum(T >= self.slope_from for T in self.horizons) < 2:
            raise ValueError(f"slope_from = {self.slope_from} leaves fewer than two horizons to fit a slope on")
        _check_positive(seeds=self.seeds, batch_size=self.batch_size)
        for loss in self.losses:
            self.problem.check_for(loss)


@dataclass(frozen=True)
class WorstTaskConfig:
    loss: str = "dpo"
    algorithms: list[str] = field(default_factory=lambda: ["standard", "uniform", "doremi", "odm",
                                                           "ama-r", "ama-s"])
    horizon: int = 16384
    seeds: int = 8
    batch_size: int = 12
    ama_s_gain_scale: str = "bound"
    #: EXP3 exploration of AMA-S and ODM: "theory" (min(1, sqrt(k ln k / ((e - 1) T)))) or a number in (0, 1]
    ama_s_gamma: str | float = "theory"
    problem: ProblemConfig = field(default_factory=lambda: ProblemConfig(sizes=[900, 90, 30],
                                                                          conflict_angle=110.0))

    def check(self) -> None:
        _check_names([self.loss], LOSSES, "loss")
        _check_names(self.algorithms, ALGORITHMS, "algorithms")
        _check_positive(horizon=self.horizon, seeds=self.seeds, batch_size=self.batch_size)
        if self.ama_s_gain_scale not in ("bound", "running"):
            raise ValueError(f"ama_s_gain_scale must be 'bound' or 'running', got {self.ama_s_gain_scale!r}")
        if isinstance(self.ama_s_gamma, str) and self.ama_s_gamma != "theory":
            raise ValueError(f"ama_s_gamma must be 'theory' or a number in (0, 1], got {self.ama_s_gamma!r}")
        if not isinstance(self.ama_s_gamma, str) and not 0.0 < self.ama_s_gamma <= 1.0:
            raise ValueError(f"ama_s_gamma must lie in (0, 1], got {self.ama_s_gamma!r}")
        self.problem.check_for(self.loss)


@dataclass(frozen=True)
class Exp3Config:
    k: int = 5
    horizons: list[int] = field(default_factory=lambda: [2**j for j in range(8, 17, 2)])
    seeds: int = 128
    sequences: list[str] = field(default_factory=lambda: list(SEQUENCES))

    def check(self) -> None:
        _check_positive(k=self.k, seeds=self.seeds)
        _check_horizons(self.horizons)
        _check_names(self.sequences, SEQUENCES, "sequences")


@dataclass(frozen=True)
class ReproductionConfig:
    seed: int = 0
    #: where results and figures go, relative to the directory the command is run from
    out: str = "paper_figures/convex_rates"
    #: worker processes (jobs are independent); 0 means one per core
    workers: int = 0
    rates: RatesConfig = field(default_factory=RatesConfig)
    worst_task: WorstTaskConfig = field(default_factory=WorstTaskConfig)
    exp3: Exp3Config = field(default_factory=Exp3Config)

    def check(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {self.workers}")


def load_config(path: str | Path) -> ReproductionConfig:
    return load_section(ReproductionConfig, read_toml(path), path)


# ---------------------------------------------------------------------------------------------- jobs

def _rng(seed: int, *names: str) -> np.random.Generator:
    """A generator per job that depends on the config seed and the job's name, not on job order."""
    return np.random.default_rng([seed] + [zlib.crc32(n.encode()) for n in names])


def rate_job(solved: SolvedProblem, algorithm: str, horizons: list[int], seeds: int, batch_size: int,
             seed: int, loss: str, progress=None) -> dict:
    """Primal gaps max_i E_i(theta_bar) - OPT, shape (horizons, seeds); deterministic runs get 1 seed."""
    n_seeds = 1 if algorithm == "ama-r-full" else seeds
    rows = np.repeat(horizons, n_seeds)
    result = train_algorithm(algorithm, solved, rows, batch_size, _rng(seed, "rates", loss, algorithm),
                             progress=progress)
    gap = (result.worst_excess - solved.opt_value).reshape(len(horizons), n_seeds)
    return dict(gap=gap.tolist())


def worst_task_job(solved: SolvedProblem, algorithm: str, horizon: int, seeds: int, batch_size: int,
                   gain_scale: str, seed: int, gamma: float | None = None, progress=None) -> dict:
    """Per-task excess of theta_bar at the horizon and the worst-task curve over training."""
    checkpoints = np.unique(np.geomspace(16, horizon, 40).astype(int))
    result = train_algorithm(algorithm, solved, np.full(seeds, horizon), batch_size,
                             _rng(seed, "worst_task", algorithm), gain_scale, gamma, checkpoints, progress)
    return dict(task_excess=result.task_excess.tolist(), average_weights=result.average_weights.tolist(),
                checkpoints=result.checkpoints.tolist(), curve=result.curve.tolist())


def exp3_job(sequence: str, k: int, horizons: list[int], seeds: int, seed: int, progress=None) -> dict:
    return exp3_regret(sequence, k, horizons, seeds, _rng(seed, "exp3", sequence), progress)


_progress_queue = None


def _init_worker(queue) -> None:
    global _progress_queue
    _progress_queue = queue


def _step_reporter(sink):
    """A job's ``progress(steps_done)`` callback that passes on the steps since its last call."""
    last = 0

    def progress(done: int) -> None:
        nonlocal last
        sink(done - last)
        last = done

    return progress


def _run_job(index: int, fn, kwargs: dict):
    """Run one job in a worker, reporting its steps to the parent's progress bar."""
    return index, fn(**kwargs, progress=_step_reporter(_progress_queue.put))


def run_jobs(jobs: list[tuple], workers: int, show_progress: bool = True, done: dict | None = None,
             on_done=None) -> list:
    """Run ``(fn, kwargs, steps)`` jobs, longest first, over ``workers`` processes, with one progress bar.

    ``done`` maps job indices to results already at hand (they are not rerun); ``on_done(index, result)``
    is called as each job finishes, so a caller can checkpoint it.
    """
    done = done or {}
    results = [done.get(i) for i in range(len(jobs))]
    todo = sorted((i for i in range(len(jobs)) if i not in done), key=lambda i: -jobs[i][2])
    bar = tqdm(total=sum(jobs[i][2] for i in todo), unit="step", unit_scale=True, disable=not show_progress,
               mininterval=1.0, desc="convex rates", dynamic_ncols=True)
    on_done = on_done or (lambda index, result: None)
    if workers == 1:
        for i in todo:
            fn, kwargs, _ = jobs[i]
            results[i] = fn(**kwargs, progress=_step_reporter(bar.update))
            on_done(i, results[i])
    elif todo:
        context = multiprocessing.get_context("spawn")  # no fork: safe whatever threads numpy started
        with context.Manager() as manager:
            queue = manager.Queue()
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(queue,)) as pool:
                pending = {pool.submit(_run_job, i, jobs[i][0], jobs[i][1]) for i in todo}
                while pending:
                    finished = {f for f in pending if f.done()}
                    for f in finished:
                        index, value = f.result()
                        results[index] = value
                        on_done(index, value)
                    pending -= finished
                    while not queue.empty():
                        bar.update(queue.get())
                    if pending:
                        time.sleep(0.2)
                while not queue.empty():
                    bar.update(queue.get())
    bar.close()
    return results


# ------------------------------------------------------------------------------------------ assembly

def _solved_record(solved: SolvedProblem) -> dict:
    return dict(problem=solved.problem.settings, clip=solved.clip, opt=solved.opt_value,
                solver_opt=solved.solver_opt_value, D=solved.D, G=solved.G, Bl=solved.Bl)


def log_log_slope(horizons, gaps) -> float:
    """Least-squares slope of log(gap) against log(T) (gaps must be positive)."""
    return float(np.polyfit(np.log(horizons), np.log(gaps), 1)[0])


def _job_key(name: tuple, kwargs: dict) -> str:
    """A file name for job ``name`` that changes whenever anything it computes from changes."""
    described = {k: (dict(problem=v.problem.settings, clip=v.clip) if isinstance(v, SolvedProblem) else v)
                 for k, v in kwargs.items()}
    text = json.dumps(dict(version=amalab.__version__, job=name, kwargs=described), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def run_reproduction(config: ReproductionConfig, show_progress: bool = True,
                     checkpoint_dir: Path | None = None) -> dict:
    """Run all three experiments; return the results record (see :func:`write_results`).

    With ``checkpoint_dir``, every finished job is saved there at once and jobs already saved are not
    rerun, so an interrupted reproduction resumes where it stopped.
    """
    start = time.perf_counter()
    rates, worst = config.rates, config.worst_task
    solved = {loss: solve(make_problem(loss, **rates.problem.generator_args(), seed=config.seed),
                          rates.problem.clip) for loss in rates.losses}
    worst_solved = solve(make_problem(worst.loss, **worst.problem.generator_args(), seed=config.seed),
                         worst.problem.clip)
    jobs, keys = [], []
    for loss in rates.losses:
        for algorithm in rates.algorithms:
            jobs.append((rate_job, dict(solved=solved[loss], algorithm=algorithm, horizons=rates.horizons,
                                        seeds=rates.seeds, batch_size=rates.batch_size, seed=config.seed,
                                        loss=loss), max(rates.horizons)))
            keys.append(("rates", loss, algorithm))
    for algorithm in worst.algorithms:
        jobs.append((worst_task_job, dict(solved=worst_solved, algorithm=algorithm, horizon=worst.horizon,
                                          seeds=worst.seeds, batch_size=worst.batch_size,
                                          gain_scale=worst.ama_s_gain_scale, seed=config.seed,
                                          gamma=None if worst.ama_s_gamma == "theory" else worst.ama_s_gamma),
                     worst.horizon))
        keys.append(("worst_task", algorithm))
    for sequence in config.exp3.sequences:
        jobs.append((exp3_job, dict(sequence=sequence, k=config.exp3.k, horizons=config.exp3.horizons,
                                    seeds=config.exp3.seeds, seed=config.seed), max(config.exp3.horizons)))
        keys.append(("exp3", sequence))
    workers = config.workers or os.cpu_count() or 1
    done, save = {}, None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        paths = [checkpoint_dir / f"{_job_key(key, kwargs)}.json" for key, (_, kwargs, _) in zip(keys, jobs)]
        done = {i: json.loads(p.read_text()) for i, p in enumerate(paths) if p.is_file()}
        if done and show_progress:
            print(f"resuming: {len(done)} of {len(jobs)} jobs were already done ({checkpoint_dir})")

        def save(index: int, result: dict) -> None:
            tmp = paths[index].with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(paths[index])  # atomic: an interrupted write never leaves a half file

    outputs = run_jobs(jobs, min(workers, len(jobs)), show_progress, done, save)

    record = dict(amalab_version=amalab.__version__, config=asdict(config),
                  machine=dict(cores=os.cpu_count(), python=platform.python_version(),
                               platform=platform.platform()),
                  rates={loss: dict(**_solved_record(solved[loss]), horizons=rates.horizons,
                                    slope_from=rates.slope_from, algorithms={})
                         for loss in rates.losses},
                  worst_task=dict(**_solved_record(worst_solved), horizon=worst.horizon,
                                  task_names=[f"task {i} (n={n})" for i, n in enumerate(worst.problem.sizes)],
                                  algorithms={}),
                  exp3=dict(k=config.exp3.k, sequences={}))
    for key, output in zip(keys, outputs):
        if key[0] == "rates":
            _, loss, algorithm = key
            gap = np.asarray(output["gap"])
            median = np.median(gap, axis=1)
            tail = np.asarray(rates.horizons) >= rates.slope_from
            entry = dict(gap=output["gap"], median=median.tolist(),
                         q25=np.quantile(gap, 0.25, axis=1).tolist(), q75=np.quantile(gap, 0.75, axis=1).tolist(),
                         bound=gap_bound(algorithm, solved[loss], rates.horizons).tolist(),
                         slope=log_log_slope(np.asarray(rates.horizons)[tail], median[tail])
                         if np.all(median[tail] > 0) else math.nan,
                         slope_all=log_log_slope(rates.horizons, median) if np.all(median > 0) else math.nan,
                         label=RATE_ALGORITHMS[algorithm][0])
            record["rates"][loss]["algorithms"][algorithm] = entry
        elif key[0] == "worst_task":
            record["worst_task"]["algorithms"][key[1]] = dict(**output, label=ALGORITHMS[key[1]])
        else:
            record["exp3"]["sequences"][key[1]] = dict(**output, description=SEQUENCES[key[1]])
    record["elapsed_s"] = time.perf_counter() - start
    return record


def write_results(record: dict, out_dir: Path) -> list[Path]:
    """results.json (everything) plus one CSV per experiment, for people who want a spreadsheet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "rates.csv", out_dir / "worst_task.csv", out_dir / "exp3.csv"]
    paths[0].write_text(json.dumps(record, indent=1, allow_nan=True))
    with paths[1].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["loss", "algorithm", "T", "seed", "gap", "bound", "opt"])
        for loss, entry in record["rates"].items():
            for algorithm, r in entry["algorithms"].items():
                for T, gaps, bound in zip(entry["horizons"], r["gap"], r["bound"]):
                    for s, gap in enumerate(gaps):
                        w.writerow([loss, algorithm, T, s, f"{gap:.6e}", f"{bound:.6e}", f"{entry['opt']:.9e}"])
    with paths[2].open("w", newline="") as f:
        w = csv.writer(f)
        wt = record["worst_task"]
        w.writerow(["algorithm", "seed"] + [f"E_{i}" for i in range(len(wt["task_names"]))] + ["worst", "opt"])
        for algorithm, r in wt["algorithms"].items():
            for s, excess in enumerate(r["task_excess"]):
                w.writerow([algorithm, s] + [f"{e:.6e}" for e in excess] + [f"{max(excess):.6e}", f"{wt['opt']:.6e}"])
    with paths[3].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sequence", "T", "gamma", "mean_regret", "stderr", "bound"])
        for sequence, r in record["exp3"]["sequences"].items():
            for row in zip(r["horizons"], r["gamma"], r["mean_regret"], r["stderr"], r["bound"]):
                w.writerow([sequence, *row])
    return paths


def load_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such results file (run `amalab convex-rates CONFIG` first)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a results file: {e}") from None
    if not isinstance(record, dict) or not {"rates", "worst_task", "exp3"} <= set(record):
        raise ConfigError(f"{path}: not a convex-rates results file (no rates / worst_task / exp3)")
    return record

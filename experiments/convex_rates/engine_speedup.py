"""Speed of the compiled training loop against the numpy reference, on the same jobs, in one run.

    python experiments/convex_rates/engine_speedup.py [HORIZON]

Runs the shipped config's rate jobs at one horizon (default 1024: every loss and algorithm, 48 seeds),
one worst-task job per algorithm (shortened to the same horizon) and every EXP3 sequence (to the same
horizon) with both engines, checks that they give the same numbers (1e-12 relative), and prints the CPU
seconds of each engine and their ratio. The kernels are compiled (or loaded from numba's cache) first,
outside the timing; the README reports that compile time separately.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from amalab.convex.algorithms import train_algorithm
from amalab.convex.config import load_reproduction_config
from amalab.convex.exp3_regret import exp3_regret
from amalab.convex.jobs import job_rng
from amalab.convex.optimum import solve
from amalab.convex.problems import make_problem
from amalab.convex.reproduction import compile_kernels

CONFIG = Path(__file__).with_name("config.toml")


def runs(config, horizon: int):
    """(name, function of engine) for every job timed."""
    rates, worst = config.rates, config.worst_task
    solved = {loss: solve(make_problem(loss, seed=config.seed, settings=rates.problem)) for loss in rates.losses}
    worst_solved = solve(make_problem(worst.loss, seed=config.seed, settings=worst.problem))
    compile_kernels(worst_solved)
    for loss in rates.losses:
        for algorithm in rates.algorithms:
            rows = np.full(1 if algorithm == "ama-r-full" else rates.seeds, horizon)
            yield f"rates {loss} {algorithm}", lambda engine, loss=loss, algorithm=algorithm, rows=rows: (
                train_algorithm(algorithm, solved[loss], rows, rates.batch_size, job_rng(config.seed, loss, algorithm),
                                engine=engine).theta_bar)
    for algorithm in worst.algorithms:
        yield f"worst_task {algorithm}", lambda engine, algorithm=algorithm: train_algorithm(
            algorithm, worst_solved, np.full(worst.seeds, horizon), worst.batch_size, job_rng(config.seed, algorithm),
            worst.ama_s_gain_scale, worst.gamma, engine=engine).theta_bar
    for sequence in config.exp3.sequences:
        yield f"exp3 {sequence}", lambda engine, sequence=sequence: np.array(exp3_regret(
            sequence, config.exp3.k, [horizon], config.exp3.seeds, job_rng(config.seed, sequence),
            engine=engine)["mean_regret"])


def main(horizon: int = 1024) -> None:
    seconds = {"numpy": 0.0, "compiled": 0.0}
    for name, run in runs(load_reproduction_config(CONFIG), horizon):
        out = {}
        for engine in seconds:
            start = time.process_time()
            out[engine] = run(engine)
            seconds[engine] += time.process_time() - start
        np.testing.assert_allclose(out["compiled"], out["numpy"], rtol=1e-12, atol=1e-15, err_msg=name)
    print(f"same jobs (T = {horizon}), same numbers (1e-12): numpy {seconds['numpy']:.2f} s CPU, "
          f"compiled {seconds['compiled']:.2f} s CPU: {seconds['numpy'] / seconds['compiled']:.1f}x faster")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

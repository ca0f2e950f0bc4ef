"""The algorithms of the convex lab, each with the step sizes its theory prescribes and its gap bound.

A horizon T fixes every step size (docs/maths.md section 5): eta_theta = D / (G sqrt(T)); AMA-R's
eta_alpha = sqrt(8 ln k / T) / Bl; AMA-S's gamma = min(1, sqrt(k ln k / ((e - 1) T))), eta = gamma / k and
gains scaled by Bl. Baselines get the same eta_theta.
"""

from __future__ import annotations

import numpy as np

from amalab.convex import bounds
from amalab.convex.optimum import SolvedProblem
from amalab.convex.training import TrainingResult, train
from amalab.mixers import MIXERS, Mixer, make_mixer

#: algorithms whose averaged iterate provably approaches OPT, with their bounds
RATE_ALGORITHMS = {
    "ama-r-full": ("AMA-R, full batches (deterministic)", bounds.ama_r_bound),
    "ama-r": ("AMA-R, task-balanced minibatches", bounds.ama_r_minibatch_bound),
    "ama-r-sim": ("AMA-R, minibatches, simultaneous play", bounds.ama_r_simultaneous_bound),
    "ama-s": ("AMA-S (EXP3 task sampling)", bounds.ama_s_bound),
}
#: rate algorithms that use the full data every step: one run per horizon, and a duality gap to check
DETERMINISTIC = frozenset({"ama-r-full"})
#: every algorithm the convex lab can run
ALGORITHMS = {"ama-r-full": RATE_ALGORITHMS["ama-r-full"][0], **MIXERS}


def build_mixer(algorithm: str, k: int, sizes, clip: str, Bl: float, horizons, gain_scale: str = "bound",
                gamma: float | None = None) -> tuple[Mixer, bool]:
    """The mixer for ``algorithm`` with one row per entry of ``horizons``; also whether it is full-batch.

    ``Bl`` is the loss bound that sets AMA-R's eta_alpha and scales AMA-S's gains; ``gain_scale``
    ("bound" or "running") is how AMA-S scales its gains: by Bl, or by a running maximum; ``gamma``
    overrides the EXP3 exploration rate the theory sets for each horizon (AMA-S and ODM).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    horizons = np.asarray(horizons, dtype=float)
    name = "ama-r" if algorithm == "ama-r-full" else algorithm
    options = {}
    if name in ("ama-r", "ama-r-sim", "doremi"):
        options["eta_alpha"] = bounds.alpha_step_size(k, Bl, horizons)
    if name in ("ama-s", "odm"):
        options["gamma"] = bounds.ama_s_gamma(k, horizons) if gamma is None else gamma
        options["gain_scale"] = Bl if name == "ama-s" and gain_scale == "bound" else "running"
    if name in ("ama-r", "ama-r-sim", "ama-s"):  # the presets doremi and odm fix their own clip
        options["clip"] = clip
    mixer = make_mixer(name, k, sizes=sizes, batch_shape=horizons.shape, **options)
    return mixer, algorithm == "ama-r-full"


def make_convex_mixer(algorithm: str, solved: SolvedProblem, horizons, gain_scale: str = "bound",
                      gamma: float | None = None) -> tuple[Mixer, bool]:
    """:func:`build_mixer` with the constants of a solved problem."""
    problem = solved.problem
    return build_mixer(algorithm, problem.k, problem.sizes, solved.clip, solved.Bl, horizons, gain_scale, gamma)


def check_batch_size(algorithm: str, k: int, sizes, batch_size: int) -> None:
    """Raise ValueError if ``algorithm``'s mixer cannot draw batches of ``batch_size`` (e.g. a task-balanced
    batch needs a multiple of k): the mixer's own rule, applied before any job starts."""
    mixer, full_batch = build_mixer(algorithm, k, sizes, "example", 1.0, [1.0])
    if not full_batch:
        try:
            mixer.draw(np.random.default_rng(0), batch_size)
        except ValueError as e:
            raise ValueError(f"batch_size = {batch_size} does not suit algorithm {algorithm!r}: {e}") from None


def theta_step_sizes(solved: SolvedProblem, horizons) -> np.ndarray:
    return bounds.theta_step_size(solved.D, solved.G, np.asarray(horizons, dtype=float))


def train_algorithm(algorithm: str, solved: SolvedProblem, horizons, batch_size: int,
                    rng: np.random.Generator, gain_scale: str = "bound", gamma: float | None = None,
                    curve_steps=(), progress=None, engine: str = "compiled") -> TrainingResult:
    """Train ``algorithm`` with the step sizes its theory sets, one row per entry of ``horizons``
    (``engine``: see :func:`amalab.convex.training.train`)."""
    mixer, full_batch = make_convex_mixer(algorithm, solved, horizons, gain_scale, gamma)
    return train(solved, mixer, horizons, theta_step_sizes(solved, horizons), rng,
                 batch_size=None if full_batch else batch_size, curve_steps=curve_steps, progress=progress,
                 engine=engine)


def gap_bound(algorithm: str, solved: SolvedProblem, horizons) -> np.ndarray:
    """The bound on E[max_i E_i(theta_bar)] - OPT for a rate algorithm at each horizon."""
    _, bound = RATE_ALGORITHMS[algorithm]
    return bound(solved.D, solved.G, solved.Bl, solved.problem.k, np.asarray(horizons, dtype=float))

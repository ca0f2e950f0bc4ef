"""The convex rate reproduction's config: one frozen dataclass per TOML table, every field checked up front.

Everything a run needs is validated when the config loads (including what would otherwise fail minutes
later in a worker, such as a batch size a task-balanced mixer cannot draw), so a mistake is one line
naming the file, table and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amalab.config import load_section, read_toml
from amalab.convex.algorithms import ALGORITHMS, RATE_ALGORITHMS, check_batch_size
from amalab.convex.exp3_regret import SEQUENCES
from amalab.convex.losses import LOSSES
from amalab.convex.problems import ProblemSettings
from amalab.mixers.base import check_k


def _check_names(names: list[str], known, what: str) -> None:
    if not names:
        raise ValueError(f"{what}: give at least one")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: {names} lists a name twice")
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
class ChecksConfig:
    """The fixed gates of `amalab check` (docs/maths.md section 6); each is printed with its result."""

    #: slopes are fitted on the last this many horizons (O(1/sqrt T) is an asymptotic statement)
    slope_horizons: int = 5
    #: the log-log slope of the median primal gap must be <= this
    slope_gate: float = -0.45
    #: the log-log slope of the duality gap of deterministic runs must be <= this
    duality_slope_gate: float = -0.45
    #: no gap may lie below -gap_tolerance (cvxpy solves to 1e-10; OPT is a numpy evaluation at its point)
    gap_tolerance: float = 1e-6
    #: EXP3's mean regret may exceed its bound by at most this many standard errors (sampling error)
    exp3_z: float = 3.0

    def check(self) -> None:
        if self.slope_horizons < 2:
            raise ValueError(f"slope_horizons must be >= 2 to fit a slope, got {self.slope_horizons}")
        for name in ("slope_gate", "duality_slope_gate"):
            if not -2.0 <= getattr(self, name) < 0.0:
                raise ValueError(f"{name} must lie in [-2, 0) (a gap that shrinks), got {getattr(self, name)}")
        if not 0.0 <= self.gap_tolerance < 1e-2:
            raise ValueError(f"gap_tolerance must lie in [0, 0.01), got {self.gap_tolerance}")
        if not 0.0 <= self.exp3_z <= 10.0:
            raise ValueError(f"exp3_z must lie in [0, 10], got {self.exp3_z}")


def _check_algorithms_draw(algorithms: list[str], problem: ProblemSettings, batch_size: int) -> None:
    for algorithm in algorithms:
        check_batch_size(algorithm, problem.k, problem.sizes, batch_size)


@dataclass(frozen=True)
class RatesConfig:
    losses: list[str] = field(default_factory=lambda: ["dpo", "ipo", "hinge", "least_squares"])
    algorithms: list[str] = field(default_factory=lambda: list(RATE_ALGORITHMS))
    horizons: list[int] = field(default_factory=lambda: [2**j for j in range(8, 19)])
    seeds: int = 48
    batch_size: int = 12
    problem: ProblemSettings = field(default_factory=ProblemSettings)

    def check(self) -> None:
        _check_names(self.losses, LOSSES, "losses")
        _check_names(self.algorithms, RATE_ALGORITHMS, "algorithms (rate checks)")
        _check_horizons(self.horizons)
        _check_positive(seeds=self.seeds, batch_size=self.batch_size)
        for loss in self.losses:
            self.problem.check_for(loss)
        _check_algorithms_draw(self.algorithms, self.problem, self.batch_size)


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
    problem: ProblemSettings = field(default_factory=lambda: ProblemSettings(sizes=[900, 90, 30],
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
        _check_algorithms_draw(self.algorithms, self.problem, self.batch_size)

    @property
    def gamma(self) -> float | None:
        """The EXP3 exploration override (None: the theory's rate for the horizon)."""
        return None if self.ama_s_gamma == "theory" else float(self.ama_s_gamma)


@dataclass(frozen=True)
class Exp3Config:
    k: int = 5
    horizons: list[int] = field(default_factory=lambda: [2**j for j in range(8, 17, 2)])
    seeds: int = 128
    sequences: list[str] = field(default_factory=lambda: list(SEQUENCES))

    def check(self) -> None:
        check_k(self.k)
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (EXP3 with one arm has no regret to measure), got {self.k}")
        if self.seeds < 2:
            raise ValueError(f"seeds must be >= 2 (the check needs a standard error), got {self.seeds}")
        _check_horizons(self.horizons)
        _check_names(self.sequences, SEQUENCES, "sequences")


@dataclass(frozen=True)
class ReproductionConfig:
    seed: int = 0
    #: where results and figures go, relative to the directory the command is run from
    out: str = "runs/convex_rates"
    #: committed results a run is compared with ("" for none), relative to the same directory
    compare_with: str = "paper_figures/convex_rates"
    #: worker processes (jobs are independent); 0 means one per core
    workers: int = 0
    rates: RatesConfig = field(default_factory=RatesConfig)
    worst_task: WorstTaskConfig = field(default_factory=WorstTaskConfig)
    exp3: Exp3Config = field(default_factory=Exp3Config)
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    def check(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {self.workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not self.out.strip():
            raise ValueError("out must name an output folder")
        if len(self.rates.horizons) < self.checks.slope_horizons:
            raise ValueError(f"[checks] slope_horizons = {self.checks.slope_horizons} needs at least that many "
                             f"[rates] horizons, got {len(self.rates.horizons)}")


def load_reproduction_config(path: str | Path) -> ReproductionConfig:
    return load_section(ReproductionConfig, read_toml(path), path)

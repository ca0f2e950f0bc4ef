"""The diagnostic suite's TOML config: every mistake is one line naming the file, table and field
(:func:`amalab.config.load_section`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from amalab.config import load_section, read_toml
from amalab.control.behaviour import BehaviourConfig
from amalab.control.evaluation import EvaluationConfig
from amalab.control.segments import PoolConfig
from amalab.control.tasks import TaskSpec
from amalab.control.teacher import TeacherConfig
from amalab.errors import ConfigError
from amalab.mixers.methods import MethodsConfig
from amalab.training.config import MergesConfig, OptimConfig
from amalab.objectives.preference import PREFERENCE_LOSSES
from amalab.runner import check_backend


@dataclass(frozen=True)
class DataConfig:
    """The dataset knobs: task sizes (task 0 the largest, the last ``imbalance`` times smaller) and the
    share of segments from the poor behaviour policy (:mod:`amalab.control.dataset`)."""

    imbalance: float = 1.0
    poor_share: float = 0.5

    def check(self) -> None:
        if not self.imbalance >= 1:
            raise ValueError(f"imbalance must be >= 1, got {self.imbalance}")
        if not 0 <= self.poor_share <= 1:
            raise ValueError(f"poor_share must lie in [0, 1], got {self.poor_share}")


@dataclass(frozen=True)
class PolicyConfig:
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    init_log_std: float = -0.5
    #: the MLP reads observations standardized by the seed's training segments (amalab/control/policy.py)
    normalize: bool = False

    def check(self) -> None:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {self.hidden}")


@dataclass(frozen=True)
class LossConfig:
    """A preference loss of :func:`~amalab.objectives.preference.preference_losses`; ``label_smoothing`` is TRL's eps
    (robust DPO's assumed label-flip rate; with dpo it is TRL's conservative DPO), 0: not passed."""

    loss_type: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0

    @property
    def options(self) -> dict:
        return {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}

    def check(self) -> None:
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type not in PREFERENCE_LOSSES or self.loss_type == "sft":
            raise ValueError(f"loss_type must be a preference loss ({', '.join(PREFERENCE_LOSSES)}; sft is a method)")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass(frozen=True)
class SweepsConfig:
    """Each value of each list is one more dataset (the others at the main config's values), on which the
    ``methods`` and ``merges`` train with ``seeds`` seeds; the noise and quality sweeps for every loss in
    ``losses`` (the main loss if empty)."""

    imbalance: list[float] = field(default_factory=list)
    mistake: list[float] = field(default_factory=list)
    poor_share: list[float] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    #: the label_smoothing of the sweeps' robust and exo_pair losses
    label_smoothing: float = 0.0
    methods: list[str] = field(default_factory=lambda: ["standard", "ama-r"])
    merges: list[str] = field(default_factory=list)
    seeds: int = 3

    def check(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        for loss in self.losses:
            LossConfig(loss, label_smoothing=self.label_smoothing).check()
        MethodsConfig(names=self.methods or ["standard"]).check()
        MergesConfig(names=self.merges).check()
        for value in self.imbalance:
            DataConfig(imbalance=value).check()
        for value in self.poor_share:
            DataConfig(poor_share=value).check()
        for value in self.mistake:
            TeacherConfig(mistake=value).check()


@dataclass(frozen=True)
class RunConfig:
    """How the independent trainings run (:mod:`amalab.runner`; the results do not depend on it):
    ``workers`` at once (0: one per core; 1: in this process, one after another) through ``backend``:
    "loky", processes on this machine; "dask" or "ray", a cluster whose address is ``scheduler``."""

    workers: int = 0
    backend: str = "loky"
    scheduler: str = ""

    def check(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {self.workers}")
        check_backend(self.backend, self.scheduler)


@dataclass(frozen=True)
class _TopLevel:
    """The config's keys outside any table."""

    out: str = "runs/mujoco_diagnostic"
    #: a folder that gets a copy of the summary, tables and figures (e.g. paper_figures/mujoco_diagnostic)
    figures: str = ""
    seed: int = 0
    environment: str = "HalfCheetah-v5"
    #: keyword arguments of gymnasium.make for the environment (Ant-v5: include_cfrc_ext_in_observation = false)
    environment_options: dict = field(default_factory=dict)
    simulators: int = 16
    #: torch threads of each job (each worker runs one job at a time: workers x threads should fit the cores)
    threads: int = 1

    def check(self) -> None:
        if self.simulators < 1 or self.threads < 1:
            raise ValueError("simulators and threads must be >= 1")


@dataclass(frozen=True)
class DiagnoseConfig(_TopLevel):
    tasks: list[TaskSpec] = field(default_factory=list)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: OptimConfig = field(default_factory=OptimConfig)
    specialists: OptimConfig = field(default_factory=OptimConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    merges: MergesConfig = field(default_factory=MergesConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    sweeps: SweepsConfig = field(default_factory=SweepsConfig)
    run: RunConfig = field(default_factory=RunConfig)


def read_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The config's TOML, over the config its ``base`` key names (a path relative to this file), if any: this
    file's top-level keys and [[tasks]] replace the base's, its tables' keys replace theirs one by one (a
    ``full`` config is its default config with more seeds)."""
    raw = read_toml(path)
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path to a config, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen + (path.resolve(),):
        raise ConfigError(f"{path}: base {base!r} leads back to this config")
    merged = read_with_base(base_path, seen + (path.resolve(),))
    for key, value in raw.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_tables else value
    return merged


def load_diagnose_config(path: str | Path) -> DiagnoseConfig:
    """Read and check a diagnostic config (``out`` is relative to the working directory, as the LLM configs');
    a ``base`` key builds it over another config (:func:`read_with_base`)."""
    path = Path(path)
    raw = read_with_base(path)
    top = load_section(_TopLevel, {k: v for k, v in raw.items() if k not in _TABLES and k != "tasks"}, path)
    if not isinstance(raw.get("tasks"), list) or len(raw["tasks"]) < 1:
        raise ConfigError(f"{path}: give at least one [[tasks]] table")
    tasks = [load_section(TaskSpec, t, path, f"tasks.{i}") for i, t in enumerate(raw["tasks"])]
    if len({t.name for t in tasks}) != len(tasks):
        raise ConfigError(f"{path}: [[tasks]] names must be distinct")
    sections = {name: load_section(cls, raw.get(name, {}), path, name) for name, cls in _TABLES.items()}
    if sections["train"].batch_size % len(tasks):  # uniform, doremi and ama-r draw task-balanced batches
        raise ConfigError(f"{path}: [train] batch_size {sections['train'].batch_size} must be a multiple of the "
                          f"{len(tasks)} tasks")
    return DiagnoseConfig(tasks=tasks, **{f.name: getattr(top, f.name) for f in fields(_TopLevel)}, **sections)


_TABLES = {"behaviour": BehaviourConfig, "pool": PoolConfig, "data": DataConfig, "teacher": TeacherConfig,
           "policy": PolicyConfig, "loss": LossConfig, "reference": OptimConfig, "specialists": OptimConfig,
           "train": OptimConfig, "methods": MethodsConfig, "merges": MergesConfig,
           "evaluation": EvaluationConfig, "sweeps": SweepsConfig, "run": RunConfig}

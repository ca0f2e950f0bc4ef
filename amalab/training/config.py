"""The settings of a training run that every policy shares: the optimizer run (:class:`OptimConfig`, under
the names TRL's ``DPOConfig`` gives them) and the merged-specialist baselines (:class:`MergesConfig`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from amalab.training.merge import MERGE_METHODS
from amalab.training.tracking import TRACKERS


@dataclass(frozen=True)
class OptimConfig:
    """One optimizer run: AdamW with linear warm-up then cosine decay to ``min_lr_rate * learning_rate``."""

    max_steps: int = 20
    batch_size: int = 8  # pairs per optimizer step, over all ranks
    micro_batch_size: int = 0  # pairs per forward on one rank; 0 = the whole per-rank batch
    #: with micro-batches: put a step's pairs of similar length in the same micro-batch (less padding; the
    #: step's gradient is the same sum over the same pairs). Off by default: the padding it saves did not pay for itself
    #: in the measured runs (benchmarks/README.md)
    group_by_length: bool = False
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    min_lr_rate: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_steps: int = 0  # 0 = only at the end
    per_device_eval_batch_size: int = 16
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int = 2
    #: trackers that get every record of metrics.jsonl too (TrainingArguments' report_to): "tensorboard"
    #: (the tensorboard extra) writes <run folder>/tensorboard/; [] (the default) writes no event files
    report_to: list[str] = field(default_factory=list)

    def check(self) -> None:
        for name in ("max_steps", "batch_size", "per_device_eval_batch_size", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup_steps", "eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_rate <= 1:
            raise ValueError(f"min_lr_rate must lie in [0, 1], got {self.min_lr_rate}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0: no clipping)")
        _check_report_to(self.report_to)


def _check_report_to(report_to: list[str]) -> None:
    for name in report_to:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"report_to: {name} needs the {name} extra (pip install 'amalab[{name}]')")
    if len(set(report_to)) != len(report_to):
        raise ValueError(f"report_to: a tracker is listed twice: {report_to}")


@dataclass(frozen=True)
class MergesConfig:
    """Merged specialists as baselines (docs/maths.md section 7; amalab.training.merge), evaluated like generalists."""

    #: merge methods to evaluate: linear, task_arithmetic, ties, dare_linear, dare_ties
    names: list[str] = field(default_factory=list)
    #: seeds of the DARE methods (their random drop masks); the other methods are deterministic
    seeds: int = 1
    #: options of each method: scale, density (ties), drop (dare_*), weights
    options: dict = field(default_factory=dict)

    def check(self) -> None:
        for name in self.names:
            if name not in MERGE_METHODS:
                raise ValueError(f"names: unknown merge method {name!r}; known: {', '.join(MERGE_METHODS)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names: a method is listed twice: {self.names}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        for name, opts in self.options.items():
            if name not in MERGE_METHODS:
                raise ValueError(f"options: unknown merge method {name!r}")
            unknown = set(opts) - {"scale", "density", "drop", "weights"} if isinstance(opts, dict) else {opts}
            if unknown:
                raise ValueError(f"options.{name}: unknown option {sorted(map(str, unknown))[0]!r}; "
                                 "known: scale, density, drop, weights")

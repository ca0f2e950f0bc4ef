"""The tasks of a multi-task TRL dataset (its task column), each pair's baseline loss s(z), and the checks of
what a task mixer can honour, made before any training with one error naming the column, row or setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from amalab.mixers import Mixer
from amalab.objectives.preference import BATCH_LOSSES

#: TRL loss types whose loss is not a mean of per-example losses (amalab.objectives.preference)
NOT_PER_EXAMPLE = (*BATCH_LOSSES, "sft")


#: the column AMATrainer adds to the train dataset: each pair's row in the dataset as the user gave it
GIVEN_ROW = "__amalab_given_row__"


@dataclass(frozen=True)
class TaskIndex:
    """Task names in order, the dataset rows of each task, and the baseline column (None: absent).

    ``given``: each row's number in the dataset as the user gave it (what an error names)."""

    names: list[str]
    rows: list[list[int]]
    baseline: list[float] | None
    baseline_column: str
    given: list[int]

    @classmethod
    def of(cls, dataset, args) -> "TaskIndex":
        if args.task_column not in dataset.column_names:
            raise ValueError(f"train_dataset has no column {args.task_column!r} (AMAConfig.task_column): "
                             f"columns are {', '.join(dataset.column_names)}")
        tasks = [str(t) for t in dataset[args.task_column]]
        given = (list(map(int, dataset[GIVEN_ROW])) if GIVEN_ROW in dataset.column_names
                 else list(range(len(tasks))))
        names = list(args.task_names) if args.task_names else sorted(set(tasks))
        position = {name: i for i, name in enumerate(names)}
        rows: list[list[int]] = [[] for _ in names]
        for row, task in enumerate(tasks):
            if task not in position:
                raise ValueError(f"train_dataset row {given[row]}: task {task!r} is not one of "
                                 f"AMAConfig.task_names {names}")
            rows[position[task]].append(row)
        empty = [name for name, r in zip(names, rows) if not r]
        if empty:
            raise ValueError(f"train_dataset: task {empty[0]!r} has no rows (column {args.task_column!r})")
        baseline = (list(map(float, dataset[args.baseline_column]))
                    if args.baseline_column in dataset.column_names else None)
        return cls(names, rows, baseline, args.baseline_column, given)

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def sizes(self) -> list[int]:
        return [len(r) for r in self.rows]

    def row(self, task: int, index: int) -> int:
        """The dataset row of example ``index`` of task ``task``."""
        return self.rows[task][index]

    def check_baselines(self, source: str) -> None:
        """A mixer measured against baseline losses needs a finite s(z) in every row."""
        if source == "none":
            return
        if self.baseline is None:
            raise ValueError(f"train_dataset has no column {self.baseline_column!r} (AMAConfig.baseline_column): "
                             f"the mixer measures its excess over baseline losses s(z)")
        for row, value in enumerate(self.baseline):
            if not math.isfinite(value):
                raise ValueError(f"train_dataset row {self.given[row]}: {self.baseline_column} is {value} "
                                 "(not finite)")

    def baselines(self, rows: list[int], source: str) -> np.ndarray | None:
        """s(z) of these rows, or None for a mixer without a baseline."""
        return None if source == "none" else np.array([self.baseline[r] for r in rows])


def check_supported(trainer, mixer: Mixer) -> None:
    """Refuse what the mixer cannot honour (ValueError naming the setting)."""
    args = trainer.args
    if len(trainer.loss_types) != 1:
        raise ValueError(f"DPOConfig.loss_type {trainer.loss_types}: a mixture of loss types has no per-example "
                         "loss the mixer can weight; give one loss type")
    if trainer.loss_types[0] in NOT_PER_EXAMPLE:
        raise ValueError(f"DPOConfig.loss_type {trainer.loss_types[0]!r} is a batch-level loss, not a mean of "
                         "per-example losses: the mixer cannot weight its examples")
    if getattr(trainer, "use_weighting", False):
        raise ValueError("DPOConfig.use_weighting (WPO) weights examples by the policy itself: not supported with "
                         "a task mixer")
    if args.sync_ref_model:
        raise ValueError("DPOConfig.sync_ref_model moves pi_ref away from the reference the baseline losses s(z) "
                         "were computed against: not supported with a task mixer")
    if trainer.aux_loss_enabled:
        raise ValueError("the MoE router auxiliary loss (model.config.output_router_logits) is a batch-level loss: "
                         "not supported with a task mixer")
    if mixer.update_first and args.gradient_accumulation_steps > 1:
        raise ValueError("AMAConfig.mixer 'ama-r' (sequential AMA-R) updates its weights from the whole batch "
                         "before the backward pass: it needs gradient_accumulation_steps = 1; use 'ama-r-sim'")

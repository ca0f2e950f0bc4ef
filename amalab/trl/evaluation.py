"""Held-out metrics per task (docs/maths.md section 11): with an ``eval_dataset`` dict keyed by the task
names, each task's mean loss, clipped excess over its baseline losses s(z) (where the dataset has them),
preference margin and accuracy, and the worst task's excess, the generalist's objective (52).

Each rank scores its share of every task's rows (rows rank, rank + W, ...); the sums travel in one
all-reduce, so every rank reports the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from amalab.training.distributed import all_reduce_sum, rank_slots
from amalab.trl.forward import sequence_logps

#: per-task sums: count, loss, clipped excess (0 without baseline losses), margin, correct
_COLUMNS = 5


def _task_sums(trainer, dataset, baseline_column: str) -> np.ndarray:
    sums, size = np.zeros(_COLUMNS), trainer.args.per_device_eval_batch_size
    rows = rank_slots(len(dataset), trainer.world)
    has_baseline = baseline_column in dataset.column_names
    for start in range(0, len(rows), size):
        examples = [dataset[int(r)] for r in rows[start:start + size]]
        inputs = trainer._prepare_inputs(trainer.data_collator(examples))
        with torch.no_grad():
            logps = sequence_logps(trainer, trainer.model, inputs)
            values = logps.losses(trainer.preference_loss).double().cpu().numpy()
        margins = logps.margins().cpu().numpy()
        baseline = np.array([e[baseline_column] for e in examples]) if has_baseline else values
        sums += [len(examples), values.sum(), np.maximum(values - baseline, 0.0).sum(), margins.sum(),
                 (margins > 0).sum()]
    return sums


def task_metrics(trainer, datasets: dict, prefix: str = "eval") -> dict[str, float]:
    """``{prefix}_{task}_{loss, excess, margin, accuracy}`` for every task of ``datasets`` and
    ``{prefix}_worst_excess`` (over the tasks with baseline losses)."""
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        sums = np.stack([_task_sums(trainer, datasets[name], trainer.args.baseline_column) for name in datasets])
    finally:
        trainer.model.train(was_training)
    sums = all_reduce_sum(sums.ravel(), trainer.world).reshape(sums.shape)
    metrics, excesses = {}, []
    for name, (count, loss, excess, margin, correct) in zip(datasets, sums):
        metrics[f"{prefix}_{name}_loss"] = loss / count
        if trainer.args.baseline_column in datasets[name].column_names:  # the same on every rank
            metrics[f"{prefix}_{name}_excess"] = excess / count
            excesses.append(excess / count)
        metrics[f"{prefix}_{name}_margin"] = margin / count
        metrics[f"{prefix}_{name}_accuracy"] = correct / count
    if excesses:
        metrics[f"{prefix}_worst_excess"] = max(excesses)
    return {key: float(value) for key, value in metrics.items()}

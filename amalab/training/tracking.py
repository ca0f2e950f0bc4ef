"""Experiment tracking: the records of a run's ``metrics.jsonl`` (the source of truth) sent to the trackers
of ``report_to`` (TrainingArguments' name). Known trackers: ``tensorboard`` (the tensorboard extra).

With ``report_to = ["tensorboard"]`` a run writes its event files in ``<run_dir>/tensorboard/``, one
TensorBoard run per training run, so ``tensorboard --logdir OUT/generalists`` shows every method and seed
side by side (``ama-s/seed0/tensorboard``, ...). The scalars, by step:

    train/loss, train/lr, train/grad_norm, train/tokens_per_s, ...   every number of a train record
    train/batch_excess/<task>, train/task_counts/<task>              its per-task lists (docs/maths.md section 8)
    weights/<task>, average_weights/<task>                           the mixer's weights and running averages
    eval/<task>/<metric>, eval/worst_excess                          held-out metrics (docs/maths.md section 11)

A resumed run purges the events from its first redone step on, as ``metrics.jsonl`` drops those lines, so
no step is shown twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
#: per-task lists shown under their own name rather than under the record's kind
MIXER_LISTS = ("weights", "average_weights")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(record: dict, task_names: list[str]) -> dict[str, float]:
    """The record's numbers as TensorBoard tags (module docstring); strings (e.g. worst_task) are left out."""
    kind, found = record["kind"], {}

    def add(tag: str, value) -> None:
        if _is_number(value):
            found[tag] = float(value)
        elif isinstance(value, dict):
            for key, inner in value.items():
                add(f"{tag}/{key}", inner)
        elif isinstance(value, list):
            names = task_names if len(value) == len(task_names) else [str(i) for i in range(len(value))]
            for name, inner in zip(names, value):
                add(f"{tag}/{name}", inner)

    for key, value in record.items():
        if key in ("step", "kind"):
            continue
        if key == "tasks":  # evaluation's per-task metrics: eval/<task>/<metric>
            for task, metrics in value.items():
                add(f"{kind}/{task}", metrics)
        else:
            add(key if key in MIXER_LISTS else f"{kind}/{key}", value)
    return found


def tensorboard_logger(run_dir: Path, task_names: list[str], last_step: int) -> Callable[[dict], None]:
    """``log(record)``: the record's :func:`scalars` at its step in ``<run_dir>/tensorboard/``.

    The writer opens at the first record, purging what an earlier process logged from that step on (a
    resumed run redoes the steps past its last checkpoint); every record is flushed, so an interruption
    loses nothing; the writer closes after the final evaluation (the eval record of ``last_step``).
    """
    from torch.utils.tensorboard import SummaryWriter

    writer = None

    def log(record: dict) -> None:
        nonlocal writer
        step = int(record["step"])
        if writer is None:
            writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=step)
        for tag, value in scalars(record, task_names).items():
            writer.add_scalar(tag, value, step)
        writer.flush()
        if record["kind"] == "eval" and step == last_step:
            writer.close()
            writer = None

    return log


#: tracker name -> builder of its ``log(record)`` from (run folder, task names, last step); each tracker's
#: package, and amalab's extra that installs it, carry its name
TRACKERS = {"tensorboard": tensorboard_logger}


def trackers(report_to: list[str], run_dir: Path, task_names: list[str], last_step: int) -> list[Callable]:
    """The ``log(record)`` of every tracker ``report_to`` names."""
    return [TRACKERS[name](run_dir, task_names, last_step) for name in report_to]

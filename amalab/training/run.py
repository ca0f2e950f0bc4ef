"""The resumable run loop of any policy (docs/maths.md section 8): :func:`train_steps` advances a
:class:`~amalab.training.state.TrainState` by :func:`~amalab.training.step.train_step`, with a progress bar,
a log record per step, an evaluation hook and checkpoints, and stops every rank with one
:class:`TrainingDiverged` on a non-finite loss or gradient.

A run folder holds ``run.json`` (what the run is: :func:`check_run_dir`), ``metrics.jsonl`` (one JSON line
per record, the source of truth; :func:`metrics_logger`) and ``checkpoints/`` (:func:`checkpoint_writer`).
A run interrupted anywhere resumes from its last checkpoint (:func:`resume`) and continues exactly as if it
had not stopped: every RNG, the sampler and the mixer are in the checkpoint, and the metric lines logged
after it are dropped. Every file is written atomically (:mod:`amalab.atomic_write`). Under several ranks,
what decides how a run goes on is shared: a refusal or a failed write on one rank stops every rank at once
(docs/distributed.md, "Decisions every rank shares").
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from amalab.atomic_write import write_json_atomic, write_text_atomic
from amalab.errors import ConfigError
from amalab.training.checkpoint import load_latest, save_checkpoint
from amalab.training.config import OptimConfig
from amalab.training.distributed import World, check_ranks_agree, decide_on_rank0, on_every_rank
from amalab.training.state import TrainState
from amalab.training.step import ExampleLosses, train_step
from amalab.training.tracking import trackers


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, its last good checkpoint stays."""


def check_run_dir(run_dir: Path, description: dict, world: World = World()) -> None:
    """Refuse to continue a run folder that was started with other settings; a new one records them.

    Every rank checks the folder it sees and a refusal on any rank is raised on every rank: a rank that saw
    another run's files (no shared filesystem) would continue from them. Rank 0 alone records run.json.
    """
    described = json.loads(json.dumps(description, default=str))
    where = f"{run_dir}" if world.is_main else f"{run_dir} (as rank {world.rank} sees it)"
    on_every_rank(world, lambda: _refuse_other_settings(Path(run_dir) / "run.json", described, where))
    decide_on_rank0(world, lambda: _record(Path(run_dir) / "run.json", described))


def _refuse_other_settings(path: Path, described: dict, where: str) -> None:
    if path.is_file():
        found = json.loads(path.read_text())
        if found != described:
            keys = sorted(k for k in set(found) | set(described) if found.get(k) != described.get(k))
            raise ConfigError(f"{where}: this run was started with other settings (differs in "
                              f"{', '.join(keys)}); delete the folder or use another `out`")


def _record(path: Path, described: dict) -> None:
    if not path.is_file():
        write_json_atomic(path, described, indent=1)


def _metrics_up_to(path: Path, step: int) -> None:
    """Drop metric lines past ``step``: what a crashed run logged after its last checkpoint is redone (a line
    cut short by the crash is past it too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def checkpoint_writer(run_dir: Path, keep_last: int, world: World) -> Callable[[TrainState], None]:
    """``write(state)``: check the ranks agree on the mixer, gather the state (a collective), rank 0 saves; a
    save that fails (a full disk) stops every rank with its error."""
    def write(state: TrainState) -> None:
        check_ranks_agree(state.mixer.state_dict(), world)
        parts = state.state_dict()
        decide_on_rank0(world, lambda: save_checkpoint(run_dir, **parts, keep_last=keep_last))

    return write


def metrics_logger(run_dir: Path, optim: OptimConfig, task_names: list[str], world: World) -> Callable[[dict], None]:
    """``log(record)``: one JSON line in the run's ``metrics.jsonl`` (rank 0), the source of truth; the same
    record to every tracker of ``optim.report_to`` (:mod:`amalab.training.tracking`)."""
    path = Path(run_dir) / "metrics.jsonl"
    track = trackers(optim.report_to, run_dir, task_names, optim.max_steps) if world.is_main else []

    def log(record: dict) -> None:
        if world.is_main:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            for tracker in track:
                tracker(record)

    return log


def train_records(run_dir: Path) -> list[dict]:
    """The ``train`` records of a run's metrics.jsonl, one per optimizer step kept; none without the file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if r.get("kind") == "train"]


def training_tokens(run_dir: Path) -> int:
    """The tokens a run's optimizer steps read (non-padding, every rank), summed from its metrics.jsonl."""
    return int(sum(r.get("tokens", 0) for r in train_records(run_dir)))


def resume(state: TrainState, run_dir: Path, name: str, world: World, show_progress: bool) -> None:
    """Put the run folder's last checkpoint into ``state`` (if there is one); drop the metric lines past it.

    Every rank loads the checkpoint rank 0 names (:func:`~amalab.training.checkpoint.load_latest`), so all
    continue from one step; rank 0 trims metrics.jsonl, and its failure stops every rank.
    """
    checkpoint = load_latest(run_dir, world=world)
    if checkpoint is not None:
        state.load_state_dict(checkpoint.state_dict())
        if show_progress and world.is_main:
            print(f"{name}: resuming from step {state.step} ({checkpoint.path})")
    decide_on_rank0(world, lambda: _metrics_up_to(Path(run_dir) / "metrics.jsonl", state.step))


def train_steps(state: TrainState, train_sets: Sequence[Sequence], example_losses: ExampleLosses,
                baseline_losses: Sequence | None, optim: OptimConfig, name: str, *, world: World = World(),
                log: Callable[[dict], None] = lambda record: None,
                write_checkpoint: Callable[[TrainState], None] | None = None,
                evaluate: Callable[[int], dict] | None = None,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                end: int | None = None, show_progress: bool = True, leave: bool = True, where: str = "") -> None:
    """Advance ``state`` to step ``end`` (default ``optim.max_steps``), logging every step's metrics.

    ``evaluate(step)`` runs every ``optim.eval_steps`` steps before the last; ``write_checkpoint(state)``
    every ``optim.save_steps`` steps and at ``end`` (every rank calls both). A diverged step raises
    :class:`TrainingDiverged` on every rank, naming the last good checkpoint (and ``where`` it is).
    """
    end = optim.max_steps if end is None else end
    bar = tqdm(total=optim.max_steps, initial=state.step, desc=name, unit="step", dynamic_ncols=True,
               disable=not (show_progress and world.is_main), mininterval=1.0, leave=leave)
    last_good = state.step
    while state.step < end:
        result = train_step(state, train_sets, example_losses, baseline_losses, optim, world, autocast)
        if result.diverged:
            checkpoint = f"; the last good checkpoint is step {last_good} in {where}" if write_checkpoint else ""
            raise TrainingDiverged(f"{name}: {result.diverged}{checkpoint}")
        log(result.metrics)
        bar.set_postfix(loss=f"{result.metrics['loss']:.4f}", tok_s=f"{result.metrics['tokens_per_s']:.0f}",
                        refresh=False)
        bar.update(1)
        if evaluate and optim.eval_steps and state.step % optim.eval_steps == 0 and state.step < optim.max_steps:
            evaluate(state.step)
        if write_checkpoint and ((optim.save_steps and state.step % optim.save_steps == 0) or state.step == end):
            write_checkpoint(state)
            last_good = state.step
    bar.close()

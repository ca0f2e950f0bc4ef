"""The training run of the LLM experiment, for specialists, generalists and every baseline (docs/maths.md
sections 3, 4 and 8): a :class:`~amalab.llm.train_state.TrainState` advanced by
:func:`~amalab.llm.train_step.train_step` on preference pairs, with evaluation, checkpoints and a log.

A run directory holds ``run.json`` (what the run is), ``metrics.jsonl``, ``checkpoints/`` and, once
finished, ``final.json``; a run interrupted anywhere resumes from its last checkpoint and continues
exactly as if it had not stopped (every RNG, the sampler and the mixer are in the checkpoint). A
non-finite loss or gradient stops the run with :class:`TrainingDiverged` and leaves the last good
checkpoint in place. Every file is written atomically (:mod:`amalab.atomic_write`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amalab.atomic_write import write_json_atomic, write_text_atomic
from amalab.errors import ConfigError
from amalab.llm.cache import ValueCache
from amalab.llm.checkpoint import load_latest, save_checkpoint
from amalab.llm.collate import collate_pairs, padded_length
from amalab.llm.config import OptimConfig
from amalab.llm.distributed import World, check_ranks_agree, is_sharded, policy_logps
from amalab.llm.evaluate import evaluate
from amalab.llm.losses import PreferenceLoss
from amalab.llm.models import autocast_context
from amalab.llm.tokenize import TokenizedPair
from amalab.llm.tracking import trackers
from amalab.llm.train_state import TrainState, load_trainable_state
from amalab.llm.train_step import ExampleLosses, check_micro_batches, train_step
from amalab.mixers import Mixer


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, its last good checkpoint stays."""


@dataclass
class TrainingRun:
    """Everything one run needs besides the model: data, caches, mixer, settings, where to write."""

    name: str
    run_dir: Path
    mixer: Mixer
    task_names: list[str]
    train_sets: list[list[TokenizedPair]]
    eval_sets: list[list[TokenizedPair]]
    reference: ValueCache  # pi_ref log-probs of every pair (columns chosen, rejected)
    #: per task, the cached losses s(z) the mixer's baseline names (None: no baseline, s = 0)
    baseline_losses: list[ValueCache | None] | None
    #: per task, the specialist's cached losses: the excess reported by evaluation (None: not reported)
    specialist_caches: list[ValueCache | None]
    optim: OptimConfig
    loss: PreferenceLoss  # the training loss: its name, beta and options
    seed: int
    pad_token_id: int
    #: what the run is, for run.json: a rerun with other settings into the same folder is refused
    description: dict = field(default_factory=dict)
    #: the loss held-out evaluation reports (None: ``loss``); an sft baseline is evaluated in the DPO loss
    eval_loss: PreferenceLoss | None = None


def preference_example_losses(run: TrainingRun, device: torch.device) -> ExampleLosses:
    """The step's view of a causal LM on preference pairs: collate, sequence log-probs (through the FSDP2
    root when sharded), and the run's loss against the cached reference log-probs (docs/maths.md
    sections 9 and 10)."""
    def losses(logps, batch):
        ids, dtype = list(batch.ids), logps.chosen.dtype
        # read in the log-probs' dtype: both are float64 sums (docs/maths.md section 9)
        ref_chosen, ref_rejected = (torch.from_numpy(run.reference.get(column, ids)).to(device, dtype)
                                    for column in ("chosen", "rejected"))
        return run.loss(logps.chosen, logps.rejected, ref_chosen, ref_rejected,
                        chosen_token_counts=batch.chosen_token_counts,
                        rejected_token_counts=batch.rejected_token_counts)[0]

    return ExampleLosses(
        collate=lambda pairs: collate_pairs(pairs, run.pad_token_id).to(device),
        sequence_logps=policy_logps, losses=losses,
        tokens=lambda batch: (float(batch.attention_mask.sum()), float(batch.attention_mask.numel())),
        length=padded_length)


def check_run_dir(run: TrainingRun) -> None:
    """Refuse to continue a run folder that was started with other settings."""
    path = run.run_dir / "run.json"
    described = json.loads(json.dumps(run.description, default=str))
    if path.is_file():
        found = json.loads(path.read_text())
        if found != described:
            keys = sorted(k for k in set(found) | set(described) if found.get(k) != described.get(k))
            raise ConfigError(f"{run.run_dir}: this run was started with other settings (differs in "
                              f"{', '.join(keys)}); delete the folder or use another `out`")
    else:
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


def checkpoint_writer(run: TrainingRun, world: World) -> Callable[[TrainState], None]:
    """``write(state)``: check the ranks agree on the mixer, gather the state (a collective), rank 0 saves."""
    def write(state: TrainState) -> None:
        check_ranks_agree(state.mixer.state_dict(), world)
        parts = state.state_dict()
        if world.is_main:
            save_checkpoint(run.run_dir, **parts, keep_last=run.optim.save_total_limit)

    return write


def metrics_logger(run: TrainingRun, world: World) -> Callable[[dict], None]:
    """``log(record)``: one JSON line in the run's ``metrics.jsonl`` (rank 0), the source of truth; the same
    record to every tracker of ``report_to`` (:mod:`amalab.llm.tracking`)."""
    path = run.run_dir / "metrics.jsonl"
    track = trackers(run.optim.report_to, run.run_dir, run.task_names, run.optim.max_steps) if world.is_main else []

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


def _resume(state: TrainState, run: TrainingRun, world: World, show_progress: bool) -> None:
    checkpoint = load_latest(run.run_dir)
    if checkpoint is not None:
        state.load_state_dict(checkpoint.state_dict())
        if show_progress and world.is_main:
            print(f"{run.name}: resuming from step {state.step} ({checkpoint.path})")
    if world.is_main:
        _metrics_up_to(run.run_dir / "metrics.jsonl", state.step)


def run_training(model, run: TrainingRun, device: torch.device, world: World = World(),
                 show_progress: bool = True, stop_after: int | None = None, *,
                 write_checkpoint: Callable[[TrainState], None] | None = None,
                 log: Callable[[dict], None] | None = None,
                 autocast: Callable[[], object] | None = None) -> dict:
    """Train ``model`` in place for ``run.optim.max_steps`` steps (resuming if checkpointed); return the final
    eval.

    A run that finished earlier is not rerun: ``model`` gets the parameters of its last checkpoint.
    ``stop_after``: stop (with a checkpoint) after this many steps, as an interruption would (tests).
    ``write_checkpoint`` (every rank calls it), ``log`` and ``autocast`` default to the run folder's checkpoints,
    its ``metrics.jsonl`` and :func:`~amalab.llm.models.autocast_context` of ``device``.
    """
    optim = run.optim
    check_micro_batches(run.mixer, optim, world, is_sharded(model), run.name)
    if world.is_main:
        check_run_dir(run)
    final_path = run.run_dir / "final.json"
    if final_path.is_file():
        load_trainable_state(model, load_latest(run.run_dir).model_state)
        return json.loads(final_path.read_text())
    write_checkpoint = write_checkpoint or checkpoint_writer(run, world)
    log = log or metrics_logger(run, world)
    autocast = autocast or (lambda: autocast_context(device))
    state = TrainState.fresh(model, optim, run.mixer, [len(s) for s in run.train_sets], run.seed, run.task_names)
    _resume(state, run, world, show_progress)
    example_losses = preference_example_losses(run, device)

    def run_eval(step: int) -> dict:  # every rank evaluates its share (evaluate shards the pairs)
        result = evaluate(model, run.eval_sets, run.task_names, run.reference, run.specialist_caches,
                          run.eval_loss or run.loss, run.pad_token_id, optim.per_device_eval_batch_size, device,
                          world, autocast)
        log({"step": step, "kind": "eval", **result})
        return result

    model.train()
    bar = tqdm(total=optim.max_steps, initial=state.step, desc=run.name, unit="step", dynamic_ncols=True,
               disable=not (show_progress and world.is_main), mininterval=1.0)
    last_good = state.step
    end = optim.max_steps if stop_after is None else min(optim.max_steps, state.step + stop_after)
    while state.step < end:
        result = train_step(state, run.train_sets, example_losses, run.baseline_losses, optim, world, autocast)
        if result.diverged:
            raise TrainingDiverged(f"{run.name}: {result.diverged}; the last good checkpoint is step {last_good} "
                                   f"in {run.run_dir}")
        log(result.metrics)
        bar.set_postfix(loss=f"{result.metrics['loss']:.4f}", tok_s=f"{result.metrics['tokens_per_s']:.0f}",
                        refresh=False)
        bar.update(1)
        if optim.eval_steps and state.step % optim.eval_steps == 0 and state.step < optim.max_steps:
            run_eval(state.step)
        if (optim.save_steps and state.step % optim.save_steps == 0) or state.step == end:
            write_checkpoint(state)
            last_good = state.step
    bar.close()
    if end < optim.max_steps:
        return {}
    result = run_eval(optim.max_steps)
    result.update(steps=optim.max_steps, average_weights=np.asarray(run.mixer.average_weights).tolist(),
                  weights=np.asarray(run.mixer.weights).tolist())
    if world.is_main:
        write_json_atomic(final_path, result, indent=1)
    return result

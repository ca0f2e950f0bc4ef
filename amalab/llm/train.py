"""The training run of the LLM experiment, for specialists, generalists and every baseline (docs/maths.md
sections 3, 4 and 8): a :class:`~amalab.training.state.TrainState` advanced by
:func:`~amalab.training.step.train_step` on preference pairs, with evaluation, checkpoints and a log.

A run directory holds what :mod:`amalab.training.run` writes (``run.json``, ``metrics.jsonl``,
``checkpoints/``) and, once finished, ``final.json``; a run interrupted anywhere resumes from its last checkpoint and continues
exactly as if it had not stopped (every RNG, the sampler and the mixer are in the checkpoint). A
non-finite loss or gradient stops the run with :class:`~amalab.training.run.TrainingDiverged` and leaves the last good
checkpoint in place. Every file is written atomically (:mod:`amalab.atomic_write`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from amalab.atomic_write import write_json_atomic
from amalab.training.cache import ValueCache
from amalab.training.checkpoint import load_latest
from amalab.llm.collate import collate_pairs, padded_length
from amalab.training.config import OptimConfig
from amalab.training.distributed import World, decide_on_rank0, is_sharded
from amalab.llm.logprobs import policy_logps
from amalab.llm.evaluate import evaluate
from amalab.objectives.preference import PreferenceLoss
from amalab.llm.precision import autocast_context
from amalab.llm.tokenize import TokenizedPair
from amalab.training.run import checkpoint_writer, check_run_dir, metrics_logger, resume, train_steps
from amalab.training.state import TrainState, load_trainable_state
from amalab.training.step import ExampleLosses, check_micro_batches
from amalab.mixers import Mixer


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


def run_training(model, run: TrainingRun, device: torch.device, world: World = World(),
                 show_progress: bool = True, stop_after: int | None = None, *,
                 write_checkpoint: Callable[[TrainState], None] | None = None,
                 log: Callable[[dict], None] | None = None,
                 autocast: Callable[[], object] | None = None) -> dict:
    """Train ``model`` in place for ``run.optim.max_steps`` steps (resuming if checkpointed); return the final
    eval.

    A run that finished earlier is not rerun: ``model`` gets the parameters of its last checkpoint. Under
    several ranks, rank 0's run folder decides whether the run finished and where it resumes
    (docs/distributed.md, "Decisions every rank shares").
    ``stop_after``: stop (with a checkpoint) after this many steps, as an interruption would (tests).
    ``write_checkpoint`` (every rank calls it), ``log`` and ``autocast`` default to the run folder's checkpoints,
    its ``metrics.jsonl`` and :func:`~amalab.llm.precision.autocast_context` of ``device``.
    """
    optim = run.optim
    check_micro_batches(run.mixer, optim, world, is_sharded(model), run.name)
    check_run_dir(run.run_dir, run.description, world)
    final_path = run.run_dir / "final.json"
    # one decision for every rank: a rank that saw no final.json would train while the others had returned
    finished = decide_on_rank0(world, lambda: _finished(final_path))
    if finished is not None:
        # the weights alone: a finished run is evaluated or merged, never resumed
        load_trainable_state(model, load_latest(run.run_dir, world=world, weights_only=True).model_state)
        return finished
    log = log or metrics_logger(run.run_dir, optim, run.task_names, world)
    autocast = autocast or (lambda: autocast_context(device))
    state = TrainState.fresh(model, optim, run.mixer, [len(s) for s in run.train_sets], run.seed, run.task_names)
    resume(state, run.run_dir, run.name, world, show_progress)

    def run_eval(step: int) -> dict:  # every rank evaluates its share (evaluate shards the pairs)
        result = evaluate(model, run.eval_sets, run.task_names, run.reference, run.specialist_caches,
                          run.eval_loss or run.loss, run.pad_token_id, optim.per_device_eval_batch_size, device,
                          world, autocast)
        log({"step": step, "kind": "eval", **result})
        return result

    model.train()
    end = optim.max_steps if stop_after is None else min(optim.max_steps, state.step + stop_after)
    train_steps(state, run.train_sets, preference_example_losses(run, device), run.baseline_losses, optim, run.name,
                world=world, log=log, write_checkpoint=write_checkpoint or checkpoint_writer(
                    run.run_dir, optim.save_total_limit, world),
                evaluate=run_eval, autocast=autocast, end=end, show_progress=show_progress, where=str(run.run_dir))
    if end < optim.max_steps:
        return {}
    result = run_eval(optim.max_steps)
    result.update(steps=optim.max_steps, average_weights=np.asarray(run.mixer.average_weights).tolist(),
                  weights=np.asarray(run.mixer.weights).tolist())
    decide_on_rank0(world, lambda: write_json_atomic(final_path, result, indent=1))
    return result


def _finished(final_path: Path) -> dict | None:
    """A finished run's final metrics (its final.json), None while it has not finished."""
    return json.loads(final_path.read_text()) if final_path.is_file() else None

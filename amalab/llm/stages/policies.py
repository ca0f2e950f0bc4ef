"""Policies of an experiment: fresh trainable copies of its base model, trained by a run or restored from one."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import torch

from amalab.llm.experiment import Experiment
from amalab.llm.logprobs import shard_causal_lm
from amalab.llm.models import MODEL_SETTINGS, compile_layers, decoder_layers, trainable
from amalab.llm.train import TrainingRun, run_training
from amalab.training.checkpoint import load_latest
from amalab.training.state import load_trainable_state


def new_policy(experiment: Experiment, seed: int) -> torch.nn.Module:
    """A fresh trainable copy of the base model (with a LoRA adapter initialized from ``seed`` if asked, its frozen
    base in ``[model] frozen_dtype``: :func:`amalab.llm.models.trainable`).

    With ``[model] torch_compile`` each decoder layer is compiled; with ``[model] fsdp`` under torchrun the copy
    is sharded over the ranks (:func:`amalab.llm.logprobs.shard_causal_lm`).
    """
    settings = experiment.config.model
    # copied and given its adapter on the CPU (where the base lives), then moved: one model on the device
    model = trainable(copy.deepcopy(experiment.base_model), settings, seed).to(experiment.device)
    if settings.torch_compile:
        compile_layers(model)
    if settings.fsdp and experiment.world.distributed:
        model = shard_causal_lm(model, decoder_layers(model), experiment.world)
    return model


def described(run: TrainingRun, mixer: dict, reference_manifest: dict) -> TrainingRun:
    """``run`` with its description (run.json): a rerun with other settings into its folder is refused."""
    # report_to only adds event files beside metrics.jsonl: switching it on or off continues the same run
    optim = {k: v for k, v in asdict(run.optim).items() if k != "report_to"}
    run.description = {"name": run.name, "mixer": mixer, "seed": run.seed, "optim": optim,
                       "loss": asdict(run.loss), "reference": reference_manifest}
    # the policy, not only pi_ref, is built with [model] attn_implementation and frozen_dtype: its own entry,
    # the values the reference manifest records (those other than the defaults: run.json of older runs holds)
    model = {key: reference_manifest[key] for key in MODEL_SETTINGS if key in reference_manifest}
    if model:
        run.description["model"] = model
    return run


def train_policy(experiment: Experiment, run: TrainingRun) -> tuple[torch.nn.Module, dict]:
    """A fresh policy trained by ``run`` (or holding its finished result), and the run's final metrics."""
    model = new_policy(experiment, run.seed)
    final = run_training(model, run, experiment.device, experiment.world, experiment.progress.enabled,
                         autocast=experiment.autocast)
    return model, final


def trained_policy(experiment: Experiment, run_dir: Path, seed: int) -> torch.nn.Module | None:
    """A fresh policy holding the trained parameters of ``run_dir``'s last checkpoint; None without one (rank
    0's checkpoint, loaded by every rank: docs/distributed.md). Its weights alone are read, never the
    optimizer state; under FSDP2 each rank copies in only its shards."""
    checkpoint = load_latest(run_dir, world=experiment.world, weights_only=True)
    if checkpoint is None:
        return None
    model = new_policy(experiment, seed)
    load_trainable_state(model, checkpoint.model_state)
    return model

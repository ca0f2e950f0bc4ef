"""Scoring against the specialists: their cached losses s(z) (docs/maths.md sections 1, 11 and 12), the
per-example loss caches of a model, and a run's held-out metrics and generation scores.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from amalab.llm.evaluate import evaluate, pair_logps, pair_losses
from amalab.llm.experiment import Experiment
from amalab.llm.generation_scores import add_generation
from amalab.llm.models import settings_manifest
from amalab.llm.precision import autocast_manifest
from amalab.llm.tokenize import TokenizedPair
from amalab.training.cache import ValueCache, data_hash


def fingerprint(caches: list[ValueCache]) -> str:
    """sha256 (16 hex digits) of the caches' ids and loss values, in order: what a result scored against them
    records, so that a result scored against other values is never reused."""
    digest = hashlib.sha256()
    for cache in caches:
        digest.update("\n".join(cache.ids).encode())
        digest.update(np.ascontiguousarray(cache.columns["loss"], dtype="<f8").tobytes())
    return digest.hexdigest()[:16]


@dataclass
class SpecialistLosses:
    """The specialists' cached losses s(z) per task (docs/maths.md sections 11 and 12).

    ``evaluation``: the experiment's definition, cross-fitted with ``[specialists] cross_fit`` >= 2, else
    in-sample; every held-out excess uses it, and so do the methods measured against the specialists.
    ``in_sample``: the losses of the specialists trained on all of their task's pairs, the baseline of the
    ``[methods] in_sample`` variants.
    """

    evaluation: list[ValueCache]
    in_sample: list[ValueCache]
    definition: str

    def stamp(self, in_sample: bool = False) -> dict:
        """What a result trained or scored against these losses records: the definition and a fingerprint."""
        if in_sample:
            return {"definition": "in-sample", "fingerprint": fingerprint(self.in_sample)}
        return {"definition": self.definition, "fingerprint": fingerprint(self.evaluation)}


def loss_cache(experiment: Experiment, model, pairs: list[TokenizedPair], folder: Path, manifest: dict,
               what: str) -> ValueCache:
    """Per-example losses of ``model`` on ``pairs`` (baseline losses s(z), docs/maths.md section 1), cached."""
    unique = list({p.id: p for p in pairs}.values())
    ids = [p.id for p in unique]
    config = experiment.config

    def build(progress):
        logps = pair_logps(model, unique, experiment.pad_token_id, config.train.per_device_eval_batch_size,
                           experiment.device, experiment.world, progress, experiment.autocast)
        losses, _ = pair_losses(logps, experiment.reference, ids, config.loss)
        return ValueCache(ids, {"loss": losses})

    manifest = {**manifest, "reference": experiment.reference_manifest["model"], "loss": asdict(config.loss),
                **autocast_manifest(experiment.device, config.model.autocast), **settings_manifest(config.model),
                "data": data_hash(sorted(ids))}
    return experiment.progress.cached(folder, manifest, what, len(unique), build)


def scored(experiment: Experiment, model, losses: SpecialistLosses, run_dir: Path, final: dict) -> dict:
    """``final`` with the held-out metrics of ``model`` (docs/maths.md (48)-(52)) against ``losses``' evaluation
    caches, stamped with them, and the generation scores of the verifiable tasks."""
    config = experiment.config
    final = {**final, **evaluate(model, experiment.eval_sets, experiment.task_names, experiment.reference,
                                 losses.evaluation, config.loss, experiment.pad_token_id,
                                 config.train.per_device_eval_batch_size, experiment.device, experiment.world,
                                 autocast=experiment.autocast),
             "specialist_losses": losses.stamp()}
    return add_generation(experiment, model, run_dir, final)

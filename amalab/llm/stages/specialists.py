"""The specialists of an LLM experiment and their cached losses s(z) (docs/maths.md sections 1, 11 and 12).

One specialist per task is trained on all of the task's pairs (``OUT/specialists/<task>/``: the merges' inputs,
and the in-sample losses); with ``[specialists] cross_fit = K`` >= 2, K more per task, each on every fold of the
task's pairs but one (``OUT/cross_fit/<task>/fold<f>of<K>/``), give the cross-fitted losses
(:mod:`amalab.llm.stages.cross_fit`). Every run and every cache resumes on its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from amalab.errors import ConfigError
from amalab.llm.experiment import Experiment
from amalab.llm.fingerprint import policy_fingerprint
from amalab.llm.models import load_model
from amalab.llm.stages.cross_fit import cross_fitted_losses, task_folds
from amalab.llm.stages.policies import described, train_policy, trained_policy
from amalab.llm.stages.scoring import SpecialistLosses, loss_cache
from amalab.llm.train import TrainingRun
from amalab.mixers import make_mixer
from amalab.training.cache import ValueCache, data_hash
from amalab.training.distributed import decide_on_rank0, on_every_rank


def specialist_run(experiment: Experiment, task: int, fold: int | None = None) -> TrainingRun:
    """Task ``task``'s specialist: the task alone (all its training pairs, or with ``fold`` every fold but that
    one), trained in the config's loss with [specialists.optim]."""
    config, name = experiment.config, experiment.task_names[task]
    train, run_dir = experiment.train_sets[task], experiment.out / "specialists" / name
    mixer = {"name": "uniform", "task": name}
    if fold is not None:
        k = config.specialists.cross_fit
        train = task_folds(experiment, task)[fold][0]
        run_dir = experiment.out / "cross_fit" / name / f"fold{fold}of{k}"
        mixer["fold"] = {"index": fold, "k": k, "seed": config.seed, "data": data_hash(sorted(p.id for p in train))}
    run = TrainingRun(name=f"specialist {name}" + ("" if fold is None else f" fold {fold}"), run_dir=run_dir,
                      mixer=make_mixer("uniform", 1), task_names=[name], train_sets=[train],
                      eval_sets=[experiment.eval_sets[task]], reference=experiment.reference,
                      baseline_losses=None, specialist_caches=[None], optim=config.specialists.optim,
                      loss=config.loss, seed=config.seed, pad_token_id=experiment.pad_token_id,
                      eval_loss=config.loss)
    return described(run, mixer, experiment.reference_manifest)


def _trained_specialist(experiment: Experiment, run: TrainingRun, allow_training: bool) -> torch.nn.Module:
    # rank 0's folder decides for every rank (docs/distributed.md): one refusing alone leaves the rest waiting
    if not allow_training and not decide_on_rank0(experiment.world, (run.run_dir / "final.json").is_file):
        raise ConfigError(f"{run.name} is not trained yet ({run.run_dir}): run `amalab llm specialists "
                          f"{experiment.config.source_path}` first, or `amalab llm run`")
    model, final = train_policy(experiment, run)
    experiment.progress.say(f"{run.name}: held-out {_short(final['tasks'].get(run.task_names[0], {}))}")
    return model


def _load_given_specialist(experiment: Experiment, path: Path) -> torch.nn.Module:
    """A model folder, or a run folder's last checkpoint: rank 0 tells which, and a rank that cannot load it
    stops every rank (docs/distributed.md)."""
    if decide_on_rank0(experiment.world, (path / "config.json").is_file):
        return on_every_rank(experiment.world, lambda: load_model(path, device=experiment.device))
    model = trained_policy(experiment, path, experiment.config.seed)
    if model is None:
        raise ConfigError(f"specialists.load: {path} is neither a model folder (config.json) nor a run folder "
                          "with checkpoints")
    return model


def in_sample_loss_caches(experiment: Experiment, allow_training: bool = True) -> list[ValueCache]:
    """Train (or load) one specialist per task on all of its pairs; the caches of its losses on every pair of
    its task, the ones it trained on included (in-sample, (46))."""
    config, caches = experiment.config, []
    for i, name in enumerate(experiment.task_names):
        given = config.specialists.load.get(name)
        if given is not None:
            model, source = _load_given_specialist(experiment, Path(config.resolve(given))), {"loaded": given}
        else:
            run = specialist_run(experiment, i)
            model = _trained_specialist(experiment, run, allow_training)
            source = {"trained": str(run.run_dir), "steps": run.optim.max_steps}
        manifest = {"kind": "specialist losses", "task": name, "specialist": policy_fingerprint(model), **source}
        caches.append(loss_cache(experiment, model, experiment.train_sets[i] + experiment.eval_sets[i],
                                 experiment.out / "caches" / f"specialist-{name}", manifest,
                                 f"specialist {name} losses"))
        del model
    return caches


def cross_fitted_loss_caches(experiment: Experiment, allow_training: bool = True) -> list[ValueCache]:
    """Per task, K fold specialists, each scoring the fold it did not train on and the held-out pairs; their
    losses combined into s(z) by (54) and (55). Every fold's run and cache resumes on its own."""
    k, caches = experiment.config.specialists.cross_fit, []
    for i, name in enumerate(experiment.task_names):
        held_out, fold_caches, scored = experiment.eval_sets[i], [], []
        for f, (_, fold_pairs) in enumerate(task_folds(experiment, i)):
            run = specialist_run(experiment, i, fold=f)
            model = _trained_specialist(experiment, run, allow_training)
            manifest = {"kind": "cross-fitted specialist losses", "task": name, "fold": f, "k": k,
                        "specialist": policy_fingerprint(model), "trained": str(run.run_dir),
                        "steps": run.optim.max_steps}
            fold_caches.append(loss_cache(
                experiment, model, fold_pairs + held_out,
                experiment.out / "caches" / f"specialist-{name}-fold{f}of{k}", manifest,
                f"specialist {name} fold {f} losses"))
            scored.append(fold_pairs)
            del model
        caches.append(cross_fitted_losses(fold_caches, scored, held_out))
    return caches


def specialist_losses(experiment: Experiment, allow_training: bool = True) -> SpecialistLosses:
    """Every task's specialist trained on all of its pairs and its in-sample losses; with cross_fit >= 2 the
    cross-fitted losses too, which then are the experiment's definition."""
    k = experiment.config.specialists.cross_fit
    in_sample = in_sample_loss_caches(experiment, allow_training)
    if k == 1:
        return SpecialistLosses(in_sample, in_sample, "in-sample")
    return SpecialistLosses(cross_fitted_loss_caches(experiment, allow_training), in_sample, f"cross-fit {k}")


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")


def loss_summary(experiment: Experiment, losses: SpecialistLosses) -> dict:
    """The definition of s(z) and, per task, its mean on the training and held-out pairs, in-sample (46) and
    by the definition: how much lower a specialist scores the pairs it trained on (docs/maths.md section 12)."""
    means = {}
    for i, name in enumerate(experiment.task_names):
        train = [p.id for p in experiment.train_sets[i]]
        held_out = [p.id for p in experiment.eval_sets[i]]
        means[name] = {"in_sample_train": float(losses.in_sample[i].get("loss", train).mean()),
                       "in_sample_held_out": float(losses.in_sample[i].get("loss", held_out).mean()),
                       "train": float(losses.evaluation[i].get("loss", train).mean()),
                       "held_out": float(losses.evaluation[i].get("loss", held_out).mean())}
    return {"definition": losses.definition, "means": means}

"""The whole LLM experiment from one config: data, caches, specialists, generalists, merges, report.

    out/
      config.toml                        the config the run was started with
      data.json                          pairs per task, and every dropped row counted by reason
      tokenizer/                         the experiment's tokenizer (what `amalab llm export` ships)
      caches/reference/                  pi_ref log-probs of every pair (docs/maths.md section 11)
      caches/specialist-<task>/          s(z): the specialist's loss on every pair of its task
      caches/standard/                   the standard generalist's losses (DoReMi's baseline losses)
      specialists/<task>/                a training run (checkpoints, metrics.jsonl, final.json)
      generalists/<method>/seed<s>/      a training run per method and seed (export: amalab.llm.export)
      merges/<method>/seed<s>/           a merge of the specialists, evaluated (amalab.llm.baseline_merges)
      summary.json, summary.csv          final held-out metrics of every generalist (amalab.llm.report)
      figures/                           per-task excess and accuracy, mixer weights, worst-task excess

Every stage reuses what is on disk (caches are checked against their manifests; finished runs are not
rerun; interrupted runs resume), so rerunning the command after an interruption continues the work.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch

from amalab.atomic_write import write_json_atomic
from amalab.errors import ConfigError
from amalab.llm.baseline_merges import add_generation, merged_specialists
from amalab.llm.cache import ValueCache
from amalab.llm.config import LLMConfig, method_mixer_and_loss
from amalab.llm.distributed import World
from amalab.llm.evaluate import evaluate
from amalab.llm.experiment import Experiment, prepare
from amalab.llm.models import load_model, policy_fingerprint
from amalab.llm.report import report
from amalab.llm.train import TrainingRun, run_training
from amalab.mixers import make_mixer


def _describe(experiment: Experiment, run: TrainingRun, mixer: dict) -> TrainingRun:
    """``run`` with its description (run.json): a rerun with other settings into its folder is refused."""
    # report_to only adds event files beside metrics.jsonl: switching it on or off continues the same run
    optim = {k: v for k, v in asdict(run.optim).items() if k != "report_to"}
    run.description = {"name": run.name, "mixer": mixer, "seed": run.seed, "optim": optim,
                       "loss": asdict(run.loss), "reference": experiment.reference_manifest}
    return run


def _train(experiment: Experiment, run: TrainingRun) -> tuple[torch.nn.Module, dict]:
    """A fresh policy trained by ``run`` (or holding its finished result), and the run's final metrics."""
    model = experiment.policy(run.seed)
    final = run_training(model, run, experiment.device, experiment.world, experiment.show_progress,
                         autocast=experiment.autocast)
    return model, final


# --------------------------------------------------------------------------------------- specialists

def specialist_run(experiment: Experiment, task: int) -> TrainingRun:
    """Task ``task``'s specialist: the task alone, trained in the config's loss with [specialists.optim]."""
    config, name = experiment.config, experiment.task_names[task]
    run = TrainingRun(name=f"specialist {name}", run_dir=experiment.out / "specialists" / name,
                      mixer=make_mixer("uniform", 1), task_names=[name], train_sets=[experiment.train_sets[task]],
                      eval_sets=[experiment.eval_sets[task]], reference=experiment.reference,
                      baseline_losses=None, specialist_caches=[None], optim=config.specialists.optim,
                      loss=config.loss, seed=config.seed, pad_token_id=experiment.pad_token_id,
                      eval_loss=config.loss)
    return _describe(experiment, run, {"name": "uniform", "task": name})


def specialist_loss_caches(experiment: Experiment, allow_training: bool = True) -> list[ValueCache]:
    """Train (or load) one specialist per task; return the caches of its losses on every pair of its task."""
    config, caches = experiment.config, []
    for i, name in enumerate(experiment.task_names):
        given = config.specialists.load.get(name)
        if given is not None:
            model, source = _load_given_specialist(experiment, Path(config.resolve(given))), {"loaded": given}
        else:
            run = specialist_run(experiment, i)
            if not allow_training and not (run.run_dir / "final.json").is_file():
                raise ConfigError(f"specialist {name!r} is not trained yet ({run.run_dir}): run `amalab llm "
                                  f"specialists {config.source_path}` first, or `amalab llm run`")
            model, final = _train(experiment, run)
            source = {"trained": str(run.run_dir), "steps": run.optim.max_steps}
            experiment.say(f"specialist {name}: held-out {_short(final['tasks'].get(name, {}))}")
        manifest = {"kind": "specialist losses", "task": name, "specialist": policy_fingerprint(model), **source}
        caches.append(experiment.loss_cache(model, experiment.train_sets[i] + experiment.eval_sets[i],
                                            experiment.out / "caches" / f"specialist-{name}", manifest,
                                            f"specialist {name} losses"))
        del model
    return caches


def _load_given_specialist(experiment: Experiment, path: Path) -> torch.nn.Module:
    if (path / "config.json").is_file():
        return load_model(path, device=experiment.device)
    model = experiment.trained_policy(path, experiment.config.seed)
    if model is None:
        raise ConfigError(f"specialists.load: {path} is neither a model folder (config.json) nor a run folder "
                          "with checkpoints")
    return model


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")


# --------------------------------------------------------------------------------------- generalists

def generalist_runs(config: LLMConfig, out: Path) -> Iterator[tuple[str, int, Path]]:
    """(method, seed index, run folder) of every generalist of the config, in the config's order."""
    for method in config.methods.names:
        for s in range(config.methods.seeds_of(method)):
            yield method, s, out / "generalists" / method / f"seed{s}"


def generalist_run(experiment: Experiment, method: str, s: int, run_dir: Path, specialist_caches: list[ValueCache],
                   standard_cache: ValueCache | None) -> TrainingRun:
    """Method ``method``'s generalist of seed index ``s``: every task, its mixer against its baseline losses
    (the specialists', the standard generalist's, or none), evaluated in the config's loss."""
    config, k = experiment.config, len(experiment.tasks)
    options = dict(config.methods.options.get(method, {}))
    mixer_name, loss = method_mixer_and_loss(method, config.loss.loss_type)
    mixer = make_mixer(mixer_name, k, sizes=[len(pairs) for pairs in experiment.train_sets], **options)
    # load_llm_config puts a method measured against the standard generalist after "standard"
    baseline_losses = {"specialist": specialist_caches, "standard": [standard_cache] * k}.get(mixer.baseline)
    run = TrainingRun(name=f"{method} seed {s}", run_dir=run_dir, mixer=mixer, task_names=experiment.task_names,
                      train_sets=experiment.train_sets, eval_sets=experiment.eval_sets,
                      reference=experiment.reference, baseline_losses=baseline_losses,
                      specialist_caches=specialist_caches, optim=config.train,
                      loss=replace(config.loss, loss_type=loss), seed=config.seed + s,
                      pad_token_id=experiment.pad_token_id, eval_loss=config.loss)
    return _describe(experiment, run, {"name": mixer_name, "options": options})


def generalists(experiment: Experiment, specialist_caches: list[ValueCache]) -> list[dict]:
    """Train every method of the config with its seeds; return one record per run."""
    records, standard_cache = [], None
    for method, s, run_dir in generalist_runs(experiment.config, experiment.out):
        run = generalist_run(experiment, method, s, run_dir, specialist_caches, standard_cache)
        model, final = _train(experiment, run)
        if method == "standard" and standard_cache is None:
            every = [p for pairs in experiment.train_sets + experiment.eval_sets for p in pairs]
            manifest = {"kind": "standard generalist losses", "model": policy_fingerprint(model), "run": str(run_dir)}
            standard_cache = experiment.loss_cache(model, every, experiment.out / "caches" / "standard", manifest,
                                                   "standard generalist losses")
        final = add_generation(experiment, model, run_dir, final)
        records.append({"method": method, "seed": s, "run_dir": experiment.relative(run_dir), **final})
        experiment.say(f"{method} seed {s}: worst-task excess {final.get('worst_excess', float('nan')):.4f} "
                       f"({final.get('worst_task')})")
        del model
    return records


def reevaluated_generalists(experiment: Experiment, specialist_caches: list[ValueCache]) -> list[dict]:
    """Every finished generalist evaluated again from its last checkpoint (final.json rewritten)."""
    config, world, records = experiment.config, experiment.world, []
    for method, s, run_dir in generalist_runs(config, experiment.out):
        if not (run_dir / "final.json").is_file():
            experiment.say(f"{method} seed {s}: not finished ({run_dir}); skipped")
            continue
        model = experiment.trained_policy(run_dir, config.seed + s)
        final = json.loads((run_dir / "final.json").read_text())
        final.update(evaluate(model, experiment.eval_sets, experiment.task_names, experiment.reference,
                              specialist_caches, config.loss, experiment.pad_token_id,
                              config.train.per_device_eval_batch_size, experiment.device, world,
                              autocast=experiment.autocast))
        final = add_generation(experiment, model, run_dir, final)
        if world.is_main:
            write_json_atomic(run_dir / "final.json", final, indent=1)
        records.append({"method": method, "seed": s, "run_dir": experiment.relative(run_dir), **final})
    return records


# ------------------------------------------------------------------------------------------ stages

def run_all(config: LLMConfig, stages: tuple[str, ...] = ("specialists", "generalists"), world: World = World(),
            show_progress: bool = True) -> dict | None:
    """Run the named stages (caches are always prepared); return the summary if generalists ran.

    Without "specialists" among the stages, the specialists must have been trained already.
    """
    experiment = prepare(config, world, show_progress)
    specialist_caches = specialist_loss_caches(experiment, allow_training="specialists" in stages)
    if "generalists" not in stages:
        return None
    records = generalists(experiment, specialist_caches) + merged_specialists(experiment, specialist_caches)
    return report(experiment.out, experiment.task_names, records, write=world.is_main)


def reevaluate(config: LLMConfig, world: World = World(), show_progress: bool = True) -> dict:
    """Evaluate every finished generalist again from its last checkpoint; rewrite the summary and figures."""
    experiment = prepare(config, world, show_progress)
    specialist_caches = specialist_loss_caches(experiment, allow_training=False)
    records = reevaluated_generalists(experiment, specialist_caches)
    records += merged_specialists(experiment, specialist_caches)
    if not records:
        raise ConfigError(f"{experiment.out}: no finished generalist to evaluate: run `amalab llm train` first")
    return report(experiment.out, experiment.task_names, records, write=world.is_main)

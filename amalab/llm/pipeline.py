"""The whole LLM experiment from one config: data, caches, specialists, generalists, merges, report.

    out/
      config.toml                        the config the run was started with
      data.json                          pairs per task, and every dropped row counted by reason
      tokenizer/                         the experiment's tokenizer (what `amalab llm export` ships)
      caches/reference/                  pi_ref log-probs of every pair (docs/maths.md section 11)
      caches/specialist-<task>/          in-sample s(z): the specialist's loss on every pair of its task
      caches/specialist-<task>-fold<f>of<K>/  fold specialist f's losses on fold f and the held-out pairs
      caches/standard/                   the standard generalist's losses (DoReMi's baseline losses)
      specialists/<task>/                a training run on all of the task's pairs (checkpoints, metrics.jsonl,
                                         final.json; amalab.llm.specialists)
      cross_fit/<task>/fold<f>of<K>/     a training run on every fold but f (docs/maths.md section 12)
      base/                              the base model evaluated like a generalist (where every method starts)
      generalists/<method>/seed<s>/      a training run per method and seed (export: amalab.llm.export);
                                         <method>-in-sample: trained against the in-sample s(z)
      merges/<method>/seed<s>/           a merge of the specialists, evaluated (amalab.llm.baseline_merges)
      summary.json, summary.csv          final held-out metrics of every run, steps and tokens, paired
                                         differences (amalab.llm.report); summary.md: its tables in markdown
      figures/                           per-task excess and accuracy, mixer weights, worst-task excess,
                                         paired differences

Every stage reuses what is on disk (caches are checked against their manifests; finished runs are not
rerun; interrupted runs resume), so rerunning the command after an interruption continues the work.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from amalab.atomic_write import write_json_atomic
from amalab.errors import ConfigError
from amalab.llm.baseline_merges import add_generation, merged_specialists
from amalab.training.cache import ValueCache
from amalab.llm.config import LLMConfig
from amalab.mixers.methods import method_mixer_and_loss
from amalab.training.distributed import World
from amalab.llm.experiment import Experiment, prepare
from amalab.llm.models import policy_fingerprint
from amalab.llm.report import report
from amalab.llm.specialists import SpecialistLosses, loss_summary, specialist_losses
from amalab.llm.train import TrainingRun
from amalab.training.run import check_run_dir, training_tokens
from amalab.mixers import make_mixer


# --------------------------------------------------------------------------------------- generalists

def generalist_runs(config: LLMConfig, out: Path) -> Iterator[tuple[str, str, bool, int, Path]]:
    """(label, method, in-sample?, seed index, run folder) of every generalist of the config, in order."""
    for label, method, in_sample in config.methods.runs():
        for s in range(config.methods.seeds_of(method)):
            yield label, method, in_sample, s, out / "generalists" / label / f"seed{s}"


def generalist_run(experiment: Experiment, label: str, method: str, s: int, run_dir: Path, losses: SpecialistLosses,
                   standard_cache: ValueCache | None, in_sample: bool = False) -> TrainingRun:
    """Method ``method``'s generalist of seed index ``s`` (reported as ``label``): every task, its mixer
    against its baseline losses (the specialists', in-sample if ``in_sample``; the standard generalist's; or
    none), evaluated in the config's loss against the experiment's specialist losses."""
    config, k = experiment.config, len(experiment.tasks)
    options = dict(config.methods.options.get(method, {}))
    mixer_name, loss = method_mixer_and_loss(method, config.loss.loss_type)
    mixer = make_mixer(mixer_name, k, sizes=[len(pairs) for pairs in experiment.train_sets], **options)
    specialist = losses.in_sample if in_sample else losses.evaluation
    # load_llm_config puts a method measured against the standard generalist after "standard"
    baseline_losses = {"specialist": specialist, "standard": [standard_cache] * k}.get(mixer.baseline)
    run = TrainingRun(name=f"{label} seed {s}", run_dir=run_dir, mixer=mixer, task_names=experiment.task_names,
                      train_sets=experiment.train_sets, eval_sets=experiment.eval_sets,
                      reference=experiment.reference, baseline_losses=baseline_losses,
                      specialist_caches=losses.evaluation, optim=config.train,
                      loss=replace(config.loss, loss_type=loss), seed=config.seed + s,
                      pad_token_id=experiment.pad_token_id, eval_loss=config.loss)
    described = {"name": mixer_name, "options": options}
    if mixer.baseline == "specialist":  # the s(z) it trains against: other values make another run
        described["specialist_losses"] = losses.stamp(in_sample)
    return experiment.described(run, described)


def generalists(experiment: Experiment, losses: SpecialistLosses) -> list[dict]:
    """Train every method of the config with its seeds; return one record per run. A run finished earlier
    whose held-out metrics were scored against other specialist losses is evaluated again."""
    records, standard_cache = [], None
    for label, method, in_sample, s, run_dir in generalist_runs(experiment.config, experiment.out):
        run = generalist_run(experiment, label, method, s, run_dir, losses, standard_cache, in_sample)
        fresh = not (run_dir / "final.json").is_file()
        model, final = experiment.train(run)
        if method == "standard" and standard_cache is None:
            every = [p for pairs in experiment.train_sets + experiment.eval_sets for p in pairs]
            manifest = {"kind": "standard generalist losses", "model": policy_fingerprint(model), "run": str(run_dir)}
            standard_cache = experiment.loss_cache(model, every, experiment.out / "caches" / "standard", manifest,
                                                   "standard generalist losses")
        if final.get("specialist_losses") != losses.stamp():
            # a run trained now was evaluated against these losses already: it only needs the stamp
            final = ({**final, "specialist_losses": losses.stamp()} if fresh
                     else experiment.scored(model, losses, run_dir, final))
            _write(experiment, run_dir / "final.json", final)
        final = add_generation(experiment, model, run_dir, final)
        records.append(_record(experiment, label, s, run_dir, final))
        experiment.say(f"{label} seed {s}: worst-task excess {final.get('worst_excess', float('nan')):.4f} "
                       f"({final.get('worst_task')})")
        del model
    return records


def _write(experiment: Experiment, path: Path, final: dict) -> None:
    if experiment.world.is_main:
        write_json_atomic(path, final, indent=1)


def _record(experiment: Experiment, label: str, s: int, run_dir: Path, final: dict) -> dict:
    """A summary record: the run's final metrics, its folder, and its optimizer steps and training tokens."""
    return {"method": label, "seed": s, "run_dir": experiment.relative(run_dir), **final,
            "steps": final.get("steps", 0), "tokens": training_tokens(run_dir)}


def reevaluated_generalists(experiment: Experiment, losses: SpecialistLosses) -> list[dict]:
    """Every finished generalist evaluated again from its last checkpoint (final.json rewritten); a run
    trained with other settings (other baseline losses among them) is refused, as training refuses it."""
    config, records = experiment.config, []
    for label, method, in_sample, s, run_dir in generalist_runs(config, experiment.out):
        if not (run_dir / "final.json").is_file():
            experiment.say(f"{label} seed {s}: not finished ({run_dir}); skipped")
            continue
        run = generalist_run(experiment, label, method, s, run_dir, losses, None, in_sample)
        check_run_dir(run.run_dir, run.description)
        model = experiment.trained_policy(run_dir, config.seed + s)
        final = experiment.scored(model, losses, run_dir, json.loads((run_dir / "final.json").read_text()))
        _write(experiment, run_dir / "final.json", final)
        records.append(_record(experiment, label, s, run_dir, final))
    return records


def base_record(experiment: Experiment, losses: SpecialistLosses, fresh: bool = False) -> dict:
    """The base model (pi_ref, no training) evaluated like a generalist, into ``OUT/base/final.json``: its
    generation success is where every method starts. Kept unless ``fresh`` or scored against other losses."""
    run_dir = experiment.out / "base"
    path = run_dir / "final.json"
    final = json.loads(path.read_text()) if path.is_file() and not fresh else {}
    if final.get("specialist_losses") != losses.stamp():
        run_dir.mkdir(parents=True, exist_ok=True)
        final = experiment.scored(experiment.base_model, losses, run_dir, {})
        for metrics in final["tasks"].values():  # pi_ref against itself: every margin is 0 up to rounding
            metrics.pop("accuracy", None), metrics.pop("margin", None)
        _write(experiment, path, final)
    return {"method": "base", "seed": 0, "run_dir": experiment.relative(run_dir), **final, "steps": 0, "tokens": 0}


# ------------------------------------------------------------------------------------------ stages

def run_all(config: LLMConfig, stages: tuple[str, ...] = ("specialists", "generalists"), world: World = World(),
            show_progress: bool = True) -> dict | None:
    """Run the named stages (caches are always prepared); return the summary if generalists ran.

    Without "specialists" among the stages, the specialists must have been trained already.
    """
    experiment = prepare(config, world, show_progress)
    losses = specialist_losses(experiment, allow_training="specialists" in stages)
    if "generalists" not in stages:
        return None
    records = [base_record(experiment, losses)] + generalists(experiment, losses)
    records += merged_specialists(experiment, losses)
    return report(experiment.out, experiment.task_names, records, write=world.is_main,
                  specialist_losses=loss_summary(experiment, losses))


def reevaluate(config: LLMConfig, world: World = World(), show_progress: bool = True) -> dict:
    """Evaluate every finished generalist again from its last checkpoint; rewrite the summary and figures."""
    experiment = prepare(config, world, show_progress)
    losses = specialist_losses(experiment, allow_training=False)
    records = reevaluated_generalists(experiment, losses)
    if not records:
        raise ConfigError(f"{experiment.out}: no finished generalist to evaluate: run `amalab llm train` first")
    records = [base_record(experiment, losses, fresh=True)] + records
    records += merged_specialists(experiment, losses, fresh=True)
    return report(experiment.out, experiment.task_names, records, write=world.is_main,
                  specialist_losses=loss_summary(experiment, losses))

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
                                         final.json; amalab.llm.stages.specialists)
      cross_fit/<task>/fold<f>of<K>/     a training run on every fold but f (docs/maths.md section 12)
      base/                              the base model evaluated like a generalist (where every method starts)
      generalists/<method>/seed<s>/      a training run per method and seed (amalab.llm.stages.generalists;
                                         export: amalab.llm.export);
                                         <method>-in-sample: trained against the in-sample s(z)
      merges/<method>/seed<s>/           a merge of the specialists, evaluated (amalab.llm.stages.merges)
      summary.json, summary.csv          final held-out metrics of every run, steps and tokens, paired
                                         differences (amalab.llm.report); summary.md: its tables in markdown
      figures/                           per-task excess and accuracy, mixer weights, worst-task excess,
                                         paired differences

Every stage reuses what is on disk (caches are checked against their manifests; finished runs are not
rerun; interrupted runs resume), so rerunning the command after an interruption continues the work.
"""

from __future__ import annotations

from amalab.errors import ConfigError
from amalab.llm.config import LLMConfig
from amalab.llm.experiment import prepare
from amalab.llm.report import report
from amalab.llm.stages.generalists import base_record, generalists, reevaluated_generalists
from amalab.llm.stages.merges import merged_specialists
from amalab.llm.stages.specialists import loss_summary, specialist_losses
from amalab.training.distributed import World


def run_all(config: LLMConfig, stages: tuple[str, ...] = ("specialists", "generalists"), world: World = World(),
            show_progress: bool = True) -> dict | None:
    """Run the named stages (caches are always prepared); return the summary if generalists ran.

    Without "specialists" among the stages, the specialists must have been trained already.
    """
    experiment = prepare(config, world, show_progress)
    losses = specialist_losses(experiment, allow_training="specialists" in stages)
    if "generalists" not in stages:
        return None
    records = [base_record(experiment, losses)]
    records += generalists(experiment, losses)
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

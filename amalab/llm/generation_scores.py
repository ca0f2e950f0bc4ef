"""The generation scores of an experiment's runs: for every task whose source is a generated, verifiable one,
greedy decoding of its held-out prompts is scored by the task's verifier (:mod:`amalab.llm.generate`); the
success rate goes into the run's per-task metrics as ``success``.

Under torchrun with replicated policies the ranks share the prompts
(:func:`amalab.llm.generate.evaluate_generation`). A policy sharded with FSDP2 (``[model] fsdp``) is not generated
from: its root unshards the embeddings and the head only in its own forward (the sequence log-probs,
:mod:`amalab.training.distributed`), which ``generate`` never calls, and every rank would have to run each
decoding step together. Then one line says so, and the run records ``generation_skipped``
(:data:`amalab.llm.report.SKIPPED_GENERATION`) instead of ``success``, which the summary shows in the success
column (:mod:`amalab.llm.report`).
"""

from __future__ import annotations

import json
from pathlib import Path

from amalab.atomic_write import write_json_atomic
from amalab.llm.experiment import Experiment
from amalab.llm.generate import evaluate_generation
from amalab.llm.data.pairs import PreferencePair
from amalab.llm.data.synthetic.verifier import is_generated_prompt
from amalab.llm.report import SKIPPED_GENERATION
from amalab.training.distributed import decide_on_rank0, is_sharded

SKIPPED_REASON = "[model] fsdp"
_SKIP_LINE = ("generation: skipped under [model] fsdp: generate() cannot run the FSDP2-sharded policy (its root "
              "gathers the embeddings and head only for the log-probs); the summary's success column says "
              "'skipped'; set fsdp = false to score generations (replicated ranks share the prompts)")
_told: set[str] = set()  # the experiments (out folders) this process has printed _SKIP_LINE for


def generated_pairs(experiment: Experiment) -> dict[str, list[PreferencePair]]:
    """Per generated (verifiable) task, the held-out pairs generation scores: the first ``max_prompts``."""
    settings, chosen = experiment.config.generation, {}
    for task in experiment.tasks:
        pairs = [p for p in task.eval if is_generated_prompt(p.prompt)]
        if pairs:
            chosen[task.name] = pairs[:settings.max_prompts] if settings.max_prompts else pairs
    return chosen


def generation_scores(experiment: Experiment, model) -> dict[str, float]:
    """Verifier success rate per generated task on its held-out prompts ({} when none or when disabled).

    Every rank must call it (the ranks share the prompts); ``model`` must not be sharded (:func:`add_generation`).
    """
    settings, scores = experiment.config.generation, {}
    if not settings.enabled:
        return {}
    for name, pairs in generated_pairs(experiment).items():
        report = evaluate_generation(model, experiment.tokenizer, pairs, max_new_tokens=settings.max_new_tokens,
                                     batch_size=settings.batch_size,
                                     max_prompt_length=experiment.config.tokenize.max_prompt_length,
                                     device=experiment.device, autocast=experiment.autocast,
                                     world=experiment.world)
        scores[name] = report.success_rate[name]
    return scores


def _skipped(experiment: Experiment, final: dict) -> dict:
    """``final`` marked: the generated tasks were not scored under ``[model] fsdp`` (one line, once, says why)."""
    tasks = list(generated_pairs(experiment)) if experiment.config.generation.enabled else []
    if not tasks:
        return final
    if experiment.world.is_main and str(experiment.out) not in _told:
        _told.add(str(experiment.out))
        print(_SKIP_LINE, flush=True)  # even with --quiet: a column of the result is missing
    return {**final, SKIPPED_GENERATION: {"reason": SKIPPED_REASON, "tasks": tasks}}


def add_generation(experiment: Experiment, model, run_dir: Path, final: dict) -> dict:
    """``final`` with each generated task's ``success``; computed once per run and kept in generation.json.
    A sharded policy is not generated from: ``final`` is marked instead (module docstring)."""
    path = run_dir / "generation.json"
    # drop the mark of an earlier, sharded evaluation
    final = {k: v for k, v in final.items() if k != SKIPPED_GENERATION}
    # rank 0's file decides for every rank: the ranks generate together (collectives) or not at all
    scores = decide_on_rank0(experiment.world, lambda: json.loads(path.read_text()) if path.is_file() else None)
    if scores is None and is_sharded(model):
        return _skipped(experiment, final)
    if scores is None:
        scores = generation_scores(experiment, model)
        if scores and experiment.world.is_main:
            write_json_atomic(path, scores, indent=1)
    for task, rate in scores.items():
        final.setdefault("tasks", {}).setdefault(task, {})["success"] = rate
    return final

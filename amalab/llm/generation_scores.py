"""The generation scores of an experiment's runs: for every task whose source is a generated, verifiable one,
greedy decoding of its held-out prompts is scored by the task's verifier (:mod:`amalab.llm.generate`); the
success rate goes into the run's per-task metrics as ``success``.
"""

from __future__ import annotations

import json
from pathlib import Path

from amalab.atomic_write import write_json_atomic
from amalab.llm.experiment import Experiment
from amalab.llm.generate import evaluate_generation
from amalab.llm.data.synthetic.verifier import is_generated_prompt


def generation_scores(experiment: Experiment, model) -> dict[str, float]:
    """Verifier success rate per generated task on its held-out prompts ({} when none or when disabled)."""
    settings = experiment.config.generation
    if not settings.enabled or experiment.config.model.fsdp and experiment.world.distributed:
        return {}
    scores = {}
    for task in experiment.tasks:
        pairs = [p for p in task.eval if is_generated_prompt(p.prompt)]
        if not pairs:
            continue
        if settings.max_prompts:
            pairs = pairs[:settings.max_prompts]
        report = evaluate_generation(model, experiment.tokenizer, pairs, max_new_tokens=settings.max_new_tokens,
                                     batch_size=settings.batch_size,
                                     max_prompt_length=experiment.config.tokenize.max_prompt_length,
                                     device=experiment.device, autocast=experiment.autocast)
        scores[task.name] = report.success_rate[task.name]
    return scores


def add_generation(experiment: Experiment, model, run_dir: Path, final: dict) -> dict:
    """``final`` with each generated task's ``success``; computed once per run and kept in generation.json."""
    path = run_dir / "generation.json"
    if path.is_file():
        scores = json.loads(path.read_text())
    else:
        scores = generation_scores(experiment, model)
        if scores and experiment.world.is_main:
            write_json_atomic(path, scores, indent=1)
    for task, rate in scores.items():
        final.setdefault("tasks", {}).setdefault(task, {})["success"] = rate
    return final

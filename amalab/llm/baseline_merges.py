"""The merged-specialist baselines and the generation scores of an experiment (docs/maths.md section 7).

Merges: the specialists' dense weights (full fine-tuning: their parameters; LoRA: base + B A * scaling of
each adapter, :func:`amalab.training.merge.lora_dense_state_dict`) are merged with the base by each method of
``[merges]`` and evaluated on the held-out pairs exactly like a generalist, into
``OUT/merges/<method>/seed<s>/final.json``; DARE methods get one run per seed (their random masks).

Generation: for every task whose source is a generated, verifiable one, greedy decoding of its held-out
prompts is scored by the task's verifier (:mod:`amalab.llm.generate`); the success rate goes into the run's
per-task metrics as ``success``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from amalab.atomic_write import write_json_atomic
from amalab.errors import ConfigError
from amalab.training.merge import RANDOM_METHODS, lora_dense_state_dict, merge_state_dicts


def _dense_state(model) -> dict[str, torch.Tensor]:
    """The plain model's float32 state dict, with a LoRA adapter folded in."""
    if getattr(model, "peft_config", None):
        return lora_dense_state_dict(model)
    return {n: t.detach().float().cpu() for n, t in model.state_dict().items()}


def _specialist_states(experiment) -> list[dict[str, torch.Tensor]]:
    states = []
    for name in experiment.task_names:
        run_dir = experiment.out / "specialists" / name
        model = experiment.trained_policy(run_dir, experiment.config.seed)  # unsharded: [merges] refuses fsdp
        if model is None:
            raise ConfigError(f"[merges] needs the trained specialist of task {name!r} in {run_dir}; a loaded "
                              "specialist ([specialists] load) cannot be merged yet")
        states.append(_dense_state(model))
        del model
    return states


def _specialists_compute(experiment) -> dict:
    """What a merge cost to train: the optimizer steps and training tokens of the specialists it merges."""
    from amalab.training.run import training_tokens

    runs = [experiment.out / "specialists" / name for name in experiment.task_names]
    steps = sum(json.loads((run / "final.json").read_text()).get("steps", 0) for run in runs)
    return {"steps": steps, "tokens": sum(training_tokens(run) for run in runs)}


def generation_scores(experiment, model) -> dict[str, float]:
    """Verifier success rate per generated task on its held-out prompts ({} when none or when disabled)."""
    from amalab.llm.generate import evaluate_generation
    from amalab.llm.generated import is_generated_prompt

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


def add_generation(experiment, model, run_dir: Path, final: dict) -> dict:
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


def merged_specialists(experiment, losses, fresh: bool = False) -> list[dict]:
    """Evaluate every merge of ``[merges]`` against ``losses`` (a :class:`~amalab.llm.specialists.SpecialistLosses`);
    one record per method and seed, named ``merge-<method>``. A merge evaluated earlier is kept unless ``fresh``
    or its specialists, its options or the specialist losses it was scored against differ."""

    config = experiment.config
    if not config.merges.names:
        return []
    base, specialist_states, records = _dense_state(experiment.base_model), None, []
    for method in config.merges.names:
        options = dict(config.merges.options.get(method, {}))
        for s in range(config.merges.seeds if method in RANDOM_METHODS else 1):
            run_dir = experiment.out / "merges" / method / f"seed{s}"
            final_path = run_dir / "final.json"
            made_of = {"options": options, "specialists": losses.stamp(in_sample=True)["fingerprint"]}
            final = json.loads(final_path.read_text()) if final_path.is_file() and not fresh else {}
            if final.get("merged") != made_of or final.get("specialist_losses") != losses.stamp():
                if specialist_states is None:
                    specialist_states = _specialist_states(experiment)
                merged = merge_state_dicts(base, specialist_states, method, seed=config.seed + s, **options)
                model = copy.deepcopy(experiment.base_model)
                model.load_state_dict(merged)
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "generation.json").unlink(missing_ok=True)  # another model: its generations differ
                final = {**experiment.scored(model, losses, run_dir, {}), "options": options, "merged": made_of}
                if experiment.world.is_main:
                    write_json_atomic(final_path, final, indent=1)
                del model
            records.append({"method": f"merge-{method}", "seed": s, "run_dir": experiment.relative(run_dir),
                            **final, **_specialists_compute(experiment)})
            experiment.say(f"merge {method} seed {s}: worst-task excess {final.get('worst_excess', float('nan')):.4f}")
    return records

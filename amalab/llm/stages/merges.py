"""The merged-specialist baselines of an experiment (docs/maths.md section 7).

The specialists' dense weights (full fine-tuning: their parameters; LoRA: base + B A * scaling of each
adapter, :func:`amalab.llm.lora_merge.lora_dense_state_dict`) are merged with the base by each method of
``[merges]`` and evaluated on the held-out pairs exactly like a generalist, into
``OUT/merges/<method>/seed<s>/final.json``; DARE methods get one run per seed (their random masks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amalab.atomic_write import write_json_atomic
from amalab.errors import ConfigError
from amalab.llm.experiment import Experiment
from amalab.llm.stages.policies import trained_policy
from amalab.llm.stages.scoring import SpecialistLosses, scored
from amalab.llm.lora_merge import lora_dense_state_dict
from amalab.training.merge import RANDOM_METHODS, merge_state_dicts
from amalab.training.distributed import decide_on_rank0
from amalab.training.run import training_tokens
from amalab.training.tensor_identity import tied_aliases


def dense_state(model, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The plain model's float32 state dict on ``device`` (where the merges compute), with a LoRA adapter
    folded in; a tied weight stays one tensor."""
    if getattr(model, "peft_config", None):
        return lora_dense_state_dict(model, device=device)
    state = model.state_dict()
    alias = tied_aliases(state)
    moved = {n: t.detach().float().to(device) for n, t in state.items() if n not in alias}
    return {n: moved[alias.get(n, n)] for n in state}


def specialist_states(experiment: Experiment) -> list[dict[str, torch.Tensor]]:
    """The dense weights of every task's trained specialist (``OUT/specialists/<task>/``), in task order."""
    states = []
    for name in experiment.task_names:
        run_dir = experiment.out / "specialists" / name
        model = trained_policy(experiment, run_dir, experiment.config.seed)  # unsharded: [merges] refuses fsdp
        if model is None:
            raise ConfigError(f"[merges] needs the trained specialist of task {name!r} in {run_dir}; a loaded "
                              "specialist ([specialists] load) cannot be merged yet")
        states.append(dense_state(model))
        del model
    return states


def specialists_compute(experiment: Experiment) -> dict:
    """What a merge cost to train: the optimizer steps and training tokens of the specialists it merges, as
    rank 0's files say (a rank without them would fail alone: docs/distributed.md)."""
    runs = [experiment.out / "specialists" / name for name in experiment.task_names]
    return decide_on_rank0(experiment.world, lambda: _compute(runs))


def _compute(runs: list[Path]) -> dict:
    steps = sum(json.loads((run / "final.json").read_text()).get("steps", 0) for run in runs)
    return {"steps": steps, "tokens": sum(training_tokens(run) for run in runs)}


def _evaluated_merge(experiment: Experiment, losses: SpecialistLosses, merged: dict[str, torch.Tensor],
                     run_dir: Path, options: dict, made_of: dict) -> dict:
    """The base model holding the ``merged`` weights, scored like a generalist; final.json written."""
    model = experiment.on_device()
    model.load_state_dict(merged)  # copies the CPU tensors onto the model's device
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "generation.json").unlink(missing_ok=True)  # another model: its generations differ
    final = {**scored(experiment, model, losses, run_dir, {}), "options": options, "merged": made_of}
    # rank 0 writes; its failure stops every rank rather than one
    decide_on_rank0(experiment.world, lambda: write_json_atomic(run_dir / "final.json", final, indent=1))
    return final


def _kept(final_path: Path, fresh: bool) -> dict:
    """The merge's final.json as evaluated earlier ({} when there is none, or when ``fresh``)."""
    return json.loads(final_path.read_text()) if final_path.is_file() and not fresh else {}


def merged_specialists(experiment: Experiment, losses: SpecialistLosses, fresh: bool = False) -> list[dict]:
    """Evaluate every merge of ``[merges]`` against ``losses``; one record per method and seed, named
    ``merge-<method>``. A merge evaluated earlier is kept unless ``fresh`` or its specialists, its options or
    the specialist losses it was scored against differ."""
    config = experiment.config
    if not config.merges.names:
        return []
    base, states, records = dense_state(experiment.base_model), None, []
    for method in config.merges.names:
        options = dict(config.merges.options.get(method, {}))
        for s in range(config.merges.seeds if method in RANDOM_METHODS else 1):
            run_dir = experiment.out / "merges" / method / f"seed{s}"
            final_path = run_dir / "final.json"
            made_of = {"options": options, "specialists": losses.stamp(in_sample=True)["fingerprint"]}
            # rank 0's final.json decides for every rank whether to merge again (docs/distributed.md)
            final = decide_on_rank0(experiment.world, lambda: _kept(final_path, fresh))
            if final.get("merged") != made_of or final.get("specialist_losses") != losses.stamp():
                states = specialist_states(experiment) if states is None else states
                merged = merge_state_dicts(base, states, method, seed=config.seed + s, **options)
                final = _evaluated_merge(experiment, losses, merged, run_dir, options, made_of)
            records.append({"method": f"merge-{method}", "seed": s,
                            "run_dir": run_dir.relative_to(experiment.out).as_posix(),
                            **final, **specialists_compute(experiment)})
            experiment.progress.say(f"merge {method} seed {s}: worst-task excess "
                                    f"{final.get('worst_excess', float('nan')):.4f}")
    return records

"""The merges stage (amalab.llm.stages.merges): two LoRA specialists merged and scored like a generalist,
checked against task arithmetic and a weight average computed by hand on their dense weights (W0 + B A
alpha / r, read off the adapters, docs/maths.md section 7), evaluated directly: full logits, one pair at a time,
the DPO loss written out. (The state-dict merge maths itself: tests/training/test_merge.py.)"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from amalab.llm.config import load_llm_config
from amalab.llm.experiment import prepare
from amalab.llm.stages.merges import merged_specialists
from amalab.llm.stages.policies import trained_policy
from amalab.llm.stages.specialists import specialist_losses

R, ALPHA = 2, 4.0
LORA = f'[model]\nuse_lora = true\nlora = {{ r = {R}, alpha = {ALPHA}, dropout = 0.0, target_modules = ["q_proj", "v_proj"] }}\n'
MERGES = '\n[merges]\nnames = ["task_arithmetic", "linear"]\noptions = { task_arithmetic = { scale = 0.5 } }\n'
IN_SAMPLE = "[specialists]\ncross_fit = 1\n\n[specialists.optim]"


def dense_adapted_weights(policy) -> dict[str, torch.Tensor]:
    """Per adapted linear layer of a peft policy, by the base model's parameter name: W0 + B A alpha / r."""
    dense = {}
    for name, module in policy.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            key = name.removeprefix("base_model.model.") + ".weight"
            dense[key] = (module.base_layer.weight + b @ a * (ALPHA / R)).detach().float()
    return dense


def test_merges_of_lora_specialists_are_task_arithmetic_on_their_dense_weights(tmp_path, experiment,
                                                                               dpo_losses_by_hand):
    config = experiment(tmp_path, names='["standard"]', extra=MERGES, **{"[model]\n": LORA, "[specialists.optim]": IN_SAMPLE})
    exp = prepare(load_llm_config(config), show_progress=False)
    losses = specialist_losses(exp)
    records = merged_specialists(exp, losses)
    assert [(r["method"], r["seed"], r["run_dir"]) for r in records] == \
        [("merge-task_arithmetic", 0, "merges/task_arithmetic/seed0"), ("merge-linear", 0, "merges/linear/seed0")]
    assert all(r["steps"] == 2 * 3 for r in records)  # the two specialists' [specialists.optim] max_steps

    base = {name: tensor.detach().float() for name, tensor in exp.base_model.state_dict().items()}
    specialists = [dense_adapted_weights(trained_policy(exp, exp.out / "specialists" / name, exp.config.seed))
                   for name in exp.task_names]
    adapted = sorted(specialists[0])
    assert len(adapted) == 2 * exp.base_model.config.num_hidden_layers  # q_proj and v_proj of each layer
    assert all(not torch.equal(s[key], base[key]) for s in specialists for key in adapted)  # trained adapters
    by_hand = {"task_arithmetic": {key: base[key] + 0.5 * sum(s[key] - base[key] for s in specialists)
                                   for key in adapted},
               "linear": {key: sum(s[key] for s in specialists) / len(specialists) for key in adapted}}
    for record in records:
        merged = copy.deepcopy(exp.base_model)
        merged.load_state_dict({**base, **by_hand[record["method"].removeprefix("merge-")]})
        excess = {}
        for i, name in enumerate(exp.task_names):
            ids = [p.id for p in exp.eval_sets[i]]
            expected = dpo_losses_by_hand(merged, exp.base_model, exp.eval_sets[i], exp.pad_token_id, beta=0.1)
            assert abs(expected.mean() - math.log(2)) > 1e-4  # not vacuous: the merge is not pi_ref
            task = record["tasks"][name]
            assert task["loss"] == pytest.approx(expected.mean(), rel=1e-5)
            excess[name] = np.maximum(expected - losses.evaluation[i].get("loss", ids), 0.0).mean()
            assert task["excess"] == pytest.approx(excess[name], rel=1e-5, abs=1e-7)
        assert record["worst_excess"] == pytest.approx(max(excess.values()), rel=1e-5, abs=1e-7)
        on_disk = json.loads((exp.out / record["run_dir"] / "final.json").read_text())
        assert on_disk["tasks"] == record["tasks"] and on_disk["options"] == record["options"]

    stamps = [(exp.out / r["run_dir"] / "final.json").stat().st_mtime_ns for r in records]
    assert merged_specialists(exp, losses) == records  # evaluated once: kept on a rerun
    assert [(exp.out / r["run_dir"] / "final.json").stat().st_mtime_ns for r in records] == stamps

"""Where an experiment keeps its models: the base model (pi_ref) on the CPU, since its log-probs are cached;
the reference scoring and every policy on the compute device.

A CPU build has no second real device, so the compute device here is ``meta`` (shapes without data): a
model left on the CPU where the device was asked for, or the base moved to the device, shows up in the
parameters' device types.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

import amalab.llm.experiment as experiment_module
from amalab.llm.config import load_llm_config
from amalab.llm.experiment import prepare
from amalab.llm.stages.policies import new_policy
from amalab.training.cache import ValueCache

META = torch.device("meta")


def devices(model) -> set[str]:
    return {p.device.type for p in model.parameters()}


def test_the_base_model_stays_on_the_cpu_and_only_copies_reach_the_device(tmp_path, experiment, monkeypatch):
    scored_on = []

    def reference_on_meta(model, pairs, *args, **kwargs):  # the reference pass, recorded instead of run
        scored_on.append(devices(model))
        zeros = np.zeros(len(pairs))
        return ValueCache([p.id for p in pairs], {name: zeros for name in
                                                  ("chosen", "rejected", "chosen_tokens", "rejected_tokens")})

    monkeypatch.setattr(experiment_module, "_device", lambda config, world: META)
    monkeypatch.setattr(experiment_module, "pair_logps", reference_on_meta)
    exp = prepare(load_llm_config(experiment(tmp_path, names='["standard"]')), show_progress=False)
    assert scored_on == [{"meta"}]  # pi_ref's log-probs were computed on the compute device
    assert devices(exp.base_model) == {"cpu"}  # and pi_ref itself did not stay there
    assert devices(new_policy(exp, seed=0)) == {"meta"}
    assert devices(exp.on_device()) == {"meta"}
    assert devices(exp.base_model) == {"cpu"}
    # under LoRA too: the adapter is added on the CPU copy, and one model (base + adapter) is moved
    lora = dataclasses.replace(exp, config=dataclasses.replace(
        exp.config, model=dataclasses.replace(exp.config.model, use_lora=True)))
    assert devices(new_policy(lora, seed=0)) == {"meta"} and devices(exp.base_model) == {"cpu"}

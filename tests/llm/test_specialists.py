"""The specialists stage (amalab.llm.stages.specialists): one specialist per task, trained on its task alone,
and its cached losses s(z), checked against the trained specialist evaluated directly: full logits (not the
head-at-completions path the caches use), one pair at a time, and the DPO loss written out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from amalab.llm.config import load_llm_config
from amalab.llm.experiment import prepare
from amalab.llm.stages.policies import trained_policy
from amalab.llm.stages.specialists import loss_summary, specialist_losses

IN_SAMPLE = {"[specialists.optim]": "[specialists]\ncross_fit = 1\n\n[specialists.optim]"}


def test_a_specialists_cached_losses_are_its_own_per_example_losses(tmp_path, experiment,
                                                                   dpo_losses_by_hand):
    exp = prepare(load_llm_config(experiment(tmp_path, names='["standard"]', **IN_SAMPLE)), show_progress=False)
    losses = specialist_losses(exp)
    assert losses.definition == "in-sample" and losses.evaluation is losses.in_sample
    summary = loss_summary(exp, losses)
    for i, name in enumerate(exp.task_names):
        run_dir = exp.out / "specialists" / name
        run = json.loads((run_dir / "run.json").read_text())
        assert run["mixer"] == {"name": "uniform", "task": name}
        assert json.loads((run_dir / "final.json").read_text())["steps"] == 3  # [specialists.optim] max_steps
        specialist = trained_policy(exp, run_dir, exp.config.seed)
        train, held_out = exp.train_sets[i], exp.eval_sets[i]
        expected = dpo_losses_by_hand(specialist, exp.base_model, train + held_out, exp.pad_token_id, beta=0.1)
        cache = losses.in_sample[i]
        assert sorted(cache.ids) == sorted(p.id for p in train + held_out)  # its own task's pairs, no other
        np.testing.assert_allclose(cache.get("loss", [p.id for p in train + held_out]), expected,
                                   rtol=1e-5, atol=1e-6)
        assert np.abs(expected - math.log(2)).max() > 1e-3  # not vacuous: training moved it away from pi_ref
        means = summary["means"][name]
        assert means["in_sample_train"] == means["train"] == pytest.approx(expected[:len(train)].mean(), rel=1e-5)
        assert means["held_out"] == pytest.approx(expected[len(train):].mean(), rel=1e-5)

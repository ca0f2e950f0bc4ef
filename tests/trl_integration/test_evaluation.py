"""Held-out metrics per task with a dict eval_dataset: each task's loss, clipped excess, margin and accuracy,
and the worst task's excess, against the same numbers computed by amalab's own log-probs and losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import sequence_logps
from amalab.llm.tokenize import TokenizedPair
from amalab.objectives.preference import PreferenceLoss
from amalab.trl import AMAConfig, AMATrainer


def task_rows(task: str, n: int, offset: int) -> list[dict]:
    return [{"task": task, "prompt": f"Human: {task} number {i}? Assistant:", "chosen": f" It is {i + offset}.",
             "rejected": " Never.", "baseline_loss": 0.5 + 0.05 * (i % 3)} for i in range(n)]


def test_per_task_held_out_metrics_and_the_worst_excess(make_model, tokenizer, tmp_path):
    train = task_rows("sums", 6, 0) + task_rows("facts", 6, 3)
    held_out = {"sums": Dataset.from_list(task_rows("sums", 5, 7)), "facts": Dataset.from_list(task_rows("facts", 4, 9))}
    args = AMAConfig(output_dir=str(tmp_path), beta=0.3, mixer="ama-s", per_device_train_batch_size=2,
                     per_device_eval_batch_size=3, max_steps=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                     bf16=False, save_strategy="no", eval_strategy="steps", eval_steps=2, logging_steps=1)
    trainer = AMATrainer(model=make_model(seed=0), ref_model=make_model(seed=0), args=args,
                         train_dataset=Dataset.from_list(train), eval_dataset=held_out, processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_worst_excess" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert not any(key.startswith("tasks/") for entry in logged for key in entry)  # train metrics stay apart
    metrics = trainer.evaluate()
    by_hand, excesses = {}, []
    pad = tokenizer.pad_token_id
    loss = PreferenceLoss("sigmoid", 0.3)
    for name, dataset in trainer.eval_dataset.items():
        pairs = [TokenizedPair(str(r), name, tuple(dataset[r]["prompt_ids"]), tuple(dataset[r]["chosen_ids"]),
                               tuple(dataset[r]["rejected_ids"])) for r in range(len(dataset))]
        batch = collate_pairs(pairs, pad)
        with torch.no_grad():
            pi, ref = sequence_logps(trainer.model, batch), sequence_logps(trainer.ref_model, batch)
        values, _ = loss(pi.chosen, pi.rejected, ref.chosen, ref.rejected, chosen_token_counts=batch.chosen_token_counts,
                         rejected_token_counts=batch.rejected_token_counts)
        values = values.double().numpy()
        margins = (pi.chosen - ref.chosen - pi.rejected + ref.rejected).double().numpy()
        excess = np.maximum(values - np.array(dataset["baseline_loss"]), 0).mean()
        by_hand.update({f"eval_{name}_loss": values.mean(), f"eval_{name}_excess": excess,
                        f"eval_{name}_margin": margins.mean(), f"eval_{name}_accuracy": (margins > 0).mean()})
        excesses.append(excess)
    by_hand["eval_worst_excess"] = max(excesses)
    assert set(metrics) == set(by_hand)
    for key, value in by_hand.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_model_card_records_the_mixer(make_model, tokenizer, tmp_path):
    args = AMAConfig(output_dir=str(tmp_path), mixer="ama-r-sim", eta_alpha=0.5, per_device_train_batch_size=2,
                     max_steps=2, report_to=[], use_cpu=True, bf16=False, save_strategy="no")
    trainer = AMATrainer(model=make_model(seed=0), ref_model=make_model(seed=0), args=args,
                         train_dataset=Dataset.from_list(task_rows("sums", 4, 0) + task_rows("facts", 4, 1)),
                         processing_class=tokenizer)
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "mixer `ama-r-sim` (options {'eta_alpha': 0.5})" in card and "on tasks facts, sums" in card
    weights = ", ".join(f"{name} {w:.4f}" for name, w in zip(["facts", "sums"], trainer.mixer.weights))
    assert f"- weights: {weights}" in card and "mixer-ama-r-sim" in card

"""AMATrainer against amalab's own training step: the same tiny model, pairs, seeds, AdamW settings and a
constant learning rate give the same per-example losses, mixer weights and parameters, step by step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import sequence_logps
from amalab.llm.tokenize import TokenizedPair
from amalab.mixers import make_mixer
from amalab.objectives.preference import PreferenceLoss
from amalab.training.cache import ValueCache
from amalab.training.config import OptimConfig
from amalab.training.state import TrainState
from amalab.training.step import ExampleLosses, train_step
from amalab.trl import AMAConfig, AMATrainer

STEPS, BETA, LR = 10, 0.3, 1e-2
#: AdamW's eps on both sides. At torch's 1e-8 an entry whose gradient is ~1e-9 (float noise in a forward pass)
#: moves by a sizeable fraction of the learning rate in Adam's first steps, so the two forwards' float32
#: rounding (TRL's fused head against amalab's head) shows as 1e-4 in a few of 2048 entries; 1e-6 damps it
ADAM_EPS = 1e-6


def multi_task_rows() -> list[dict]:
    """Three tasks of unequal size, pairs of unequal lengths, s(z) stand-ins: the pairs of the two-process
    child script (two_process_child.py, a script the child processes run, so the one definition lives there)."""
    spec = importlib.util.spec_from_file_location("two_process_child", Path(__file__).with_name("two_process_child.py"))
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    return child.multi_task_rows()


def trl_args(tmp_path, mixer: str, **overrides) -> AMAConfig:
    settings = dict(output_dir=str(tmp_path / "trl"), beta=BETA, mixer=mixer, per_device_train_batch_size=3,
                    gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", report_to=[], use_cpu=True,
                    bf16=False, logging_steps=1, save_strategy="no", seed=0, warmup_steps=0,
                    dataloader_num_workers=0, adam_epsilon=ADAM_EPS)
    return AMAConfig(**{**settings, **overrides})


class Recorder:
    """Per-example losses and mixer weights of every step, from inside a run."""

    def __init__(self):
        self.losses, self.weights = [], []


def run_trl(make_model, tokenizer, tmp_path, mixer: str, **overrides):
    policy, reference = make_model(seed=0), make_model(seed=0)
    trainer = AMATrainer(model=policy, ref_model=reference, args=trl_args(tmp_path, mixer, **overrides),
                         train_dataset=Dataset.from_list(multi_task_rows()), processing_class=tokenizer)
    record, loss = Recorder(), trainer.preference_loss

    def recorded(*args, **kwargs):
        out = loss(*args, **kwargs)
        record.losses.append(out[0].detach().double().numpy().copy())
        return out

    trainer.preference_loss = recorded
    end_step = trainer._end_step

    def end_and_record():
        end_step()
        record.weights.append(np.asarray(trainer.mixer.weights).copy())

    trainer._end_step = end_and_record
    trainer.train()
    return trainer, record


def run_amalab(trainer: AMATrainer, make_model, mixer: str, options: dict, micro_batch_size: int = 3,
               sgd_lr: float | None = None, max_grad_norm: float = 1.0):
    """amalab's train_step on the pairs TRL tokenized, grouped by the trainer's task order."""
    dataset, index = trainer.train_dataset, trainer.tasks
    pairs = [[TokenizedPair(f"r{r}", index.names[i], tuple(dataset[r]["prompt_ids"]),
                            tuple(dataset[r]["chosen_ids"]), tuple(dataset[r]["rejected_ids"])) for r in rows]
             for i, rows in enumerate(index.rows)]
    everything = [p for task in pairs for p in task]
    reference = make_model(seed=0)
    pad = trainer.processing_class.pad_token_id
    with torch.no_grad():
        ref = sequence_logps(reference, collate_pairs(everything, pad))
    ref_cache = ValueCache([p.id for p in everything], {"chosen": ref.chosen.numpy(), "rejected": ref.rejected.numpy()})
    baselines = [ValueCache([f"r{r}" for r in rows], {"loss": np.array([index.baseline[r] for r in rows])})
                 for rows in index.rows]
    preference = PreferenceLoss("sigmoid", BETA)
    record = Recorder()

    def losses(logps, batch):
        ids = list(batch.ids)
        out = preference(logps.chosen, logps.rejected, torch.from_numpy(ref_cache.get("chosen", ids)),
                         torch.from_numpy(ref_cache.get("rejected", ids)),
                         chosen_token_counts=batch.chosen_token_counts, rejected_token_counts=batch.rejected_token_counts)
        record.losses.append(out[0].detach().double().numpy().copy())
        return out[0]

    example_losses = ExampleLosses(collate=lambda p: collate_pairs(p, pad), sequence_logps=sequence_logps,
                                   losses=losses)
    optim = OptimConfig(max_steps=STEPS, batch_size=6, micro_batch_size=micro_batch_size,
                        learning_rate=sgd_lr or LR, warmup_steps=0,
                        min_lr_rate=1.0, weight_decay=0.0, max_grad_norm=max_grad_norm)
    amalab_mixer = make_mixer(mixer, index.k, sizes=index.sizes, **options)
    state = TrainState.fresh(make_model(seed=0), optim, amalab_mixer, index.sizes, 0, index.names)
    state.optimizer.param_groups[0]["eps"] = ADAM_EPS
    if sgd_lr is not None:  # TRL's optim="sgd": plain SGD at a constant rate
        state.optimizer = torch.optim.SGD(state.parameters, lr=sgd_lr)
        state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lambda step: 1.0)
    for _ in range(STEPS):
        result = train_step(state, pairs, example_losses, baselines if amalab_mixer.baseline != "none" else None,
                            optim)
        assert result.diverged is None
        record.weights.append(np.asarray(amalab_mixer.weights).copy())
    return state.policy, record


@pytest.mark.parametrize("mixer, options", [("ama-r-sim", {"eta_alpha": 1.0}), ("ama-s", {"gamma": 0.3}),
                                            ("standard", {})])
def test_amatrainer_equals_amalabs_step(make_model, tokenizer, tmp_path, mixer, options):
    trainer, trl_record = run_trl(make_model, tokenizer, tmp_path, mixer)
    policy, amalab_record = run_amalab(trainer, make_model, mixer, options)
    assert_same_run(trainer, trl_record, policy, amalab_record)


def assert_same_run(trainer, trl_record, policy, amalab_record, micro_batches: int = 2):
    assert len(trl_record.losses) == len(amalab_record.losses) == micro_batches * STEPS
    for ours, theirs in zip(amalab_record.losses, trl_record.losses):
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(trl_record.weights), np.array(amalab_record.weights), rtol=1e-5, atol=1e-6)
    trained = dict(trainer.model.named_parameters())
    for name, parameter in policy.named_parameters():
        torch.testing.assert_close(trained[name].detach(), parameter.detach(), rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.equal(trained["model.embed_tokens.weight"], trainer.ref_model.model.embed_tokens.weight)


def test_sequential_ama_r_updates_before_its_one_backward_pass(make_model, tokenizer, tmp_path):
    trainer, trl_record = run_trl(make_model, tokenizer, tmp_path, "ama-r", per_device_train_batch_size=6,
                                  gradient_accumulation_steps=1)
    policy, amalab_record = run_amalab(trainer, make_model, "ama-r", {"eta_alpha": 1.0}, micro_batch_size=0)
    assert_same_run(trainer, trl_record, policy, amalab_record, micro_batches=1)


def test_the_step_has_the_scale_of_amalabs_step_under_sgd(make_model, tokenizer, tmp_path):
    """SGD moves by the gradient itself (Adam would hide a wrong scale): the accumulated micro-batches give
    the coefficient-weighted sum over the global batch, as amalab's step."""
    # no clipping, a small rate: clipping would normalize a wrong scale away, and a large rate drives every
    # clipped excess to 0 within a step (a zero gradient shows no scale)
    trainer, trl_record = run_trl(make_model, tokenizer, tmp_path, "ama-r-sim", optim="sgd", learning_rate=0.01,
                                  max_grad_norm=0.0)
    policy, amalab_record = run_amalab(trainer, make_model, "ama-r-sim", {"eta_alpha": 1.0}, sgd_lr=0.01,
                                       max_grad_norm=0.0)
    assert_same_run(trainer, trl_record, policy, amalab_record)


def test_the_logged_loss_is_the_mean_loss_of_the_step_and_tasks_are_logged(make_model, tokenizer, tmp_path):
    trainer, record = run_trl(make_model, tokenizer, tmp_path, "ama-s")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    assert len(logged) == STEPS
    for step, entry in enumerate(logged):
        mean = np.concatenate(record.losses[2 * step:2 * step + 2]).mean()
        assert entry["loss"] == pytest.approx(mean, rel=1e-5)
        assert sum(entry[f"weights/{name}"] for name in trainer.tasks.names) == pytest.approx(1.0)
    # a task's metrics appear in the steps that drew it (AMA-S draws tasks at random)
    for name in trainer.tasks.names:
        keys = {f"tasks/{name}/{metric}" for metric in ("loss", "excess", "margin", "accuracy")}
        assert any(keys <= set(entry) for entry in logged), name

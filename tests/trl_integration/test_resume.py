"""Resume: the mixer, the task samplers and the draw generator travel in TRL's checkpoint folders, so a run
stopped at a checkpoint and resumed ends where the uninterrupted run ends; a checkpoint folder whose save was
interrupted (no mixer state, written last) is passed over."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from amalab.trl import AMAConfig, AMATrainer
from amalab.trl.checkpoint import MIXER_STATE

STEPS, SAVE = 8, 3


def rows() -> list[dict]:
    data = [{"task": ["sums", "greetings", "facts"][i % 3], "prompt": f"Human: tell me {i}. Assistant:",
             "chosen": f" Sure: {i} is {'even' if i % 2 == 0 else 'odd'}.", "rejected": " No.",
             "baseline_loss": 0.6 + 0.01 * (i % 5)} for i in range(15)]
    return data


class StopAt(TrainerCallback):
    """Stops training after ``step`` optimizer steps, as an interruption right after a checkpoint would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer_for(make_model, tokenizer, output_dir, mixer="ama-s", callbacks=(), **settings):
    args = AMAConfig(output_dir=str(output_dir), beta=0.3, mixer=mixer, per_device_train_batch_size=3,
                     gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant",
                     optim="adamw_torch", report_to=[], use_cpu=True, bf16=False, logging_steps=1,
                     save_strategy="steps", save_steps=SAVE, seed=0, **{"dataloader_num_workers": 0, **settings})
    return AMATrainer(model=make_model(seed=0), ref_model=make_model(seed=0), args=args,
                      train_dataset=Dataset.from_list(rows()), processing_class=tokenizer, callbacks=list(callbacks))


def final_state(trainer):
    return ({name: p.detach().clone() for name, p in trainer.model.named_parameters()},
            {key: np.asarray(value).copy() for key, value in trainer.mixer.state_dict().items()},
            trainer.sampler.state_dict())


def assert_same(a, b):
    params_a, mixer_a, sampler_a = a
    params_b, mixer_b, sampler_b = b
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-6, atol=1e-7, msg=name)
    assert mixer_a.keys() == mixer_b.keys()
    for key in mixer_a:
        np.testing.assert_allclose(mixer_a[key], mixer_b[key], rtol=1e-9, atol=1e-12, err_msg=key)
    assert sampler_a == sampler_b


@pytest.mark.parametrize("mixer, workers", [("ama-s", 0), ("ama-r-sim", 0), ("ama-s", 1)])
def test_a_resumed_run_equals_the_uninterrupted_one(make_model, tokenizer, tmp_path, mixer, workers):
    """Also with a loader worker: the Trainer's loader only counts steps, the draws come from the mixer."""
    straight = trainer_for(make_model, tokenizer, tmp_path / "straight", mixer)
    straight.train()
    stopped = trainer_for(make_model, tokenizer, tmp_path / "resumed", mixer, [StopAt(SAVE)],
                          dataloader_num_workers=workers)
    stopped.train()
    assert (tmp_path / "resumed" / f"checkpoint-{SAVE}" / MIXER_STATE).is_file()
    resumed = trainer_for(make_model, tokenizer, tmp_path / "resumed", mixer,  # a new process would start fresh
                          dataloader_num_workers=workers)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS
    assert_same(final_state(straight), final_state(resumed))


def test_an_interrupted_save_is_passed_over(make_model, tokenizer, tmp_path, capsys):
    straight = trainer_for(make_model, tokenizer, tmp_path / "straight")
    straight.train()
    stopped = trainer_for(make_model, tokenizer, tmp_path / "resumed", callbacks=[StopAt(2 * SAVE)])
    stopped.train()
    # the newest checkpoint as a kill -9 during its save leaves it: the Trainer's files, not the mixer's state
    newest = tmp_path / "resumed" / f"checkpoint-{2 * SAVE}"
    (newest / MIXER_STATE).unlink()
    with pytest.raises(ValueError, match="not a complete AMATrainer checkpoint"):
        trainer_for(make_model, tokenizer, tmp_path / "resumed").train(resume_from_checkpoint=str(newest))
    resumed = trainer_for(make_model, tokenizer, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    assert f"{newest}: incomplete checkpoint" in capsys.readouterr().out
    assert_same(final_state(straight), final_state(resumed))
    shutil.rmtree(tmp_path / "resumed")
    (tmp_path / "resumed").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint to resume from"):
        trainer_for(make_model, tokenizer, tmp_path / "resumed").train(resume_from_checkpoint=True)


class Killed(BaseException):
    """What a kill -9 does to the process, for the test: it stops, wherever it is."""


def test_a_kill_before_the_new_checkpoint_is_complete_keeps_the_last_complete_one(make_model, tokenizer, tmp_path,
                                                                                   monkeypatch):
    """With ``save_total_limit=1`` the Trainer prunes the older checkpoints at the end of its own save; the
    mixer's state, which makes the new one complete, comes after. Pruning must wait for it: a kill between the
    two would otherwise leave no complete checkpoint at all."""
    import amalab.trl.trainer as trainer_module

    straight = trainer_for(make_model, tokenizer, tmp_path / "straight")
    straight.train()
    save = trainer_module.save_mixer_state

    def killed_at_the_second_save(folder, *args):
        if folder.name == f"checkpoint-{2 * SAVE}":
            raise Killed
        save(folder, *args)

    monkeypatch.setattr(trainer_module, "save_mixer_state", killed_at_the_second_save)
    with pytest.raises(Killed):
        trainer_for(make_model, tokenizer, tmp_path / "resumed", save_total_limit=1).train()
    monkeypatch.setattr(trainer_module, "save_mixer_state", save)
    assert (tmp_path / "resumed" / f"checkpoint-{SAVE}" / MIXER_STATE).is_file()
    resumed = trainer_for(make_model, tokenizer, tmp_path / "resumed", save_total_limit=1)
    resumed.train(resume_from_checkpoint=True)
    assert_same(final_state(straight), final_state(resumed))
    kept = sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{STEPS}"]  # the limit still holds once the saves complete

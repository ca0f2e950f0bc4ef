"""AMATrainer runs recorded for tests/trl_integration/test_two_processes.py: on one process inside the test, or
on two under ``torchrun`` with this file as the script (not a test module: pytest collects ``test_*.py`` only).

    python -m torch.distributed.run --nproc_per_node 2 --master_port PORT two_process_child.py OUT RUNS_JSON

RUNS_JSON is a list of run specifications (:func:`record_run`'s keyword arguments and a ``name``); every rank
writes ``OUT/<name>.rank<r>.pt`` with what :class:`Record` holds. The tiny tokenizer and model are built here
as tests/conftest.py's fixtures build them, and the pairs are those of test_trainer.py's ``multi_task_rows``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

#: AdamW's eps, as in test_trainer.py (its ADAM_EPS says why 1e-6)
ADAM_EPS = 1e-6
BETA, LR = 0.3, 1e-2
#: the process group's timeout: a rank left waiting in a collective fails instead of hanging the test run
PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)


def multi_task_rows() -> list[dict]:
    """The pairs of the TRL integration tests (three tasks of unequal size, pairs of unequal lengths, s(z)
    stand-ins), each with its row number in ``row``."""
    rows = []
    for i in range(9):
        rows.append({"task": "sums", "prompt": f"Human: what is {i} plus {i + 2}? Assistant:",
                     "chosen": f" It is {2 * i + 2}.", "rejected": f" No idea, maybe {i}."})
    for i in range(6):
        rows.append({"task": "greetings", "prompt": f"Human: say hello to friend {i}. Assistant:",
                     "chosen": " Hello, friend!", "rejected": " Go away."})
    for i in range(4):
        rows.append({"task": "facts", "prompt": "Human: is the sky blue? Assistant:" + " Think." * i,
                     "chosen": " Yes, on a clear day.", "rejected": " It is green."})
    for row, values in enumerate(rows):
        values["baseline_loss"] = 0.55 + 0.02 * (row % 7)
        values["row"] = row
    return rows


def fixed_losses() -> np.ndarray:
    """Stand-in per-example losses, one per row: fixed, so that the mixer's statistics do not depend on the
    model, and far from the baselines, so that AMA-S's weights move (and its draws depend on them). Float32
    values (the losses' dtype), as float64."""
    rows = len(multi_task_rows())
    values = np.array([0.1 + 1.7 * ((7 * row) % 11) / 10 for row in range(rows)])
    return values.astype(np.float32).astype(np.float64)


def tiny_tokenizer_and_models():
    from amalab.llm.tiny import tiny_llama, tiny_tokenizer

    tokenizer = tiny_tokenizer()

    def make(seed: int = 0):
        return tiny_llama(len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)

    return tokenizer, make


class Record:
    """What a run did, step by step, on this rank."""

    def __init__(self):
        self.draws: list[np.ndarray] = []      # the task ids of each optimizer step's global batch
        self.rows: list[list[int]] = []        # the dataset rows of each micro-batch of this rank, in order
        self.losses: list[np.ndarray] = []     # the per-example losses the mixer saw, per micro-batch
        self.stats: list[np.ndarray] = []      # the statistics of each mixer update (summed over micro-batches
                                               # and ranks)
        self.weights: list[np.ndarray] = []    # the mixer's weights after each step's update
        self.logs: list[dict] = []             # the Trainer's log of each step (per-task metrics, weights)

    def as_dict(self) -> dict:
        return dict(draws=self.draws, rows=self.rows, losses=self.losses, stats=self.stats, weights=self.weights,
                    logs=self.logs)


def record_run(output_dir, mixer: str = "ama-s", steps: int = 10, per_device_train_batch_size: int = 3,
               gradient_accumulation_steps: int = 2, dataloader_num_workers: int = 0, fixed: bool = False,
               stop_at: int | None = None, resume: bool = False, **overrides):
    """Train AMATrainer on the pairs and record it (:class:`Record`); ``fixed``: the mixer sees
    :func:`fixed_losses` instead of the model's losses (the gradients are still the model's). ``stop_at``: stop
    after that optimizer step, as an interruption would (save with ``save_strategy``/``save_steps`` in
    ``overrides``); ``resume``: go on from the newest complete checkpoint in ``output_dir``."""
    from datasets import Dataset
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    from amalab.trl import AMAConfig, AMATrainer

    tokenizer, make = tiny_tokenizer_and_models()
    settings = dict(output_dir=str(output_dir), beta=BETA, mixer=mixer, max_steps=steps,
                    per_device_train_batch_size=per_device_train_batch_size,
                    gradient_accumulation_steps=gradient_accumulation_steps,
                    dataloader_num_workers=dataloader_num_workers, learning_rate=LR, lr_scheduler_type="constant",
                    weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", adam_epsilon=ADAM_EPS, report_to=[],
                    use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", seed=0, warmup_steps=0,
                    disable_tqdm=True)
    args = AMAConfig(**{**settings, **overrides})
    trainer = AMATrainer(model=make(seed=0), ref_model=make(seed=0), args=args,
                         train_dataset=Dataset.from_list(multi_task_rows()), processing_class=tokenizer,
                         callbacks=[StopAt()] if stop_at else None)
    record, table = Record(), fixed_losses()

    draw = trainer.mixer.draw

    def recorded_draw(rng, batch_size):
        task_ids = draw(rng, batch_size)
        record.draws.append(np.array(task_ids, copy=True))
        return task_ids

    trainer.mixer.draw = recorded_draw
    collate = trainer.data_collator

    def recorded_collate(examples):
        record.rows.append([int(example["row"]) for example in examples])
        return collate(examples)

    trainer.data_collator = recorded_collate
    preference_loss, pending = trainer.preference_loss, []

    def recorded_losses(*args, **kwargs):
        out = preference_loss(*args, **kwargs)
        losses = out[0]
        if fixed:  # the table's values (exactly, in the losses' dtype), the model's gradient
            rows = record.rows[len(record.losses)]
            values = torch.as_tensor(table[rows], dtype=losses.dtype, device=losses.device)
            losses = values + (losses - losses.detach())
        record.losses.append(losses.detach().double().cpu().numpy().copy())
        return (losses, *out[1:])

    trainer.preference_loss = recorded_losses
    update = trainer.mixer.update

    def recorded_update(stats):
        record.stats.append(np.array(stats, copy=True))
        return update(stats)

    trainer.mixer.update = recorded_update
    end_step = trainer._end_step

    def recorded_end_step():
        end_step()
        record.weights.append(np.asarray(trainer.mixer.weights, dtype=float).copy())

    trainer._end_step = recorded_end_step
    trainer.train(resume_from_checkpoint=resume or None)
    assert trainer.state.global_step == (stop_at or steps)
    record.logs = [dict(entry) for entry in trainer.state.log_history if "step" in entry and "loss" in entry]
    return trainer, record


def parameters(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def main(out: str, runs_json: str) -> None:
    import torch.distributed as dist

    world_size = int(os.environ["WORLD_SIZE"])
    # joined here, with a short timeout, before the Trainer's accelerate state (which then uses this group:
    # TrainingArguments passes no timeout to accelerate on CPU)
    dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    torch.set_num_threads(1)
    out_dir = Path(out)
    for spec in json.loads(runs_json):
        spec = dict(spec)
        name, folder = spec.pop("name"), spec.pop("folder", None)  # runs that share a folder: stop, then resume
        trainer, record = record_run(out_dir / (folder or name), **spec)
        assert trainer.accelerator.num_processes == world_size, trainer.accelerator.num_processes
        assert trainer.world.size == world_size, trainer.world
        rank = trainer.accelerator.process_index
        torch.save({"num_processes": trainer.accelerator.num_processes, "rank": rank,
                    "distributed_type": trainer.accelerator.distributed_type.value,
                    "record": record.as_dict(), "parameters": parameters(trainer)},
                   out_dir / f"{name}.rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""``AMATrainer``: TRL's ``DPOTrainer`` training the generalist of docs/maths.md sections 3, 4 and 8 with a task
mixer of :mod:`amalab.mixers`, on accelerate's engine.

One optimizer step, as amalab's own :func:`~amalab.training.step.train_step` takes it:

    get_batch_samples (once per optimizer step, after the previous step's update):
        task ids of the global batch drawn from the mixer's weights, on every rank from one identically
        seeded generator; each task's example from its seeded sampler; this rank takes slots rank, rank + W, ...
        and cuts them into gradient_accumulation_steps micro-batches, collated by TRL's collator
    compute_loss (each micro-batch): TRL's forward (fused log-prob head, ld_alpha, PEFT or precomputed
        reference), amalab's per-example losses (equal to TRL's), the mixer's statistics and coefficients;
        the loss W * sum(coefficients * losses): the Trainer does not divide it by the accumulation steps
        (``loss_is_scaled_for_ga``) and DDP's mean over W ranks leaves the coefficient-weighted sum
    on_step_end (after the optimizer step): the step's statistics summed over micro-batches and ranks in one
        all-reduce, and the mixer updated once

The Trainer's own loader only counts steps here (:class:`_StepCounter`): the draws do not depend on its
prefetching or workers. Sequential AMA-R (``ama-r``, theta steps with alpha_{t+1}) updates inside its one
micro-batch, before the backward pass.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import DPOTrainer

from amalab.mixers import make_mixer
from amalab.mixers.excess import COUNT
from amalab.training.distributed import World, all_reduce_sum, rank_slots
from amalab.training.sampler import TaskSampler
from amalab.training.state import draw_generator
from amalab.training.step import draw_batch
from amalab.trl.baselines import check_baseline_record, preference_loss_of
from amalab.trl.checkpoint import load_mixer_state, resume_folder, save_mixer_state
from amalab.trl.config import AMAConfig
from amalab.trl.evaluation import task_metrics
from amalab.trl.forward import sequence_logps
from amalab.trl.tasks import GIVEN_ROW, TaskIndex, check_supported

class _StepCounter:
    """The Trainer's train loader: ``length`` placeholder micro-batches per epoch (the batches themselves come
    from the mixer's draws)."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter([None] * self.length)


class _UpdateMixer(TrainerCallback):
    def __init__(self, trainer: "AMATrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step()


def _with_given_rows(args, kwargs) -> dict:
    """DPOTrainer's arguments by name, the train dataset numbered by its rows as the user gave it
    (:data:`~amalab.trl.tasks.GIVEN_ROW`): TRL's preparation drops the pairs whose prompt alone fills
    max_length, which renumbers the rows after them, and a refusal names the user's row."""
    bound = inspect.signature(DPOTrainer.__init__).bind(None, *args, **kwargs).arguments
    bound.pop("self")
    dataset = bound.get("train_dataset")
    if isinstance(dataset, Dataset) and GIVEN_ROW not in dataset.column_names:
        bound["train_dataset"] = dataset.add_column(GIVEN_ROW, list(range(len(dataset))))
    return bound


class AMATrainer(DPOTrainer):
    """A ``DPOTrainer`` whose batches are drawn and weighted by a task mixer (module docstring).

    The train dataset needs the columns ``args.task_column`` and, for a mixer measured against baseline
    losses, ``args.baseline_column`` (s(z) of each pair). Everything the mixer cannot honour is refused here,
    before any training, in one error naming the column, row or setting.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(**_with_given_rows(args, kwargs))
        if not isinstance(self.args, AMAConfig):
            raise ValueError("AMATrainer needs an AMAConfig as args (a DPOConfig has no mixer settings)")
        world = World(self.accelerator.process_index, self.accelerator.num_processes)
        self.world, self.micro_batch = world, self.args.per_device_train_batch_size
        self.global_batch = self.micro_batch * self.args.gradient_accumulation_steps * world.size
        self.tasks = TaskIndex.of(self.train_dataset, self.args)
        try:
            self.mixer = make_mixer(self.args.mixer, self.tasks.k, sizes=self.tasks.sizes,
                                    **self.args.mixer_options())
            self.mixer.draw(np.random.default_rng(0), self.global_batch)  # a batch the mixer can draw
        except ValueError as e:
            raise ValueError(f"AMAConfig.mixer {self.args.mixer!r}: {e}") from None
        check_supported(self, self.mixer)
        self.tasks.check_baselines(self.mixer.baseline)
        check_baseline_record(self)  # the values were computed with this run's loss settings and reference
        self.preference_loss = preference_loss_of(self)
        self.sampler = TaskSampler(self.tasks.sizes, self.args.seed, self.tasks.names)
        self.draw_rng = draw_generator(self.args.seed)
        self.loss_is_scaled_for_ga = True  # compute_loss returns the step's share already (module docstring)
        self._micro_batches: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._counts, self._stats, self._updated = np.zeros(self.tasks.k), np.zeros((3, self.tasks.k)), False
        self._step_pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (tasks, losses, margins)
        self.add_callback(_UpdateMixer(self))

    # --- checkpoints ----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """TRL's ``train``; resuming also puts back the mixer, the samplers and the draw generator (from the
        newest complete checkpoint with ``resume_from_checkpoint=True``: :mod:`amalab.trl.checkpoint`)."""
        if resume_from_checkpoint:
            folder = resume_folder(self.args.output_dir, resume_from_checkpoint)
            load_mixer_state(folder, self.mixer, self.sampler, self.draw_rng)
            resume_from_checkpoint = str(folder)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial):
        # The Trainer prunes old checkpoints (save_total_limit) at the end of its save, before the mixer's state
        # marks the new one complete: a kill between the two would leave no complete checkpoint. So the
        # Trainer saves with no limit, and the pruning comes after the marker.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:  # the process that writes the Trainer's checkpoint; the marker comes last
            run_dir = Path(self._get_output_dir(trial=trial))
            save_mixer_state(run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}", self.mixer,
                             self.sampler, self.draw_rng)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, with the task mixer that trained the model: its name, options, the tasks and the
        mixer's weights and running-average weights when the card is written."""
        super().create_model_card(model_name, dataset_name, [*(tags or []), "amalab", f"mixer-{self.args.mixer}"])
        if not self.is_world_process_zero():
            return
        weights = ", ".join(f"{name} {w:.4f}" for name, w in zip(self.tasks.names, np.asarray(self.mixer.weights)))
        average = ", ".join(f"{name} {w:.4f}" for name, w in
                            zip(self.tasks.names, np.asarray(self.mixer.average_weights)))
        with (Path(self.args.output_dir) / "README.md").open("a") as card:
            card.write(f"\n## Task mixer (amalab)\n\nTrained with `AMATrainer`, mixer `{self.args.mixer}` "
                       f"(options {self.args.mixer_options()}), on tasks {', '.join(self.tasks.names)} "
                       f"(column `{self.args.task_column}`) after {self.state.global_step} steps.\n\n"
                       f"- weights: {weights}\n- running-average weights: {average}\n")

    # --- the batches ---------------------------------------------------------------------------------

    def get_train_dataloader(self):
        # an epoch: enough optimizer steps to draw the dataset's size, each a whole number of micro-batches (a
        # short last step would make the Trainer step the optimizer in the middle of a drawn batch)
        steps = math.ceil(len(self.train_dataset) / self.global_batch)
        return _StepCounter(steps * self.args.gradient_accumulation_steps)

    def get_resumed_dataloader(self, dataloader, num_batches: int):
        return dataloader  # nothing to skip: the draws resume from the checkpointed mixer and samplers

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The micro-batches of one optimizer step (module docstring); no ``num_items_in_batch``."""
        for _ in range(num_batches):
            next(epoch_iterator, None)
        task_ids, picks, self._counts = draw_batch(self.mixer, self.draw_rng, self.sampler, self.global_batch)
        slots = rank_slots(self.global_batch, self.world)
        batches = []
        for start in range(0, len(slots), self.micro_batch):
            chunk = slots[start:start + self.micro_batch]
            rows = [self.tasks.row(*picks[j]) for j in chunk]
            # one Arrow read for the micro-batch's rows, as torch's DataLoader fetches a batch (a third of the
            # time of one read per row)
            batches.append(self.data_collator(self.train_dataset.__getitems__(rows)))
            self._micro_batches.append((task_ids[chunk], self.tasks.baselines(rows, self.mixer.baseline)))
        return batches, None

    # --- the loss ------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: TRL's own loss and metrics
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        tasks, baseline = self._micro_batches.pop(0)
        logps = sequence_logps(self, model, inputs)
        losses = logps.losses(self.preference_loss)
        values = losses.detach().double().cpu().numpy()
        statistics = self.mixer.statistics(tasks, values, baseline)  # ValueError on a non-finite loss
        self._stats += statistics
        if self.mixer.update_first:  # sequential AMA-R: its one micro-batch per rank sees alpha_{t+1}
            self._update()
        coefficients = self.mixer.coefficients(tasks, values, baseline, self._counts)
        weighted = self.world.size * (torch.from_numpy(coefficients).to(losses) * losses).sum()
        shown = self.world.size * float(values.sum()) / self.global_batch  # logs the batch's mean loss
        self._log_micro_batch(tasks, values, logps)
        loss = weighted + (shown - weighted).detach()
        return (loss, logps) if return_outputs else loss

    def _update(self) -> None:
        stats = all_reduce_sum(self._stats.ravel(), self.world).reshape(self._stats.shape)
        self.mixer.update(stats)
        self._step_stats, self._stats, self._updated = stats, np.zeros_like(self._stats), True

    def _end_step(self) -> None:
        if not self._updated:
            self._update()
        self._updated = False
        self._log_step(self._step_stats)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """With a dict of held-out sets keyed by the task names: each task's loss, clipped excess, margin and
        accuracy, and the worst task's excess (:mod:`amalab.trl.evaluation`); otherwise TRL's evaluation."""
        datasets = self.eval_dataset if eval_dataset is None else eval_dataset
        if not (isinstance(datasets, dict) and set(datasets) <= set(self.tasks.names)):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is not None:  # held-out sets given here are raw: tokenized as TRL tokenizes its own
            datasets = {name: self._prepare_dataset(data, self.processing_class, self.args, f"eval_{name}")
                        for name, data in eval_dataset.items()}
        metrics = task_metrics(self, datasets, metric_key_prefix)
        Trainer.log(self, dict(metrics))  # not TRL's log, which would take the pending train metrics along
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- metrics -------------------------------------------------------------------------------------

    def _log_micro_batch(self, tasks, values, logps) -> None:
        self._step_pairs.append((tasks, values, logps.margins().cpu().numpy()))

    def _log_step(self, stats: np.ndarray) -> None:
        """Per-task loss, clipped excess, margin and accuracy of the step (reduced over ranks), the weights."""
        k, sums = self.tasks.k, np.zeros((3, self.tasks.k))
        for tasks, values, margins in self._step_pairs:
            for i in range(k):
                where = tasks == i
                sums[:, i] += [values[where].sum(), margins[where].sum(), (margins[where] > 0).sum()]
        self._step_pairs = []
        sums = all_reduce_sum(sums.ravel(), self.world).reshape(sums.shape)
        counts = np.maximum(stats[COUNT], 1)
        metrics = self._metrics["train"]
        for i, name in enumerate(self.tasks.names):
            if stats[COUNT][i]:
                metrics[f"tasks/{name}/loss"].append(sums[0, i] / counts[i])
                metrics[f"tasks/{name}/excess"].append(stats[1, i] / counts[i])
                metrics[f"tasks/{name}/margin"].append(sums[1, i] / counts[i])
                metrics[f"tasks/{name}/accuracy"].append(sums[2, i] / counts[i])
            metrics[f"weights/{name}"].append(float(np.asarray(self.mixer.weights)[i]))
            metrics[f"average_weights/{name}"].append(float(np.asarray(self.mixer.average_weights)[i]))

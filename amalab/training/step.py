"""One optimizer step, for any policy whose examples have sequence log-probs (docs/maths.md section 8).

    task_ids = mixer.draw(draw_rng, global batch)              # the same generator on every rank
    picks    = sampler.take(task_ids)                          # the example of each slot
    for micro in micro-batches of this rank's slots:
        batch  = collate(its examples)
        logps  = sequence_logps(policy, batch)                 # the only forward pass
        losses = losses(logps, batch)                          # per example (cached reference log-probs inside)
        stats += mixer.statistics(micro tasks, losses, cached baseline losses s(z))
        backward now, unless the mixer updates first
    mixer.update(all_reduce(stats))                            # once, identical on every rank
    backward what waited                                       # sequential AMA-R: with the updated weights
    sum gradients over ranks, clip, AdamW step, schedule

The step knows nothing of transformers: :class:`ExampleLosses` carries the three functions that do (collate,
sequence log-probs, per-example losses), so the same step trains any policy with sequence log-probs.

Each backward pass weights the losses by the mixer's coefficients, ``(coefficients * losses).sum()``, so the
gradient is the coefficient-weighted *sum* over the global batch: each rank backpropagates its share and the
gradients are summed over ranks. W ranks, A micro-batches or one big batch give the same update up to float
rounding. Under FSDP2 every backward pass reduce-scatters its gradients into each rank's shard, where the
micro-batches' shards add up: a rank never holds a whole gradient of a sharded parameter (one collective per
micro-batch instead of one per step, the price of FSDP's memory saving). Sequential AMA-R
(``mixer.update_first``: theta steps with alpha_{t+1}) needs the whole statistics before its first backward
pass, so it keeps each micro-batch's graph until the update and needs one micro-batch per rank
(:func:`check_sequential_update`); ``ama-r-sim`` is the variant for accumulation.

A non-finite loss or gradient norm on any rank abandons the step on every rank: each rank still finishes the
step's collectives (under FSDP2 a forward or backward pass is one), the all-reduce carries a divergence flag,
and every rank returns a :class:`StepResult` whose ``diverged`` says why, with no parameter or mixer change.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from amalab.errors import ConfigError
from amalab.training.config import OptimConfig
from amalab.training.distributed import World, all_reduce_gradients, all_reduce_sum, rank_slots
from amalab.training.sampler import TaskSampler
from amalab.training.state import TrainState
from amalab.mixers import Mixer
from amalab.mixers.excess import COUNT


def _no_tokens(batch) -> tuple[float, float]:
    return 0.0, 0.0


@dataclass(frozen=True)
class ExampleLosses:
    """How examples become per-example losses of a policy: the only part of a step that knows the policy.

    ``collate(examples)``: a batch on the policy's device, with ``batch.ids`` the examples' ids in order.
    ``sequence_logps(policy, batch)``: each example's sequence log-probs (any structure ``losses`` reads).
    ``losses(logps, batch)``: the per-example losses, a differentiable tensor of shape (B,).
    ``tokens(batch)``: (real, padded) token counts of the batch, for the log.
    ``length(example)``: the padded length an example needs, for length grouping (None: no grouping).
    """

    collate: Callable[[list], Any]
    sequence_logps: Callable[[torch.nn.Module, Any], Any]
    losses: Callable[[Any, Any], torch.Tensor]
    tokens: Callable[[Any], tuple[float, float]] = _no_tokens
    length: Callable[[Any], int] | None = None


@dataclass
class StepResult:
    """What one step did: its metrics, or (``diverged``) why it was abandoned on every rank."""

    metrics: dict
    diverged: str | None = None


class TimedMixer:
    """The mixer with one stopwatch: its work in a step (draw, statistics, coefficients, update, and the
    lookup of cached baseline losses, through :meth:`timed`) adds up in ``seconds``."""

    _TIMED = frozenset({"draw", "statistics", "coefficients", "update"})

    def __init__(self, mixer: Mixer):
        self.mixer, self.seconds = mixer, 0.0

    def timed(self, function: Callable, *args):
        began = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.seconds += time.perf_counter() - began

    def __getattr__(self, name):
        value = getattr(self.mixer, name)
        if name not in self._TIMED:
            return value
        return lambda *args: self.timed(value, *args)


def check_sequential_update(mixer: Mixer, micro_batch_size: int, examples: int, what: str) -> None:
    """Sequential AMA-R updates its weights from the whole batch before any backward pass, so the
    ``examples`` of one process must go through one forward pass (``micro_batch_size`` 0 or >= them)."""
    if mixer.update_first and 0 < micro_batch_size < examples:
        raise ConfigError(f"{what} updates its weights before the parameter step (sequential AMA-R) and needs "
                          "the whole batch in one forward: set [train] micro_batch_size = 0, or use ama-r-sim")


def check_micro_batches(mixer: Mixer, optim: OptimConfig, world: World, sharded: bool, name: str) -> None:
    """Refuse a batch this rank cannot split as the step needs (ConfigError)."""
    per_rank = [len(rank_slots(optim.batch_size, World(r, world.size))) for r in range(world.size)]
    if per_rank[world.rank] == 0:
        raise ConfigError(f"batch_size {optim.batch_size} leaves no example for rank {world.rank} of {world.size}")
    check_sequential_update(mixer, optim.micro_batch_size, per_rank[world.rank], name)
    counts = {math.ceil(n / (optim.micro_batch_size or n)) for n in per_rank}
    if sharded and len(counts) > 1:  # every forward and backward of a sharded model is a collective
        raise ConfigError(f"{name}: with fsdp every rank needs the same number of micro-batches; "
                          f"batch_size {optim.batch_size} over {world.size} ranks in micro-batches of "
                          f"{optim.micro_batch_size} gives {sorted(counts)}: make batch_size a "
                          f"multiple of {world.size} x micro_batch_size")


def length_grouped_chunks(slots: np.ndarray, lengths: list[int], micro: int) -> list[np.ndarray]:
    """This step's slots in micro-batches of ``micro`` examples of similar length (what ``group_by_length``
    does), so each micro-batch pads its rows to a length close to their own.

    Consecutive runs of the slots sorted longest first; when ``micro`` does not divide the slots, the short
    micro-batch goes wherever it pads least. The padding, sum over micro-batches g of |g| max_{j in g}
    length_j, is then the least of any cut into micro-batches of these sizes (checked by enumeration in the
    tests). Ties keep slot order: deterministic, so a resumed run groups exactly as the uninterrupted one.
    """
    ranked = sorted(range(len(slots)), key=lambda i: (-lengths[i], i))
    order, longest = slots[ranked], [lengths[i] for i in ranked]
    full, short = divmod(len(order), micro)
    # the candidate cuts: the short micro-batch (if any) placed after g full ones, for every g
    candidates = [[micro] * g + [short] * bool(short) + [micro] * (full - g) for g in range(full + 1 if short else 1)]

    def starts(sizes):
        return np.cumsum([0] + sizes)

    def padding(sizes):  # each micro-batch's longest example is its first
        return sum(size * longest[start] for size, start in zip(sizes, starts(sizes)))

    bounds = starts(min(candidates, key=padding))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def micro_batches(slots: np.ndarray, examples: dict[int, Any], optim: OptimConfig,
                  length: Callable[[Any], int] | None) -> list[np.ndarray]:
    """This rank's slots cut into micro-batches: in slot order, or grouped by length."""
    micro = optim.micro_batch_size or len(slots)
    if optim.group_by_length and length is not None and len(slots) > micro:
        return length_grouped_chunks(slots, [length(examples[int(j)]) for j in slots], micro)
    return [slots[i:i + micro] for i in range(0, len(slots), micro)]


def draw_batch(mixer: Mixer, draw_rng: np.random.Generator, sampler: TaskSampler,
               batch_size: int) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """The global batch of one step (docs/maths.md section 8): its task ids, drawn from the mixer's weights in
    force, the (task, example index) the sampler picks for each slot, and the count of slots of each task.
    Every rank draws the same batch from identically seeded generators and takes its own slots."""
    task_ids = mixer.draw(draw_rng, batch_size)
    return task_ids, sampler.take(task_ids), np.bincount(task_ids, minlength=mixer.k).astype(float)


def baseline_losses_of(caches, tasks: np.ndarray, ids: Sequence[str]) -> np.ndarray | None:
    """s(z) of each example, from its task's cache of baseline losses (None: the mixer uses no baseline)."""
    if caches is None:
        return None
    values = np.empty(len(ids))
    for task in np.unique(tasks):
        where = tasks == task
        values[where] = caches[task].get("loss", [i for i, w in zip(ids, where) if w])
    return values


@dataclass
class _MicroBatch:
    """A micro-batch after its forward pass: what its backward pass needs."""

    losses: torch.Tensor
    tasks: np.ndarray
    values: np.ndarray
    baseline: np.ndarray | None


class _Forward:
    """The forward passes of one step on this rank, and what they add up to."""

    def __init__(self, k: int):
        self.stats, self.tokens, self.padded, self.loss_sum = np.zeros((3, k)), 0.0, 0.0, 0.0
        self.diverged: str | None = None

    def run(self, state: TrainState, mixer: TimedMixer, batch, example_losses: ExampleLosses, tasks, baseline_caches,
            autocast) -> _MicroBatch:
        with autocast():
            logps = example_losses.sequence_logps(state.policy, batch)
        losses = example_losses.losses(logps, batch)
        values = losses.detach().double().cpu().numpy()
        baseline = mixer.timed(baseline_losses_of, baseline_caches, tasks, batch.ids)
        try:
            self.stats += mixer.statistics(tasks, values, baseline)
        except ValueError as e:  # a non-finite loss: the step goes on to its collectives, then stops everywhere
            self.diverged = str(e)
        tokens, padded = example_losses.tokens(batch)
        self.tokens, self.padded = self.tokens + tokens, self.padded + padded
        self.loss_sum += float(np.nansum(values))
        return _MicroBatch(losses, tasks, values, baseline)


def _backward(part: _MicroBatch, mixer: TimedMixer, counts: np.ndarray, diverged: bool) -> None:
    # a diverged step still runs its backward passes (zero coefficients): under FSDP2 each is a collective
    coefficients = np.zeros(len(part.tasks)) if diverged else mixer.coefficients(part.tasks, part.values,
                                                                                 part.baseline, counts)
    (torch.from_numpy(coefficients).to(part.losses.device, part.losses.dtype) * part.losses).sum().backward()


def train_step(state: TrainState, train_sets: Sequence[Sequence], example_losses: ExampleLosses,
               baseline_caches: Sequence | None, optim: OptimConfig, world: World = World(),
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> StepResult:
    """Take one optimizer step of ``state`` (module docstring); every rank calls it with the same arguments.

    ``train_sets[i]``: task i's training examples. ``baseline_caches[i]``: task i's cached baseline losses
    s(z) (anything with ``.get("loss", ids)``), or None when the mixer uses no baseline.
    """
    began = time.perf_counter()
    mixer, policy = TimedMixer(state.mixer), state.policy
    task_ids, picks, counts = draw_batch(mixer, state.draw_rng, state.sampler, optim.batch_size)
    slots = rank_slots(optim.batch_size, world)
    examples = {int(j): train_sets[picks[j][0]][picks[j][1]] for j in slots}  # this rank's examples
    chunks = micro_batches(slots, examples, optim, example_losses.length)
    forward, waiting = _Forward(mixer.k), []
    if isinstance(policy, FSDPModule):
        # reduce-scatter after every backward pass: without sync, FSDP2 would keep a full-size unsharded
        # gradient of every parameter on every rank until the last micro-batch (module docstring)
        policy.set_requires_gradient_sync(True)
    for chunk in chunks:
        part = forward.run(state, mixer, example_losses.collate([examples[int(j)] for j in chunk]), example_losses,
                           task_ids[chunk], baseline_caches, autocast)
        waiting.append(part)
        if not mixer.update_first:  # coefficients of the weights in force when the batch was drawn
            _backward(waiting.pop(), mixer, counts, forward.diverged is not None)
    reduced = all_reduce_sum(np.concatenate([forward.stats.ravel(), [forward.tokens, forward.padded,
                                             forward.loss_sum, float(forward.diverged is not None)]]), world)
    stats, (tokens, padded, loss_sum, diverged_ranks) = reduced[:-4].reshape(3, mixer.k), reduced[-4:]
    if diverged_ranks:
        return StepResult({}, forward.diverged or f"step {state.step + 1}: another rank saw a non-finite loss")
    mixer.update(stats)
    for part in waiting:  # sequential AMA-R: coefficients of the weights just updated
        _backward(part, mixer, counts, False)
    grad_norm = _sum_and_clip_gradients(state, optim, world)
    if not math.isfinite(grad_norm):
        state.optimizer.zero_grad(set_to_none=True)
        return StepResult({}, f"step {state.step + 1}: non-finite gradient norm ({grad_norm})")
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    device = state.parameters[0].device
    if device.type == "cuda":  # CUDA runs asynchronously: the step's time ends when its kernels do
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    return StepResult({
        "step": state.step, "kind": "train", "loss": loss_sum / optim.batch_size, "lr": lr,
        "grad_norm": grad_norm, "tokens": tokens, "padded_tokens": padded, "seconds": seconds,
        "mixer_seconds": mixer.seconds, "tokens_per_s": tokens / seconds, "task_counts": stats[COUNT].tolist(),
        "batch_excess": (stats[1] / np.maximum(stats[COUNT], 1)).tolist(),
        "weights": np.asarray(mixer.weights).tolist(), "average_weights": np.asarray(mixer.average_weights).tolist()})


def _sum_and_clip_gradients(state: TrainState, optim: OptimConfig, world: World) -> float:
    """Sum the gradients over the ranks and clip their norm; return the norm before clipping (every rank's)."""
    params = state.parameters
    if not isinstance(state.policy, FSDPModule):  # FSDP2 has summed them over ranks in the backward pass
        all_reduce_gradients(params, world)
    max_norm = optim.max_grad_norm if optim.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)  # FSDP2: replicated

"""The one training loop, for specialists, generalists and every baseline (spec sections 3, 4 and 8).

One optimizer step reads top to bottom:

    task_ids = mixer.draw(draw_rng, global_batch)              # the same generator on every rank
    picks    = sampler.take(task_ids)                          # the example of each slot
    for micro in split(this rank's slots, micro_batch):
        logps  = sequence_logps(policy, collate(micro))        # the only forward pass (policy_logps)
        losses = loss(logps, cached reference log-probs)       # per example
        stats += mixer.statistics(micro tasks, losses, cached baseline losses)
        (mixer.coefficients(micro, losses, global counts) * losses).sum().backward()
    mixer.update(all_reduce(stats))                            # once, identical on every rank
    all-reduce gradients, clip, AdamW step, schedule, log; maybe evaluate / checkpoint

Sequential AMA-R (``mixer.update_first``: theta steps with alpha_{t+1}) updates before the backward pass,
so it needs one micro-batch per rank; ``ama-r-sim`` is the variant for gradient accumulation. Gradients
are the coefficient-weighted *sum* over the global batch: each rank backpropagates its share and the
gradients are summed over ranks (an all-reduce SUM per parameter), so W ranks, A micro-batches or one big
batch give the same update up to float rounding.

A run directory holds ``run.json`` (what the run is), ``metrics.jsonl``, ``checkpoints/`` and, once
finished, ``final.json``; a run interrupted anywhere resumes from its last checkpoint and continues
exactly as if it had not stopped (every RNG, the sampler and the mixer are in the checkpoint). A
non-finite loss or gradient stops the run with an error and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amalab.errors import ConfigError
from amalab.llm.cache import ValueCache
from amalab.llm.checkpoint import capture_rng_states, load_latest, restore_rng_states, save_checkpoint
from amalab.llm.collate import collate_pairs, padded_length
from amalab.llm.config import OptimConfig
from amalab.llm.distributed import (World, all_reduce_gradients, all_reduce_sum, check_ranks_agree, gather_full,
                                    is_sharded, policy_logps, rank_slots, shard_like, unwrap)
from amalab.llm.evaluate import evaluate
from amalab.llm.losses import preference_losses
from amalab.llm.models import autocast_context
from amalab.llm.sampler import TaskSampler
from amalab.llm.tokenize import TokenizedPair
from amalab.mixers import Mixer
from amalab.mixers.excess import COUNT


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops, its last good checkpoint stays."""


@dataclass
class TrainingRun:
    """Everything one run needs besides the model: data, caches, mixer, settings, where to write."""

    name: str
    run_dir: Path
    mixer: Mixer
    task_names: list[str]
    train_sets: list[list[TokenizedPair]]
    eval_sets: list[list[TokenizedPair]]
    reference: ValueCache  # pi_ref log-probs of every pair (columns chosen, rejected)
    #: per task, the cached losses the mixer's baseline names (None: no baseline, s = 0)
    baseline_losses: list[ValueCache | None] | None
    #: per task, the specialist's cached losses: the excess reported by evaluation (None: not reported)
    specialist_caches: list[ValueCache | None]
    optim: OptimConfig
    loss: str
    beta: float
    seed: int
    pad_token_id: int
    #: what the run is, for run.json: a rerun with other settings into the same folder is refused
    description: dict = field(default_factory=dict)
    #: the loss held-out evaluation reports (None: ``loss``); an sft baseline is evaluated in the DPO loss
    eval_loss: str | None = None


def length_grouped_chunks(slots: np.ndarray, lengths: list[int], micro: int) -> list[np.ndarray]:
    """This step's slots in micro-batches of ``micro`` pairs of similar length (what ``group_by_length`` does),
    so each micro-batch pads its rows to a length close to their own.

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

    def padding(sizes):  # each micro-batch's longest pair is its first
        return sum(size * longest[start] for size, start in zip(sizes, starts(sizes)))

    bounds = starts(min(candidates, key=padding))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters the run trains (all of them, or only the LoRA adapter): what a checkpoint stores.

    Full CPU tensors under the policy's own names, sharded (FSDP) or not; gathering shards is a collective,
    so every rank calls this, and rank 0 writes.
    """
    return {name: gather_full(p) for name, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put full tensors (a checkpoint's) into the trainable parameters; each rank keeps its shard under FSDP."""
    params = dict(unwrap(model).named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(shard_like(value, params[name]))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with full CPU tensors (Adam's moments are sharded under FSDP); collective."""
    state = optimizer.state_dict()
    state["state"] = {i: {key: gather_full(value) for key, value in entry.items()}
                      for i, entry in sorted(state["state"].items())}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a :func:`full_optimizer_state`: per-parameter tensors are cut to this rank's shard where sharded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    entries = {}
    for i, entry in state["state"].items():
        param = params[int(i)]
        entries[i] = {key: shard_like(value, param) if torch.is_tensor(value) and value.shape == param.shape
                      else value for key, value in entry.items()}
    optimizer.load_state_dict({**state, "state": entries})


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _check_run_dir(run: TrainingRun) -> None:
    """Refuse to continue a run folder that was started with other settings."""
    path = run.run_dir / "run.json"
    described = json.loads(json.dumps(run.description, default=str))
    if path.is_file():
        found = json.loads(path.read_text())
        if found != described:
            keys = sorted(k for k in set(found) | set(described) if found.get(k) != described.get(k))
            raise ConfigError(f"{run.run_dir}: this run was started with other settings (differs in "
                              f"{', '.join(keys)}); delete the folder or use another `out`")
    else:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, described)


def _metrics_up_to(path: Path, step: int) -> None:
    """Drop metric lines past ``step``: what a crashed run logged after its last checkpoint is redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def run_training(model, run: TrainingRun, device: torch.device, world: World = World(),
                 show_progress: bool = True, stop_after: int | None = None) -> dict:
    """Train ``model`` in place for ``run.optim.steps`` steps (resuming if checkpointed); return the final eval.

    A run that finished earlier is not rerun: ``model`` gets the parameters of its last checkpoint.

    ``stop_after``: stop (with a checkpoint) after this many steps, as an interruption would (tests).
    """
    optim, mixer, k = run.optim, run.mixer, len(run.task_names)
    slots = rank_slots(optim.batch_size, world)
    if len(slots) == 0:
        raise ConfigError(f"batch_size {optim.batch_size} leaves no example for rank {world.rank} of {world.size}")
    micro = optim.micro_batch_size or len(slots)
    chunks = [slots[i:i + micro] for i in range(0, len(slots), micro)]
    sharded = is_sharded(model)
    if sharded:  # every forward and backward of a sharded model is a collective: same number on every rank
        counts_per_rank = {math.ceil(n / (optim.micro_batch_size or n))
                           for n in (len(rank_slots(optim.batch_size, World(r, world.size))) for r in range(world.size))}
        if len(counts_per_rank) > 1:
            raise ConfigError(f"{run.name}: with fsdp every rank needs the same number of micro-batches; "
                              f"batch_size {optim.batch_size} over {world.size} ranks in micro-batches of "
                              f"{optim.micro_batch_size} gives {sorted(counts_per_rank)}: make batch_size a "
                              f"multiple of {world.size} x micro_batch_size")
    if mixer.update_first and len(chunks) > 1:
        raise ConfigError(f"{run.name}: this mixer updates its weights before the parameter step (sequential "
                          "AMA-R), which needs the whole batch in one forward per rank; set micro_batch_size = 0 "
                          "or use ama-r-sim")
    if world.is_main:
        _check_run_dir(run)
    final_path = run.run_dir / "final.json"
    if final_path.is_file():
        load_trainable_state(model, load_latest(run.run_dir).model_state)
        return json.loads(final_path.read_text())

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim.steps, optim.warmup_steps, optim.min_lr_ratio))
    sampler = TaskSampler([len(s) for s in run.train_sets], run.seed, run.task_names)
    draw_rng = np.random.default_rng([run.seed, 0x5eed])
    torch.manual_seed(run.seed)
    start = 0
    checkpoint = load_latest(run.run_dir)
    if checkpoint is not None:
        load_trainable_state(model, checkpoint.model_state)
        load_optimizer_state(optimizer, checkpoint.optimizer_state)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        mixer.load_state_dict(checkpoint.mixer_state)
        sampler.load_state_dict(checkpoint.sampler_state)
        restore_rng_states(checkpoint.rng_states, {"draw": draw_rng})
        start = checkpoint.step
        if show_progress and world.is_main:
            print(f"{run.name}: resuming from step {start} ({checkpoint.path})")
    metrics_path = run.run_dir / "metrics.jsonl"
    if world.is_main:
        _metrics_up_to(metrics_path, start)

    def save(step: int) -> None:
        check_ranks_agree(mixer.state_dict(), world)
        model_state, optimizer_state = trainable_state(model), full_optimizer_state(optimizer)  # collectives
        if world.is_main:
            save_checkpoint(run.run_dir, step, model_state, optimizer_state,
                            scheduler.state_dict(), mixer.state_dict(), sampler.state_dict(),
                            capture_rng_states({"draw": draw_rng}), keep_last=optim.keep_checkpoints)

    def log(record: dict) -> None:
        if world.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval(step: int) -> dict:  # every rank evaluates its share (evaluate shards the pairs)
        result = evaluate(model, run.eval_sets, run.task_names, run.reference, run.specialist_caches,
                          run.eval_loss or run.loss, run.beta, run.pad_token_id, optim.eval_batch_size, device, world)
        log({"step": step, "kind": "eval", **result})
        return result

    model.train()
    bar = tqdm(total=optim.steps, initial=start, desc=run.name, unit="step", dynamic_ncols=True,
               disable=not (show_progress and world.is_main), mininterval=1.0)
    last_good = start
    end = optim.steps if stop_after is None else min(optim.steps, start + stop_after)
    for step in range(start, end):
        began = time.perf_counter()
        task_ids = mixer.draw(draw_rng, optim.batch_size)
        mixer_seconds = time.perf_counter() - began  # the mixer's own work in the step, logged beside its time
        picks = sampler.take(task_ids)
        counts = np.bincount(task_ids, minlength=k).astype(float)
        stats, diverged = np.zeros((3, k)), None
        tokens, loss_sum = 0.0, 0.0
        pending = []  # sequential AMA-R keeps its one micro-batch's graph until alpha is updated
        padded = 0.0
        pair_of = {int(j): run.train_sets[picks[j][0]][picks[j][1]] for j in slots}  # this rank's pairs
        step_chunks = chunks
        if optim.group_by_length and len(chunks) > 1:
            step_chunks = length_grouped_chunks(slots, [padded_length(pair_of[int(j)]) for j in slots], micro)
        for c, chunk in enumerate(step_chunks):
            pairs = [pair_of[int(j)] for j in chunk]
            batch = collate_pairs(pairs, run.pad_token_id).to(device)
            ids = list(batch.ids)
            if sharded:  # FSDP reduce-scatters gradients once, after the last micro-batch's backward
                model.set_requires_gradient_sync(c == len(chunks) - 1 or mixer.update_first)
            with autocast_context(device):
                logps = policy_logps(model, batch)
            ref = [torch.from_numpy(run.reference.get(c, ids)).to(device, torch.float32)
                   for c in ("chosen", "rejected")]
            losses, _ = preference_losses(run.loss, logps.chosen, logps.rejected, *ref, run.beta,
                                          chosen_token_counts=batch.chosen_token_counts,
                                          rejected_token_counts=batch.rejected_token_counts)
            values = losses.detach().double().cpu().numpy()
            mixer_began = time.perf_counter()
            chunk_tasks = task_ids[chunk]
            baseline = None
            if run.baseline_losses is not None:
                baseline = np.empty(len(chunk))
                for task in np.unique(chunk_tasks):
                    where = chunk_tasks == task
                    baseline[where] = run.baseline_losses[task].get("loss", [i for i, w in zip(ids, where) if w])
            try:
                stats += mixer.statistics(chunk_tasks, values, baseline)
            except ValueError as e:  # finish the step's collectives on every rank, then stop everywhere
                diverged = f"{run.name}: {e}"
                stats[:] = np.nan
            mixer_seconds += time.perf_counter() - mixer_began
            tokens += float(batch.attention_mask.sum())
            padded += float(batch.attention_mask.numel())
            loss_sum += float(np.nansum(values))
            if mixer.update_first:
                pending.append((losses, chunk_tasks, values, baseline))
            else:
                # a diverged step is abandoned after the all-reduce below; its backward still runs, since under
                # FSDP a backward pass is a collective that the other ranks wait for
                mixer_began = time.perf_counter()
                coeffs = np.zeros(len(chunk)) if diverged else mixer.coefficients(chunk_tasks, values, baseline, counts)
                mixer_seconds += time.perf_counter() - mixer_began
                (torch.from_numpy(coeffs).to(device, losses.dtype) * losses).sum().backward()
        reduced = all_reduce_sum(np.concatenate([stats.ravel(), [tokens, padded, loss_sum]]), world)
        stats, (tokens, padded, loss_sum) = reduced[:3 * k].reshape(3, k), reduced[-3:]
        if not np.all(np.isfinite(stats)):
            raise TrainingDiverged((diverged or f"{run.name}: step {step + 1}: another rank saw a non-finite loss")
                                   + f"; the last good checkpoint is step {last_good} in {run.run_dir}")
        mixer_began = time.perf_counter()
        mixer.update(stats)
        if mixer.update_first:  # sequential AMA-R: this step's coefficients come from the updated weights
            coefficients = [mixer.coefficients(chunk_tasks, values, baseline, counts)
                            for _, chunk_tasks, values, baseline in pending]
        mixer_seconds += time.perf_counter() - mixer_began
        if mixer.update_first:
            for (losses, *_), coeffs in zip(pending, coefficients):
                (torch.from_numpy(coeffs).to(device, losses.dtype) * losses).sum().backward()
        if not sharded:  # FSDP has reduced the gradients (a sum over ranks) in the backward pass
            all_reduce_gradients(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else math.inf)
        grad_norm = gather_full(grad_norm)  # under FSDP, a replicated DTensor
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"{run.name}: step {step + 1}: non-finite gradient norm ({float(grad_norm)}); "
                                   f"the last good checkpoint is step {last_good} in {run.run_dir}")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if device.type == "cuda":  # CUDA runs asynchronously: the step's time ends when its kernels do
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - began
        excess = stats[1] / np.maximum(stats[COUNT], 1)
        log({"step": done, "kind": "train", "loss": loss_sum / optim.batch_size, "lr": lr,
             "grad_norm": float(grad_norm), "tokens": tokens, "padded_tokens": padded, "seconds": elapsed,
             "mixer_seconds": mixer_seconds,
             "tokens_per_s": tokens / elapsed, "task_counts": stats[COUNT].tolist(),
             "batch_excess": excess.tolist(), "weights": np.asarray(mixer.weights).tolist(),
             "average_weights": np.asarray(mixer.average_weights).tolist()})
        bar.set_postfix(loss=f"{loss_sum / optim.batch_size:.4f}", tok_s=f"{tokens / elapsed:.0f}", refresh=False)
        bar.update(1)
        if optim.eval_every and done % optim.eval_every == 0 and done < optim.steps:
            run_eval(done)
        if (optim.checkpoint_every and done % optim.checkpoint_every == 0) or done == end:
            save(done)
            last_good = done
    bar.close()
    if end < optim.steps:
        return {}
    result = run_eval(optim.steps)
    result.update(steps=optim.steps, average_weights=np.asarray(mixer.average_weights).tolist(),
                  weights=np.asarray(mixer.weights).tolist())
    if world.is_main:
        _write_json_atomic(final_path, result)
    return result

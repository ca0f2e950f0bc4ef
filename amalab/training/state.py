"""Everything a training run carries from one optimizer step to the next, with one state dict.

:class:`TrainState` holds the policy, AdamW, the learning-rate schedule, the task mixer, the task sampler and
the generator that draws the batch's task ids; :meth:`TrainState.state_dict` is what a checkpoint stores and
:meth:`TrainState.load_state_dict` puts it back, so a resumed run continues exactly as the uninterrupted one
(docs/maths.md section 8).

Policy and optimizer states go through ``torch.distributed.checkpoint.state_dict``, which handles plain and
FSDP2-sharded modules alike: saved as full (unsharded) CPU tensors under the policy's own parameter names, and
cut back to each rank's shard on load (each rank copies in only its part of the model's tensors and of their
optimizer moments: :func:`load_trainable_state`, :func:`load_optimizer_state`). A run saved on W ranks, sharded
or not, therefore continues on any number of ranks, sharded or not. Only the trained parameters are stored
(with LoRA, only the adapter).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
# private, but what torch's own loading of sharded state dicts uses; no public equivalent
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from amalab.errors import ConfigError
from amalab.training.checkpoint import capture_rng_states, restore_rng_states
from amalab.training.config import OptimConfig
from amalab.training.distributed import unwrap
from amalab.training.sampler import TaskSampler
from amalab.mixers import Mixer

#: the whole tensors, on the CPU; with several ranks only rank 0 receives them (it alone writes checkpoints)
_FOR_RANK_0 = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
#: the whole tensors on every rank (each gathers the shards): what a rank compares or hashes
_FOR_EVERY_RANK = StateDictOptions(full_state_dict=True, cpu_offload=False, ignore_frozen_params=True)
#: full tensors in (every rank read the same checkpoint); each rank keeps its shard of a sharded parameter
_FROM_FULL = StateDictOptions(full_state_dict=True, strict=False)
#: as the optimizer holds its state: a sharded parameter's moments are DTensors, each rank's part local
_AS_HELD = StateDictOptions(full_state_dict=False, strict=False)


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` at the last step.

    Step s of the warm-up has factor (s + 1) / warmup. transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup`` uses s / warmup, so its first step trains at learning
    rate 0 (a step spent on nothing); after the warm-up the two are the same function (checked in the tests).
    Ours stays, so that runs keep the learning rates they always had.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _tie_like(state: dict[str, torch.Tensor], policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Names of one tied parameter share one tensor again (copying to the CPU separated them), so that
    a checkpoint stores it once."""
    first: dict[int, str] = {}
    for name, param in policy.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(param), name)
        if kept != name and kept in state and name in state:
            state[name] = state[kept]
    return state


def _trained_names(policy: torch.nn.Module) -> set[str]:
    return {name for name, p in policy.named_parameters(remove_duplicate=False) if p.requires_grad}


def trainable_state(policy: torch.nn.Module, every_rank: bool = True) -> dict[str, torch.Tensor]:
    """The parameters the run trains (all of them, or only the LoRA adapter) as full CPU tensors under the
    policy's own names, sharded (FSDP2) or not. A collective: every rank calls it.

    ``every_rank=False``: only rank 0 receives the tensors (the others get ``{}``), what a checkpoint needs.
    """
    policy = unwrap(policy)
    state = get_model_state_dict(policy, options=_FOR_EVERY_RANK if every_rank else _FOR_RANK_0)
    trained = _trained_names(policy)  # the state dict holds buffers too, which no step changes
    return _tie_like({name: tensor.detach().cpu() for name, tensor in state.items() if name in trained}, policy)


def trainable_tensors(policy: torch.nn.Module) -> tuple[list[str], dict[str, str], Callable[[str], torch.Tensor]]:
    """(the trained parameters' names, tied name -> the first of its names in sorted order, ``whole(name)``):
    the names and ties of :func:`trainable_state`, and one whole CPU tensor at a time. ``whole`` gathers a
    sharded (DTensor) parameter, a collective: every rank asks for the same names in the same order."""
    policy = unwrap(policy)
    params = dict(policy.named_parameters(remove_duplicate=False))
    names = sorted(name for name, p in params.items() if p.requires_grad)
    first: dict[int, str] = {}
    aliases = {name: first.setdefault(id(params[name]), name) for name in names}
    aliases = {name: kept for name, kept in aliases.items() if kept != name}

    def whole(name: str) -> torch.Tensor:
        tensor = params[name].detach()
        return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()

    return names, aliases, whole


def load_trainable_state(policy: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put full tensors (a checkpoint's) into the trained parameters; each rank keeps its shard under FSDP2.

    A sharded (DTensor) parameter gets only this rank's part of its full tensor, sliced on the CPU (from the
    memory-mapped checkpoint, so only that part is read) and copied into the local shard: no rank moves a
    whole tensor to its device, and no collective runs. ``set_model_state_dict`` would move each full tensor
    to the device on every rank before cutting it. The other parameters go through ``set_model_state_dict``.
    """
    policy = unwrap(policy)
    expected = _trained_names(policy)
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    params = dict(policy.named_parameters(remove_duplicate=False))
    sharded = {name for name in state if isinstance(params[name], DTensor)}
    for name in sorted(sharded):
        _copy_shard(name, params[name], state[name])
    rest = {name: tensor for name, tensor in state.items() if name not in sharded}
    if rest:
        set_model_state_dict(policy, rest, options=_FROM_FULL)


def _local_part(name: str, param: DTensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, a whole tensor of the sharded parameter ``param``'s shape (its value or
    one of its optimizer moments): a view, so that only that part is read from a memory-mapped file."""
    if tuple(full.shape) != tuple(param.shape):
        raise ConfigError(f"checkpoint does not fit the model: {name} has shape {tuple(full.shape)}, the "
                          f"model's is {tuple(param.shape)}")
    # the offsets of this rank's part, as torch computes them to load a sharded state dict
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return full[tuple(slice(start, start + size) for size, start in zip(shape, offset))]


@torch.no_grad()
def _copy_shard(name: str, param: DTensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor ``full`` into the sharded parameter ``param``."""
    param.detach().to_local().copy_(_local_part(name, param, full))


def load_optimizer_state(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put an optimizer state of full tensors (a checkpoint's) into ``optimizer``; under FSDP2 each rank keeps
    its part of every moment of a sharded parameter.

    Each moment of a sharded (DTensor) parameter becomes this rank's rows of the full tensor, sliced on the CPU
    (from the memory-mapped optimizer.pt, so only those rows are read) and wrapped as a DTensor laid out like
    the parameter; no collective runs. ``set_optimizer_state_dict`` of full tensors would move every whole
    moment to every rank's device and scatter rank 0's copy. The other parameters' moments load whole. The
    optimizer gets copies: once ``state`` is dropped, nothing maps the checkpoint's file.
    """
    policy = unwrap(policy)
    params = dict(policy.named_parameters(remove_duplicate=False))

    def as_held(name: str, value):
        # copies: the optimizer must own its state, not hold pages of the mapped file for the rest of the run
        # (the mapping would keep a pruned checkpoint's disk space, and AdamW's in-place updates would write
        # into it, privately or not as the mapping was made)
        param = params.get(name)
        if not isinstance(value, torch.Tensor):
            return value
        if param is None or not value.dim():
            return value.clone()  # a step count, kept where it was loaded (AdamW moves it if it must)
        if not isinstance(param, DTensor):
            return value.to(param.device, copy=True)  # a parameter every rank holds whole
        part = _local_part(name, param, value).to(param.device, copy=True)
        return DTensor.from_local(part, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride())

    held = {name: {key: as_held(name, value) for key, value in per_param.items()}
            for name, per_param in state["state"].items()}
    set_optimizer_state_dict(policy, optimizer, {"state": held, "param_groups": state["param_groups"]},
                             options=_AS_HELD)


def draw_generator(seed: int) -> np.random.Generator:
    """The generator that draws a run's task ids: seeded alike on every rank (docs/maths.md section 8)."""
    return np.random.default_rng([seed, 0x5eed])


@dataclass
class TrainState:
    """Policy, optimizer, schedule, mixer, sampler and draw generator after ``step`` optimizer steps."""

    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mixer: Mixer
    sampler: TaskSampler
    draw_rng: np.random.Generator
    step: int = 0

    @classmethod
    def fresh(cls, policy: torch.nn.Module, optim: OptimConfig, mixer: Mixer, task_sizes: list[int], seed: int,
              task_names: list[str] | None = None) -> "TrainState":
        """Step 0 of a run: AdamW on the trainable parameters, the schedule, a seeded sampler and generator.

        Seeds torch's global generator too (dropout, if a policy has any, draws from it).
        """
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, optim.max_steps, optim.warmup_steps, optim.min_lr_rate))
        sampler = TaskSampler(task_sizes, seed, task_names)
        draw_rng = draw_generator(seed)
        torch.manual_seed(seed)
        return cls(policy, optimizer, scheduler, mixer, sampler, draw_rng)

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The trained parameters, in the optimizer's order."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """Everything :meth:`load_state_dict` needs, under the names :func:`save_checkpoint` takes.

        A collective (gathers shards): every rank calls it; with several ranks only rank 0 receives the model
        and optimizer tensors, the others get empty dicts for them.
        """
        return {"step": self.step,
                "model_state": trainable_state(self.policy, every_rank=False),
                "optimizer_state": get_optimizer_state_dict(unwrap(self.policy), self.optimizer,
                                                            options=_FOR_RANK_0),
                "scheduler_state": self.scheduler.state_dict(),
                "mixer_state": self.mixer.state_dict(),
                "sampler_state": self.sampler.state_dict(),
                "rng_states": capture_rng_states({"draw": self.draw_rng})}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a :meth:`state_dict`, e.g. a checkpoint's, read on every rank)."""
        load_trainable_state(self.policy, state["model_state"])
        load_optimizer_state(self.policy, self.optimizer, state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        self.mixer.load_state_dict(state["mixer_state"])
        self.sampler.load_state_dict(state["sampler_state"])
        restore_rng_states(state["rng_states"], {"draw": self.draw_rng})
        self.step = int(state["step"])

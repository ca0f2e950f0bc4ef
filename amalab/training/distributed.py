"""Several processes under ``torchrun``: who this rank is, the one all-reduce of mixer statistics, agreement.

docs/maths.md section 8: every rank draws the global batch's task ids from one identically seeded generator and
takes its own slots (rank, rank + W, ...); per-task statistics travel as one float64 array in one
all-reduce (SUM), so every rank applies the same update and holds bit-identical mixer state.
Backends: nccl on CUDA, gloo on CPU. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything
here degrades to a single process and touches no ``torch.distributed`` state.

Parameters, two ways (``[model] fsdp``):
* replicated (default): every rank holds the whole model; after the backward passes the gradients are
  summed over ranks (:func:`all_reduce_gradients`), so the update is that of the whole global batch.
* sharded with FSDP2 (:func:`shard_policy`): each of the layers the caller names is its own ``fully_shard``
  unit, and the root unit is :class:`ShardedPolicy`, a module whose forward is the policy's forward function
  (for a causal LM, its sequence log-probs). It has to be: a log-prob computation that calls the backbone
  and the LM head directly skips the root module's forward hook, in which FSDP2 unshards the root's own
  parameters (embeddings, final norm, head). FSDP2 divides reduced gradients by the world size; we set the divide factor to 1
  (with plain SUM collectives, which gloo needs), so the gradient is the same sum as in the replicated case.
Checkpoints hold full (unsharded) tensors either way (:mod:`amalab.training.state`), so a run saved on W
ranks, sharded or not, continues on any number of ranks, sharded or not.

Decisions every rank must share (is this run finished, which checkpoint to continue from, may this folder
be continued) are taken once, by :func:`decide_on_rank0`, or checked on every rank by :func:`on_every_rank`;
either way an error raises the same error on every rank at once, never on one rank while the others wait in
a collective. What still waits (a rank that died) fails after the process group's timeout (``ddp_timeout``).
docs/distributed.md, "Decisions every rank shares".
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: the oldest torch with every FSDP2, DTensor and distributed-checkpoint call amalab makes: the newest of
#: them, FSDPModule.set_force_sum_reduction_for_comms (and set_gradient_divide_factor, renamed in the same
#: change, pytorch PR #155915), first shipped in torch 2.8; pyproject.toml's floor is the same
#: (tests/test_dependencies.py)
MIN_TORCH = (2, 8)


def check_torch_version(version: str | None = None) -> None:
    """Refuse, in one line, a torch older than :data:`MIN_TORCH` (``version``: the installed torch's)."""
    version = torch.__version__ if version is None else str(version)
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) < MIN_TORCH:
        needed = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"amalab.training.distributed needs torch>={needed} (FSDP2's "
                          f"set_force_sum_reduction_for_comms); found torch {version}: upgrade torch")


# before torch.distributed.fsdp, whose names an older torch lacks: this line rather than their ImportError
check_torch_version()

import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402

from amalab.training.tensor_identity import state_digest  # noqa: E402

#: seconds a collective waits for the other ranks before it fails (the config's ``ddp_timeout``): gloo's
#: default, and transformers' ``ddp_timeout``; nccl's own default is 10 minutes
PROCESS_GROUP_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: torch.device, timeout_s: float = PROCESS_GROUP_TIMEOUT_S) -> World:
    """Join the process group ``torchrun`` describes (nccl on CUDA, gloo otherwise), or stay single.

    ``timeout_s``: how long a collective waits for the other ranks before it fails (docs/distributed.md), so
    that a rank that stopped alone ends the run rather than holding the others for the backend's default.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank, size, local_rank)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_slots(n: int, world: World) -> np.ndarray:
    """Indices of this rank's slots in a global batch of ``n``: rank, rank + W, ... (each task stays spread)."""
    return np.arange(world.rank, n, world.size)


def all_reduce_sum(values: np.ndarray, world: World) -> np.ndarray:
    """Sum a float64 array over the ranks in one all-reduce (identity on a single process)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    if not world.distributed:
        return values
    # gloo and nccl both reduce float64; on CUDA the buffer must live on the device
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buffer = torch.from_numpy(values.copy()).to(device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.cpu().numpy().reshape(values.shape)


def check_ranks_agree(state: dict[str, np.ndarray], world: World, what: str = "mixer state") -> None:
    """Raise on every rank if the ranks do not hold bit-identical ``state``."""
    if not world.distributed:
        return
    digests = [None] * world.size
    dist.all_gather_object(digests, state_digest(state))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks disagree on the {what}: digests {digests}")


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank if ``flag`` is true on any rank (one all-reduce)."""
    return bool(all_reduce_sum(np.array([float(flag)]), world)[0] > 0)


# --- decisions every rank shares (docs/distributed.md) ---------------------------------------------------

def _portable(error: Exception) -> Exception:
    """``error`` if a copy of it can travel to the other ranks (pickled and rebuilt), else a RuntimeError
    with its type and text: every rank then raises an error of the same type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # an exception whose constructor cannot be called again from its args
        return RuntimeError(f"{type(error).__name__}: {error}")


def _raise_own(error: Exception, portable: Exception):
    """On the rank where ``error`` happened: raise the error the other ranks raise, keeping its traceback."""
    if portable is error:
        raise error
    raise portable from error


def decide_on_rank0(world: World, fn: Callable[[], Any]) -> Any:
    """Rank 0's ``fn()`` on every rank: rank 0 alone runs it and broadcasts its result (which must pickle)
    or its error, which every rank then raises. One process: ``fn()``.

    For what every rank must decide alike from files only rank 0 is sure to see (it writes them), and for
    rank 0's writes whose failure must stop every rank at once (docs/distributed.md).
    """
    if not world.distributed:
        return fn()
    message, own = [None], None
    if world.is_main:
        try:
            message[0] = (True, fn())
        except Exception as e:
            own, message[0] = e, (False, _portable(e))
    dist.broadcast_object_list(message, src=0)
    ok, value = message[0]
    if ok:
        return value
    if own is not None:
        _raise_own(own, value)
    raise value from None


def on_every_rank(world: World, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, returning this rank's result; if it raises on any rank, every rank raises the
    error of the lowest such rank (one all-gather). One process: ``fn()``.

    For what every rank must do from its own files (read a checkpoint rank 0 named): a rank that cannot
    stops every rank with its error instead of leaving them in the next collective (docs/distributed.md).
    """
    if not world.distributed:
        return fn()
    result, own, portable = None, None, None
    try:
        result = fn()
    except Exception as e:
        own, portable = e, _portable(e)
    errors = [None] * world.size
    dist.all_gather_object(errors, portable)
    failed = [rank for rank, error in enumerate(errors) if error is not None]
    if not failed:
        return result
    if failed[0] == world.rank:
        _raise_own(own, portable)
    raise errors[failed[0]] from None


def all_reduce_gradients(params: list[torch.Tensor], world: World) -> None:
    """Sum every parameter's gradient over the ranks (a parameter without one counts as zeros).

    One all-reduce per parameter tensor: on CPU/gloo one flattened buffer was not faster where it mattered
    (experiments/llm_allreduce_timing/README.md); on GPUs (nccl) measure again, or use FSDP.
    """
    if not world.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


# --- FSDP2 --------------------------------------------------------------------------------------------

class ShardedPolicy(torch.nn.Module):
    """The FSDP2 root around a policy: ``forward(batch)`` is ``forward_fn(policy, batch)``.

    Calling the root module (not its submodules) is what lets FSDP2 all-gather the root's parameters before
    the policy's forward function runs, and reduce their gradients after the backward pass (module docstring).
    """

    def __init__(self, policy: torch.nn.Module, forward_fn: Callable[[torch.nn.Module, Any], Any]):
        super().__init__()
        self.policy, self.forward_fn = policy, forward_fn

    def forward(self, batch):
        return self.forward_fn(self.policy, batch)


def shard_policy(model: torch.nn.Module, world: World, layers: Iterable[torch.nn.Module],
                 forward_fn: Callable[[torch.nn.Module, Any], Any]) -> ShardedPolicy:
    """Shard ``model`` over the ranks with FSDP2: one unit per module of ``layers``, the rest in the root,
    whose forward is ``forward_fn(model, batch)``.

    Gradients are reduced as a SUM over ranks (divide factor 1), as in the replicated case.
    """
    if not world.distributed:
        raise ValueError("fsdp needs several processes: launch with torchrun --nproc-per-node N (N >= 2)")
    for layer in layers:
        fully_shard(layer)
    root = fully_shard(ShardedPolicy(model, forward_fn))
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # a divide factor becomes NCCL's PreMulSum, which gloo lacks; plain SUM with a (no-op) scaling works
            module.set_force_sum_reduction_for_comms(True)
    return root


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The policy itself (its parameter names are those of checkpoints), sharded or not."""
    return model.policy if isinstance(model, ShardedPolicy) else model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, ShardedPolicy)

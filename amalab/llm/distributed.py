"""Several processes under ``torchrun``: who this rank is, the one all-reduce of mixer statistics, agreement.

docs/maths.md section 8: every rank draws the global batch's task ids from one identically seeded generator and
takes its own slots (rank, rank + W, ...); per-task statistics travel as one float64 array in one
all-reduce (SUM), so every rank applies the same update and holds bit-identical mixer state.
Backends: nccl on CUDA, gloo on CPU. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything
here degrades to a single process and touches no ``torch.distributed`` state.

Parameters, two ways (``[model] fsdp``):
* replicated (default): every rank holds the whole model; after the backward passes the gradients are
  summed over ranks (:func:`all_reduce_gradients`), so the update is that of the whole global batch.
* sharded with FSDP2 (:func:`shard_policy`): each decoder layer is its own ``fully_shard`` unit, and the root
  unit is :class:`ShardedPolicy`, a module whose forward computes the sequence log-probs. It has to be: our
  log-prob computation calls the backbone and the LM head directly (``sequence_logps``), and FSDP2 unshards
  the root's own parameters (embeddings, final norm, head) in the root module's forward hook, which calling
  submodules would skip. FSDP2 divides reduced gradients by the world size; we set the divide factor to 1
  (with plain SUM collectives, which gloo needs), so the gradient is the same sum as in the replicated case.
Checkpoints hold full (unsharded) tensors either way (:mod:`amalab.llm.train_state`), so a run saved on W
ranks, sharded or not, continues on any number of ranks, sharded or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from amalab.llm.tensor_identity import state_digest

from amalab.llm.tensor_identity import state_digest


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


def init_world(device: torch.device) -> World:
    """Join the process group ``torchrun`` describes (nccl on CUDA, gloo otherwise), or stay single."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


def all_reduce_gradients(params: list[torch.Tensor], world: World) -> None:
    """Sum every parameter's gradient over the ranks (a parameter without one counts as zeros).

    One all-reduce per parameter tensor. Measured against one flattened buffer on CPU/gloo, 2 ranks on 2
    shared cores (experiments/llm_allreduce_timing/time_allreduce.py): at SmolLM2-135M's 272 tensors the
    flattened buffer is slower (median 2.0 s against 1.34 s: the concatenation and the copy back cost more than
    the 271 saved calls), at the tiny model's 21 tensors faster (1.8 ms against 11 ms, small next to a step).
    So the simpler one stays; on GPUs (nccl) measure again, or use FSDP, which reduces per decoder layer.
    """
    if not world.distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


# --- FSDP2 --------------------------------------------------------------------------------------------

class ShardedPolicy(torch.nn.Module):
    """The FSDP2 root around a policy: ``forward(batch)`` is ``sequence_logps(policy, batch)``.

    Calling the root module (not its submodules) is what lets FSDP2 all-gather the root's parameters before
    the backbone and the head run, and reduce their gradients after the backward pass (module docstring).
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch):
        from amalab.llm.logprobs import sequence_logps

        return sequence_logps(self.policy, batch)


def shard_policy(model: torch.nn.Module, world: World) -> ShardedPolicy:
    """Shard ``model`` over the ranks with FSDP2: one unit per decoder layer, the rest in the root.

    Gradients are reduced as a SUM over ranks (divide factor 1), as in the replicated case.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from amalab.llm.models import decoder_layers

    if not world.distributed:
        raise ValueError("fsdp needs several processes: launch with torchrun --nproc-per-node N (N >= 2)")
    for layer in decoder_layers(model):
        fully_shard(layer)
    root = fully_shard(ShardedPolicy(model))
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # a divide factor becomes NCCL's PreMulSum, which gloo lacks; plain SUM with a (no-op) scaling works
            module.set_force_sum_reduction_for_comms(True)
    return root


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The policy itself (its parameter names are those of checkpoints), sharded or not."""
    return model.policy if isinstance(model, ShardedPolicy) else model


def policy_logps(model: torch.nn.Module, batch):
    """Sequence log-probs of a policy, through the FSDP root when it is sharded (see :class:`ShardedPolicy`)."""
    from amalab.llm.logprobs import sequence_logps

    return model(batch) if isinstance(model, ShardedPolicy) else sequence_logps(model, batch)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, ShardedPolicy)

"""Several processes under ``torchrun``: who this rank is, the one all-reduce of mixer statistics, agreement.

Spec section 8: every rank draws the global batch's task ids from one identically seeded generator and
takes its own slots (rank, rank + W, ...); per-task statistics travel as one float64 array in one
all-reduce (SUM), so every rank applies the same update and holds bit-identical mixer state.
Backends: nccl on CUDA, gloo on CPU. Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything
here degrades to a single process and touches no ``torch.distributed`` state.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


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


def state_digest(state: dict[str, np.ndarray]) -> str:
    """A hash of a mixer state's exact bytes, to compare across ranks."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(np.ascontiguousarray(state[key]).tobytes())
    return h.hexdigest()


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

"""When two named tensors are one: shared storage (tied weights) and equal bytes (digests).

Tied weights (an LM head that *is* the embedding matrix, as in SmolLM2) appear in a state dict under two
names with one storage. Checkpoints store them once, fingerprints hash them once, merges merge them once:
all of them ask :func:`tied_aliases`. :func:`state_digest` is the one hash of a state's exact bytes, for
cache keys, model fingerprints and the check that every rank holds the same mixer state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch


def storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when they are views of the same memory with the same layout."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def tied_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """name -> the first name (in ``state``'s order) that is the same tensor, for every name but the first.

    Empty tensors are never tied (they share no memory that matters, and all have data pointer 0).
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        kept = first.setdefault(storage_key(tensor), name)
        if kept != name:
            aliases[name] = kept
    return aliases


def _as_bytes(value) -> tuple[str, tuple, bytes]:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        return str(value.dtype), tuple(value.shape), value.reshape(-1).view(torch.uint8).numpy().tobytes()
    value = np.ascontiguousarray(value)
    return str(value.dtype), value.shape, value.tobytes()


def state_digest(state: Mapping[str, torch.Tensor | np.ndarray], prefix: str = "") -> str:
    """SHA-256 of ``prefix`` and every (name, dtype, shape, bytes) of ``state`` in sorted name order.

    A tied tensor (torch only) is hashed once, its alias recorded by name, so tying is part of the digest.
    Every byte is hashed, not a sample: a sample misses sparse changes (a few embedding rows touched by
    fine-tuning), and a cache reused for another model is the failure digests guard against.
    """
    # aliases by sorted name, so the digest does not depend on the order of ``state``
    aliases = tied_aliases({name: state[name] for name in sorted(state) if isinstance(state[name], torch.Tensor)})
    return streamed_digest(state, aliases, state.__getitem__, prefix)


def streamed_digest(names: Iterable[str], aliases: Mapping[str, str],
                    value_of: Callable[[str], torch.Tensor | np.ndarray], prefix: str = "") -> str:
    """:func:`state_digest` of the state whose tensor ``name`` is ``value_of(name)``, asked for one name at a
    time in sorted order, never for an alias: a caller that gathers each tensor (a sharded model) holds one
    whole tensor at a time, not the whole model."""
    digest = hashlib.sha256(prefix.encode())
    for name in sorted(names):
        if name in aliases:
            digest.update(f"{name}|alias of {aliases[name]}".encode())
            continue
        dtype, shape, data = _as_bytes(value_of(name))
        digest.update(f"{name}|{dtype}|{shape}".encode())
        digest.update(data)
    return digest.hexdigest()

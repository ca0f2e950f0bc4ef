"""Device and dtype policy of the LLM half: which device, which parameter dtype, which autocast.

Parameters stay in float32 (the optimizer's master weights); the forward runs under the autocast of
``[model] autocast`` (:func:`autocast_context`): ``"auto"`` is bf16 on CUDA and plain float32 on CPU,
``"bf16"`` is bf16 on both (torch's CPU autocast; its speed and its log-prob error against float32 on SmolLM2:
benchmarks/README.md), ``"none"`` is float32 on both. Sequence log-probs apply the LM head in float32 in
every case (see :mod:`amalab.llm.logprobs`, docs/maths.md section 9).
"""

from __future__ import annotations

import contextlib

import torch

from amalab.errors import ConfigError
from amalab.llm.config import check_autocast


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU. An explicit CUDA device without CUDA is an error."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise ConfigError(
                f"device: {device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1')"
            ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for CUDA, but torch sees no CUDA device")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The parameter dtype: always float32 on every device (the optimizer's master weights; CUDA adds bf16
    autocast)."""
    names = {"float32": torch.float32, "fp32": torch.float32}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ConfigError(f"dtype: {dtype!r} is not one of {sorted(names)}; parameters stay float32 "
                              "(CPU runs keep float32, CUDA runs add bf16 autocast)")
        dtype = names[dtype]
    if dtype != torch.float32:
        raise ConfigError(f"dtype: {dtype}; parameters stay float32 (CPU runs keep float32 parameters; CUDA runs "
                          "add bf16 autocast)")
    return dtype


def autocast_dtype(device: str | torch.device, setting: str = "auto") -> torch.dtype | None:
    """The dtype the forward autocasts to under ``setting`` on ``device``; None for plain float32."""
    try:
        check_autocast(setting)
    except ValueError as error:
        raise ConfigError(f"[model] {error}") from None
    device = torch.device(device) if isinstance(device, str) else device
    if setting == "bf16" or setting == "auto" and device.type == "cuda":
        return torch.bfloat16
    return None


def autocast_manifest(device: str | torch.device, setting: str = "auto") -> dict[str, str]:
    """What a cache manifest records of the autocast: nothing for plain float32 (manifests written before
    ``[model] autocast`` existed stay valid), else ``{"autocast": "bfloat16"}``."""
    dtype = autocast_dtype(device, setting)
    return {} if dtype is None else {"autocast": str(dtype).removeprefix("torch.")}


def autocast_context(device: str | torch.device, setting: str = "auto"):
    """The autocast context of ``setting`` ("auto", "bf16" or "none") on ``device``; parameters stay float32."""
    device = torch.device(device) if isinstance(device, str) else device
    dtype = autocast_dtype(device, setting)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

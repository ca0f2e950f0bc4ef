"""Model merging of the per-task specialists: the merge baselines of docs/maths.md (18)-(21).

With base weights theta_0 and specialists theta_1..theta_k, task vectors tau_i = theta_i - theta_0
(Ilharco et al. 2023, "Editing models with task arithmetic"), every method works tensor by tensor, in
float32, and returns float32 tensors (``load_state_dict`` casts them to the model's dtype):

- ``linear``: theta = sum_i w_i theta_i (weights default uniform, 1/k; a plain weight average);
- ``task_arithmetic``: theta = theta_0 + scale * sum_i w_i tau_i (weights default 1);
- ``ties`` (Yadav et al. 2023, "TIES-Merging"): trim each tau_i to its ``density`` fraction of largest
  magnitudes, elect the sign of every entry as the sign of the sum of the trimmed values (a zero sum
  elects +), then the disjoint mean: the mean of w_i * trimmed_i over the specialists whose trimmed entry
  is nonzero and has the elected sign (0 where none); theta = theta_0 + scale * merged;
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024, "Language models are super Mario", DARE): drop each
  entry of tau_i with probability ``drop`` and rescale the kept ones by 1 / (1 - drop), so that the
  expectation is tau_i; then task arithmetic, or TIES's sign election and disjoint mean (no magnitude
  trim, as in PEFT's ``dare_ties``).

Conventions, stated because papers and libraries differ:

- trim count: a tensor of n entries keeps exactly k = ceil(density * n) entries (density * n rounded
  to 9 decimals first, so that 0.3 * 10 keeps 3), at least one for any density > 0; ties in magnitude
  are broken by ``torch.topk``. PEFT keeps int(density * n) (floor); the two agree when density * n is an
  integer. The trim is per tensor, as in PEFT (TIES's reference code trims the whole flattened model).
- TIES with density 1 and no sign conflict, every tau_i nonzero: the disjoint mean is (1/k) sum_i tau_i,
  so ``ties`` at scale lambda equals ``task_arithmetic`` at scale lambda / k (a mean, not a sum).
- the sign is elected on the trimmed (unweighted) values, weights enter the disjoint mean (as PEFT).
- DARE masks come from a ``torch.Generator`` seeded from (seed, specialist index, parameter name), so a
  merge is reproducible and does not depend on the order of the state dict or on the global RNG.
- tied parameters (two names sharing one storage in the base, e.g. a tied LM head) are merged once and
  stay tied.
- tensors that are not floating point (integer buffers) must be equal in every model and are copied.

LoRA specialists: :func:`amalab.llm.lora_merge.lora_dense_state_dict` folds an adapter into dense weights, so
merging dense LoRA specialists merges their dense deltas B_i A_i * scaling_i; unadapted tensors have
tau_i = 0 and stay at theta_0 under every method (the trim is per tensor, so a zero tensor takes no share
of another's budget).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

from amalab.errors import ConfigError
from amalab.training.tensor_identity import tied_aliases

MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
#: the merges that draw random drop masks (one per seed); the others are deterministic
RANDOM_METHODS = ("dare_linear", "dare_ties")


# --- the pieces ----------------------------------------------------------------------------------------

def trim_count(numel: int, density: float) -> int:
    """Entries kept by the TIES trim: ceil(density * numel), see the module docstring."""
    return min(numel, math.ceil(round(density * numel, 9)))


def trim_to_top_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``trim_count`` largest-magnitude entries set to zero (TIES "trim")."""
    flat = tensor.reshape(-1)
    keep = trim_count(flat.numel(), density)
    if keep >= flat.numel():
        return tensor.clone()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), keep, largest=True, sorted=False).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(tensor.shape)


def dare_drop(tensor: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry dropped with probability ``drop`` (uniform draws from ``generator``), the kept ones
    rescaled by 1 / (1 - drop), so that the expectation is ``tensor``."""
    if drop == 0:
        return tensor.clone()
    uniform = torch.rand(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.device)
    return torch.where(uniform >= drop, tensor / (1.0 - drop), torch.zeros_like(tensor))


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """TIES "elect": per entry, the sign (+1 / -1) of the sum over the specialists (dim 0); a zero sum: +1."""
    return torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0).to(stacked.dtype)


def disjoint_mean(stacked: torch.Tensor, weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """TIES "disjoint merge": the mean of ``weighted`` over the specialists whose ``stacked`` entry has the
    elected sign (zeros never agree); 0 where no specialist agrees."""
    agree = torch.sign(stacked) == sign
    count = agree.sum(dim=0).clamp(min=1)
    return torch.where(agree, weighted, torch.zeros_like(weighted)).sum(dim=0) / count


def _dare_generator(seed: int, specialist: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"amalab.merge.dare\0{seed}\0{specialist}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# --- checks --------------------------------------------------------------------------------------------

def _check_arguments(base, specialists, method, weights, scale, density, drop, seed) -> list[float] | None:
    if method not in MERGE_METHODS:
        raise ConfigError(f"merge: unknown method {method!r}; known: {', '.join(MERGE_METHODS)}")
    if not isinstance(specialists, Sequence) or isinstance(specialists, Mapping) or not specialists:
        raise ConfigError("merge: give a non-empty list of specialist state dicts")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"merge: density must lie in (0, 1], got {density!r}")
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop < 1:
        raise ConfigError(f"merge: drop must lie in [0, 1), got {drop!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ConfigError(f"merge: scale must be a finite number, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"merge: seed must be an integer, got {seed!r}")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(specialists):
            raise ConfigError(f"merge: {len(weights)} weights for {len(specialists)} specialists")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                   for w in weights):
            raise ConfigError(f"merge: weights must be finite numbers, got {weights!r}")
        weights = [float(w) for w in weights]
    for index, specialist in enumerate(specialists, start=1):
        missing = [name for name in base if name not in specialist]
        if missing:
            raise ConfigError(f"merge: specialist {index} lacks parameter {missing[0]} of the base")
        extra = [name for name in specialist if name not in base]
        if extra:
            raise ConfigError(f"merge: specialist {index} has parameter {extra[0]}, which the base lacks")
        for name, tensor in base.items():
            other = specialist[name]
            if tuple(other.shape) != tuple(tensor.shape):
                raise ConfigError(f"merge: parameter {name} has shape {tuple(other.shape)} in specialist "
                                  f"{index} and {tuple(tensor.shape)} in the base")
            if tensor.is_floating_point() != other.is_floating_point() or (
                    not tensor.is_floating_point() and not torch.equal(tensor, other)):
                raise ConfigError(f"merge: non-float tensor {name} differs between specialist {index} and "
                                  f"the base (only floating-point parameters are merged)")
    return weights


# --- merging -------------------------------------------------------------------------------------------

def merge_tensor(name: str, base: torch.Tensor, specialists: Sequence[torch.Tensor], method: str, *,
                 weights: Sequence[float] | None, scale: float, density: float, drop: float,
                 seed: int) -> torch.Tensor:
    """The merged float32 value of one parameter (arguments already checked; see the module docstring)."""
    base = base.float()
    count = len(specialists)
    if method == "linear":
        w = weights if weights is not None else [1.0 / count] * count
        return sum(wi * s.float() for wi, s in zip(w, specialists))
    w = torch.tensor(weights if weights is not None else [1.0] * count, dtype=torch.float32,
                     device=base.device).reshape((count,) + (1,) * base.dim())
    taus = torch.stack([s.float() - base for s in specialists])
    if method == "ties":
        taus = torch.stack([trim_to_top_magnitude(t, density) for t in taus])
    elif method in ("dare_linear", "dare_ties"):
        taus = torch.stack([dare_drop(t, drop, _dare_generator(seed, i, name)) for i, t in enumerate(taus)])
    if method in ("task_arithmetic", "dare_linear"):
        merged = (w * taus).sum(dim=0)
    else:  # ties, dare_ties
        merged = disjoint_mean(taus, w * taus, elect_sign(taus))
    return base + scale * merged


def merge_state_dicts(base: Mapping[str, torch.Tensor], specialists: Sequence[Mapping[str, torch.Tensor]],
                      method: str, *, weights: Sequence[float] | None = None, scale: float = 1.0,
                      density: float = 1.0, drop: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Merge specialists that share the base's parameter names and shapes (see the module docstring).

    ``weights``: one per specialist (``linear``: default 1/k; the others: default 1). ``scale``: lambda of
    task arithmetic, TIES and DARE (unused by ``linear``). ``density``: the fraction TIES keeps, in (0, 1].
    ``drop``: DARE's drop probability, in [0, 1). ``seed``: DARE's masks.
    Bad input (unknown method, different names or shapes, knobs out of range) raises a one-line
    :class:`ConfigError`.
    """
    weights = _check_arguments(base, specialists, method, weights, scale, density, drop, seed)
    alias = tied_aliases(base)
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in base.items():
            if name in alias:
                merged[name] = merged[alias[name]]
            elif not tensor.is_floating_point():
                merged[name] = tensor.detach().clone()
            else:
                merged[name] = merge_tensor(name, tensor.detach(), [s[name].detach() for s in specialists],
                                            method, weights=weights, scale=float(scale),
                                            density=float(density), drop=float(drop), seed=seed)
    return merged


__all__ = [
    "MERGE_METHODS", "RANDOM_METHODS", "disjoint_mean", "dare_drop", "elect_sign", "merge_state_dicts",
    "merge_tensor", "trim_count", "trim_to_top_magnitude",
]

"""The protocol every task mixer follows, shared by the convex lab and the LLM trainer.

A mixer decides, at each step, which tasks the batch is drawn from and how much each example's loss
counts in the parameter update. One training step of any trainer is:

    task_ids = mixer.draw(rng, batch_size)               # which task each example slot comes from
    ...draw examples uniformly from those tasks, compute their losses l(theta; z)...
    coeffs   = mixer.step(task_ids, losses, ref_losses)  # updates the mixer's state
    theta   <- theta - lr * sum_j coeffs_j * grad l(theta; z_j)

``ref_losses`` are the cached per-example losses the mixer's ``reference`` names: the task's specialist
(AMA), the shared pi_ref (DoReMi-style) or nothing (``"zero"``: plain training loss). Mixers are plain
numpy objects with explicit state (``state_dict`` / ``load_state_dict``); every array may carry leading
``batch_shape`` dimensions so that many independent runs advance in one call.
"""

from __future__ import annotations

import abc
import operator

import numpy as np

REFERENCES = ("specialist", "base", "zero")


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"the number of tasks k must be an integer >= 1, got {k!r}")
    return int(k)


def check_reference(reference: str) -> str:
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}; got {reference!r}")
    return reference


def per_run(value, batch_shape: tuple[int, ...], name: str, low: float, high: float,
            low_open: bool = False) -> np.ndarray:
    """A hyperparameter given once or per run, checked to lie in its range, shaped ``batch_shape + (1,)``."""
    arr = np.asarray(value, dtype=float)
    try:
        arr = np.broadcast_to(arr, batch_shape)
    except ValueError:
        raise ValueError(f"{name} has shape {arr.shape}, which does not fit the runs' shape {batch_shape}")
    below = arr <= low if low_open else arr < low
    outside = below | (arr > high) | ~np.isfinite(arr)
    if np.any(outside):
        bad = arr[outside].flat[0]
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high == np.inf else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {bad:g}")
    return arr[..., None].copy()


class Stateful:
    """Explicit, exactly restorable state: the arrays named by ``state_keys``."""

    #: attribute paths (``"eg.log_weights"``) of the arrays that make up the state
    state_keys: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {key: np.array(operator.attrgetter(key)(self), copy=True) for key in self.state_keys}

    def load_state_dict(self, state: dict) -> None:
        name = type(self).__name__
        missing = set(self.state_keys) - set(state)
        unexpected = set(state) - set(self.state_keys)
        if missing or unexpected:
            raise ValueError(f"{name} state: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
        for key in self.state_keys:
            current = operator.attrgetter(key)(self)
            value = np.asarray(state[key], dtype=np.asarray(current).dtype)
            if value.shape != np.shape(current):
                raise ValueError(f"{name} state {key!r} has shape {value.shape}, expected {np.shape(current)}")
            owner, _, attr = key.rpartition(".")
            setattr(operator.attrgetter(owner)(self) if owner else self, attr, value.copy())


class Mixer(Stateful, abc.ABC):
    """Base class of the task mixers: see the module docstring for the protocol."""

    k: int
    reference: str
    batch_shape: tuple[int, ...]

    @abc.abstractmethod
    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """Task ids of the next batch, shape ``batch_shape + (batch_size,)``."""

    @abc.abstractmethod
    def step(self, task_ids: np.ndarray, losses: np.ndarray, ref_losses: np.ndarray | None = None
             ) -> np.ndarray:
        """Consume one batch's per-example losses; return per-example gradient coefficients."""

    @property
    @abc.abstractmethod
    def weights(self) -> np.ndarray:
        """Current task weights (the mixture alpha or the sampling distribution p), ``(..., k)``."""

    @property
    @abc.abstractmethod
    def average_weights(self) -> np.ndarray:
        """Mean of the task weights the parameter steps used so far (the current ones before any step)."""

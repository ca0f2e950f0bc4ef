"""The protocol every task mixer follows, shared by the convex lab and the LLM trainer.

A mixer decides, at each step, which tasks the batch is drawn from and how much each example's loss
counts in the parameter update. It splits into pure pieces (docs/maths.md section 8), so that a trainer with
gradient accumulation or several ranks combines them exactly:

    task_ids = mixer.draw(rng, batch_size)                  # which task each example slot comes from
    ...draw examples of those tasks, compute their losses l(theta; z) and cached baseline losses s(z)...
    stats    = mixer.statistics(task_ids, losses, baseline_losses)   # additive over micro-batches, ranks
    coeffs   = mixer.coefficients(task_ids, losses, baseline_losses, counts)   # pure: current weights
    mixer.update(stats)                                     # once per optimizer step, global statistics
    theta   <- theta - lr * sum_j coeffs_j * grad l(theta; z_j)

``step(task_ids, losses, baseline_losses)`` is that composition for one whole batch. Mixers whose
``update_first`` is true (sequential AMA-R: theta steps with alpha_{t+1}) update before computing the
coefficients; the others use the weights in force when the batch was drawn.

``baseline`` names the cached per-example losses s(z) the excess is measured against: the task's
specialist (AMA), the model trained on the standard mixture (DoReMi-style) or nothing (``"none"``: raw
loss). Mixers are plain numpy objects with explicit, validated state (``state_dict`` / ``load_state_dict``);
every array may carry leading ``batch_shape`` dimensions so that many independent runs advance in one call.
"""

from __future__ import annotations

import abc
import operator

import numpy as np

from amalab.mixers.excess import COUNT, check_finite_losses, task_statistics
from amalab.mixers.task_batches import TaskLayout

BASELINES = ("specialist", "standard", "none")


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"the number of tasks k must be an integer >= 1, got {k!r}")
    return int(k)


def check_baseline(baseline: str) -> str:
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}; got {baseline!r}")
    return baseline


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


# ------------------------------------------------------------------------------------ state checks

def require_finite(name: str, value: np.ndarray) -> None:
    if not np.all(np.isfinite(value)):
        raise ValueError(f"state {name!r} holds a non-finite value")


def require_nonnegative(name: str, value: np.ndarray) -> None:
    require_finite(name, value)
    if np.any(value < 0):
        raise ValueError(f"state {name!r} holds a negative value ({np.min(value):g})")


def require_log_simplex(name: str, log_weights: np.ndarray, tol: float = 1e-9) -> None:
    """Log-weights of a distribution: finite and logsumexp = 0 on every row."""
    require_finite(name, log_weights)
    top = log_weights.max(axis=-1, keepdims=True)
    total = top[..., 0] + np.log(np.exp(log_weights - top).sum(axis=-1))
    if np.any(np.abs(total) > tol):
        raise ValueError(f"state {name!r} is not normalized: logsumexp = {total.flat[np.argmax(np.abs(total))]:.3g}, "
                         "expected 0")


def require_row_sums(name: str, value: np.ndarray, steps: np.ndarray, tol: float = 1e-9) -> None:
    """A running sum of distributions over ``steps`` steps: every row sums to ``steps``."""
    require_nonnegative(name, value)
    sums = value.sum(axis=-1)
    if np.any(np.abs(sums - steps) > tol * max(1, int(steps))):
        raise ValueError(f"state {name!r} rows sum to {sums.flat[0]:.12g}, expected the step count {int(steps)}")


class Stateful:
    """Explicit, exactly restorable state: the arrays named by ``state_keys``."""

    #: attribute paths (``"eg.log_weights"``) of the arrays that make up the state
    state_keys: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {key: np.array(operator.attrgetter(key)(self), copy=True) for key in self.state_keys}

    def check_state(self, state: dict[str, np.ndarray]) -> None:
        """Raise ValueError if ``state`` (shapes and dtypes already checked) is not a state this object can hold."""

    def load_state_dict(self, state: dict) -> None:
        name = type(self).__name__
        missing = set(self.state_keys) - set(state)
        unexpected = set(state) - set(self.state_keys)
        if missing or unexpected:
            raise ValueError(f"{name} state: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
        values = {}
        for key in self.state_keys:
            current = operator.attrgetter(key)(self)
            value = np.array(state[key], dtype=np.asarray(current).dtype, copy=True)
            if value.shape != np.shape(current):
                raise ValueError(f"{name} state {key!r} has shape {value.shape}, expected {np.shape(current)}")
            values[key] = value
        try:
            self.check_state(values)
        except ValueError as e:
            raise ValueError(f"{name}: refusing to load: {e}") from None
        for key, value in values.items():
            owner, _, attr = key.rpartition(".")
            setattr(operator.attrgetter(owner)(self) if owner else self, attr, value)


class Mixer(Stateful, abc.ABC):
    """Base class of the task mixers: see the module docstring for the protocol."""

    k: int
    baseline: str
    batch_shape: tuple[int, ...]
    steps: np.ndarray
    #: whether ``step`` updates the weights before computing the coefficients (sequential AMA-R)
    update_first: bool = False

    @abc.abstractmethod
    def draw(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        """Task ids of the next batch, shape ``batch_shape + (batch_size,)``."""

    def statistics(self, task_ids: np.ndarray, losses: np.ndarray, baseline_losses: np.ndarray | None = None
                   ) -> np.ndarray:
        """Per-task (count, excess sum, difference sum) of these examples, ``(..., 3, k)`` float64.

        Additive: the statistics of a batch are the sum of those of its micro-batches (and ranks). Raises
        ValueError naming the step and task if a loss or baseline loss is not finite.
        """
        layout = TaskLayout(task_ids, self.k)
        check_finite_losses(layout, task_ids, losses, baseline_losses, int(self.steps) + 1)
        return task_statistics(layout, losses, baseline_losses)

    @abc.abstractmethod
    def coefficients(self, task_ids: np.ndarray, losses: np.ndarray, baseline_losses: np.ndarray | None = None,
                     counts: np.ndarray | None = None) -> np.ndarray:
        """Per-example gradient coefficients from the weights in force; pure (changes no state).

        ``counts`` (``(..., k)``) are the task counts of the whole (global) batch these examples belong to;
        by default those of the examples given.
        """

    @abc.abstractmethod
    def update(self, stats: np.ndarray) -> None:
        """Advance the state once, from the statistics of one whole (global) batch."""

    def step(self, task_ids: np.ndarray, losses: np.ndarray, baseline_losses: np.ndarray | None = None
             ) -> np.ndarray:
        """statistics, update and coefficients of one whole batch; returns the per-example coefficients."""
        stats = self.statistics(task_ids, losses, baseline_losses)
        counts = stats[..., COUNT, :]
        if self.update_first:
            self.update(stats)
            return self.coefficients(task_ids, losses, baseline_losses, counts)
        coeffs = self.coefficients(task_ids, losses, baseline_losses, counts)
        self.update(stats)
        return coeffs

    def check_stats(self, stats: np.ndarray) -> np.ndarray:
        stats = np.asarray(stats, dtype=float)
        if stats.shape != self.batch_shape + (3, self.k):
            raise ValueError(f"statistics must have shape {self.batch_shape + (3, self.k)}, got {stats.shape}")
        if not np.all(np.isfinite(stats)):
            bad = np.argwhere(~np.isfinite(stats))[0]
            raise ValueError(f"step {int(self.steps) + 1}: task {int(bad[-1])} has non-finite statistics")
        return stats

    @property
    @abc.abstractmethod
    def weights(self) -> np.ndarray:
        """Current task weights (the mixture alpha or the sampling distribution p), ``(..., k)``."""

    @property
    @abc.abstractmethod
    def average_weights(self) -> np.ndarray:
        """Mean of the task weights the parameter steps used so far (the current ones before any step)."""

"""Synthetic convex multi-task problems (docs/maths.md section 5).

k tasks in d dimensions. Task i has a hidden reward vector w_i (unit norm); every pair (w_i, w_j) makes
the same angle, ``conflict_angle``: 0 degrees is k copies of one task, 90 degrees orthogonal tasks, and
beyond 90 degrees the tasks pull against each other (possible up to arccos(-1 / (k - 1))).

Preference losses (dpo, ipo, hinge): each example is a pair of responses with features phi(x, y_1),
phi(x, y_2) ~ N(0, I / (2d)); the chosen one is drawn from the Bradley-Terry model
P(y_1 > y_2) = sigmoid(reward_scale * w_i . (phi_1 - phi_2)), then flipped with probability ``noise``,
and a_z = phi(x, y_w) - phi(x, y_l), rescaled to unit norm. Least squares: y = reward_scale * w_i . x + noise * N(0, 1).
Logistic: y = +-1 from the same Bradley-Terry model on x, flipped with probability ``noise``. For the
regression tasks x is drawn on the unit sphere. Unit-norm features keep the worst-case constants G and Bl
of the bounds close to typical values (Gaussian features' largest norms would inflate them).
The domain is the ball ||theta - theta_ref|| <= radius; we work with u = theta - theta_ref (theta_ref = 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
from scipy.special import expit

from amalab.convex.losses import MarginLoss, get_loss
from amalab.mixers.base import check_k
from amalab.mixers.excess import check_clip


@dataclass(frozen=True, eq=False)
class MultiTaskProblem:
    """Data of a convex multi-task problem; examples of task i are the rows ``slices[i]``."""

    loss: MarginLoss
    features: np.ndarray  # (N, d): a_z
    targets: np.ndarray  # (N,): y for least_squares / logistic, 0 for the preference losses
    task: np.ndarray  # (N,): the task of each example, sorted
    sizes: np.ndarray  # (k,)
    rewards: np.ndarray  # (k, d): hidden w_i
    radius: float
    beta: float
    #: the generator's settings, loss and seed, for the record (empty for hand-made problems)
    settings: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.sizes)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    @property
    def slices(self) -> list[slice]:
        return [slice(o, o + n) for o, n in zip(self.offsets, self.sizes)]

    def losses(self, u: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """l(u; z) for every example (or ``rows``), for u of shape ``(..., d)``."""
        a = self.features if rows is None else self.features[rows]
        y = self.targets if rows is None else self.targets[rows]
        return self.loss.value(np.einsum("...d,nd->...n", u, a), y, self.beta)

    def project(self, u: np.ndarray) -> np.ndarray:
        """Euclidean projection onto the ball ||u|| <= radius."""
        norm = np.linalg.norm(u, axis=-1, keepdims=True)
        return u * np.minimum(1.0, self.radius / np.maximum(norm, 1e-300))


def equiangular_rewards(k: int, dim: int, angle_deg: float, rng: np.random.Generator) -> np.ndarray:
    """k unit vectors in R^dim whose pairwise angles all equal ``angle_deg``, in a random orientation."""
    c = math.cos(math.radians(angle_deg))  # feasible: checked by ProblemSettings.check_for
    gram = (1.0 - c) * np.eye(k) + c * np.ones((k, k))
    eigval, eigvec = np.linalg.eigh(gram)
    coords = eigvec * np.sqrt(np.clip(eigval, 0.0, None))  # rows: the k vectors in R^k
    basis, _ = np.linalg.qr(rng.standard_normal((dim, k)))  # random orthonormal k-frame in R^dim
    return coords @ basis.T


@dataclass(frozen=True)
class ProblemSettings:
    """The knobs of the generator, with the one set of defaults every caller shares (the rate problem).

    ``clip`` is not a generator knob but part of the objective E_i (docs/maths.md section 2): it travels with the
    problem so that a config's ``[..problem]`` table describes the whole problem.
    """

    k: int = 3
    dim: int = 8
    sizes: list[int] = field(default_factory=lambda: [200, 120, 60])
    conflict_angle: float = 100.0
    noise: float = 0.1
    reward_scale: float = 4.0
    radius: float = 1.0
    beta: float = 1.0
    clip: str = "example"

    def check_for(self, loss: str) -> None:
        """Raise ValueError naming the first knob that is out of range for ``loss``."""
        family = get_loss(loss)
        k = check_k(self.k)
        check_clip(self.clip)
        sizes = np.asarray(self.sizes)
        if sizes.shape != (k,):
            raise ValueError(f"sizes must list one size per task (k={k}), got {sizes.tolist()}")
        if not np.issubdtype(sizes.dtype, np.integer) or np.any(sizes < 1):
            raise ValueError(f"sizes must be integers >= 1, got {sizes.tolist()}")
        dim = self.dim
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < k:
            raise ValueError(f"dim must be an integer >= k={k} (room for k distinct reward vectors), got {dim!r}")
        for name in ("reward_scale", "radius", "beta"):
            value = getattr(self, name)
            if not value > 0.0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        noise = self.noise
        if family.preference or loss == "logistic":
            if not 0.0 <= noise <= 0.5:
                raise ValueError(f"noise is a label-flip probability for loss {loss!r}: it must lie in [0, 0.5], "
                                 f"got {noise!r}")
        elif not (noise >= 0.0 and math.isfinite(noise)):
            raise ValueError(f"noise is the label noise std for loss {loss!r}: it must be >= 0, got {noise!r}")
        if not 0.0 <= self.conflict_angle <= 180.0:
            raise ValueError(f"conflict_angle must lie in [0, 180] degrees, got {self.conflict_angle!r}")
        c = math.cos(math.radians(self.conflict_angle))
        if k > 1 and c < -1.0 / (k - 1) - 1e-12:
            limit = math.degrees(math.acos(-1.0 / (k - 1)))
            raise ValueError(f"conflict_angle {self.conflict_angle:g} degrees is impossible for k={k} tasks: "
                             f"equal pairwise angles need angle <= {limit:.4g} degrees")


def make_problem(loss: str = "dpo", seed: int = 0, settings: ProblemSettings | None = None,
                 **knobs) -> MultiTaskProblem:
    """Generate a k-task problem from ``settings`` (default :class:`ProblemSettings`) with ``knobs``
    overriding single fields; see the module docstring for what each knob means."""
    try:
        settings = replace(settings or ProblemSettings(), **knobs)
    except TypeError:
        unknown = sorted(set(knobs) - {f.name for f in fields(ProblemSettings)})
        raise ValueError(f"unknown problem knob {unknown[0]!r}") from None
    settings.check_for(loss)
    family = get_loss(loss)
    k, dim, sizes = int(settings.k), int(settings.dim), np.asarray(settings.sizes)
    conflict_angle, noise, reward_scale = settings.conflict_angle, settings.noise, settings.reward_scale
    radius, beta = settings.radius, settings.beta

    rng = np.random.default_rng(seed)
    rewards = equiangular_rewards(k, dim, conflict_angle, rng)
    task = np.repeat(np.arange(k), sizes)
    n = int(sizes.sum())
    w = rewards[task]
    if family.preference:
        phi_1, phi_2 = rng.normal(0.0, 1.0 / math.sqrt(2 * dim), size=(2, n, dim))
        diff = phi_1 - phi_2
        first_wins = rng.random(n) < expit(reward_scale * np.einsum("nd,nd->n", w, diff))
        first_wins ^= rng.random(n) < noise
        features = np.where(first_wins[:, None], diff, -diff)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        targets = np.zeros(n)
    else:
        features = rng.normal(size=(n, dim))
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        score = reward_scale * np.einsum("nd,nd->n", w, features)
        if loss == "logistic":
            positive = rng.random(n) < expit(score)
            positive ^= rng.random(n) < noise
            targets = np.where(positive, 1.0, -1.0)
        else:
            targets = score + noise * rng.standard_normal(n)
    record = dict(loss=loss, **asdict(settings), seed=seed)
    return MultiTaskProblem(family, features, targets, task, sizes, rewards, float(radius), float(beta), record)

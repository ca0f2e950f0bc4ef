"""The Gaussian MLP policy and its sequence log-densities (docs/maths.md section 9, actions for tokens).

pi(a | o) = N(a; mu_theta(o), diag(exp(2 log_std))): an MLP (tanh) gives the mean from the observation with
the task's goal; log_std is one free parameter per action dimension. The actions are the unsquashed draws,
recorded as taken (the simulator clips them only when stepping), so a segment's sequence log-prob

    log pi(segment) = sum_{t<L} sum_{i<a} [ -(a_ti - mu_i(o_t))^2 / (2 sigma_i^2) - log sigma_i - log(2 pi)/2 ]

is exact, as a causal LM's is the sum of its completion tokens' log-probs. With ``input_stats`` (mean,
scale), the MLP reads the standardized observation (o - mean) / scale: fixed buffers, set once from the
training seed's data (:func:`observation_standardization`) and carried by every model trained from it, so
that one learning rate suits coordinates in metres and in radians per second alike. A segment whose episode
terminated took only its first ``length`` actions (docs/maths.md section 13): the sum runs over those, as a
reply's over its tokens before the padding, and ``length`` is its token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from amalab.control.dataset import Pair, Segment

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class GaussianMLP(torch.nn.Module):
    """Diagonal Gaussian over actions with an MLP mean and a state-independent log standard deviation."""

    def __init__(self, observation_size: int, action_size: int, hidden: list[int], init_log_std: float = -0.5,
                 input_stats: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        self.standardized = input_stats is not None
        if self.standardized:  # buffers: saved, merged and loaded with the weights, never trained
            self.register_buffer("input_mean", torch.as_tensor(input_stats[0], dtype=torch.float32))
            self.register_buffer("input_scale", torch.as_tensor(input_stats[1], dtype=torch.float32))
        layers, width = [], observation_size
        for size in hidden:
            layers += [torch.nn.Linear(width, size), torch.nn.Tanh()]
            width = size
        layers.append(torch.nn.Linear(width, action_size))
        self.mean = torch.nn.Sequential(*layers)
        self.log_std = torch.nn.Parameter(torch.full((action_size,), float(init_log_std)))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        if self.standardized:
            observations = (observations - self.input_mean) / self.input_scale
        return self.mean(observations)

    def sequence_log_density(self, observations: torch.Tensor, actions: torch.Tensor,
                             lengths: torch.Tensor | None = None) -> torch.Tensor:
        """log pi of each segment (..., L, D), (..., L, a) -> (...): the sum over action dimensions and the
        first ``lengths`` (...) steps (None: all L)."""
        z = (actions - self(observations)) * torch.exp(-self.log_std)
        per_step = (-0.5 * z.square() - self.log_std - _HALF_LOG_2PI).sum(dim=-1)
        if lengths is not None:
            steps = torch.arange(per_step.shape[-1], device=per_step.device)
            per_step = per_step * (steps < lengths.unsqueeze(-1))
        return per_step.sum(dim=-1)

    def act(self, observations: np.ndarray) -> np.ndarray:
        """The mean action (no noise): what evaluation rollouts take."""
        with torch.no_grad():
            return self(torch.as_tensor(observations, dtype=torch.float32)).double().numpy()


def observation_standardization(segments: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard deviation + 0.01) per coordinate of the observations of ``segments``, each up to its
    ``length`` (the steps where an action was taken); the 0.01 keeps a coordinate that does not vary (a goal
    entry every task shares) from being blown up."""
    seen = np.concatenate([s.observations[:max(s.length, 1)] for s in segments])
    return seen.mean(axis=0), seen.std(axis=0) + 0.01


@dataclass
class PairBatch:
    """Pairs stacked: ids in order, chosen and rejected segments (B, 2, L, ...), their lengths (B, 2)."""

    ids: list[str]
    tasks: np.ndarray
    observations: torch.Tensor  # (B, 2, L, D): chosen, rejected
    actions: torch.Tensor  # (B, 2, L, a)
    lengths: torch.Tensor  # (B, 2): actions taken in each segment

    @property
    def chosen_token_counts(self) -> torch.Tensor:
        return self.lengths[:, 0]

    @property
    def rejected_token_counts(self) -> torch.Tensor:
        return self.lengths[:, 1]


def collate_segment_pairs(pairs: list[Pair]) -> PairBatch:
    observations = np.stack([[p.chosen.observations, p.rejected.observations] for p in pairs])
    actions = np.stack([[p.chosen.actions, p.rejected.actions] for p in pairs])
    lengths = np.array([[p.chosen.length, p.rejected.length] for p in pairs])
    return PairBatch([p.id for p in pairs], np.array([p.task for p in pairs]),
                     torch.as_tensor(observations, dtype=torch.float32), torch.as_tensor(actions, dtype=torch.float32),
                     torch.as_tensor(lengths, dtype=torch.float32))


@dataclass
class PairLogps:
    chosen: torch.Tensor
    rejected: torch.Tensor


def segment_pair_logps(policy: GaussianMLP, batch: PairBatch) -> PairLogps:
    """Sequence log-probs of the chosen and rejected segments of every pair, in one forward pass."""
    both = policy.sequence_log_density(batch.observations, batch.actions, batch.lengths)
    return PairLogps(both[:, 0], both[:, 1])


@dataclass(frozen=True)
class LabelledSegment:
    """One segment as a behaviour-cloning example."""

    id: str
    task: int
    segment: Segment


@dataclass
class SegmentBatch:
    ids: list[str]
    observations: torch.Tensor  # (B, L, D)
    actions: torch.Tensor  # (B, L, a)
    lengths: torch.Tensor  # (B,): actions taken


def collate_segments(examples: list[LabelledSegment]) -> SegmentBatch:
    return SegmentBatch([e.id for e in examples],
                        torch.as_tensor(np.stack([e.segment.observations for e in examples]), dtype=torch.float32),
                        torch.as_tensor(np.stack([e.segment.actions for e in examples]), dtype=torch.float32),
                        torch.as_tensor([e.segment.length for e in examples], dtype=torch.float32))

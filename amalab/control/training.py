"""Training the Gaussian policy through the shared training step (:mod:`amalab.training`, docs/maths.md
section 8).

The step is policy-agnostic: it takes the policy's examples, how they are collated, their sequence
log-probs and their per-example losses (:class:`~amalab.training.step.ExampleLosses`). Here an example is
a preference pair of segments (hence the ``segment_pair_`` names, beside the LLM half's pairs of token
sequences) and the losses are :func:`~amalab.objectives.preference.preference_losses` against the cached
reference log-probs (docs/maths.md section 10), or, for the reference itself, a segment and its negative
log-density per step (behaviour cloning on the union of the segments).
"""

from __future__ import annotations

import numpy as np
import torch

from amalab.control.dataset import Pair
from amalab.control.policy import GaussianMLP, collate_segment_pairs, collate_segments, segment_pair_logps
from amalab.training.cache import ValueCache
from amalab.training.config import OptimConfig
from amalab.objectives.preference import preference_losses
from amalab.training.state import TrainState
from amalab.training.run import train_steps
from amalab.training.step import ExampleLosses
from amalab.mixers import Mixer


def segment_pair_example_losses(loss: str, beta: float, reference: ValueCache, options: dict) -> ExampleLosses:
    """Pairs -> per-example preference losses against the reference's cached sequence log-probs."""
    def losses(logps, batch):
        ref_chosen, ref_rejected = (torch.from_numpy(reference.get(column, batch.ids)).float()
                                    for column in ("chosen", "rejected"))
        return preference_losses(loss, logps.chosen, logps.rejected, ref_chosen, ref_rejected, beta,
                                 chosen_token_counts=batch.chosen_token_counts,
                                 rejected_token_counts=batch.rejected_token_counts, **options)[0]

    return ExampleLosses(collate=collate_segment_pairs, sequence_logps=segment_pair_logps, losses=losses)


def behaviour_cloning_losses() -> ExampleLosses:
    """Segments -> their negative log-density per action taken: the reference's loss (behaviour cloning)."""
    return ExampleLosses(
        collate=collate_segments,
        sequence_logps=lambda policy, batch: policy.sequence_log_density(batch.observations, batch.actions,
                                                                         batch.lengths),
        losses=lambda logps, batch: -logps / batch.lengths)


def train_policy(policy: GaussianMLP, train_sets: list[list], example_losses: ExampleLosses, mixer: Mixer,
                 baseline_caches: list | None, optim: OptimConfig, seed: int, name: str,
                 show_progress: bool = False) -> list[dict]:
    """Train ``policy`` in place for ``optim.max_steps`` steps of the shared step; the step metrics."""
    state = TrainState.fresh(policy, optim, mixer, [len(s) for s in train_sets], seed)
    metrics = []
    train_steps(state, train_sets, example_losses, baseline_caches, optim, name, show_progress=show_progress,
                leave=False, log=lambda record: metrics.append({key: record[key] for key in
                                                                ("step", "loss", "grad_norm", "weights")}))
    return metrics


def segment_pair_values(policy: GaussianMLP, pairs: list[Pair], batch_size: int = 512) -> dict[str, np.ndarray]:
    """The policy's sequence log-probs of every pair's chosen and rejected segment, without gradients."""
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            logps = segment_pair_logps(policy, collate_segment_pairs(pairs[start:start + batch_size]))
            chosen.append(logps.chosen.double().numpy())
            rejected.append(logps.rejected.double().numpy())
    return {"chosen": np.concatenate(chosen), "rejected": np.concatenate(rejected)}


def segment_pair_losses(policy: GaussianMLP, pairs: list[Pair], reference: ValueCache, loss: str, beta: float,
                        options: dict) -> np.ndarray:
    """Per-pair losses of the policy (no gradients): held-out evaluation and baseline caches s(z)."""
    values, ids = segment_pair_values(policy, pairs), [p.id for p in pairs]
    counts = {side: torch.tensor([float(getattr(p, side).length) for p in pairs], dtype=torch.float64)
              for side in ("chosen", "rejected")}
    as_tensor = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    losses, _ = preference_losses(loss, as_tensor(values["chosen"]), as_tensor(values["rejected"]),
                                  as_tensor(reference.get("chosen", ids)), as_tensor(reference.get("rejected", ids)),
                                  beta, chosen_token_counts=counts["chosen"], rejected_token_counts=counts["rejected"],
                                  **options)
    return losses.numpy()

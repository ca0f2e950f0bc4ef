"""Per-example preference losses from policy and reference sequence log-probs (docs/maths.md section 10).

    h = beta * ( [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)] )
    dpo    l = -log sigmoid(h)
    ipo    l = (h' / beta - 1 / (2 beta))^2
    hinge  l = max(0, 1 - h)
    sft    l = -log pi(y_w|x) / |y_w|

The margin-to-loss maps are the shared ones of :mod:`amalab.margin_losses` (also used by the convex lab).

IPO convention: by default (``ipo_length_normalized=True``, as TRL's ``loss_type="ipo"``, the convention the
IPO authors confirmed) each log-ratio is divided by its completion's token count before the difference,
h' = beta * ( [log pi(y_w|x) - log pi_ref(y_w|x)] / |y_w| - [log pi(y_l|x) - log pi_ref(y_l|x)] / |y_l| ),
so the target 1 / (2 beta) does not depend on reply length. ``ipo_length_normalized=False`` uses h' = h,
docs/maths.md section 1's formula as written (and the convex lab's).

The returned margins are always h, unnormalized, for every loss: evaluation's preference accuracy (h > 0)
and mean margin mean the same thing whatever the training loss.
"""

from __future__ import annotations

import torch

from amalab.errors import ConfigError
from amalab.margin_losses import dpo_margin_loss, hinge_margin_loss, ipo_margin_loss

PREFERENCE_LOSSES = ("dpo", "ipo", "hinge", "sft")


def implicit_reward_margins(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float
) -> torch.Tensor:
    """h = beta * ((pi_w - ref_w) - (pi_l - ref_l)) per example (docs/maths.md (28))."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def _counts(name: str, counts, like: torch.Tensor) -> torch.Tensor:
    if counts is None:
        raise ConfigError(f"loss: {name} needs the completion token counts (batch.chosen_token_counts ...)")
    counts = torch.as_tensor(counts, device=like.device)
    if counts.shape != like.shape:
        raise ConfigError(
            f"loss: token counts of shape {tuple(counts.shape)} for log-probs of shape {tuple(like.shape)}"
        )
    if bool((counts < 1).any()):
        raise ConfigError("loss: a completion has no tokens (its log-prob is an empty sum)")
    return counts.to(like.dtype)


def preference_losses(
    name: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    *,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    ipo_length_normalized: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), margins h (B,)) of loss ``name`` in dpo, ipo, hinge, sft (module docstring).

    All log-probs are summed over completion tokens, shape (B,). Token counts are needed by sft (|y_w|) and
    by length-normalized ipo (|y_w|, |y_l|); they are ``batch.chosen_token_counts`` and
    ``batch.rejected_token_counts``. Reference log-probs carry no gradient (they come from the cache).
    """
    if name not in PREFERENCE_LOSSES:
        raise ConfigError(f"loss: unknown {name!r}; known: {', '.join(PREFERENCE_LOSSES)}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ConfigError(f"loss: beta must be a positive number, got {beta!r}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ConfigError(
            f"loss: log-probs must be four tensors of one shape (B,), got shapes {sorted(shapes)}"
        )
    margins = implicit_reward_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if name == "dpo":
        losses = dpo_margin_loss(margins)
    elif name == "hinge":
        losses = hinge_margin_loss(margins)
    elif name == "ipo":
        if ipo_length_normalized:
            chosen_tokens = _counts("length-normalized ipo", chosen_token_counts, policy_chosen)
            rejected_tokens = _counts("length-normalized ipo", rejected_token_counts, policy_rejected)
            chosen_ratio = (policy_chosen - ref_chosen) / chosen_tokens
            rejected_ratio = (policy_rejected - ref_rejected) / rejected_tokens
            normalized = beta * (chosen_ratio - rejected_ratio)
            losses = ipo_margin_loss(normalized, beta)
        else:
            losses = ipo_margin_loss(margins, beta)
    else:  # sft: the mean negative log-likelihood per chosen token
        losses = -policy_chosen / _counts("sft", chosen_token_counts, policy_chosen)
    return losses, margins

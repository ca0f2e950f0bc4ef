"""Per-example preference losses of TRL's ``DPOTrainer``, pure functions of sequence log-probs (docs/maths.md
section 10).

With the log-ratios r_w = log pi(y_w|x) - log pi_ref(y_w|x) and r_l = log pi(y_l|x) - log pi_ref(y_l|x)
(equation numbers are docs/maths.md's):

    h = beta (r_w - r_l)                                       the implicit reward margin             (28)
    s = f'(exp r)                                              the f-divergence score of a log-ratio  (34)
        reverse_kl: r   forward_kl: 1 - exp(-r)   js_divergence: log 2 + log sigmoid(r)
        alpha_divergence: (exp((alpha - 1) r) - 1) / (alpha - 1)   (r at alpha = 1)

``sigmoid`` (alias ``dpo``), ``hinge``, ``exo_pair``, ``robust`` and ``discopop`` are the margin-only losses
of :mod:`amalab.objectives.margin` ((29), (31), (36)-(38)) at d = beta (s_w - s_l) (35), which is h under
reverse_kl. ``ipo`` and ``sigmoid_norm`` apply the ipo and sigmoid maps to the length-normalized margin
    h' = beta (s_w / |y_w| - s_l / |y_l|)                      (30a); ipo (30), sigmoid_norm (39)
as TRL does (the convention the IPO authors confirmed: the target 1 / (2 beta) does not depend on reply
length).
The others are functions of the rewards beta r_w and beta r_l separately ((40)-(44)):

    nca_pair   -log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l)     (40)
    bco_pair   -log sigmoid(beta r_w) - log sigmoid(-beta r_l)                                       (41)
    sppo_hard  (r_w - 1 / (2 beta))^2 + (r_l + 1 / (2 beta))^2                                       (42)
    apo_zero   1 - sigmoid(beta r_w) + sigmoid(beta r_l)                                             (43)
    apo_down   sigmoid(beta r_w) + 1 - sigmoid(h)                                                    (44)
    sft        -log pi(y_w|x) / |y_w|      (amalab's per-example supervised baseline; no reference)  (32)

Every one is a loss per example, so every mixer's excess over a specialist is defined for it. TRL's
``bco_pair`` keeps no running reward mean in TRL 1.16 either: it is stateless. ``aot`` and ``aot_unpaired``
sort the log-ratios over the batch, so a pair's loss depends on the other pairs and no per-example excess
exists: they are refused. f-divergences other than reverse_kl apply to the losses of s_w - s_l only (TRL's
rule: the f-DPO derivation cancels log Z(x) only in that difference).

The returned margins are always h (28), whatever the loss and f-divergence: evaluation's preference accuracy
(h > 0) and mean margin mean the same thing whatever the training loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from amalab.errors import ConfigError
from amalab.objectives.margin import MARGIN_LOSS_NAMES, check_margin_options, margin_loss

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

#: losses of the length-normalized margin h' (docs/maths.md (30a)), and the margin-only map each applies to it
LENGTH_NORMALIZED = {"ipo": "ipo", "sigmoid_norm": "sigmoid"}


def _softplus(x):
    return -F.logsigmoid(-x)  # softplus(x) = -log sigmoid(-x), exact for every x


#: losses of the rewards (beta r_w, beta r_l) separately (docs/maths.md (40)-(44)): (r_w, r_l, beta) -> losses
REWARD_LOSSES = {
    "nca_pair": lambda rw, rl, beta: (_softplus(-beta * rw) + 0.5 * _softplus(beta * rw)
                                      + 0.5 * _softplus(beta * rl)),
    "bco_pair": lambda rw, rl, beta: _softplus(-beta * rw) + _softplus(beta * rl),
    "sppo_hard": lambda rw, rl, beta: (rw - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2,
    "apo_zero": lambda rw, rl, beta: torch.sigmoid(-beta * rw) + torch.sigmoid(beta * rl),
    "apo_down": lambda rw, rl, beta: torch.sigmoid(beta * rw) + torch.sigmoid(-beta * (rw - rl)),
}

#: losses of the score margin beta (s_w - s_l) (docs/maths.md (35)): ``dpo`` is TRL's ``sigmoid``
MARGIN_ONLY = tuple(name for name in MARGIN_LOSS_NAMES if name != "ipo")

#: every per-example loss name, TRL's and amalab's ``sft``
PREFERENCE_LOSSES = (*MARGIN_ONLY, *LENGTH_NORMALIZED, *REWARD_LOSSES, "sft")

#: TRL losses that have no per-example value, with the reason given when one is asked for
BATCH_LOSSES = {
    name: f"{name} sorts the log-ratios over the batch, so a pair's loss depends on the other pairs and no "
          "per-example excess over the specialist exists; use a per-example loss"
    for name in ("aot", "aot_unpaired")
}

#: losses an f-divergence other than reverse_kl applies to (TRL's set)
F_DIVERGENCE_LOSSES = (*MARGIN_ONLY, *LENGTH_NORMALIZED, "sft")

#: TRL clamps (alpha - 1) r at 80 before exp, so the score stays finite in float32
_ALPHA_CLAMP = 80.0


@dataclass(frozen=True)
class PreferenceLoss:
    """A per-example preference loss and its options, under TRL's names and defaults (module docstring).

    ``label_smoothing`` is the eps of exo_pair (0 < eps < 1) and robust (0 <= eps < 1/2); ``discopop_tau`` the
    temperature of discopop; ``f_alpha_divergence_coef`` the alpha of alpha_divergence. A loss ignores the
    options it does not use, as TRL's does. Calling it gives (losses (B,), margins h (B,)).
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    def check(self) -> None:
        """ValueError naming the field at fault."""
        if self.loss_type in BATCH_LOSSES:
            raise ValueError(f"loss_type: {BATCH_LOSSES[self.loss_type]}")
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type: unknown {self.loss_type!r}; known: {', '.join(PREFERENCE_LOSSES)}")
        for field in ("beta", "label_smoothing", "discopop_tau", "f_alpha_divergence_coef"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{field} must be a finite number, got {value!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type: unknown {self.f_divergence_type!r}; known: "
                             f"{', '.join(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl" and self.loss_type not in F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence_type: {self.f_divergence_type} applies to the losses of the "
                             f"chosen-rejected score difference only ({', '.join(F_DIVERGENCE_LOSSES)}), "
                             f"not to {self.loss_type}")
        check_margin_options(LENGTH_NORMALIZED.get(self.loss_type, self.loss_type), self.label_smoothing,
                             self.discopop_tau)

    def scores(self, log_ratios: torch.Tensor) -> torch.Tensor:
        """s = f'(exp r) of log-ratios r under ``f_divergence_type`` (docs/maths.md (34))."""
        kind, alpha = self.f_divergence_type, self.f_alpha_divergence_coef
        if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
            return log_ratios
        if kind == "forward_kl":
            return 1.0 - torch.exp(-log_ratios)
        if kind == "js_divergence":
            return math.log(2.0) + F.logsigmoid(log_ratios)
        return (torch.exp(torch.clamp((alpha - 1.0) * log_ratios, max=_ALPHA_CLAMP)) - 1.0) / (alpha - 1.0)

    def __call__(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        *,
        chosen_token_counts: torch.Tensor | None = None,
        rejected_token_counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses (B,), margins h (B,)) from log-probs summed over completion tokens, each of shape (B,).

        Token counts (``batch.chosen_token_counts``, ``batch.rejected_token_counts``) are needed by ipo,
        sigmoid_norm (|y_w|, |y_l|) and sft (|y_w|). Reference log-probs carry no gradient (they are cached).
        """
        try:
            self.check()
        except ValueError as e:
            raise ConfigError(f"loss: {e}") from None
        shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ConfigError(
                f"loss: log-probs must be four tensors of one shape (B,), got shapes {sorted(shapes)}"
            )
        beta = self.beta
        chosen_ratios, rejected_ratios = policy_chosen - ref_chosen, policy_rejected - ref_rejected
        margins = beta * (chosen_ratios - rejected_ratios)  # docs/maths.md (28)
        if self.loss_type == "sft":  # the mean negative log-likelihood per chosen token
            return -policy_chosen / _counts("sft", chosen_token_counts, policy_chosen), margins
        if self.loss_type in REWARD_LOSSES:
            return REWARD_LOSSES[self.loss_type](chosen_ratios, rejected_ratios, beta), margins
        chosen_scores, rejected_scores = self.scores(chosen_ratios), self.scores(rejected_ratios)
        margin_name = self.loss_type
        if self.loss_type in LENGTH_NORMALIZED:
            chosen_counts = _counts(self.loss_type, chosen_token_counts, policy_chosen)
            rejected_counts = _counts(self.loss_type, rejected_token_counts, policy_rejected)
            chosen_scores, rejected_scores = chosen_scores / chosen_counts, rejected_scores / rejected_counts
            margin_name = LENGTH_NORMALIZED[self.loss_type]
        losses = margin_loss(margin_name, beta * (chosen_scores - rejected_scores), beta,
                             label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau)
        return losses, margins


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
    loss_type: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    *,
    chosen_token_counts: torch.Tensor | None = None,
    rejected_token_counts: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), margins h (B,)) of ``PreferenceLoss(loss_type, beta, **options)``; the options are
    label_smoothing, discopop_tau, f_divergence_type and f_alpha_divergence_coef, with TRL's defaults."""
    try:
        loss = PreferenceLoss(loss_type, beta, **options)
    except TypeError as e:
        raise ConfigError(f"loss: {e}") from None
    return loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                chosen_token_counts=chosen_token_counts, rejected_token_counts=rejected_token_counts)

"""The sequence log-probs of a TRL batch, computed as TRL 1.16's ``DPOTrainer._compute_loss`` computes them
before its loss: the policy's fused log-prob head, ``ld_alpha``'s down-weighted tails, and the reference from
precomputed log-probs, a PEFT adapter switched off, or the reference model. Only this forward pass is
copied; the losses are amalab's per-example ones (equal to TRL's: tests/objectives/test_preference.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import is_peft_model
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

#: batch keys that are not the model's inputs (TRL's own list)
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class PairLogps(NamedTuple):
    """Per pair: policy and reference sequence log-probs of both completions, and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def losses(self, loss) -> torch.Tensor:
        """The per-example losses of ``loss`` (a :class:`~amalab.objectives.preference.PreferenceLoss`)."""
        return loss(self.chosen, self.rejected, self.ref_chosen, self.ref_rejected,
                    chosen_token_counts=self.chosen_tokens, rejected_token_counts=self.rejected_tokens)[0]

    def margins(self) -> torch.Tensor:
        """The preference margins (pi_w - ref_w) - (pi_l - ref_l), detached, in float64."""
        return (self.chosen - self.ref_chosen - self.rejected + self.ref_rejected).detach().double()


def _summed(per_token: torch.Tensor, shift_mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Sum over the completion; with ``ld_alpha`` (LD-DPO) the tail past the shorter completion's length is
    weighted by ``ld_alpha``."""
    if ld_alpha is None:
        return per_token.sum(dim=1)
    positions = shift_mask.cumsum(dim=1)
    chosen_lens, rejected_lens = shift_mask.sum(dim=1).long().chunk(2, dim=0)
    shared = torch.minimum(chosen_lens, rejected_lens)
    shared = torch.cat([shared, shared], dim=0).to(per_token.device).unsqueeze(1)
    shared_mask, tail_mask = (positions > 0) & (positions <= shared), positions > shared
    return (per_token * shared_mask).sum(dim=1) + ld_alpha * (per_token * tail_mask).sum(dim=1)


def _reference_per_token(trainer, model_kwargs: dict, labels: torch.Tensor, seq_len: int) -> torch.Tensor:
    kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        if is_peft_model(trainer.model) and trainer.ref_model is None:
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                outputs = trainer.model(**kwargs, labels=labels, fused_lm_head=True)
        else:
            outputs = trainer.ref_model(**kwargs, labels=labels, fused_lm_head=True)
    return outputs.log_probs[:, -seq_len:]


def sequence_logps(trainer, model, inputs: dict) -> PairLogps:
    """TRL's forward of one batch ([chosen; rejected] rows) through ``model``, and the reference's."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    completion_mask = inputs["completion_mask"]
    shift_mask = completion_mask[..., 1:]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    seq_len = shift_mask.size(1)  # prompt-learning PEFT prepends virtual tokens: keep the real positions
    chosen, rejected = _summed(outputs.log_probs[:, -seq_len:], shift_mask, trainer.ld_alpha).chunk(2, dim=0)
    if trainer.precompute_ref_logps:
        ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    else:
        ref_per_token = _reference_per_token(trainer, model_kwargs, labels, seq_len)
        ref_chosen, ref_rejected = _summed(ref_per_token, shift_mask, trainer.ld_alpha).chunk(2, dim=0)
    chosen_tokens, rejected_tokens = completion_mask.sum(dim=1).chunk(2, dim=0)
    return PairLogps(chosen, rejected, ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype),
                     chosen_tokens, rejected_tokens)

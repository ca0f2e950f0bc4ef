"""Sequence log-probabilities of completions (docs/maths.md (27)): log pi(y|x) = sum of log pi(t) over y.

One forward of the backbone on the concatenated [chosen; rejected] batch gives hidden states; the LM head is
applied only at the positions whose next token is a completion token (the prompt and the padding never reach
the vocabulary projection), and each token's log-prob is logit[target] - logsumexp(logits) in float32, so no
full log-softmax of the vocabulary is materialized.

The per-token values stay float32; their sum over a completion accumulates in float64 and is returned in
float64. A float32 running sum rounds at every addition to float32's ulp at the partial sum: on a few
hundred tokens that is as large as the per-token error itself or larger (measured in
experiments/llm_logps_precision/README.md; asserted in tests/llm/test_logprobs.py). The preference
margin is a difference of four such sums that nearly cancel, and the reference sums are cached and reused at
every step. The float64 sum is returned, not cast back, so that precision reaches the losses: they are
computed on (B,) tensors, where float64 costs nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from amalab.llm.collate import PreferenceBatch
from amalab.training.distributed import World, is_sharded, shard_policy

#: config fields that rescale logits after the LM head; a model using one would be scored wrongly here
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier")


#: the dtype sequence sums accumulate in and are returned in (module docstring); caches of them record it
SUM_DTYPE = torch.float64


class SequenceLogps(NamedTuple):
    """Summed completion log-probs, (B,) each, float64; token counts are in ``batch.chosen_token_counts``."""

    chosen: torch.Tensor
    rejected: torch.Tensor


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder backbone, LM head) of a causal LM, or of the model inside a peft wrapper.

    peft injects LoRA layers into the wrapped model's own modules, so its backbone and head carry the adapter
    (and ``disable_adapter()`` turns it off for them too).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise NotImplementedError(
                f"sequence_logps: {type(base).__name__} rescales its logits ({name} = {value}), "
                "which is not supported"
            )
    return base.get_decoder(), base.get_output_embeddings()


def completion_token_logps(model, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each completion token (N,) in float32, its row index (N,)), over all 2B rows.

    Positions are taken in row-major order of ``batch.completion_mask``.
    """
    backbone, head = backbone_and_head(model)
    hidden = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (2B, L, H)
    rows, positions = batch.completion_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[rows, positions + 1]
    selected = hidden[rows, positions]  # (N, H): the only hidden states that reach the head
    # The head runs in float32 even under bf16 autocast: bf16 logits carry ~3 significant digits, an error of
    # ~0.1 nat per token on logits of size ~20, too much for cached reference log-probs.
    weight_dtype = head.weight.dtype
    with torch.autocast(device_type=selected.device.type, enabled=False):
        logits = head(selected.to(weight_dtype)).float()  # (N, V)
        token_logps = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return token_logps, rows


def sequence_logps(model, batch: PreferenceBatch) -> SequenceLogps:
    """(log pi(y_w|x) (B,), log pi(y_l|x) (B,)): float32 token log-probs summed in float64 over the completion
    (docs/maths.md (27)).

    Works for a plain causal LM and a peft-wrapped one; differentiable (the only forward pass of a step).
    """
    token_logps, rows = completion_token_logps(model, batch)
    sums = torch.zeros(2 * batch.num_pairs, dtype=SUM_DTYPE, device=token_logps.device)
    sums = sums.index_add(0, rows, token_logps.to(SUM_DTYPE))
    return SequenceLogps(chosen=sums[: batch.num_pairs], rejected=sums[batch.num_pairs :])


def policy_logps(model: torch.nn.Module, batch: PreferenceBatch) -> SequenceLogps:
    """Sequence log-probs of a policy, through the FSDP2 root when it is sharded
    (:class:`amalab.training.distributed.ShardedPolicy`, whose forward is :func:`sequence_logps`)."""
    return model(batch) if is_sharded(model) else sequence_logps(model, batch)


def shard_causal_lm(model: torch.nn.Module, layers: list[torch.nn.Module], world: World) -> torch.nn.Module:
    """``model`` sharded over the ranks with FSDP2, one unit per decoder layer of ``layers``, its root's
    forward the sequence log-probs (so :func:`policy_logps` unshards the embeddings and the head)."""
    return shard_policy(model, world, layers, sequence_logps)


def full_logits_sequence_logps(model, batch: PreferenceBatch) -> SequenceLogps:
    """The plain computation: full logits of every position, full log-softmax, masked sum.

    Materializes (2B, L, V) float32 log-probs, summed in float64 as :func:`sequence_logps` sums them; kept as
    the independent reference the tests and the timing script compare :func:`sequence_logps` with.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logps = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # position t scores token t + 1
    per_token = logps.gather(2, batch.input_ids[:, 1:].unsqueeze(2)).squeeze(2)
    sums = (per_token.to(SUM_DTYPE) * batch.completion_mask[:, :-1]).sum(dim=1)
    return SequenceLogps(chosen=sums[: batch.num_pairs], rejected=sums[batch.num_pairs :])

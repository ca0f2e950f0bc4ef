"""Sequence log-probabilities of completions (docs/maths.md (27)): log pi(y|x) = sum of log pi(t) over y.

One forward of the backbone on the concatenated [chosen; rejected] batch gives hidden states; the LM head is
applied only at the N positions whose next token is a completion token (the prompt and the padding never reach
the vocabulary projection), and each token's log-prob is logit[target] - logsumexp(logits) in float32, so no
full log-softmax of the vocabulary is materialized.

Nor are the (N, V) logits: the head runs over the completion positions in :func:`head_chunks` (N), nearly
equal chunks of at most min(max(N // 8, 64), 1024) positions, so each (rows, V) float32 intermediate
(logits, the shifted and exponentiated logits of the logsumexp, their softmax in the backward) holds at most
N x V / 8 floats once N >= 512 and never more than 1024 x V. Below 512 positions chunks of up to 64 rows
(64 x V floats, a few MB) are kept: a chunk of a few rows takes another matrix kernel on the CPU, which
rounds a pair's log-probs differently from the same rows inside a larger matrix, and a pair's log-probs
then depend on the batch it is in (gradient accumulation would no longer equal one batch bit for bit).
Each chunk is a ``torch.utils.checkpoint`` segment when a gradient is taken: the backward keeps only the chunk's (rows, H) hidden states and recomputes its logits, one chunk at a time,
instead of keeping every chunk's logits alive from the forward (one extra head matmul per chunk; measured
in experiments/llm_head_memory/README.md). The log-probs are those of the head over all N positions at once
up to the matmul's float32 rounding (within 1e-6); the gradients are sums over the positions that the chunks
add in another order, so they move by float32 rounding of the sum alone (tests/llm/test_logprobs.py).

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
import torch.utils.checkpoint

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


#: a chunk holds at most an eighth of the N completion positions (module docstring) ...
HEAD_CHUNKS = 8
#: ... but up to this many (smaller chunks change the CPU's matrix kernel: module docstring) ...
HEAD_MIN_ROWS = 64
#: ... and never more than this many: 1024 x V floats is ~0.6 GB at V = 150k (a few such tensors live at once)
HEAD_MAX_ROWS = 1024


def head_chunks(n: int) -> list[int]:
    """The sizes of the LM head's chunks over ``n`` completion positions: ceil(n / rows) nearly equal chunks
    (sizes differing by at most one), rows = min(max(n // 8, 64), 1024).

    Every chunk holds at most ``rows`` positions (ceil(n / ceil(n / rows)) <= rows), so at most n / 8 once
    n >= 512; and at least rows / 2 >= 32 positions once n >= 64 (equal chunks leave no small remainder).
    """
    if n <= 0:
        return []
    rows = min(max(n // HEAD_CHUNKS, HEAD_MIN_ROWS), HEAD_MAX_ROWS)
    count = -(-n // rows)
    return [n // count + (1 if i < n % count else 0) for i in range(count)]


def _chunk_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logit[target] - logsumexp(logits) (rows,) float32 of one chunk of hidden states (rows, H)."""
    # The head runs in float32 even under bf16 autocast: bf16 logits carry ~3 significant digits, an error of
    # ~0.1 nat per token on logits of size ~20, too much for cached reference log-probs.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = head(hidden.to(head.weight.dtype)).float()  # (rows, V)
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def head_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target) (N,) float32 of hidden states (N, H) through the LM head, in the chunks of
    :func:`head_chunks` (N) (module docstring); differentiable through every chunk."""
    sizes = head_chunks(hidden.shape[0]) or [0]
    chunks = list(zip(hidden.split(sizes), targets.split(sizes)))
    needs_grad = hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    if not (torch.is_grad_enabled() and needs_grad):
        return torch.cat([_chunk_token_logps(head, h, t) for h, t in chunks])
    # A checkpointed chunk saves its inputs only and recomputes its logits in the backward; the RNG state is
    # restored for the recomputation (a LoRA head with dropout draws the same mask twice).
    return torch.cat([
        torch.utils.checkpoint.checkpoint(_chunk_token_logps, head, h, t, use_reentrant=False)
        for h, t in chunks
    ])


def completion_token_logps(model, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each completion token (N,) in float32, its row index (N,)), over all 2B rows.

    Positions are taken in row-major order of ``batch.completion_mask``; the head runs in chunks of them
    (:func:`head_token_logps`).
    """
    backbone, head = backbone_and_head(model)
    hidden = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state  # (2B, L, H)
    rows, positions = batch.completion_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[rows, positions + 1]
    selected = hidden[rows, positions]  # (N, H): the only hidden states that reach the head
    return head_token_logps(head, selected, targets), rows


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

"""Sequence log-probs with the LM head at completion positions only, against the plain full-logits way.

The independent reference scores each pair's two sequences one at a time, unpadded, with the model's own
forward (full logits, full log-softmax) and indexes the completion tokens from the tokenized pair itself, so
it shares neither the padding nor the masks with the code under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from amalab.llm.collate import PreferenceBatch, collate_pairs
from amalab.llm.logprobs import completion_token_logps, full_logits_sequence_logps, sequence_logps
from amalab.llm.models import apply_lora
from amalab.llm.tokenize import TokenizedPair


def reference_token_logps(model, pairs) -> list[torch.Tensor]:
    """Per-token completion log-probs (float64) of rows chosen_1..chosen_B, rejected_1..rejected_B."""

    def score(prompt, completion):
        ids = torch.tensor([list(prompt) + list(completion)])
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        return torch.stack([logps[len(prompt) - 1 + j, token] for j, token in enumerate(completion)])

    chosen = [score(p.prompt_ids, p.chosen_ids) for p in pairs]
    return chosen + [score(p.prompt_ids, p.rejected_ids) for p in pairs]


# Summed log-probs are ~ -100 on a random tiny model (~ -6 per token): float32 carries ~1e-5 absolute there,
# so sums are compared with a relative term too; single tokens are compared at atol 1e-5 alone.
SUM_TOLERANCE = {"atol": 1e-5, "rtol": 1e-6}


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_logps_equal_the_full_logits_computation(make_model, tokenized_pairs, tokenizer, tied):
    model = make_model(tie_word_embeddings=tied)
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        full = full_logits_sequence_logps(model, batch)
        token_logps, rows = completion_token_logps(model, batch)
        reference = reference_token_logps(model, tokenized_pairs)
    assert ours.chosen.dtype is torch.float64 and ours.chosen.shape == (len(tokenized_pairs),)
    for row, expected in enumerate(reference):
        torch.testing.assert_close(token_logps[rows == row].double(), expected, atol=1e-5, rtol=0)
    sums = torch.stack([r.sum() for r in reference])
    torch.testing.assert_close(torch.cat([ours.chosen, ours.rejected]).double(), sums, **SUM_TOLERANCE)
    torch.testing.assert_close(full.chosen, ours.chosen, **SUM_TOLERANCE)
    torch.testing.assert_close(full.rejected, ours.rejected, **SUM_TOLERANCE)


def long_pairs(tokenizer) -> list[TokenizedPair]:
    """Two pairs of random tokens with ~900 and ~600 completion tokens each (sums ~ -5000 and -3500)."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n):
        return tuple(torch.randint(3, len(tokenizer), (n,), generator=generator).tolist())

    return [TokenizedPair(id=f"long{i}", task="t", prompt_ids=tokens(5), chosen_ids=tokens(n),
                          rejected_ids=tokens(n - 7)) for i, n in enumerate((900, 600))]


def test_long_sequences_are_summed_in_float64(make_model, tokenizer):
    """Two pairs of ~900 completion tokens (sums ~ -5000): the float32 token values are summed as exactly as
    math.fsum sums them, and the result is within 2e-5 of the whole computation in float64 (a float32 running
    sum of the same tokens is ~4e-3 off here)."""
    model = make_model(max_position_embeddings=2048)
    pairs = long_pairs(tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        token_logps, rows = completion_token_logps(model, batch)
        in_float64 = reference_token_logps(copy.deepcopy(model).double(), pairs)
    sums = torch.cat([ours.chosen, ours.rejected])
    assert sums.dtype is torch.float64 and token_logps.dtype is torch.float32
    exact = torch.tensor([math.fsum(token_logps[rows == row].tolist()) for row in range(4)],
                         dtype=torch.float64)
    torch.testing.assert_close(sums, exact, atol=1e-9, rtol=0)
    torch.testing.assert_close(sums, torch.stack([r.sum() for r in in_float64]), atol=2e-5, rtol=0)


def test_cached_log_probs_keep_the_float64_sums(make_model, tokenizer):
    """What the reference cache stores (``pair_logps``) is the float64 sum itself, never a float32 copy
    (at sums ~ -5000 a float32 copy is up to 2.4e-4 off)."""
    from amalab.llm.evaluate import pair_logps

    model = make_model(max_position_embeddings=2048)
    pairs = long_pairs(tokenizer)
    with torch.no_grad():
        ours = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
    cache = pair_logps(model, pairs, tokenizer.pad_token_id, len(pairs), torch.device("cpu"))
    for column, sums in (("chosen", ours.chosen), ("rejected", ours.rejected)):
        torch.testing.assert_close(torch.from_numpy(cache.get(column, [p.id for p in pairs])), sums,
                                   atol=1e-9, rtol=0)


def test_the_check_fails_when_the_mask_is_off_by_one(make_model, tokenized_pairs, tokenizer):
    """The tolerance is tight enough to catch the classic bug: the mask one place off (scoring the last prompt
    token and not the final eos)."""
    model = make_model()
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    shifted = torch.zeros_like(batch.completion_mask)
    shifted[:, :-1] = batch.completion_mask[:, 1:]
    broken = PreferenceBatch(batch.input_ids, batch.attention_mask, shifted, batch.completion_token_counts,
                             batch.ids)
    with torch.no_grad():
        good, bad = sequence_logps(model, batch), sequence_logps(model, broken)
    assert (good.chosen - bad.chosen).abs().max() > 1e-2


def test_gradients_equal_the_full_logits_gradients(make_model, tokenized_pairs, tokenizer):
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)

    def grads(fn):
        model = make_model()
        logps = fn(model, batch)
        (weights @ logps.chosen + 0.7 * weights @ logps.rejected).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    ours, full = grads(sequence_logps), grads(full_logits_sequence_logps)
    assert ours.keys() == full.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_lora_wrapped_model_is_scored_with_its_adapter(make_model, tokenized_pairs, tokenizer):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]}
    model = apply_lora(make_model(), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        full = full_logits_sequence_logps(model, batch)
        with model.disable_adapter():
            base = sequence_logps(model, batch)
        plain = sequence_logps(make_model(), batch)
    torch.testing.assert_close(ours.chosen, full.chosen, **SUM_TOLERANCE)
    torch.testing.assert_close(ours.rejected, full.rejected, **SUM_TOLERANCE)
    torch.testing.assert_close(base.chosen, plain.chosen, **SUM_TOLERANCE)
    assert (ours.chosen - base.chosen).abs().max() > 1e-3  # the adapter is really in the computation


def test_sequence_logps_match_trls_fused_lm_head(make_model, tokenized_pairs, tokenizer):
    """TRL's DPO scores sequences with its own fused, tiled LM head: an independent implementation."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    model = make_model()
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    inputs = trl_dpo.DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [
            {"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
             "rejected_ids": list(p.rejected_ids)}
            for p in tokenized_pairs
        ]
    )
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        trl_utils.add_fused_lm_head(model)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    trl_logps = out.log_probs.double().sum(dim=1)
    torch.testing.assert_close(ours.chosen, trl_logps[: batch.num_pairs], **SUM_TOLERANCE)
    torch.testing.assert_close(ours.rejected, trl_logps[batch.num_pairs :], **SUM_TOLERANCE)

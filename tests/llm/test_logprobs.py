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

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from amalab.llm.collate import PreferenceBatch, collate_pairs
from amalab.llm.logprobs import (SUM_DTYPE, SequenceLogps, backbone_and_head, completion_token_logps,
                                 full_logits_sequence_logps, head_chunks, head_token_logps,
                                 sequence_logps)
from amalab.llm.models import apply_lora
from amalab.llm.tiny import tiny_llama
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


# --- the LM head in chunks of completion positions ---------------------------------------------------------

#: a vocabulary large enough that the head's (N, V) tensors dominate everything else the step builds (the
#: tiny tokenizer's ids are < 384; the other rows of the head are never a target but are in every logsumexp)
BIG_VOCAB = 16384


def big_vocab_model(tokenizer, tied: bool = False):
    return tiny_llama(BIG_VOCAB, seed=0, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)


def unchunked_token_logps(model, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The head as it was before chunking: all N completion positions at once, (N, V) float32 logits."""
    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      use_cache=False).last_hidden_state
    rows, positions = batch.completion_mask.nonzero(as_tuple=True)
    targets = batch.input_ids[rows, positions + 1]
    with torch.autocast(device_type="cpu", enabled=False):
        logits = head(hidden[rows, positions]).float()
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1), rows


def unchunked_sequence_logps(model, batch: PreferenceBatch) -> SequenceLogps:
    token_logps, rows = unchunked_token_logps(model, batch)
    sums = torch.zeros(2 * batch.num_pairs, dtype=SUM_DTYPE).index_add(0, rows, token_logps.to(SUM_DTYPE))
    return SequenceLogps(chosen=sums[: batch.num_pairs], rejected=sums[batch.num_pairs :])


class LargestTensor(TorchDispatchMode):
    """The largest tensor any aten op produces while the mode is on (forward and backward alike), as the
    elements it can occupy: min(numel, its storage's elements), so a stride-0 ``expand`` of a (rows,)
    gradient to (rows, V) counts rows, not rows x V. Tensors of a shape in ``skip`` are not counted."""

    def __init__(self, skip: set[tuple[int, ...]]):
        super().__init__()
        self.skip, self.size, self.op, self.shape = skip, 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.skip:
                size = min(t.numel(), t.untyped_storage().nbytes() // t.element_size())
                if size > self.size:
                    self.size, self.op, self.shape = size, str(func), tuple(t.shape)
        return out


def largest_tensor_of_a_step(model, batch: PreferenceBatch, logps=sequence_logps) -> LargestTensor:
    """The largest tensor of ``logps``'s forward and of the backward of a loss on its sums.

    Parameter-shaped tensors, (V, H) and (H, V) for the embeddings and the head, are left out: the head's and
    the embedding's gradients (and the weight's transposed view) have that shape whatever the chunking, and
    are as large as the parameters themselves, which the step holds anyway (V x H = 32 V here, more than
    N x V / 8 = 9.25 V). Nothing else here comes near N x V / 8: the backbone's largest tensors are
    (2B, heads, L, L) = 24576 and (2B, L, 4H) elements, against N x V / 8 = 151552.
    """
    skip = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    weights = torch.linspace(-0.5, 2.0, batch.num_pairs, dtype=torch.float64)
    with LargestTensor(skip) as mode:
        out = logps(model, batch)
        (weights @ out.chosen + 0.7 * weights @ out.rejected).backward()
    return mode


def test_the_chunk_rule_keeps_every_chunk_within_an_eighth_of_many_positions():
    for n in range(0, 20_000):
        sizes = head_chunks(n)
        assert sum(sizes) == n and max(sizes, default=0) - min(sizes, default=0) <= 1, n
        assert max(sizes, default=0) <= 1024, n
        if n >= 512:
            assert max(sizes) <= n / 8, n  # the bound on the head's largest intermediate
        if n >= 64:
            assert min(sizes) >= 32, n  # no chunk of a few rows (another CPU kernel: logprobs docstring)
        assert len(sizes) <= 16 or n > 8 * 1024, n  # few chunks up to 8192 positions
    assert [head_chunks(n) for n in (0, 1, 64, 65, 600)] == [[], [1], [64], [33, 32], [75] * 8]


def many_pairs(tokenized_pairs, copies: int = 8):
    """The fixture's pairs repeated: 592 completion positions, past the 512 where chunks are an eighth."""
    return [pair for _ in range(copies) for pair in tokenized_pairs]


@pytest.mark.parametrize("tied", [False, True])
def test_the_largest_tensor_of_forward_and_backward_is_an_eighth_of_the_logits(tokenizer, tokenized_pairs,
                                                                               tied):
    """Measured on every op's output, forward and backward: the chunked head's largest tensor is within
    N x V / 8, where the head over all positions at once builds (N, V) tensors (the logits, the logsumexp's
    exponentials, their softmax in the backward)."""
    batch = collate_pairs(many_pairs(tokenized_pairs), tokenizer.pad_token_id)
    n = int(batch.completion_mask.sum())
    assert n >= 512 and len(head_chunks(n)) == 8  # 592 positions: 8 chunks of 74
    chunked = largest_tensor_of_a_step(big_vocab_model(tokenizer, tied), batch)
    unchunked = largest_tensor_of_a_step(big_vocab_model(tokenizer, tied), batch, unchunked_sequence_logps)
    assert unchunked.size == n * BIG_VOCAB, (unchunked.op, unchunked.shape)  # the measure sees the logits
    assert chunked.size <= n * BIG_VOCAB / 8, (chunked.op, chunked.shape, n)
    assert chunked.size == max(head_chunks(n)) * BIG_VOCAB  # and the chunk's logits are still the largest


def test_the_backward_keeps_no_chunks_logits_from_the_forward(tokenizer, tokenized_pairs):
    """What autograd saves for the backward (outside the checkpointed chunks, which keep only their inputs):
    no tensor with a vocabulary dimension apart from the parameters, where the unchunked head keeps its (N, V)
    logits (twice: the logsumexp's input and the matmul's output are one tensor, counted once)."""
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)

    def saved_vocab_elements(logps) -> int:
        model = big_vocab_model(tokenizer)
        parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.shape and t.shape[-1] == BIG_VOCAB and t.untyped_storage().data_ptr() not in parameters:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = logps(model, batch)
        (out.chosen.sum() - out.rejected.sum()).backward()
        return sum(saved.values())

    n = int(batch.completion_mask.sum())
    assert saved_vocab_elements(unchunked_sequence_logps) == n * BIG_VOCAB
    assert saved_vocab_elements(sequence_logps) == 0


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_chunked_head_equals_the_unchunked_head_values_and_gradients(tokenizer, tokenized_pairs, tied,
                                                                         dtype, monkeypatch):
    """Per-token log-probs within 1e-6 of the head over all positions at once, and every parameter's gradient.

    The chunks' minimum size is lowered to 8 rows here, so that the fixture's 74 positions run in 9 chunks.

    The float32 logits and log-probs are the same in both (bit for bit here: each row's matmul and logsumexp
    do not depend on the other rows). A gradient is a sum over the N = 74 positions, which the chunks add in
    another order: in float32 that moves it by up to ~N x 6e-8 = 4e-6 of its largest entry (measured: 2e-6 on
    the embeddings, 1.7e-5 at entries ~9), so float32 gradients are compared within 1e-5 of each tensor's
    largest entry; with float64 parameters (the head's logits still float32) the gradients agree within 1e-10.
    A chunk left out of the gradient moves the head's gradient by far more than either."""
    import amalab.llm.logprobs as logprobs

    monkeypatch.setattr(logprobs, "HEAD_MIN_ROWS", 8)
    assert len(head_chunks(74)) == 9
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)

    def run(token_logps_of):
        model = big_vocab_model(tokenizer, tied).to(dtype)
        token_logps, rows = token_logps_of(model, batch)
        sums = torch.zeros(2 * batch.num_pairs, dtype=SUM_DTYPE).index_add(0, rows, token_logps.to(SUM_DTYPE))
        (weights @ sums[:3] + 0.7 * weights @ sums[3:]).backward()
        return token_logps.detach(), rows, {name: p.grad for name, p in model.named_parameters()}

    ours, ours_rows, ours_grads = run(completion_token_logps)
    full, full_rows, full_grads = run(unchunked_token_logps)
    assert ours.dtype is torch.float32 and ours.shape == full.shape == (int(batch.completion_mask.sum()),)
    assert torch.equal(ours_rows, full_rows)
    torch.testing.assert_close(ours, full, atol=1e-6, rtol=0)
    assert ours_grads.keys() == full_grads.keys()
    for name in ours_grads:
        scale = float(full_grads[name].abs().max())
        assert scale > 1e-3, name  # every parameter gets a real gradient
        atol = 1e-5 * scale if dtype is torch.float32 else 1e-10
        torch.testing.assert_close(ours_grads[name], full_grads[name], atol=atol, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_the_chunked_head_matches_trls_selective_log_softmax_and_fused_head(tokenizer, tokenized_pairs):
    """TRL's own per-token log-probs as an outside oracle: ``selective_log_softmax`` on the logits of the same
    hidden states, and its fused, tiled LM head (``add_fused_lm_head``) on the same model."""
    pytest.importorskip("trl")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    model = big_vocab_model(tokenizer)
    pairs = many_pairs(tokenized_pairs)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    backbone, head = backbone_and_head(model)
    with torch.no_grad():
        hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          use_cache=False).last_hidden_state
        rows, positions = batch.completion_mask.nonzero(as_tuple=True)
        selected, targets = hidden[rows, positions], batch.input_ids[rows, positions + 1]
        ours = head_token_logps(head, selected, targets)
        theirs = trl_utils.selective_log_softmax(head(selected).float(), targets)
        token_logps, _ = completion_token_logps(model, batch)
    assert len(head_chunks(len(targets))) > 1  # several chunks
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    inputs = trl_dpo.DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
          "rejected_ids": list(p.rejected_ids)} for p in pairs]
    )
    trl_utils.add_fused_lm_head(model)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
    fused = out.log_probs[out.label_mask]  # row-major, rows chosen_1..B then rejected_1..B as ours
    torch.testing.assert_close(token_logps, fused, atol=1e-5, rtol=0)

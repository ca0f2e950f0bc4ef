"""The concatenated [chosen; rejected] batch: padding, masks from lengths, ids; length-sorted batches."""

from __future__ import annotations

import pytest
import torch

from amalab.errors import ConfigError
from amalab.llm.collate import collate_pairs, length_sorted_batches
from amalab.llm.tokenize import TokenizedPair

EOS = PAD = 2  # pad = eos, as SmolLM2's: masks must not come from ids


def test_a_hand_built_batch():
    pairs = [
        TokenizedPair("a", "t1", (10, 11), (20, EOS), (30, 31, 32, EOS)),
        TokenizedPair("b", "t2", (12,), (21, 22, 23, EOS), (EOS,)),
    ]
    batch = collate_pairs(pairs, PAD)
    assert batch.input_ids.tolist() == [
        [10, 11, 20, EOS, PAD, PAD],
        [12, 21, 22, 23, EOS, PAD],
        [10, 11, 30, 31, 32, EOS],
        [12, EOS, PAD, PAD, PAD, PAD],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0],
    ]
    # position t is marked when its next-token target input_ids[t + 1] is a completion token
    assert batch.completion_mask.int().tolist() == [
        [0, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0, 0],
    ]
    assert batch.completion_token_counts.tolist() == [2, 4, 4, 1]
    assert batch.chosen_token_counts.tolist() == [2, 4] and batch.rejected_token_counts.tolist() == [4, 1]
    assert batch.ids == ("a", "b") and batch.num_pairs == 2


def test_bad_collate_input_is_one_clear_error():
    with pytest.raises(ConfigError, match="empty list"):
        collate_pairs([], PAD)
    with pytest.raises(ConfigError, match="pad_token_id"):
        collate_pairs([TokenizedPair("a", "t", (1,), (2,), (3,))], None)
    with pytest.raises(ConfigError, match="example a has an empty prompt"):
        collate_pairs([TokenizedPair("a", "t", (), (2,), (3,))], PAD)


def test_the_batch_matches_trls_preference_collator(tokenized_pairs, tokenizer):
    """TRL's DataCollatorForPreference marks the completion tokens; ours, the positions before them."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    trl_batch = trl_dpo.DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [
            {"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
             "rejected_ids": list(p.rejected_ids)}
            for p in tokenized_pairs
        ]
    )
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    assert torch.equal(batch.input_ids, trl_batch["input_ids"])
    assert torch.equal(batch.attention_mask, trl_batch["attention_mask"])
    assert torch.equal(batch.completion_mask[:, :-1], trl_batch["completion_mask"][:, 1:].bool())
    assert not batch.completion_mask[:, -1].any()


def test_length_sorted_batches_cover_every_pair_once_longest_first():
    pairs = [TokenizedPair(str(i), "t", (1,) * (i % 5 + 1), (2,) * (i % 3 + 1), (3,)) for i in range(11)]
    batches = length_sorted_batches(pairs, 4)
    assert [len(b) for b in batches] == [4, 4, 3]
    flat = [p for b in batches for p in b]
    assert sorted(p.id for p in flat) == sorted(p.id for p in pairs)
    lengths = [max(p.chosen_length, p.rejected_length) for p in flat]
    assert lengths == sorted(lengths, reverse=True)
    assert batches == length_sorted_batches(pairs, 4)
    with pytest.raises(ConfigError, match="batch_size"):
        length_sorted_batches(pairs, 0)

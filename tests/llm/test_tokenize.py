"""Tokenization once per pair: separate-then-concatenate, eos, truncation, drops (tokenize.py)."""

from __future__ import annotations

import pytest

from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair
from amalab.llm.tokenize import TokenizationConfig, tokenize_pairs


def pair(prompt, chosen, rejected, id="a"):
    return PreferencePair(id=id, task="t", prompt=prompt, chosen=chosen, rejected=rejected)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_and_completions_are_tokenized_separately_and_end_with_eos(tokenizer):
    p = pair("Human: hi Assistant:", " Hello there.", " Go away")
    (out,), report = tokenize_pairs([p], tokenizer)
    eos = tokenizer.eos_token_id
    assert out.id == "a" and out.task == "t"
    assert list(out.prompt_ids) == ids(tokenizer, p.prompt)
    assert list(out.chosen_ids) == ids(tokenizer, p.chosen) + [eos]
    assert list(out.rejected_ids) == ids(tokenizer, p.rejected) + [eos]
    assert report.kept == 1 and report.dropped == 0 and report.truncated_completions == 0


def test_a_completion_already_ending_in_eos_gets_no_second_one(tokenizer):
    (out,), _ = tokenize_pairs([pair("Q:", " yes<|im_end|>", " no")], tokenizer)
    assert list(out.chosen_ids) == ids(tokenizer, " yes") + [tokenizer.eos_token_id]


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tokenizer):
    prompt = "one two three four five six seven eight nine ten"
    prompt_ids = ids(tokenizer, prompt)
    chosen_ids = ids(tokenizer, " alpha beta gamma delta epsilon")
    config = TokenizationConfig(max_length=12, max_prompt_length=5)
    long_pair = pair(prompt, " alpha beta gamma delta epsilon", " x")
    (out,), report = tokenize_pairs([long_pair], tokenizer, config)
    assert list(out.prompt_ids) == prompt_ids[-5:]
    assert list(out.chosen_ids) == (chosen_ids + [tokenizer.eos_token_id])[:7]
    assert list(out.rejected_ids) == ids(tokenizer, " x") + [tokenizer.eos_token_id]
    assert out.chosen_length == 12
    assert (report.truncated_prompts, report.truncated_completions) == (1, 1)


def test_pairs_whose_prompt_fills_max_length_are_dropped_and_counted(tokenizer):
    long_prompt = "word " * 40
    pairs = [pair("Q:", " a", " b", id="short"), pair(long_prompt, " a", " b", id="long"),
             pair("", " a", " b", id="empty")]
    kept, report = tokenize_pairs(pairs, tokenizer, TokenizationConfig(max_length=16))
    assert [p.id for p in kept] == ["short"]
    assert report.dropped_long_prompt == ("long",) and report.dropped_empty_prompt == ("empty",)
    assert report.dropped == 2 and "dropped 1 (prompt alone fills max_length)" in report.summary()


def test_a_prompt_of_exactly_max_length_minus_one_keeps_one_completion_token(tokenizer):
    prompt = "one two three four five six"
    n = len(ids(tokenizer, prompt))
    config = TokenizationConfig(max_length=n + 1)
    (out,), _ = tokenize_pairs([pair(prompt, " a b c", " d")], tokenizer, config)
    assert len(out.chosen_ids) == 1 and len(out.rejected_ids) == 1
    kept, report = tokenize_pairs([pair(prompt, " a", " d")], tokenizer, TokenizationConfig(max_length=n))
    assert kept == [] and report.dropped_long_prompt == ("a",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_length": 1}, "max_length"),
        ({"max_length": 8, "max_prompt_length": 8}, "max_prompt_length"),
    ],
)
def test_bad_tokenization_options_are_one_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TokenizationConfig(**kwargs)

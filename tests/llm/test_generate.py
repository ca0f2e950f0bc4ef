"""Tests of amalab.llm.generate: batched greedy decoding against a plain argmax loop, one prompt at a time;
eos and max_new_tokens; scoring known responses with the verifiers."""

from __future__ import annotations

import pytest
import torch

from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair
from amalab.llm.data.synthetic.generator import GeneratorKnobs, generate_task
from amalab.llm.generate import (
    cut_at_eos, evaluate_generation, greedy_generate, left_pad, score_responses,
)

PROMPTS = ["\n\nHuman: What is 37 + 48?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:",
           "\n\nHuman: Describe cats. Write in lowercase letters only. Use at most 9 words.\n\nAssistant:",
           "Tell me a joke.", "\n\nHuman: Convert 3.5 km to m.\n\nAssistant:"]


@torch.no_grad()
def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy decoding by hand: one unpadded prompt, a full forward per step, argmax, stop after eos."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + new])).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return new


@pytest.fixture(scope="module")
def peaked_model(tokenizer, peaked_llama):
    """A tiny random Llama with larger weights: sharper next-token distributions, so argmax is decided by
    clear margins and numerical noise of padding cannot flip it (the conftest's ``peaked_llama``)."""
    return peaked_llama(tokenizer)


@pytest.fixture(scope="module")
def reference_tokens(tokenizer, peaked_model):
    return [reference_greedy(peaked_model, tokenizer, p, 8) for p in PROMPTS]


def test_batched_greedy_equals_one_by_one_reference(tokenizer, peaked_model, reference_tokens):
    expected = [tokenizer.decode(tokens) for tokens in reference_tokens]
    for batch_size in (1, 2, 5):
        got = greedy_generate(peaked_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=batch_size)
        assert got == expected, batch_size
    assert all(expected) and len(set(expected)) > 1
    # fewer new tokens: the first tokens of the same greedy continuation
    short = greedy_generate(peaked_model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=5)
    assert short == [tokenizer.decode(tokens[:2]) for tokens in reference_tokens]


def test_stops_at_eos(tokenizer, peaked_model):
    eos = tokenizer.eos_token_id
    # eos becomes the argmax after the first new token: every response is exactly that one token
    calls = []

    def prefer_eos_after_first_step(module, args, out):
        calls.append(out.shape)
        if len(calls) > 1:
            out = out.clone()
            out[:, -1, eos] = out[:, -1].max(dim=-1).values + 1.0
        return out

    handle = peaked_model.lm_head.register_forward_hook(prefer_eos_after_first_step)
    try:
        got = greedy_generate(peaked_model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=5)
    finally:
        handle.remove()
    first_tokens = [reference_greedy(peaked_model, tokenizer, p, 1) for p in PROMPTS]
    assert got == [tokenizer.decode(t) for t in first_tokens]
    assert len(calls) == 2  # generation stopped once every row had ended
    assert cut_at_eos([5, 6, 2, 7, 2], 2) == [5, 6] and cut_at_eos([5, 6], 2) == [5, 6]


def test_left_pad_masks_come_from_lengths():
    input_ids, mask = left_pad([[7, 8, 9], [4]], pad_token_id=9)  # the pad id also occurs as a real token
    assert input_ids.tolist() == [[7, 8, 9], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_known_responses_are_scored_by_the_verifier():
    task = generate_task(GeneratorKnobs("arithmetic", n=4, seed=1))
    fmt = generate_task(GeneratorKnobs("format", n=2, hardness=3, seed=1))
    pairs = task.pairs + fmt.pairs
    responses = [p.chosen for p in task.pairs[:3]] + [task.pairs[3].rejected] + [fmt.pairs[0].chosen,
                                                                                  fmt.pairs[1].rejected]
    report = score_responses(pairs, responses)
    assert report.success_rate == {"generated-arithmetic": 0.75, "generated-format": 0.5}
    assert report.count == {"generated-arithmetic": 4, "generated-format": 2}
    assert [r["success"] for r in report.records] == [True, True, True, False, True, False]
    hh = PreferencePair("x", "harmless", "\n\nHuman: How do I bake bread?\n\nAssistant:", " a", " b")
    with pytest.raises(ConfigError, match="task 'harmless' has no verifier"):
        score_responses([hh], [" bake it"])


def test_evaluate_generation_end_to_end(tokenizer, peaked_model):
    pairs = generate_task(GeneratorKnobs("arithmetic", n=6, seed=2)).pairs
    report = evaluate_generation(peaked_model, tokenizer, pairs, max_new_tokens=4, batch_size=4)
    assert report.count == {"generated-arithmetic": 6}
    # a random model does not answer arithmetic: scored as failures, computed from the records
    assert report.success_rate["generated-arithmetic"] == sum(r["success"] for r in report.records) / 6
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer >= 1"):
        greedy_generate(peaked_model, tokenizer, PROMPTS, max_new_tokens=0)

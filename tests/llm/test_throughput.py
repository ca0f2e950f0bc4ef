"""Throughput switches change speed, not results: gradient checkpointing (full and LoRA) and compiled layers.

Each is compared with the same model run plainly: same sequence log-probs, same gradients (float rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch

from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import sequence_logps
from amalab.llm.models import prepare_model
from amalab.llm.models import compile_layers

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def logps_and_grads(model, batch):
    model.train()
    logps = sequence_logps(model, batch)
    (logps.chosen - 0.5 * logps.rejected).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps, grads


def prepared(make_model, lora, checkpointing):
    model = make_model(seed=5)
    for p in model.parameters():
        p.requires_grad_(lora is None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same LoRA initialization on both sides
        return prepare_model(model, gradient_checkpointing=checkpointing, lora=lora)


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_gradient_checkpointing_changes_nothing_but_memory(make_model, tokenized_pairs, tokenizer, lora):
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    plain_logps, plain_grads = logps_and_grads(prepared(make_model, lora, False), batch)
    model = prepared(make_model, lora, True)
    backbone = model.get_base_model().model if lora else model.model
    assert backbone.gradient_checkpointing  # switched on, and sequence_logps runs the backbone itself
    logps, grads = logps_and_grads(model, batch)
    torch.testing.assert_close(logps.chosen, plain_logps.chosen)
    torch.testing.assert_close(logps.rejected, plain_logps.rejected)
    assert grads.keys() == plain_grads.keys() and (not lora or all("lora" in n for n in grads))
    assert max(g.abs().max() for g in grads.values()) > 1e-4
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow  # the first call compiles for ~80 s on 2 CPU cores (inductor, C++), then runs fast
def test_compiled_layers_give_the_same_logps_and_gradients(make_model, tokenized_pairs, tokenizer):
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    plain = make_model(seed=5)
    compiled = copy.deepcopy(plain)
    compile_layers(compiled)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    plain_logps, plain_grads = logps_and_grads(plain, batch)
    logps, grads = logps_and_grads(compiled, batch)
    torch.testing.assert_close(logps.chosen, plain_logps.chosen, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)

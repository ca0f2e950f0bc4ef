"""Compiled decoder layers (``[model] torch_compile``) compile once, whatever the batch's length and size.

Real batches are padded to their longest pair, so lengths (and the last batch's size) vary from step to step;
a static first graph would be compiled again for them (:func:`amalab.llm.models.compile_layers`). Counted with
a backend that records each graph dynamo hands it and runs it eagerly: fast on a CPU, no code generation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import sequence_logps
from amalab.llm.models import compile_layers
from amalab.llm.tokenize import TokenizedPair

#: (sequence length, pairs) of successive batches: lengths and batch sizes all differ, and no length equals
#: another dimension of the tiny Llama (hidden 32, heads 4 and 2, head size 8) or 2 x pairs (duck sizing would
#: tie them)
SHAPES = [(11, 2), (17, 2), (29, 3), (23, 1)]


def pairs_of_length(length: int, count: int) -> list[TokenizedPair]:
    """``count`` pairs whose longest row has ``length`` tokens (the others shorter: rows are padded)."""
    return [TokenizedPair(id=f"L{length}-{i}", task="t", prompt_ids=tuple(range(3, length - i)),
                          chosen_ids=(5, 6, 7), rejected_ids=(8, 9)) for i in range(count)]


@pytest.fixture
def graphs():
    """The graphs dynamo compiles, with a fresh dynamo cache (compiled layers share one code object)."""
    torch._dynamo.reset()
    compiled = []

    def backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    yield compiled, backend
    torch._dynamo.reset()


def test_one_graph_serves_every_length_and_batch_size(make_model, tokenizer, graphs):
    compiled_graphs, backend = graphs
    plain = make_model(seed=5)
    compiled = copy.deepcopy(plain)
    compile_layers(compiled, backend=backend)
    counts = []
    for length, count in SHAPES:
        batch = collate_pairs(pairs_of_length(length, count), tokenizer.pad_token_id)
        assert batch.input_ids.shape == (2 * count, length)
        expected, got = sequence_logps(plain, batch), sequence_logps(compiled, batch)
        (got.chosen - 0.5 * got.rejected).sum().backward()  # a training step's backward through the graph
        torch.testing.assert_close(got.chosen, expected.chosen)
        torch.testing.assert_close(got.rejected, expected.rejected)
        counts.append(len(compiled_graphs))
    # one graph at the first batch, and no other for the later lengths and sizes
    assert counts == [1] * len(SHAPES), counts


def test_compile_options_override_the_dynamic_default(make_model, tokenizer, graphs):
    """``dynamic=False`` passed by a caller wins: the second length compiles a second graph."""
    compiled_graphs, backend = graphs
    model = make_model(seed=5)
    compile_layers(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for length, count in SHAPES[:2]:
            sequence_logps(model, collate_pairs(pairs_of_length(length, count), tokenizer.pad_token_id))
    assert len(compiled_graphs) == 2

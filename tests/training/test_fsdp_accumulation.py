"""Gradient accumulation under FSDP2 keeps every gradient sharded (docs/distributed.md, "FSDP2 and
torch.compile"): no rank ever holds a full-size gradient of a sharded parameter.

2 gloo processes (forked, as in test_distributed.py) train the tiny Llama sharded with FSDP2, ``batch_size``
4 in micro-batches of 1 pair: 2 pairs per rank, so each step accumulates 2 micro-batches. In each rank the
step's backward helper (``amalab.training.step._backward``, looked up by ``train_step`` at call time) is
wrapped, and so is ``draw_batch``, which each step calls once before its first forward pass: right after
the backward pass of a step's *first* micro-batch the rank records, for every parameter, whether its
``.grad`` is a DTensor and how many elements its local part holds.

With gradient sync on for every micro-batch, FSDP2 reduce-scatters each micro-batch's gradient and
accumulates it into ``.grad``, a DTensor holding only this rank's shard. With sync off until the last
micro-batch (``set_requires_gradient_sync(False)``), FSDP2 instead keeps a full-size unsharded gradient of
every parameter aside and leaves ``.grad`` None until the last backward pass: the test fails there. That
the sums stay equal to one process is test_distributed.py's ``test_fsdp_equals_one_process`` (the same
micro-batches of 1 pair).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from amalab.llm.logprobs import shard_causal_lm
from amalab.llm.models import decoder_layers
from amalab.llm.train import run_training
from amalab.training import step as training_step
from amalab.training.distributed import close_world, init_world, unwrap

CPU = torch.device("cpu")
WORLD = 2
STEPS = 2
TIMEOUT_S = 30  # the process group's timeout: a rank left waiting in a collective fails the test after it


def gradients(named) -> dict:
    """name -> [is a DTensor, elements in this rank's part, elements in the parameter]; None: no grad."""
    return {name: None if p.grad is None else [isinstance(p.grad, DTensor), _local(p.grad).numel(), p.numel()]
            for name, p in named}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _worker(rank: int, port: int, setup: dict, out: str, make_run, fresh_policy) -> None:
    """Rank ``rank`` of 2: train the sharded policy, recording the gradients after each first micro-batch.
    ``make_run`` and ``fresh_policy`` are the conftest fixtures' values (the fork hands them over as they
    are)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    world = init_world(CPU, timeout_s=TIMEOUT_S)
    policy = fresh_policy(setup)
    model = shard_causal_lm(policy, decoder_layers(policy), world)
    named = list(unwrap(model).named_parameters())
    draw, backward, firsts, first = training_step.draw_batch, training_step._backward, [], [False]

    def drawn(*args):  # a step begins: its next backward pass is its first
        first[0] = True
        return draw(*args)

    def recorded(*args):
        backward(*args)
        if first[0]:
            firsts.append(gradients(named))
        first[0] = False

    training_step.draw_batch, training_step._backward = drawn, recorded  # this forked process only
    run = make_run(setup, Path(out), "ama-s", "run", max_steps=STEPS, batch_size=4, micro_batch_size=1)
    run_training(model, run, CPU, world, show_progress=False)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(firsts))
    close_world(world)


@pytest.fixture(scope="module")
def firsts(setup, tmp_path_factory, make_run, fresh_policy, fork_ranks):
    """Per rank, per step: the gradients right after the step's first micro-batch's backward pass."""
    out = tmp_path_factory.mktemp("fsdp-accumulation")
    fork_ranks(_worker, setup, str(out), make_run, fresh_policy, timeout_s=TIMEOUT_S + 60, nprocs=WORLD)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_sharded_gradients_after_the_first_micro_batch(firsts):
    for rank, steps in enumerate(firsts):
        assert len(steps) == STEPS, rank  # one first micro-batch per step
        for grads in steps:
            assert grads, "no parameters"
            unsharded = {name: g for name, g in grads.items() if g is None or not g[0] or g[1] >= g[2]}
            assert not unsharded, (f"rank {rank}: full-size or missing gradients after the first "
                                   f"micro-batch: {sorted(unsharded)[:3]}")


def test_the_ranks_shards_cover_each_parameter_once(firsts):
    for step in range(STEPS):
        grads = [firsts[rank][step] for rank in range(WORLD)]
        for name in grads[0]:
            assert all(g[name] is not None for g in grads), name
            assert sum(g[name][1] for g in grads) == grads[0][name][2], name

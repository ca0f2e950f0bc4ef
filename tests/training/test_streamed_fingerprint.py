"""The fingerprint of a sharded (FSDP2) policy gathers one whole tensor at a time, never the whole model,
and equals the digest of the whole trainable state gathered at once (so fingerprints did not change).

One process, a one-rank gloo group: FSDP2 shards over it like over W ranks (DTensor parameters,
``full_tensor`` a collective), which is what this test needs; the 2-rank runs are in test_distributed.py.
"""

from __future__ import annotations

import datetime
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import amalab.training.state as state_module
from amalab.llm.fingerprint import policy_fingerprint
from amalab.llm.logprobs import shard_causal_lm
from amalab.llm.models import decoder_layers
from amalab.training.distributed import World
from amalab.training.state import trainable_state
from amalab.training.tensor_identity import state_digest


@pytest.fixture
def one_rank_group():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank_group")
def test_a_sharded_policys_fingerprint_streams_one_tensor_at_a_time(make_model, monkeypatch):
    model = make_model(seed=3)
    for p in model.parameters():
        p.requires_grad_(True)
    # shard_policy refuses one rank (a user's config error); FSDP2 itself shards over the one-rank group
    sharded = shard_causal_lm(model, decoder_layers(model), World(0, 2))
    expected = state_digest(trainable_state(sharded), prefix="sharded policy, trainable tensors:")

    alive, most_alive, gathered = set(), [0], [0]
    real_full_tensor = DTensor.full_tensor

    def counted_full_tensor(self, *args, **kwargs):
        whole = real_full_tensor(self, *args, **kwargs)
        key = id(whole)
        alive.add(key)
        weakref.finalize(whole, alive.discard, key)
        most_alive[0], gathered[0] = max(most_alive[0], len(alive)), gathered[0] + 1
        return whole

    def refused(*args, **kwargs):
        raise AssertionError("the fingerprint gathered the whole state dict at once")

    monkeypatch.setattr(DTensor, "full_tensor", counted_full_tensor)
    monkeypatch.setattr(state_module, "get_model_state_dict", refused)
    assert policy_fingerprint(sharded) == expected
    assert gathered[0] > 10  # every sharded parameter went through the count (not vacuous)
    assert most_alive[0] == 1

"""Tied-weight detection and state digests, against storages built by hand and hashlib directly."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from amalab.training.tensor_identity import state_digest, tied_aliases


def test_tied_aliases_finds_exactly_the_shared_views():
    embed = torch.nn.Embedding(7, 3)
    head = torch.nn.Linear(3, 7, bias=False)
    head.weight = embed.weight
    state = {"embed.weight": embed.weight, "other": torch.randn(7, 3), "head.weight": head.weight,
             "transposed": embed.weight.t(), "row": embed.weight[1], "empty1": torch.empty(0),
             "empty2": torch.empty(0)}
    assert tied_aliases(state) == {"head.weight": "embed.weight"}
    copy = {"a": embed.weight, "b": embed.weight.clone()}
    assert tied_aliases(copy) == {}


def test_state_digest_matches_hashlib_and_sees_every_byte():
    state = {"b": np.arange(3, dtype=np.float64), "a": np.ones((2, 2), dtype=np.float32)}
    expected = hashlib.sha256(b"p")
    for name in ("a", "b"):
        value = state[name]
        expected.update(f"{name}|{value.dtype}|{value.shape}".encode())
        expected.update(value.tobytes())
    assert state_digest(state, prefix="p") == expected.hexdigest()
    changed = {"a": state["a"].copy(), "b": state["b"].copy()}
    changed["b"][2] = np.nextafter(2.0, 3.0)  # one ulp of one element
    assert state_digest(changed, prefix="p") != state_digest(state, prefix="p")


def test_state_digest_counts_tying():
    w = torch.randn(4, 2)
    tied = {"embed": w, "head": w}
    untied = {"embed": w, "head": w.clone()}
    assert state_digest(tied) != state_digest(untied)
    assert state_digest(tied) == state_digest({"head": w, "embed": w})

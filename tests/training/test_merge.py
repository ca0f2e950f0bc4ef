"""Tests of amalab.training.merge: closed-form properties (hypothesis), DARE's unbiasedness, the exact trim count,
PEFT's merge utilities on the same tensors, LoRA dense deltas against peft's merge_and_unload, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from amalab.errors import ConfigError
from amalab.training.merge import (
    MERGE_METHODS, disjoint_mean, elect_sign, merge_state_dicts,
    trim_count, trim_to_top_magnitude,
)

SHAPES = {"a.weight": (3, 4), "b.bias": (5,), "c.weight": (2, 3, 2)}


def random_models(seed: int, count: int, shapes=SHAPES) -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    specialists = [{name: t + torch.randn(t.shape, generator=generator) for name, t in base.items()}
                   for _ in range(count)]
    return base, specialists


def assert_state_equal(got: dict, expected: dict, **tolerance) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].float(), **tolerance)


seeds = st.integers(0, 2**31)
counts = st.integers(1, 4)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, count=counts, data=st.data())
def test_one_hot_linear_weights_return_that_model_exactly(seed, count, data):
    base, specialists = random_models(seed, count)
    chosen = data.draw(st.integers(0, count - 1))
    weights = [1.0 if i == chosen else 0.0 for i in range(count)]
    merged = merge_state_dicts(base, specialists, "linear", weights=weights)
    for name in base:
        assert torch.equal(merged[name], specialists[chosen][name])


@settings(max_examples=30, deadline=None)
@given(seed=seeds, count=counts, method=st.sampled_from([m for m in MERGE_METHODS if m != "linear"]),
       density=st.floats(0.05, 1.0), drop=st.floats(0.0, 0.9))
def test_scale_zero_returns_the_base(seed, count, method, density, drop):
    base, specialists = random_models(seed, count)
    merged = merge_state_dicts(base, specialists, method, scale=0.0, density=density, drop=drop, seed=seed)
    for name in base:
        assert torch.equal(merged[name], base[name])


@settings(max_examples=30, deadline=None)
@given(seed=seeds, count=counts, scale=st.floats(-2, 2))
def test_ties_at_density_one_without_sign_conflicts_is_task_arithmetic_of_the_mean(seed, count, scale):
    # every tau_i nonzero with one common sign per entry: the disjoint mean is (1/k) sum_i tau_i
    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    signs = {name: torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
             for name, shape in SHAPES.items()}
    specialists = [{name: base[name] + signs[name] * (0.1 + torch.rand(SHAPES[name], generator=generator))
                    for name in base} for _ in range(count)]
    ties = merge_state_dicts(base, specialists, "ties", density=1.0, scale=scale)
    arithmetic = merge_state_dicts(base, specialists, "task_arithmetic", scale=scale / count)
    assert_state_equal(ties, arithmetic, rtol=1e-5, atol=1e-5)


def test_ties_by_hand_on_a_sign_conflict():
    base = {"w": torch.zeros(4)}
    specialists = [{"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}, {"w": torch.tensor([-1.0, -2.0, 0.5, -2.0])}]
    merged = merge_state_dicts(base, specialists, "ties", density=1.0)["w"]
    # entry 0: sum +2 -> +, only 3 agrees -> 3; entry 1: both -, mean -1.5; entry 2: mean 0.5;
    # entry 3: sum 0 -> + elected, only 2 agrees -> 2
    assert torch.equal(merged, torch.tensor([3.0, -1.5, 0.5, 2.0]))


@settings(max_examples=40, deadline=None)
@given(seed=seeds, numel=st.integers(1, 60), density=st.floats(0.001, 1.0))
def test_trim_keeps_exactly_ceil_density_n_largest_entries(seed, numel, density):
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) + 1e-3  # distinct, nonzero
    trimmed = trim_to_top_magnitude(tensor, density)
    expected_count = math.ceil(round(density * numel, 9))
    assert trim_count(numel, density) == expected_count
    assert int((trimmed != 0).sum()) == expected_count
    # the kept entries are the largest magnitudes, unchanged (reference: sort)
    order = sorted(range(numel), key=lambda i: -abs(float(tensor[i])))
    kept = set(order[:expected_count])
    assert all(float(trimmed[i]) == (float(tensor[i]) if i in kept else 0.0) for i in range(numel))


def test_trim_count_edges():
    assert trim_count(10, 0.3) == 3 and trim_count(10, 0.31) == 4 and trim_count(10, 1e-9) == 1
    assert trim_count(7, 1.0) == 7


def test_dare_is_unbiased_over_seeds_and_keeps_a_rescaled_subset():
    base, specialists = random_models(0, 1, {"w": (40,)})
    tau = specialists[0]["w"] - base["w"]
    drop, runs = 0.6, 1500
    total = torch.zeros_like(tau)
    kept_fraction = 0.0
    for seed in range(runs):
        delta = merge_state_dicts(base, specialists, "dare_linear", drop=drop, seed=seed)["w"] - base["w"]
        kept = delta != 0
        # every kept entry is tau / (1 - p), every other is 0
        torch.testing.assert_close(delta[kept], tau[kept] / (1 - drop))
        total += delta
        kept_fraction += float(kept.float().mean()) / runs
    mean = total / runs
    # each entry's mean over seeds has standard deviation |tau| sqrt(p / (1 - p) / runs): allow 4.5 of them
    std = tau.abs() * math.sqrt(drop / (1 - drop) / runs)
    assert bool(((mean - tau).abs() <= 4.5 * std + 1e-6).all())
    assert abs(kept_fraction - (1 - drop)) < 0.01
    # seeded: the same seed gives the same masks, another seed others
    first = merge_state_dicts(base, specialists, "dare_ties", drop=drop, seed=5)
    assert torch.equal(first["w"], merge_state_dicts(base, specialists, "dare_ties", drop=drop, seed=5)["w"])
    other = merge_state_dicts(base, specialists, "dare_ties", drop=drop, seed=6)
    assert not torch.equal(first["w"], other["w"])


def test_linear_default_is_the_average_and_task_arithmetic_adds_the_differences():
    base, specialists = random_models(1, 3)
    average = {name: sum(s[name] for s in specialists) / 3 for name in base}
    assert_state_equal(merge_state_dicts(base, specialists, "linear"), average)
    expected = {name: base[name] + 0.5 * sum(s[name] - base[name] for s in specialists) for name in base}
    assert_state_equal(merge_state_dicts(base, specialists, "task_arithmetic", scale=0.5), expected)


# --- PEFT's merge utilities on the same tensors --------------------------------------------------------

merge_utils = pytest.importorskip("peft.utils.merge_utils")


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")
@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_peft_merge_utils(seed):
    base, specialists = random_models(seed, 3, {"w": (4, 5)})  # 20 entries: density 0.4 keeps 8 in both
    taus = [s["w"] - base["w"] for s in specialists]
    weights = [0.5, 1.0, 2.0]
    w = torch.tensor(weights)
    density = 0.4
    for tau in taus:  # the trim: ceil and floor agree when density * n is an integer
        assert torch.equal(trim_to_top_magnitude(tau, density), merge_utils.prune(tau, density, "magnitude"))
    trimmed = torch.stack([trim_to_top_magnitude(t, density) for t in taus])
    peft_mask = merge_utils.calculate_majority_sign_mask(trimmed, method="total")
    assert torch.equal(torch.sign(trimmed) == elect_sign(trimmed), peft_mask)
    weighted = trimmed * w.view(3, 1, 1)
    torch.testing.assert_close(disjoint_mean(trimmed, weighted, elect_sign(trimmed)),
                               merge_utils.disjoint_merge(weighted, peft_mask))
    cases = [("task_arithmetic", merge_utils.task_arithmetic(taus, w)),
             ("ties", merge_utils.ties(taus, w, density)),
             ("dare_linear", merge_utils.dare_linear(taus, w, 1.0)),  # drop 0: no randomness to match
             ("dare_ties", merge_utils.dare_ties(taus, w, 1.0))]
    for method, peft_delta in cases:
        merged = merge_state_dicts(base, specialists, method, weights=weights, density=density)
        torch.testing.assert_close(merged["w"] - base["w"], peft_delta, rtol=1e-5, atol=1e-6)


# --- LoRA -------------------------------------------------------------------------------------------------

def test_tied_weights_stay_tied_under_dare(make_model):
    base_model = make_model(seed=0, tie_word_embeddings=True)
    base = base_model.state_dict()
    specialists = []
    for seed in (1, 2):
        model = make_model(seed=0, tie_word_embeddings=True)
        with torch.no_grad():
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed))
                parameter.add_(0.01 * noise)
        specialists.append(model.state_dict())
    assert base["lm_head.weight"].data_ptr() == base["model.embed_tokens.weight"].data_ptr()
    merged = merge_state_dicts(base, specialists, "dare_linear", drop=0.5, seed=3)
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]
    base_model.load_state_dict(merged)  # loads into the model it came from


# --- errors ---------------------------------------------------------------------------------------------

def test_bad_merges_are_one_line_config_errors():
    base, specialists = random_models(0, 2)
    cases = [
        ({"method": "average"}, "unknown method 'average'"),
        ({"method": "ties", "density": 0.0}, "density must lie in (0, 1], got 0.0"),
        ({"method": "ties", "density": 1.5}, "density must lie in (0, 1], got 1.5"),
        ({"method": "dare_linear", "drop": 1.0}, "drop must lie in [0, 1), got 1.0"),
        ({"method": "linear", "weights": [1.0]}, "1 weights for 2 specialists"),
    ]
    for kwargs, message in cases:
        method = kwargs.pop("method")
        with pytest.raises(ConfigError) as error:
            merge_state_dicts(base, specialists, method, **kwargs)
        assert message in str(error.value) and "\n" not in str(error.value)
    wrong_shape = dict(specialists[0], **{"a.weight": torch.zeros(4, 3)})
    with pytest.raises(ConfigError, match=r"merge: parameter a.weight has shape \(4, 3\) in specialist 2 "
                                          r"and \(3, 4\) in the base"):
        merge_state_dicts(base, [specialists[0], wrong_shape], "linear")
    missing = {k: v for k, v in specialists[0].items() if k != "b.bias"}
    with pytest.raises(ConfigError, match="specialist 1 lacks parameter b.bias"):
        merge_state_dicts(base, [missing], "ties")
    with pytest.raises(ConfigError, match="specialist 1 has parameter z, which the base lacks"):
        merge_state_dicts(base, [dict(specialists[0], z=torch.zeros(1))], "ties")
    with pytest.raises(ConfigError, match="non-empty list"):
        merge_state_dicts(base, [], "ties")

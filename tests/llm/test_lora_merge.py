"""LoRA specialists folded into dense weights (amalab/llm/lora_merge.py), against PEFT's own merge."""

from __future__ import annotations

import copy

import pytest
import torch

from amalab.errors import ConfigError
from amalab.llm.lora_merge import lora_delta_state_dict, lora_dense_state_dict
from amalab.llm.models import apply_lora
from amalab.training.merge import merge_state_dicts


def assert_state_equal(got: dict, expected: dict, **tolerance) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name].float(), **tolerance)


def lora_specialist(make_model, seed: int):
    model = apply_lora(make_model(seed=0), {"r": 2, "alpha": 4, "dropout": 0.0,
                                             "target_modules": ["q_proj", "v_proj"]})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter a nonzero delta, as after training
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def test_lora_dense_state_equals_peft_merge_and_unload(make_model):
    model = lora_specialist(make_model, 1)
    dense = lora_dense_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert_state_equal(dense, reference, rtol=1e-6, atol=1e-6)
    base = lora_dense_state_dict(model, with_delta=False)
    assert_state_equal(base, make_model(seed=0).state_dict())
    deltas = lora_delta_state_dict(model)
    assert len(deltas) == 2 * 2  # 2 layers x (q_proj, v_proj)
    name = "model.layers.0.self_attn.q_proj.weight"
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    by_hand = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    torch.testing.assert_close(deltas[name], by_hand)
    # merging two LoRA specialists only moves the adapted weights
    merged = merge_state_dicts(base, [dense, lora_dense_state_dict(lora_specialist(make_model, 2))], "ties",
                               density=0.5)
    changed = {n for n in base if not torch.equal(merged[n], base[n])}
    assert changed == set(deltas)
    with pytest.raises(ConfigError, match="no LoRA adapter 'other'"):
        lora_delta_state_dict(model, "other")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dense_state_is_on_the_merge_device_whatever_the_model_is_on(make_model, lora):
    """A specialist trained on a GPU meets the base's dense state on one device: every tensor of
    ``dense_state`` is moved there. Here the model is on the CPU and the merge device is ``meta`` (a CPU
    build has no second real device): a tensor left where the model lives shows up as a CPU tensor."""
    from amalab.llm.stages.merges import dense_state

    model = lora_specialist(make_model, 1) if lora else make_model(seed=0)
    dense = dense_state(model, device="meta")
    assert {t.device.type for t in dense.values()} == {"meta"}
    assert {t.dtype for t in dense.values() if t.is_floating_point()} == {torch.float32}
    base = dense_state(make_model(seed=0), device="meta")
    for method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):  # meta tensors hold no data
        merged = merge_state_dicts(base, [dense, dense], method, density=0.5)
        assert {t.device.type for t in merged.values()} == {"meta"}

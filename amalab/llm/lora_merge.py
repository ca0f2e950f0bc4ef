"""LoRA specialists as dense weights, for the merges of :mod:`amalab.training.merge` (docs/maths.md (18)-(21)).

:func:`lora_dense_state_dict` folds an adapter into dense weights (theta_0 + B A * scaling per adapted module,
PEFT's own ``get_delta_weight``), so merging dense LoRA specialists merges their dense deltas
B_i A_i * scaling_i.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from amalab.errors import ConfigError
from amalab.training.tensor_identity import tied_aliases


def _lora_layers(peft_model, adapter: str):
    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = {name: module for name, module in base_model.named_modules()
              if isinstance(module, LoraLayer) and adapter in module.lora_A}
    if not layers:
        raise ConfigError(f"merge: the model has no LoRA adapter {adapter!r} (is it a peft LoRA model?)")
    return base_model, layers


def lora_delta_state_dict(peft_model, adapter: str = "default", device: torch.device | str = "cpu",
                          ) -> dict[str, torch.Tensor]:
    """The dense weight delta of every LoRA-adapted module, B A * scaling in float32 (PEFT's
    ``get_delta_weight``, which also transposes fan-in-fan-out layers), on ``device``, keyed by the plain
    model's name of the adapted weight (``model.layers.0.self_attn.q_proj.weight``)."""
    _, layers = _lora_layers(peft_model, adapter)
    with torch.no_grad():
        return {f"{name}.weight": layer.get_delta_weight(adapter).float().to(device) for name, layer in layers.items()}


def lora_dense_state_dict(peft_model, adapter: str = "default", *, with_delta: bool = True,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of the plain model in float32 on ``device``, with the adapter folded in (``with_delta``)
    or left out (the base, theta_0); names as in the model without peft. The model itself is not changed
    (unlike peft's ``merge_and_unload``).

    Every tensor is moved, whatever device the model is on: the merges compute specialist minus base, and a
    specialist trained on the GPU must meet the base's state on one device (the CPU by default).
    """
    base_model, _ = _lora_layers(peft_model, adapter)
    deltas = lora_delta_state_dict(peft_model, adapter, device) if with_delta else {}
    state = base_model.state_dict()
    alias = tied_aliases(state)
    dense: dict[str, torch.Tensor] = {}
    plain_of: dict[str, str] = {}
    for name, tensor in state.items():
        if "modules_to_save" in name or "original_module" in name:
            raise ConfigError(f"merge: {name}: peft modules_to_save are not supported by the LoRA merge")
        if ".lora_" in name:
            continue
        plain = plain_of[name] = name.replace(".base_layer.", ".")
        if name in alias:  # tied weights stay one tensor (merge_state_dicts then merges them once)
            dense[plain] = dense[plain_of[alias[name]]]
            continue
        value = (tensor.detach().float() if tensor.is_floating_point() else tensor.detach()).to(device)
        dense[plain] = value + deltas[plain] if plain in deltas else value.clone()
    return dense

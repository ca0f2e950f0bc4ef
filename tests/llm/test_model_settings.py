"""[model] attn_implementation and frozen_dtype (docs/config.md): the config accepts and refuses their values in
one line, the built models use them, a LoRA policy over a bf16 frozen base keeps a float32 adapter and trains,
and every cache and run made with other settings is refused rather than reused."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from amalab.errors import ConfigError
from amalab.llm.config import LLMConfig, ModelConfig, load_llm_config
from amalab.llm.evaluate import pair_logps
from amalab.llm.experiment import base_model, prepare
from amalab.llm.models import check_attention, load_model, settings_manifest, trainable
from amalab.llm.stages.policies import described, new_policy
from amalab.llm.stages.scoring import loss_cache
from amalab.llm.tiny import tiny_tokenizer
from amalab.llm.train import run_training
from amalab.training.cache import CacheMismatch

CPU = torch.device("cpu")
BF16_LORA = 'name = "tiny"\nuse_lora = true\nfrozen_dtype = "bfloat16"'


def model_keys(text: str) -> dict:
    """``experiment(..., **model_keys(...))``: ``text`` added to the [model] table of the tiny experiment."""
    return {'name = "tiny"': 'name = "tiny"\n' + text}


def one_line_error(path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_llm_config(path)
    assert "\n" not in str(raised.value)
    return str(raised.value)


@pytest.mark.parametrize("text", ['attn_implementation = "eager"', 'attn_implementation = "flash_attention_2"',
                                  'use_lora = true\nfrozen_dtype = "bfloat16"',
                                  'attn_implementation = "sdpa"\nfrozen_dtype = "float32"'])
def test_the_config_accepts_the_supported_values(tmp_path, experiment, text):
    model = load_llm_config(experiment(tmp_path, names='["standard"]', **model_keys(text))).model
    for line in text.splitlines():
        key, value = (part.strip().strip('"') for part in line.split("="))
        assert str(getattr(model, key)).lower() == value


@pytest.mark.parametrize("text, phrase", [
    ('attn_implementation = "flash"', "attn_implementation: 'flash' is not one of 'sdpa', 'eager'"),
    ('frozen_dtype = "float16"', "frozen_dtype: 'float16' is not one of 'float32', 'bfloat16'"),
    ('frozen_dtype = "bfloat16"', "frozen_dtype: 'bfloat16' needs use_lora = true"),
    ('attn_implementation = "flash_attention_2"\nautocast = "none"', "attn_implementation: 'flash_attention_2'"),
])
def test_the_config_refuses_other_values_in_one_line_naming_the_key(tmp_path, experiment, text, phrase):
    assert phrase in one_line_error(experiment(tmp_path, names='["standard"]', **model_keys(text)))


def test_merges_refuse_a_bf16_frozen_base(tmp_path, experiment):
    path = experiment(tmp_path, names='["standard"]', extra='[merges]\nnames = ["linear"]', **model_keys(
        'use_lora = true\nfrozen_dtype = "bfloat16"'))
    assert "frozen_dtype = 'bfloat16'" in one_line_error(path)


def test_flash_attention_without_its_package_is_one_line_naming_the_key():
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match=r"^\[model\] attn_implementation: 'flash_attention_2' needs"):
        check_attention("flash_attention_2")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_built_and_loaded_models_use_the_asked_attention(tmp_path, attn):
    tokenizer = tiny_tokenizer()
    settings = ModelConfig(attn_implementation=attn, use_lora=True)
    base = base_model(dataclasses.replace(LLMConfig(), model=settings), tokenizer, CPU)
    assert base.config._attn_implementation == attn
    policy = trainable(copy.deepcopy(base), settings, seed=0)
    assert policy.get_base_model().config._attn_implementation == attn
    other = "eager" if attn == "sdpa" else "sdpa"
    base.save_pretrained(tmp_path / "model")  # saved by one implementation, loaded with the one asked for
    assert load_model(tmp_path / "model", device=CPU, attn_implementation=other).config._attn_implementation \
        == other


def test_a_bf16_frozen_base_keeps_a_float32_adapter_and_trains(setup, tmp_path, make_run):
    settings = ModelConfig(use_lora=True, frozen_dtype="bfloat16")
    policy = trainable(copy.deepcopy(setup["base"]), settings, seed=0)
    frozen = {n: p for n, p in policy.named_parameters() if not p.requires_grad}
    adapter = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert frozen and {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert adapter and all(".lora_" in n for n in adapter) and {p.dtype for p in adapter.values()} == {torch.float32}
    # the same adapter initialization as over a float32 base
    plain = dict(trainable(copy.deepcopy(setup["base"]), ModelConfig(use_lora=True), seed=0).named_parameters())
    assert all(torch.equal(p, plain[n]) for n, p in adapter.items())
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    final = run_training(policy, make_run(setup, tmp_path, "standard", max_steps=1, eval_steps=0), CPU,
                         show_progress=False)
    assert final["steps"] == 1 and torch.isfinite(torch.tensor(final["tasks"]["task0"]["loss"]))
    after = dict(policy.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in adapter)  # the adapter learned (B moved off 0)
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == torch.bfloat16 for n in frozen)
    assert {after[n].dtype for n in adapter} == {torch.float32}


def test_the_reference_is_the_fresh_policy_over_the_same_bf16_base(tmp_path, experiment):
    exp = prepare(load_llm_config(experiment(tmp_path, names='["standard"]', **model_keys(
        'use_lora = true\nfrozen_dtype = "bfloat16"\nattn_implementation = "eager"'))), show_progress=False)
    assert exp.reference_manifest["frozen_dtype"] == "bfloat16"
    assert exp.reference_manifest["attn_implementation"] == "eager"
    policy = new_policy(exp, seed=0)
    assert policy.get_base_model().config._attn_implementation == "eager"
    pairs = [p for s in exp.train_sets for p in s]
    fresh = pair_logps(policy, pairs, exp.pad_token_id, 8, CPU)
    ids = [p.id for p in pairs]
    # a fresh adapter adds exactly 0: pi_ref must be scored over the same bf16 base, not the float32 one
    assert (fresh.get("chosen", ids) == exp.reference.get("chosen", ids)).all()
    # the base record scores pi_ref as the cache did (bf16); the kept base itself stays float32
    assert {p.dtype for p in exp.on_device().parameters()} == {torch.bfloat16}
    assert {p.dtype for p in exp.base_model.parameters()} == {torch.float32}


@pytest.mark.parametrize("key, value", [("frozen_dtype", '"bfloat16"'), ("attn_implementation", '"eager"')])
def test_a_cache_made_with_other_settings_is_refused_not_reused(tmp_path, experiment, key, value):
    made = prepare(load_llm_config(experiment(tmp_path, names='["standard"]', **model_keys("use_lora = true"))),
                   show_progress=False)
    assert not {"frozen_dtype", "attn_implementation"} & made.reference_manifest.keys()  # defaults: old caches hold
    other = load_llm_config(experiment(tmp_path, names='["standard"]',
                                       **model_keys(f"use_lora = true\n{key} = {value}")))
    with pytest.raises(CacheMismatch, match=f"{key}: cached None, wanted '{value.strip(chr(34))}'"):
        prepare(other, show_progress=False)


def test_loss_caches_and_run_descriptions_record_the_settings(tmp_path, experiment, setup, make_run):
    exp = prepare(load_llm_config(experiment(tmp_path, names='["standard"]', **model_keys(
        'use_lora = true\nfrozen_dtype = "bfloat16"\nattn_implementation = "eager"'))), show_progress=False)
    wanted = {"frozen_dtype": "bfloat16", "attn_implementation": "eager"}
    assert settings_manifest(exp.config.model) == wanted
    assert settings_manifest(ModelConfig()) == {}

    class Recorded:  # the specialists' loss caches go through loss_cache: record its manifest, build nothing
        manifest = None

        def cached(self, folder, manifest, *args):
            Recorded.manifest = manifest

    loss_cache(dataclasses.replace(exp, progress=Recorded()), None, exp.train_sets[0], tmp_path / "c",
               {"kind": "specialist losses"}, "losses")
    assert {key: Recorded.manifest.get(key) for key in wanted} == wanted
    run = described(make_run(setup, tmp_path), {"name": "standard"}, exp.reference_manifest)
    assert run.description["model"] == wanted
    assert "model" not in described(make_run(setup, tmp_path), {}, {"model": "x"}).description

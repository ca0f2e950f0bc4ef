"""``[model] autocast``: "auto" (bf16 on CUDA, plain float32 on CPU), "bf16" (also on CPU), "none".

Under bf16 the sequence log-probs are checked against float32 ones of the same model (the LM head and its
log-softmax stay float32, docs/maths.md section 9), and every cache and run records the autocast, so a
float32 cache is never reused by a bf16 run (docs/maths.md section 11).
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from amalab.cli import main
from amalab.errors import ConfigError
from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import backbone_and_head, head_chunks, sequence_logps
from amalab.llm.precision import autocast_context, autocast_dtype, autocast_manifest

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

#: bf16 keeps 8 bits of mantissa: the tiny model's summed log-probs (about 10-30 completion tokens) move by
#: a few 1e-2 nats; SmolLM2's are measured in benchmarks/README.md
BF16_SEQUENCE_ATOL = 5e-2


def test_each_setting_resolves_on_each_device():
    assert autocast_dtype(CPU, "auto") is None and autocast_dtype(CUDA, "auto") is torch.bfloat16
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16 and autocast_dtype(CUDA, "bf16") is torch.bfloat16
    assert autocast_dtype(CPU, "none") is None and autocast_dtype(CUDA, "none") is None
    # a manifest records only an autocast that is not plain float32: the CPU's "auto" manifests stay as they were
    assert autocast_manifest(CPU, "auto") == {} == autocast_manifest(CUDA, "none")
    assert autocast_manifest(CPU, "bf16") == {"autocast": "bfloat16"} == autocast_manifest(CUDA, "auto")
    with pytest.raises(ConfigError, match=r"\[model\] autocast: 'fp16' is not one of 'auto', 'bf16', 'none'"):
        autocast_dtype(CPU, "fp16")


def test_auto_on_cpu_is_plain_float32_and_bf16_autocasts():
    with autocast_context(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32
    with autocast_context(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16


def test_bf16_log_probs_are_close_to_float32_and_the_head_stays_float32(make_model, tokenized_pairs, tokenizer):
    model = make_model().eval()
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    _, head = backbone_and_head(model)
    seen = []  # (autocast on inside the head, input dtype, output dtype); the layers' output dtype
    head.register_forward_hook(lambda m, args, out: seen.append(
        (torch.is_autocast_enabled("cpu"), args[0].dtype, out.dtype)))
    layer_dtypes = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: layer_dtypes.append(out.dtype))
    with torch.no_grad():
        reference = sequence_logps(model, batch)
        with autocast_context(CPU, "bf16"):
            bf16 = sequence_logps(model, batch)
    assert layer_dtypes == [torch.float32, torch.bfloat16]  # the autocast reached the decoder layers
    chunks = len(head_chunks(int(batch.completion_mask.sum())))
    assert seen == [(False, torch.float32, torch.float32)] * 2 * chunks  # the head and its log-softmax: float32
    assert bf16.chosen.dtype is torch.float64 and all(p.dtype is torch.float32 for p in model.parameters())
    for name in ("chosen", "rejected"):
        difference = (getattr(bf16, name) - getattr(reference, name)).abs()
        assert 0 < difference.max() < BF16_SEQUENCE_ATOL, difference


def _reference_manifest(out) -> dict:
    return json.loads((out / "caches" / "reference" / "manifest.json").read_text())


def test_bf16_run_trains_records_its_autocast_and_refuses_a_float32_cache(tmp_path, capsys, experiment):
    config = experiment(tmp_path, names='["standard"]', **{'name = "tiny"': 'name = "tiny"\nautocast = "bf16"'})
    assert main(["llm", "specialists", str(config), "--quiet"]) == 0
    out = tmp_path / "run"
    assert _reference_manifest(out)["autocast"] == "bfloat16"
    specialist = json.loads((out / "caches" / "specialist-alpha" / "manifest.json").read_text())
    assert specialist["autocast"] == "bfloat16"
    run = json.loads((out / "specialists" / "alpha" / "run.json").read_text())
    assert run["reference"]["autocast"] == "bfloat16"  # a resumed run under another autocast is refused
    first = json.loads((out / "specialists" / "alpha" / "metrics.jsonl").read_text().splitlines()[0])
    # step 1: the policy is the reference, and both forwards ran under the same autocast, so the DPO loss is
    # log 2 (a float32 policy against this bf16 reference misses it by 5e-7: beta / 2 times the rounding)
    assert first["kind"] == "train" and first["loss"] == pytest.approx(math.log(2), abs=1e-12)

    config.write_text(config.read_text().replace('autocast = "bf16"', 'autocast = "none"'))
    assert main(["llm", "specialists", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "caches/reference" in err and "autocast" in err and len(err.splitlines()) == 1, err


def test_auto_on_cpu_records_no_autocast_and_a_bad_value_is_one_line(tmp_path, capsys, experiment):
    config = experiment(tmp_path, names='["standard"]')
    assert main(["llm", "specialists", str(config), "--quiet"]) == 0
    assert "autocast" not in _reference_manifest(tmp_path / "run")  # manifests of existing CPU runs unchanged
    config.write_text(config.read_text().replace('name = "tiny"', 'name = "tiny"\nautocast = "fp16"'))
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{config}: [model]: autocast: 'fp16' is not one of 'auto', 'bf16', 'none'" in err, err
    assert len(err.splitlines()) == 1


def test_generation_runs_under_the_given_autocast(make_model, tokenizer):
    from amalab.llm.generate import greedy_generate

    model = make_model()
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    greedy_generate(model, tokenizer, ["Human: Tell me a joke. Assistant:"], max_new_tokens=2, device=CPU,
                    autocast=lambda: autocast_context(CPU, "bf16"))
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    greedy_generate(model, tokenizer, ["Human: Tell me a joke. Assistant:"], max_new_tokens=2, device=CPU,
                    autocast=contextlib.nullcontext)
    assert seen and set(seen) == {torch.float32}


def test_every_forward_of_a_bf16_run_autocasts(tmp_path, monkeypatch, experiment, experiment_tables):
    """Training, evaluation, the caches, the merges and generation, then `eval`: a hook on the base model's
    first projection (kept by every deep copy: policies and merges) sees only bf16 outputs."""
    import amalab.llm.experiment as experiment_module

    GENERATED_TASK, MERGES = experiment_tables.generated_task, experiment_tables.merges

    seen = []
    build = experiment_module.base_model

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(experiment_module, "base_model", hooked)
    config = experiment(tmp_path, names='["standard"]', extra=MERGES.replace('"ties", "dare_ties"', '"ties"'),
                        extra_task=GENERATED_TASK, batch="6",
                        **{'name = "tiny"': 'name = "tiny"\nautocast = "bf16"'})
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    assert main(["llm", "eval", str(config), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "success" in summary["methods"]["merge-linear"]["tasks"]["sums"]  # generation ran on a merge
    assert len(seen) > 20 and set(seen) == {torch.bfloat16}

"""The GPU check's CPU part: without CUDA, ``python -m benchmarks.gpu_check`` says so in one line and runs
every check on the CPU at tiny sizes (bf16 standing for CPU bf16 autocast, gloo for nccl, torch.compile's
aot_eager backend for inductor), writing gpu_check.json with every check passed.

Independent numbers: at step 1 the policy is its own reference, so the DPO loss is -log sigmoid(0) = log 2
(closed form); the CPU log-probs of the parity check equal the full log-softmax of the same model
(``full_logits_sequence_logps``); the benchmark's tokens/s is its tokens per step over its step time.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def plumbing(tmp_path_factory):
    """The check as it runs on a machine without CUDA, once: (report, its stdout lines, output folder)."""
    import torch

    from benchmarks.gpu_check import main

    out = tmp_path_factory.mktemp("gpu-check")
    threads, printed = torch.get_num_threads(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(torch.cuda, "is_available", lambda: False)
        report = main(["--out", str(out), "--data", ""])
    assert torch.get_num_threads() == threads  # the plumbing's one thread is given back
    return report, printed.getvalue().splitlines(), out


def test_without_cuda_one_line_says_only_the_plumbing_ran(plumbing):
    report, lines, out = plumbing
    assert len(lines) == 1, lines
    assert lines[0].startswith("CUDA is not available: ran only the plumbing test")
    assert f"{len(report['checks'])}/{len(report['checks'])} passed" in lines[0]
    assert str(out / "gpu_check.json") in lines[0]


def test_plumbing_json_has_every_check_and_each_passed(plumbing):
    from benchmarks.gpu_check import KINDS

    report, _, out = plumbing
    written = json.loads((out / "gpu_check.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["cuda"] is False and written["mode"] == "plumbing" and written["complete"] is True
    for key in ("torch", "transformers", "trl", "device"):
        assert key in written["environment"]
    assert {c["kind"] for c in written["checks"]} == set(KINDS)
    for check in written["checks"]:
        assert check["passed"] is True, (check["name"], check.get("error"), check.get("measured"))
        assert check["seconds"] > 0 and "tolerance" in check
    assert written["passed"] is True
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {c['name']} | pass |" in table for c in written["checks"])


def _by_name(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


def test_first_step_loss_is_log_2_in_every_training_check(plumbing):
    report, _, _ = plumbing
    for name, curves in (("bf16_training/tiny", ("loss_fp32", "loss_bf16")),
                         ("bf16_training/tiny+lora", ("loss_fp32", "loss_bf16")),
                         ("compile/tiny", ("loss_eager", "loss_compiled")),
                         ("fsdp2_one_rank/tiny", ("loss_plain", "loss_other")),
                         ("nccl_one_process/tiny", ("loss_plain", "loss_other"))):
        measured = _by_name(report, name)["measured"]
        for curve in curves:
            assert measured[curve][0] == pytest.approx(math.log(2), abs=2e-3 if "bf16" in curve else 1e-5), (name, curve)
            assert len(measured[curve]) == 3
    for name in ("fsdp2_one_rank/tiny", "nccl_one_process/tiny"):
        assert _by_name(report, name)["backend"] == "gloo"


def test_the_sharded_run_stopped_and_resumed_ends_as_the_plain_one(plumbing):
    """On the CPU a sum over one rank is the identity and every step deterministic: the resumed sharded run's
    gradient norms and parameters are the plain run's."""
    report, _, out = plumbing
    resumed = _by_name(report, "fsdp2_one_rank/tiny")["measured"]["resumed_after_2_steps"]
    assert resumed["loss_max_relative_difference"] < 1e-6
    assert resumed["grad_norm_max_relative_difference"] < 1e-6
    assert resumed["parameters_l2_difference_over_l2_update"] < 1e-6
    assert "stopped at 2 and resumed: loss" in (out / "gpu_check.md").read_text()  # in its verdict line


def test_parity_cpu_logps_equal_the_full_log_softmax(plumbing):
    import torch

    from amalab.llm.collate import collate_pairs
    from amalab.llm.logprobs import full_logits_sequence_logps
    from benchmarks import workload

    report, _, _ = plumbing
    measured = _by_name(report, "logprob_parity/tiny")["measured"]
    model, tokenizer = workload.build_model("tiny", torch.device("cpu"), seed=0)
    pairs, _ = workload.tokenized_pairs(tokenizer, 4 * 3, 64, full_length=True, data=None)
    with torch.no_grad():
        logps = full_logits_sequence_logps(model.eval(), collate_pairs(pairs[:4], tokenizer.pad_token_id))
    expected = torch.cat([logps.chosen, logps.rejected]).tolist()
    assert measured["cpu_logps"] == pytest.approx(expected, abs=1e-4)
    assert measured["fp32_max_abs_difference"] == 0.0  # the CPU against itself in the plumbing run
    assert 0 < measured["bf16_mean_abs_difference_per_token"] <= 5e-2


def test_step_benchmark_numbers_are_consistent(plumbing):
    report, _, _ = plumbing
    measured = _by_name(report, "step_benchmark/tiny")["measured"]
    for variant in ("amalab-standard", "trl-dpo"):
        v = measured[variant]
        assert v["tokens_per_step"] == 2 * 4 * 64  # 4 pairs of two 64-token rows
        assert v["tokens_per_s"] == pytest.approx(v["tokens_per_step"] / (v["ms_per_step"] / 1000))
        assert v["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert measured["amalab_over_trl_step_time"] == pytest.approx(
        measured["amalab-standard"]["ms_per_step"] / measured["trl-dpo"]["ms_per_step"])


def test_a_failing_a_slow_and_an_unaffordable_check_do_not_stop_the_others(tmp_path):
    from benchmarks.gpu_check import Check, _with_alarm, run_check

    def fails(limit_s, folder):
        raise ValueError("broken")

    def sleeps(limit_s, folder):
        return _with_alarm(limit_s, lambda: time.sleep(5) or {"passed": True})

    deadline = time.monotonic() + 60
    failed = run_check(Check("a", "compile", 5, fails), deadline, tmp_path)
    assert failed["passed"] is False and failed["error"] == "ValueError: broken"
    slow = run_check(Check("b", "compile", 0.2, sleeps), deadline, tmp_path)
    assert slow["passed"] is False and slow["error"].startswith("CheckTimeout") and slow["seconds"] < 2
    skipped = run_check(Check("c", "compile", 5, fails), time.monotonic() + 1, tmp_path)
    assert skipped["passed"] is None and skipped["skipped"].startswith("budget")


def test_h200_peaks_are_the_data_sheets_dense_bf16_rates():
    from benchmarks.workload import peak_tflops_for

    # NVIDIA's H200 data sheet: 1,979 (SXM) and 1,671 (NVL) bf16 TFLOP/s with 2:4 sparsity, half that dense
    assert peak_tflops_for("NVIDIA H200", "bf16") == pytest.approx(1979 / 2, abs=1)
    assert peak_tflops_for("NVIDIA H200 NVL", "bf16") == pytest.approx(1671 / 2, abs=1)


def test_the_cuda_plans_limits_sum_to_the_default_budget():
    """Every part of the CUDA plan has its own limit, and together they fit the default budget (a lent GPU has
    minutes in all): a part added without shrinking the others fails here."""
    from benchmarks.gpu_check import BUDGET_S, KINDS, cuda_plan

    plan = cuda_plan(data="")
    assert {check.kind for check in plan} == set(KINDS)
    assert sum(check.cap_s for check in plan) <= BUDGET_S <= 300


def test_the_script_installs_the_tested_ranges_of_the_trl_stack():
    """What gpu_check.sh installs where a package is missing is the range amalab.trl is tested on."""
    import re

    from amalab.trl.versions import TESTED

    script = (Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh").read_text()
    installs = dict(re.findall(r'^install \S+ "([a-z]+)([^"]*)"', script, flags=re.M))
    for package in ("trl", "accelerate", "datasets"):
        assert installs.get(package) == TESTED[package], package

"""The benchmark's smallest configuration end to end: tiny Llama, one round of one warm-up and one timed step
of every step variant (amalab ama-r, ama-s, standard, TRL DPOTrainer), the cache part, and the JSON schema.

Timings here mean nothing (a tiny model on a shared machine); the test checks that every path runs and
that results.json has the documented shape, including ``ratio_vs_trl`` per model.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl")


def test_smallest_benchmark_writes_the_documented_json(tmp_path):
    import torch

    from benchmarks.run import main

    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    try:
        results = main(["--models", "tiny", "--parts", "step", "cache", "--rounds", "1",
                        "--warmup-steps", "1", "--timed-steps", "1", "--cache-pairs", "8",
                        "--cache-seq-len", "64", "--cache-repeats", "1", "--threads", "1", "--data", "",
                        "--device", "cpu", "--in-process", "--out", str(out)])
    finally:  # --threads 1 applies to this process: give the other tests their threads back
        torch.set_num_threads(threads)
    written = json.loads((out / "results.json").read_text())
    assert written["schema"] == "amalab-benchmark/1" == results["schema"]
    assert (out / "figure.png").stat().st_size > 0
    for key in ("cpu_count", "torch", "device", "transformers", "trl"):
        assert key in written["machine"]

    block = written["step_time"]["tiny"]
    assert set(block["variants"]) == {"amalab-ama-r", "amalab-ama-s", "amalab-standard", "trl-dpo"}
    for name, variant in block["variants"].items():
        assert variant["errors"] == [], name
        assert variant["step_seconds"]["n"] == 1 and variant["step_seconds"]["median"] > 0
        # every step of either framework processes the same 2 * 8 pairs * 128 tokens
        assert variant["tokens_per_step"] == 2 * 8 * 128
        assert variant["peak_rss_mib"]["median"] > 0
        assert variant["data"] == "synthetic"
        assert variant["rounds"][0]["gradient_checkpointing_active"] is False, name
        if name.startswith("amalab"):  # the mixer's share of the step, timed inside amalab's loop
            assert 0 < variant["mixer_seconds"]["median"] < variant["step_seconds"]["median"]
    ratio = block["ratio_vs_trl"]
    assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(block["variants"]["amalab-standard"]["step_seconds"]["median"]
                                  / block["variants"]["trl-dpo"]["step_seconds"]["median"])
    assert set(block["ratio_vs_trl_by_mixer"]) == {"ama-r", "ama-s", "standard"}
    assert set(block["ratio_vs_standard"]) == {"ama-r", "ama-s"}
    assert set(block["targets"]["met"]) == {"ama-r_vs_trl", "ama-s_vs_trl", "standard_vs_trl",
                                            "ama-r_vs_standard", "ama-s_vs_standard"}

    cache = written["cache_throughput"]["tiny"]
    assert cache["pairs"] == 8
    for method in ("length_sorted", "data_order"):
        assert cache[method]["median_pairs_per_s"] > 0
    # sorting by length never pads more than data order does
    assert cache["padded_tokens"]["length_sorted"] <= cache["padded_tokens"]["data_order"]


def test_length_grouping_feature_pads_less_for_the_same_tokens(tmp_path):
    import torch

    from benchmarks.run import main

    threads = torch.get_num_threads()
    try:
        results = main(["--models", "tiny", "--parts", "features", "--features", "length_grouping",
                        "--mixers", "standard", "--rounds", "1", "--warmup-steps", "1", "--timed-steps", "2",
                        "--seq-len", "512", "--threads", "1", "--data", "", "--device", "cpu", "--in-process",
                        "--out", str(tmp_path / "bench")])
    finally:
        torch.set_num_threads(threads)
    feature = results["step_time"]["tiny"]["features"]["length_grouping"]
    grouped, plain = feature["variant"], feature["baseline"]
    assert (grouped, plain) == ("amalab-standard+micro+grouped", "amalab-standard+micro")
    real, padded = feature["real_tokens_per_step"], feature["padded_tokens_per_step"]
    assert real[grouped] == real[plain] < 2 * 8 * 512  # the same pairs, of their own (varied) lengths
    assert real[grouped] <= padded[grouped] < padded[plain]  # grouping removes padding
    assert feature["step_time_ratio_vs_baseline"]["median"] > 0


def test_bf16_on_cpu_variants_and_the_logprob_error_part(tmp_path):
    import torch

    from benchmarks.run import main

    threads = torch.get_num_threads()
    try:
        results = main(["--models", "tiny", "--parts", "features", "logprob_error", "--features", "bf16_autocast",
                        "--mixers", "standard", "--rounds", "1", "--warmup-steps", "1", "--timed-steps", "1",
                        "--lora", "--error-pairs", "8", "--threads", "1", "--data", "", "--device", "cpu",
                        "--in-process", "--out", str(tmp_path / "bench")])
    finally:
        torch.set_num_threads(threads)
    features = results["step_time"]["tiny"]["features"]
    assert (features["bf16_autocast"]["variant"], features["bf16_autocast"]["baseline"]) == \
        ("amalab-standard+bf16", "amalab-standard")
    assert (features["trl_bf16"]["variant"], features["trl_bf16"]["baseline"]) == ("trl-dpo+bf16", "trl-dpo")
    for name, variant in results["step_time"]["tiny"]["variants"].items():
        assert variant["errors"] == [] and variant["step_seconds"]["median"] > 0, name
    error = results["logprob_error"]["tiny"]
    assert error["pairs"] == 8
    reference, margin = error["reference_sequence_logp_abs_error_nats"], error["dpo_margin_abs_error"]
    assert 0 < reference["mean"] <= reference["max"] < 0.05 * error["tokens_per_sequence"]["max"]
    assert error["dpo_margin_fp32"]["max"] > 0  # the perturbed adapter moved the policy off pi_ref
    # -log sigmoid(h) is 1-Lipschitz in the margin h: the loss error is at most the margin error
    assert 0 < error["dpo_loss_abs_error"]["max"] <= margin["max"]

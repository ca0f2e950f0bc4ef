"""benchmarks/trl_step.py's smallest configuration: the tiny Llama with LoRA, one round of 2 optimizer steps
(1 warm-up + 1 timed) of every variant (plain DPOTrainer, AMATrainer with ama-s and standard), in process.

Timings here mean nothing; the test checks that every variant runs and that results.json has the fields the
README documents, and that the tiny model's ratio carries no gate.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")


def test_smallest_trl_step_benchmark_writes_the_documented_json(tmp_path):
    import torch

    from benchmarks.trl_step import SCHEMA, TRL, VARIANTS, main

    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    try:
        results = main(["--models", "tiny", "--rounds", "1", "--warmup-steps", "1", "--timed-steps", "1",
                        "--threads", "1", "--data", "", "--in-process", "--out", str(out)])
    finally:  # --threads 1 applies to this process: give the other tests their threads back
        torch.set_num_threads(threads)
    written = json.loads((out / "results.json").read_text())
    assert written["schema"] == SCHEMA == results["schema"]
    assert written["command"].startswith("python -m benchmarks.trl_step")
    for key in ("cpu_count", "torch", "transformers", "trl", "load_average_at_start"):
        assert key in written["machine"]
    assert written["settings"]["batch_size"] == 8 and written["settings"]["seq_len"] == 128
    assert written["settings"]["completion_len"] == 32

    block = written["models"]["tiny"]
    assert set(block["variants"]) == set(VARIANTS)
    for name, variant in block["variants"].items():
        assert variant["errors"] == [], name
        assert variant["step_seconds"]["n"] == 1 and variant["step_seconds"]["median"] > 0
        assert variant["cycle_seconds"]["n"] == 1 and variant["cycle_seconds"]["median"] > 0
        (run,) = variant["rounds"]
        assert run["steps_run"] == 2 and run["round"] == 0
        assert run["tokens_per_step"] == 2 * 8 * 128
        assert run["data"].startswith("synthetic")
        # every pair has one shape, so every step of every variant scores the same completion positions
        assert run["completion_tokens_per_step"] == [2 * 8 * 32]
        assert run["trainable_parameters"] > 0  # the LoRA adapter only
    assert len({r["trainable_parameters"] for v in block["variants"].values() for r in v["rounds"]}) == 1

    assert set(block["ratio_vs_trl"]) == set(VARIANTS) - {TRL}
    for name, ratio in block["ratio_vs_trl"].items():
        for kind in ("step", "cycle"):
            (per_round,) = ratio[kind]["per_round"]
            assert math.isfinite(ratio[kind]["median"]) and ratio[kind]["median"] > 0
            mine = block["variants"][name]["rounds"][0][f"median_{kind}_seconds"]
            trl = block["variants"][TRL]["rounds"][0][f"median_{kind}_seconds"]
            assert per_round == pytest.approx(mine / trl)
    assert block["gate"]["at_most"] is None and block["gate"]["met"] is None  # tiny: reported, not gated

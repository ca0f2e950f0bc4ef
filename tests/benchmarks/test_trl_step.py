"""benchmarks/trl_step.py's smallest configuration: the tiny Llama with LoRA, one round of 2 optimizer steps
(1 warm-up + 1 timed) of every variant (plain DPOTrainer, AMATrainer with ama-s and standard), in process.

Timings here mean nothing; the test checks that every variant runs and that results.json has the fields the
README documents, and that the tiny model's ratio carries no gate.
"""

from __future__ import annotations

import json
import math

import pytest



def needs_trl():
    pytest.importorskip("trl")
    pytest.importorskip("peft")


def assert_usage_within(run: dict) -> None:
    """Each timed cycle's CPU time: the process cannot have used more CPU time over a span than its wall time
    on every core (so the usage is the span's, not the process's total), up to getrusage's tick; and the
    steps computed something."""
    import os

    assert len(run["cycle_usage"]) == len(run["cycle_seconds"])
    for usage, seconds in zip(run["cycle_usage"], run["cycle_seconds"]):
        assert usage["user_seconds"] + usage["system_seconds"] <= seconds * os.cpu_count() + 0.02
    assert sum(usage["user_seconds"] for usage in run["cycle_usage"]) > 0


def test_smallest_trl_step_benchmark_writes_the_documented_json(tmp_path):
    needs_trl()
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
    for key in ("cpu", "cpu_count", "torch", "transformers", "trl", "load_average_at_start", "allocator_environment"):
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
        assert run["allocator"] in ("glibc", "jemalloc", "tcmalloc")
        assert_usage_within(run)
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


def test_interleaved_steps_take_turns_in_the_schedule_and_never_overlap():
    """Turns: three workers in their own threads, each step a short sleep; the steps run one at a time, in
    the order given rotated by one each round, so that no worker takes two steps in a row."""
    import threading
    import time

    from benchmarks.trl_step import Turns

    names, steps = ["a", "b", "c"], 4
    turns, spans, lock = Turns(names, steps), [], threading.Lock()

    def worker(name):
        turns.started.wait()
        for k in range(steps):
            turns.wait_for_turn(name)
            began = time.perf_counter()
            time.sleep(0.01)
            with lock:
                spans.append((began, time.perf_counter(), name))
            turns.end_turn()
        turns.wait_for_all()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in reversed(names)]  # started out of order
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    spans.sort()
    assert [name for *_, name in spans] == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(end <= next_began for (_, end, _), (next_began, _, _) in zip(spans, spans[1:]))


def test_a_failed_trainer_releases_the_others_waiting_for_their_turn():
    import threading

    from benchmarks.trl_step import Turns

    turns, raised = Turns(["a", "b"], 2), []

    def second():
        try:
            turns.wait_for_turn("b")  # "a" goes first and fails instead of ending its turn
        except RuntimeError as e:
            raised.append(str(e))

    t = threading.Thread(target=second, daemon=True)
    t.start()
    turns.fail("a: ValueError: boom")
    t.join(timeout=30)
    assert not t.is_alive() and raised == ["another trainer failed: a: ValueError: boom"]


def time_of(round_: dict, kind: str) -> float:
    """An interleaved round's one timed step: its wall seconds, or its cycle's user CPU seconds."""
    return round_["cycle_usage"][0]["user_seconds"] if kind == "user" else round_[f"{kind}_seconds"][0]


def test_interleaved_benchmark_reports_one_ratio_per_step_round(tmp_path):
    """``--interleave steps``: one process trains every variant, a round is one timed step of each, and each
    round's ratio is that step's time over TRL's; the trainers' steps (turn to on_step_end) never overlap and
    come in the rotated order."""
    needs_trl()
    import torch

    from benchmarks.trl_step import TRL, VARIANTS, main

    threads = torch.get_num_threads()
    try:
        results = main(["--models", "tiny", "--interleave", "steps", "--rounds", "3", "--warmup-steps", "1",
                        "--threads", "1", "--data", "", "--in-process", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    block = results["models"]["tiny"]
    for name, variant in block["variants"].items():
        assert variant["errors"] == [], name
        assert [r["round"] for r in variant["rounds"]] == [0, 1, 2]
        assert all(r["steps_run"] == 4 and r["completion_tokens_per_step"] == [2 * 8 * 32] for r in variant["rounds"])
        assert variant["cycle_seconds"]["n"] == 3
        assert variant["cycle_minor_faults"]["n"] == 3
        for run in variant["rounds"]:
            assert_usage_within(run)
    for name in set(VARIANTS) - {TRL}:
        for kind in ("step", "cycle", "user"):
            expected = [time_of(a, kind) / time_of(t, kind)
                        for a, t in zip(block["variants"][name]["rounds"], block["variants"][TRL]["rounds"])]
            assert block["ratio_vs_trl"][name][kind]["per_round"] == pytest.approx(expected)
            assert block["ratio_vs_trl"][name][kind]["median_interval_95"] == [min(expected), max(expected)]
    names = list(VARIANTS)  # the default order, rotated by one each round
    spans = sorted((r["turn_span"][0], r["turn_span"][1], r["round"], name)
                   for name, v in block["variants"].items() for r in v["rounds"])
    assert all(end <= next_began for (_, end, *_), (next_began, *_) in zip(spans, spans[1:]))
    # timed round k is the run's step k + 1 (one warm-up step): its order is names rotated by k + 1
    assert [(k, name) for *_, k, name in spans] == [
        (k, name) for k in range(3) for name in names[(k + 1) % 3:] + names[:(k + 1) % 3]]


def test_median_interval_is_a_percentile_bootstrap_of_the_median():
    """Against an independent enumeration: for 3 values every resample's median is one of them, with
    probabilities 7/27 (smallest), 13/27 (middle), 7/27 (largest), so the 2.5 and 97.5 percentiles of 10,000
    resamples are the smallest and the largest; for 2 values there is no interval."""
    from benchmarks.trl_step import _median_interval

    assert _median_interval([1.0, 2.0, 3.0]) == [1.0, 3.0]
    assert _median_interval([1.0, 2.0]) is None
    values = [0.9, 0.95, 1.0, 1.0, 1.01, 1.02, 1.04, 1.3]
    low, high = _median_interval(values)
    assert low == _median_interval(values)[0] and 0.95 <= low < 1.0 < high <= 1.04


def test_same_batch_check_times_both_trainers_on_each_round(tmp_path):
    """benchmarks/trl_same_batch.py's smallest run: each round times both trainers' compute_loss and
    backward once, and the ratios are AMATrainer's times over TRL's, round by round."""
    needs_trl()
    import torch

    from benchmarks.trl_same_batch import PARTS, main

    threads = torch.get_num_threads()
    try:
        results = main(["--model", "tiny", "--rounds", "3", "--threads", "1", "--data", "", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "results.json").read_text())["command"].startswith("python -m benchmarks.trl_same")
    for part in PARTS:
        trl, ama = results["seconds"]["trl-dpo"][part], results["seconds"]["ama-ama-s"][part]
        assert len(trl) == len(ama) == 3 and min(trl + ama) > 0
        assert results["ratio_ama_s_vs_trl"][part]["per_round"] == pytest.approx([a / t for a, t in zip(ama, trl)])


def test_an_interleaved_trainer_that_fails_releases_the_others(tmp_path, monkeypatch):
    """A trainer raising inside its step stops the interleaved run with its error (no thread left waiting
    for a turn that never comes): recorded on every variant."""
    needs_trl()
    import threading

    import torch
    from trl import DPOTrainer

    from benchmarks.trl_step import TRL, VARIANTS, main

    def broken_step(self, *args, **kwargs):
        raise ValueError("broken step")

    monkeypatch.setattr(DPOTrainer, "training_step", broken_step)  # AMATrainer is a DPOTrainer: all break
    threads = torch.get_num_threads()
    try:
        results = main(["--models", "tiny", "--interleave", "steps", "--rounds", "2", "--warmup-steps", "1",
                        "--variants", TRL, "ama-ama-s", "--threads", "1", "--data", "", "--in-process",
                        "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    block = results["models"]["tiny"]
    for name in (TRL, "ama-ama-s"):
        (error,) = block["variants"][name]["errors"]
        assert "broken step" in error
    assert not [t for t in threading.enumerate() if t.name in (TRL, "ama-ama-s")]  # the trainers' threads ended
    assert set(VARIANTS) > set(block["variants"])


def test_summary_ratios_of_cpu_times_per_round_and_none_where_trl_took_none():
    """Per round the AMATrainer variant's wall, user-CPU and system-CPU times over TRL's (hand-built runs); a
    round where TRL's step took no system CPU time (a short step can) has no system ratio, and the median
    is over the others."""
    from benchmarks.trl_step import summarize

    def run(variant, k, wall, user, system):
        return {"variant": variant, "round": k, "step_seconds": [wall], "cycle_seconds": [wall],
                "median_step_seconds": wall, "median_cycle_seconds": wall,
                "cycle_usage": [{"user_seconds": user, "system_seconds": system, "minor_faults": 10}]}

    runs = [run("trl-dpo", 0, 1.0, 2.0, 0.0), run("ama-ama-s", 0, 1.1, 2.2, 0.1),
            run("trl-dpo", 1, 2.0, 4.0, 0.5), run("ama-ama-s", 1, 1.0, 3.0, 1.0),
            run("trl-dpo", 2, 1.0, 2.0, 0.5), run("ama-ama-s", 2, 1.0, 2.0, 2.0),
            run("trl-dpo", 3, 1.0, 2.0, 0.5), run("ama-ama-s", 3, 1.0, 2.0, 0.0)]
    old = dict(run("trl-dpo", 4, 1.0, 0, 0))  # a result from before cycle_usage was recorded
    del old["cycle_usage"]
    summary = summarize("tiny", runs + [old, run("ama-ama-s", 4, 1.2, 2.0, 0.5)], 1.02)
    ratios = summary["ratio_vs_trl"]["ama-ama-s"]
    assert ratios["cycle"]["per_round"] == pytest.approx([1.1, 0.5, 1.0, 1.0, 1.2])
    assert ratios["user"]["per_round"][:4] == pytest.approx([1.1, 0.75, 1.0, 1.0])
    assert ratios["user"]["per_round"][4] is None and ratios["user"]["median"] == pytest.approx(1.0)
    system = ratios["system"]["per_round"]
    assert system[0] is None and system[3] is None and system[4] is None
    assert system[1:3] == pytest.approx([2.0, 4.0]) and ratios["system"]["median"] == pytest.approx(3.0)
    # per variant, the recorded cycles' CPU times and faults
    assert summary["variants"]["trl-dpo"]["cycle_system_seconds"] == {"n": 4, "median": 0.5, "min": 0.0, "max": 0.5}
    assert summary["variants"]["ama-ama-s"]["cycle_user_seconds"] == {"n": 5, "median": 2.0, "min": 2.0, "max": 3.0}


def test_the_allocator_is_read_from_the_memory_map():
    from benchmarks.trl_step import _allocator

    libc = "7f2a1c000000-7f2a1c028000 r--p 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    jemalloc = "7f2a1b000000-7f2a1b010000 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    tcmalloc = "7f2a1a000000-7f2a1a010000 r-xp 00000000 08:01 98 /usr/lib/libtcmalloc_minimal.so.4\n"
    assert _allocator(libc) == "glibc"
    assert _allocator(libc + jemalloc) == "jemalloc" and _allocator(tcmalloc + libc) == "tcmalloc"
    assert _allocator() in ("glibc", "jemalloc", "tcmalloc")  # this process's own map

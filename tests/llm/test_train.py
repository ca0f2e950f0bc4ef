"""The one training loop: gradient accumulation equals one batch, exact resume, divergence stops cleanly.

References: the same loop run another way (one big batch, no interruption), a hand-written AMA-S step
with torch autograd, and the mixers' own one-batch ``step``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from amalab.training.cache import ValueCache
from amalab.training.checkpoint import list_checkpoints
from amalab.llm.logprobs import sequence_logps
from amalab.llm.collate import collate_pairs
from amalab.objectives.preference import preference_losses
from amalab.llm.train import run_training
from amalab.training.run import TrainingDiverged
from amalab.training.state import lr_factor
from amalab.mixers import make_mixer

CPU = torch.device("cpu")


@pytest.mark.parametrize("mixer_name", ["ama-s", "ama-r-sim", "standard"])
def test_gradient_accumulation_equals_one_batch(setup, tmp_path, mixer_name, monkeypatch, make_run, train,
                                                recording_adamw):
    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    recording_adamw.steps = []
    whole, _ = train(setup, make_run(setup, tmp_path, mixer_name, "whole", max_steps=3))
    whole_grads, recording_adamw.steps = recording_adamw.steps, []
    split_run = make_run(setup, tmp_path, mixer_name, "split", max_steps=3, micro_batch_size=1)
    split, _ = train(setup, split_run)
    # the first step starts from the same parameters: the accumulated gradient is the batch gradient
    for a, b in zip(whole_grads[0], recording_adamw.steps[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert max(g.abs().max() for g in whole_grads[0]) > 1e-3  # a real gradient, not zeros
    # Adam then amplifies float-rounding differences of near-zero gradient entries, but only that far
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split_lines = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines, split_lines):
        if a["kind"] == "train":
            np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-9)


def test_sequential_amar_refuses_accumulation(setup, tmp_path, make_run, train):
    with pytest.raises(Exception, match="ama-r-sim"):
        train(setup, make_run(setup, tmp_path, "ama-r", micro_batch_size=2))


def test_one_step_matches_a_hand_written_ama_s_step(setup, tmp_path, make_run, train, fresh_policy):
    """The loop's first AMA-S step equals: draw, mean clipped excess over the batch, AdamW step."""
    run = make_run(setup, tmp_path, "ama-s", max_steps=1, warmup_steps=0, max_grad_norm=0.0)
    trained, _ = train(setup, run)
    # by hand, with the same draws
    mixer = make_mixer("ama-s", 2, gamma=0.5)
    rng = np.random.default_rng([7, 0x5eed])
    task_ids = mixer.draw(rng, 4)
    from amalab.training.sampler import TaskSampler

    picks = TaskSampler([len(s) for s in setup["train"]], 7).take(task_ids)
    pairs = [setup["train"][t][i] for t, i in picks]
    model = fresh_policy(setup)
    batch = collate_pairs(pairs, setup["tokenizer"].pad_token_id)
    logps = sequence_logps(model, batch)
    ids = list(batch.ids)
    ref_c = torch.from_numpy(setup["reference"].get("chosen", ids))  # float64, as the loop reads the cache
    ref_r = torch.from_numpy(setup["reference"].get("rejected", ids))
    losses, _ = preference_losses("dpo", logps.chosen, logps.rejected, ref_c, ref_r, 0.1)
    s = torch.from_numpy(setup["specialist"].get("loss", ids))
    objective = torch.clamp(losses - s, min=0).sum() / 4  # mean clipped excess: AMA-S's gradient
    objective.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    optimizer.step()
    for (name, a), b in zip(trained.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mixer_name", ["ama-s", "ama-r"])
def test_interrupted_run_resumes_exactly(setup, tmp_path, mixer_name, make_run, train, fresh_policy):
    straight, final = train(setup, make_run(setup, tmp_path, mixer_name, "straight", max_steps=6,
                                            eval_steps=2))
    halves = make_run(setup, tmp_path, mixer_name, "halves", max_steps=6, eval_steps=2)
    model = fresh_policy(setup)
    assert run_training(model, halves, CPU, show_progress=False, stop_after=3) == {}
    assert [s for s, _ in list_checkpoints(halves.run_dir)] == [3]
    resumed_run = dataclasses.replace(halves, mixer=make_run(setup, tmp_path, mixer_name).mixer)
    resumed = fresh_policy(setup)  # a fresh process: fresh model and mixer, state from disk
    final_resumed = run_training(resumed, resumed_run, CPU, show_progress=False)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name  # bitwise on CPU
    assert final_resumed == final
    straight_log = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed_log = (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "tokens_per_s", "mixer_seconds")} for x in straight_log]
    strip_r = [{k: v for k, v in json.loads(x).items() if k not in ("seconds", "tokens_per_s", "mixer_seconds")} for x in resumed_log]
    assert strip == strip_r


def test_a_finished_run_is_not_rerun(setup, tmp_path, make_run, train):
    run = make_run(setup, tmp_path, "standard", max_steps=2)
    _, final = train(setup, run)
    before = (run.run_dir / "metrics.jsonl").read_text()
    _, again = train(setup, run)
    assert again == final and (run.run_dir / "metrics.jsonl").read_text() == before


def test_other_settings_in_the_same_folder_are_refused(setup, tmp_path, make_run, train):
    train(setup, make_run(setup, tmp_path, "standard", max_steps=2))
    with pytest.raises(Exception, match="other settings"):
        train(setup, make_run(setup, tmp_path, "standard", max_steps=3))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, make_run, fresh_policy):
    run = make_run(setup, tmp_path, "ama-s", max_steps=4, save_steps=2)
    model = fresh_policy(setup)
    run_training(model, run, CPU, show_progress=False, stop_after=2)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = ValueCache(setup["reference"].ids, {**setup["reference"].columns,
                                               "chosen": np.full(len(setup["reference"].ids), np.nan)})
    with pytest.raises(TrainingDiverged, match=r"step 3: task \d has a non-finite loss.*last good checkpoint is step 2"):
        run_training(model, dataclasses.replace(run, reference=bad), CPU, show_progress=False)
    assert [s for s, _ in list_checkpoints(run.run_dir)] == [2]
    # resuming with good data continues from step 2 as if nothing had happened
    fresh = fresh_policy(setup)
    run_training(fresh, dataclasses.replace(run, mixer=make_run(setup, tmp_path, "ama-s").mixer), CPU,
                 show_progress=False, stop_after=0)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, saved[name]), name


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 2, 0.1) == pytest.approx(0.5)
    assert lr_factor(1, 10, 2, 0.1) == pytest.approx(1.0)
    assert lr_factor(2, 10, 2, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)
    mid = 2 + 4  # halfway through the decay: the cosine is at its mean
    assert lr_factor(mid, 10, 2, 0.1) == pytest.approx(0.55)


@pytest.mark.parametrize("steps, warmup, min_ratio", [(10, 2, 0.1), (100, 10, 0.0), (7, 0, 0.25), (20, 3, 0.05)])
def test_lr_schedule_is_transformers_cosine_with_warmup_one_step_ahead(steps, warmup, min_ratio):
    """transformers' cosine-with-minimum schedule: the same decay; its warm-up is ours one step later
    (its step 0 has factor 0), which is why ours stays (see lr_factor)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, steps, min_lr_rate=min_ratio).lr_lambdas[0]
    for step in range(steps + 1):
        expected = theirs(step + 1) if step < warmup else theirs(step)
        assert lr_factor(step, steps, warmup, min_ratio) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _padding_cost(chunks, lengths) -> int:
    return sum(2 * len(chunk) * max(lengths[j] for j in chunk) for chunk in chunks)


def _partitions(items: list[int], size: int):
    """Every way to cut ``items`` into groups of ``size`` (the last may be smaller), by enumeration."""
    if len(items) <= size:
        yield [items]
        return
    import itertools

    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = [x for x in rest if x not in others]
        for tail in _partitions(remaining, size):
            yield [[first, *others], *tail]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n, micro", [(6, 2), (7, 3), (8, 4)])
def test_length_grouped_chunks_pad_as_little_as_any_partition(n, micro, seed):
    from amalab.training.step import length_grouped_chunks

    rng = np.random.default_rng(seed)
    slots = np.arange(n) * 3 + 1  # slot numbers are not positions
    lengths = rng.integers(5, 60, size=n).tolist()
    chunks = length_grouped_chunks(slots, lengths, micro)
    position = {int(s): i for i, s in enumerate(slots)}
    assert sorted(int(s) for c in chunks for s in c) == sorted(slots.tolist())  # every slot once
    assert sorted(len(c) for c in chunks) == sorted(len(c) for c in (range(n)[i:i + micro] for i in range(0, n, micro)))
    best = min(_padding_cost(p, lengths) for p in _partitions(list(range(n)), micro))
    assert _padding_cost([[position[int(s)] for s in c] for c in chunks], lengths) == best


def test_length_grouped_micro_batches_pad_less_for_the_same_step(setup, tmp_path, monkeypatch, make_run, train,
                                                                  recording_adamw):
    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    runs = {}
    for grouped in (False, True):
        recording_adamw.steps = []
        name = f"grouped-{grouped}"
        train(setup, make_run(setup, tmp_path, "ama-s", name, max_steps=3, batch_size=8, micro_batch_size=2,
                              group_by_length=grouped))
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[grouped] = (recording_adamw.steps[0], [x for x in lines if x["kind"] == "train"])
    (plain_grads, plain), (grouped_grads, grouped) = runs[False], runs[True]
    for a, b in zip(plain_grads, grouped_grads):  # the same pairs, only summed in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(plain, grouped):
        assert a["tokens"] == b["tokens"] and b["padded_tokens"] <= a["padded_tokens"]
        np.testing.assert_allclose(a["weights"], b["weights"], rtol=1e-9)
    assert sum(b["padded_tokens"] for b in grouped) < sum(a["padded_tokens"] for a in plain)

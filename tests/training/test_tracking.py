"""Experiment tracking: with ``report_to = ["tensorboard"]`` the event files hold exactly the values of
``metrics.jsonl`` (read back with TensorBoard's own EventAccumulator), a resumed run shows no step twice,
and the default writes no event file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from amalab.cli import main
from amalab.llm.train import run_training

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged_value(lines: list[dict], tag: str, step: int, tasks: list[str]) -> float:
    """What metrics.jsonl says the scalar ``tag`` is at ``step`` (read by tag: an independent parse)."""
    head, _, rest = tag.partition("/")
    if head in ("weights", "average_weights"):
        kind, path = "train", [head, rest]
    else:
        kind, path = head, rest.split("/")
    (line,) = [x for x in lines if x["kind"] == kind and x["step"] == step]
    if kind == "eval" and path[0] in tasks:
        path = ["tasks", *path]
    value = line
    for key in path:
        value = value[tasks.index(key)] if isinstance(value, list) else value[key]
    return value


def check_events_hold_the_logged_values(run_dir: Path, tasks: list[str]) -> None:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = read_events(run_dir / "tensorboard")
    required = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/worst_excess",
                *(f"{name}/{t}" for t in tasks for name in ("weights", "average_weights", "train/batch_excess")),
                *(f"eval/{t}/{m}" for t in tasks for m in ("loss", "excess", "accuracy", "margin"))}
    assert required <= set(events), required - set(events)
    for tag, points in events.items():
        kind = "train" if tag.startswith(("train/", "weights/", "average_weights/")) else "eval"
        assert [s for s, _ in points] == [x["step"] for x in lines if x["kind"] == kind], tag  # each step once
        for step, value in points:
            assert value == pytest.approx(logged_value(lines, tag, step, tasks), rel=1e-6, abs=1e-30), (tag, step)


def test_tensorboard_events_hold_every_logged_value(setup, tmp_path, make_run, train):
    run = make_run(setup, tmp_path, "ama-s", max_steps=4, eval_steps=2, report_to=["tensorboard"])
    train(setup, run)
    check_events_hold_the_logged_values(run.run_dir, ["task0", "task1"])


def test_a_resumed_run_shows_each_step_once(setup, tmp_path, make_run, train, fresh_policy):
    """A run killed after logging step 3 but before checkpointing it: step 3 is redone, and shown once."""
    run = make_run(setup, tmp_path, "ama-r", max_steps=5, eval_steps=2, save_steps=2, report_to=["tensorboard"])
    model = fresh_policy(setup)
    run_training(model, run, torch.device("cpu"), show_progress=False, stop_after=3)
    checkpoints = run.run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-000003")  # the crash: step 3 logged, its checkpoint never written
    (checkpoints / "latest").write_text("step-000002\n")
    train(setup, run)
    check_events_hold_the_logged_values(run.run_dir, ["task0", "task1"])
    lines = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_the_default_writes_no_event_file(setup, tmp_path, make_run, train):
    run = make_run(setup, tmp_path, "standard", max_steps=2)
    train(setup, run)
    assert (run.run_dir / "metrics.jsonl").is_file()
    assert not (run.run_dir / "tensorboard").exists() and not list(tmp_path.rglob("events.out.tfevents*"))


def test_report_to_in_the_config_tracks_every_generalist_and_can_be_switched(tmp_path, experiment):
    config = experiment(tmp_path, names='["ama-s"]', **{"save_steps = 2": 'save_steps = 2\nreport_to = ["tensorboard"]'})
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    out = tmp_path / "run"
    for seed in (0, 1):
        check_events_hold_the_logged_values(out / "generalists" / "ama-s" / f"seed{seed}", ["alpha", "beta"])
    assert not list((out / "specialists").rglob("events.out.tfevents*"))  # [specialists.optim] has its own
    # switching the tracker off continues the same runs (run.json does not hold report_to)
    config.write_text(config.read_text().replace('report_to = ["tensorboard"]', "report_to = []"))
    assert main(["llm", "run", str(config), "--quiet"]) == 0


@pytest.mark.parametrize("value,message", [
    ('["wandb"]', "report_to: unknown tracker 'wandb'; known: tensorboard"),
    ('"tensorboard"', "report_to: expected a list, got 'tensorboard'"),
    ('["tensorboard", "tensorboard"]', "report_to: a tracker is listed twice"),
])
def test_a_bad_report_to_is_one_line(tmp_path, capsys, value, message, experiment):
    config = experiment(tmp_path, names='["standard"]', **{"save_steps = 2": f"save_steps = 2\nreport_to = {value}"})
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "[train]" in err and len(err.splitlines()) == 1, err

"""The TRL recipe (experiments/trl_ama/ama_dpo.py) from its command line, as its README runs it, at tiny sizes:
specialists with DPOTrainer, s(z) of the training and held-out pairs, the AMATrainer generalist; a rerun
continues instead of starting over.

Independent numbers: the held-out worst-task excess the recipe prints is the largest of the per-task
excesses it wrote (docs/maths.md (52)); the record of the scored pairs names each task's specialist by the
fingerprint of the folder the recipe saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "trl_ama" / "ama_dpo.py"


def write_task(path: Path, task: str, n: int) -> str:
    rows = [{"prompt": f"\n\nHuman: {task} question {i}?\n\nAssistant:", "chosen": f" {task} good answer {i}.",
             "rejected": f" {task} bad {i} no no."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_recipe(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    config = REPO / "experiments" / "trl_ama" / "tiny.yaml"
    tasks = [f"sums={write_task(tmp_path / 'sums.jsonl', 'sums', 20)}",
             f"facts={write_task(tmp_path / 'facts.jsonl', 'facts', 14)}"]
    command = [sys.executable, str(SCRIPT), "--config", str(config), "--tasks", *tasks, "--held_out", "4",
               "--max_examples", "100", "--specialist_max_steps", "2", "--max_steps", "3", "--save_steps", "2",
               "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("recipe")
    first = run_recipe(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp_path, first


def test_the_recipe_trains_specialists_scores_and_trains_the_generalist(recipe_run):
    from datasets import load_from_disk

    from amalab.trl.baselines import read_baseline_record

    tmp_path, first = recipe_run
    out = tmp_path / "out"
    for task in ("facts", "sums"):
        assert json.loads((out / "specialists" / task / "done.json").read_text())["steps"] == 2
    record = read_baseline_record(load_from_disk(str(out / "scored" / "train")))
    assert record["kind"] == "specialists" and record["tasks"] == ["facts", "sums"]
    assert len(set(record["models"].values())) == 2  # each task scored by its own specialist
    metrics = json.loads((out / "generalist-ama-s" / "eval_results.json").read_text())
    excesses = [metrics[f"eval_{task}_excess"] for task in ("facts", "sums")]
    assert metrics["eval_worst_excess"] == pytest.approx(max(excesses))
    assert f"held-out worst-task excess {max(excesses):.4f}" in first.stdout
    assert json.loads((out / "generalist-ama-s" / "train_results.json").read_text())["train_loss"] > 0
    assert "ama-s" in (out / "generalist-ama-s" / "README.md").read_text()  # the card records the mixer


def test_a_rerun_continues_instead_of_starting_over(recipe_run):
    tmp_path, first = recipe_run
    out = tmp_path / "out"
    done = {task: (out / "specialists" / task / "done.json").stat().st_mtime_ns for task in ("facts", "sums")}
    # the saved pairs' own files (TRL's tokenization adds its cache files beside them on every load)
    scored = {p.name: p.stat().st_mtime_ns for p in (out / "scored" / "train").glob("data-*.arrow")}
    again = run_recipe(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {task: (out / "specialists" / task / "done.json").stat().st_mtime_ns for task in done} == done
    assert scored and {p.name: p.stat().st_mtime_ns for p in (out / "scored" / "train").glob("data-*.arrow")} == scored
    assert "held-out worst-task excess" in again.stdout


def test_a_bad_task_entry_is_one_line(tmp_path):
    result = run_recipe(tmp_path, "--tasks", "only-a-name")
    assert result.returncode != 0
    assert "--tasks 'only-a-name': expected NAME=SOURCE" in result.stderr
    assert "Traceback" not in result.stderr

"""Decisions every rank shares (docs/distributed.md, "Decisions every rank shares"): 2 gloo processes whose
run folders differ, or where one rank refuses or fails, both end at once with the same one-line error (or,
where rank 0's folder decides, with the same result), never one rank waiting in a collective for the process
group's timeout. Besides training: the generalists stage's decisions (which runs finished, the base model's
record) and the per-example caches (:func:`amalab.training.cache.cached`), on stand-ins for the model work.

Each scenario is its own fork of 2 processes (a regression leaves the ranks' collectives out of step, which
must not spill into the next scenario). The process group gets a short timeout, ``TIMEOUT_S``, through
:func:`~amalab.training.distributed.init_world`, so a regression fails the test after it instead of hanging
CI; with the shared decisions every rank is done in about a second, well under it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from amalab.config import load_section
from amalab.errors import ConfigError
from amalab.llm.config import LLMConfig
from amalab.llm.stages import generalists as generalist_stage
from amalab.llm.train import run_training
from amalab.training import cache as value_cache
from amalab.training import distributed
from amalab.training import run as training_run
from amalab.training.distributed import (all_reduce_sum, barrier, close_world, decide_on_rank0, init_world,
                                         on_every_rank)

CPU = torch.device("cpu")
TIMEOUT_S = 30  # the process group's timeout in these tests: a hang fails after it
PROMPT_S = 10  # each rank must end within this (about 1 s with shared decisions)
STEPS = 2
FOREIGN = {"mixer": "another run's", "optim": {}}


# Each scenario is ``act(rank, world, root, setup, fixtures)``: ``fixtures`` holds the conftest fixtures'
# values it may use (``make_run``, ``fresh_policy``), which the fork hands over as they are.

def train_run(rank, world, root, setup, fixtures):
    """The same run on every rank, each in its own folder ``root/rank<r>/run`` (no shared filesystem)."""
    run = fixtures.make_run(setup, root / f"rank{rank}", "ama-s", "run", max_steps=STEPS)
    run_training(fixtures.fresh_policy(setup), run, CPU, world, show_progress=False)


def cannot_save(rank, world, root, setup, fixtures):
    """Rank 0's disk is full when it saves the checkpoint."""
    if rank == 0:
        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        training_run.save_checkpoint = full  # this forked process only
    train_run(rank, world, root, setup, fixtures)


def rank0_decides(rank, world, root, setup, fixtures):
    """Every rank gets rank 0's result; then rank 0's error is raised on every rank."""
    assert decide_on_rank0(world, lambda: f"rank {rank}'s answer") == "rank 0's answer"
    decide_on_rank0(world, lambda: 1 / 0)


def rank1_fails_alone(rank, world, root, setup, fixtures):
    def read():
        if rank == 1:
            raise ConfigError("rank 1 cannot read its file")
        return 0

    on_every_rank(world, read)


# --- the generalists stage and the caches, on stand-ins for the model work ---------------------------------

#: the folder of the one generalist of the stand-in config (method ama-s, seed 0)
GENERALIST = "generalists/ama-s/seed0"
STAMP = {"fingerprint": "specialist losses"}
NO_SPACE = OSError(28, "No space left on device")


def stage_experiment(rank, world, root):
    """A stand-in Experiment with one generalist (method ama-s, seed 0), its output folder root/rank<r>."""
    methods = SimpleNamespace(names=["ama-s"], runs=lambda: [("ama-s", "ama-s", False)], seeds_of=lambda m: 1)
    return SimpleNamespace(config=SimpleNamespace(methods=methods, seed=0, source_path="config.toml"),
                           out=root / f"rank{rank}", world=world, on_device=lambda: None,
                           progress=SimpleNamespace(say=lambda text: None))


LOSSES = SimpleNamespace(stamp=lambda: STAMP)  # the specialist losses the stand-in generalists are scored on


def stand_in_model_work(root):
    """Replace, in this forked process, what would train, score or generate with stand-ins; scoring is a
    collective, as evaluation is, so ranks that disagree on whether to score are caught waiting."""
    description = json.loads((root / "description.json").read_text())

    def scored(experiment, model, losses, run_dir, final):
        all_reduce_sum(np.ones(1), experiment.world)
        return {"tasks": {}, "specialist_losses": STAMP, "scored": True}

    generalist_stage.check_generalist_batches = lambda config, world: None
    generalist_stage.generalist_run = lambda experiment, label, method, s, run_dir, *rest: SimpleNamespace(
        run_dir=run_dir, description=description)
    generalist_stage.train_policy = lambda experiment, run: (None, {"tasks": {}, "steps": STEPS})
    generalist_stage.scored = scored
    generalist_stage.add_generation = lambda experiment, model, run_dir, final: final


def train_generalists(rank, world, root, setup, fixtures):
    stand_in_model_work(root)
    return generalist_stage.generalists(stage_experiment(rank, world, root), LOSSES)


def reevaluate_generalists(rank, world, root, setup, fixtures):
    stand_in_model_work(root)
    return generalist_stage.reevaluated_generalists(stage_experiment(rank, world, root), None)


def base_record_kept_by_rank1(rank, world, root, setup, fixtures):
    """Rank 1 alone holds the base model's final.json, scored against these losses."""
    stand_in_model_work(root)
    if rank == 1:
        (root / "rank1" / "base").mkdir(parents=True)
        kept = {"tasks": {}, "specialist_losses": STAMP}
        (root / "rank1" / "base" / "final.json").write_text(json.dumps(kept))
    return generalist_stage.base_record(stage_experiment(rank, world, root), LOSSES)


def stand_in_cache():
    return value_cache.ValueCache(["a", "b"], {"loss": np.array([0.5, 0.25])})


def cache_of_something_else_on_rank1(rank, world, root, setup, fixtures):
    """Rank 1's cache folder holds a cache computed from another manifest; rank 0's is empty."""
    if rank == 1:
        value_cache.save_cache(root / "rank1" / "cache", {"kind": "another"}, stand_in_cache())
    return value_cache.cached(root / f"rank{rank}" / "cache", {"kind": "wanted"}, stand_in_cache,
                              log=lambda text: None, world=world)


def cache_not_saved(rank, world, root, setup, fixtures):
    """Rank 0's disk is full when it saves the cache every rank built."""
    if rank == 0:
        def full(*args, **kwargs):
            raise NO_SPACE

        value_cache.save_cache = full  # this forked process only
    return value_cache.cached(root / f"rank{rank}" / "cache", {"kind": "wanted"}, stand_in_cache,
                              log=lambda text: None, world=world)


#: scenario -> (what each rank does, what rank 0's and rank 1's folders hold, a phrase of the expected error,
#: or None where both ranks must end without one and with the same result)
SCENARIOS = {
    "rank 0 refuses a foreign run.json": (train_run, ("foreign", None), "started with other settings"),
    "rank 1 sees a foreign run.json": (train_run, (None, "foreign"), "(as rank 1 sees it): this run was started"),
    "rank 1 lacks the checkpoint rank 0 resumes from": (train_run, ("stopped", "run.json of stopped"),
                                                        "rank 1 does not see the checkpoint"),
    "rank 1 lacks the finished run of rank 0": (train_run, ("finished", "run.json of finished"),
                                                "rank 1 does not see the checkpoint"),
    "rank 0 cannot save a checkpoint": (cannot_save, (None, None), "OSError: [Errno 28] No space left"),
    "decide_on_rank0 raises rank 0's error everywhere": (rank0_decides, (None, None), "ZeroDivisionError"),
    "on_every_rank raises rank 1's error everywhere": (rank1_fails_alone, (None, None), "rank 1 cannot read"),
    "rank 1 alone sees a finished generalist": (train_generalists, (None, "finished"), None),
    "rank 1 lacks the finished generalist rank 0 re-evaluates": (reevaluate_generalists, ("finished", None),
                                                                 "rank 1 does not see the checkpoint"),
    "rank 1 sees a foreign run.json in a finished generalist": (
        reevaluate_generalists, ("finished", "finished with a foreign run.json"),
        "(as rank 1 sees it): this run was started"),
    "rank 1 alone kept the base model's record": (base_record_kept_by_rank1, (None, None), None),
    "rank 1 holds a cache computed from something else": (cache_of_something_else_on_rank1, (None, None),
                                                          "CacheMismatch: "),
    "rank 0 cannot save a cache": (cache_not_saved, (None, None), "OSError: [Errno 28] No space left"),
}
#: where a scenario's folders are filled (under root/rank<r>/): the run folder unless named here
FOLDERS = {scenario: GENERALIST for scenario, (act, _, _) in SCENARIOS.items()
           if act in (train_generalists, reevaluate_generalists)}


def _worker(rank: int, port: int, scenario: str, root: str, setup: dict, fixtures) -> None:
    """Rank ``rank`` of 2: join through init_world with the short timeout, run the scenario, write what it
    raised (one line), what it returned and how long it took to ``root/rank<r>.json``."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    world = init_world(CPU, timeout_s=TIMEOUT_S)
    barrier(world)  # both ranks start the clock together
    start, error, result = time.monotonic(), None, None
    try:
        result = SCENARIOS[scenario][0](rank, world, Path(root), setup, fixtures)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - start
    (Path(root) / f"rank{rank}.json").write_text(json.dumps({"error": error, "result": repr(result),
                                                             "seconds": seconds}))
    close_world(world)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory, make_run, fresh_policy, one_thread):
    """Run folders made here by one process: a run stopped after 1 of its 2 steps, and a finished one."""
    made = tmp_path_factory.mktemp("made")
    with one_thread():
        run_training(fresh_policy(setup), make_run(setup, made / "stopped", "ama-s", "run", max_steps=STEPS),
                     CPU, show_progress=False, stop_after=1)
        run_training(fresh_policy(setup), make_run(setup, made / "finished", "ama-s", "run", max_steps=STEPS),
                     CPU, show_progress=False)
    return {"stopped": made / "stopped" / "run", "finished": made / "finished" / "run"}


def fill(folder: Path, holds: str | None, runs: dict) -> None:
    """Make ``folder`` a run folder holding ``holds``: nothing, a foreign run.json, a made run or its
    run.json, or a made run whose run.json is foreign."""
    if holds is None:
        return
    if holds.endswith(" with a foreign run.json"):
        shutil.copytree(runs[holds.removesuffix(" with a foreign run.json")], folder)
        (folder / "run.json").write_text(json.dumps(FOREIGN))
    elif holds == "foreign":
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps(FOREIGN))
    elif holds.startswith("run.json of "):
        folder.mkdir(parents=True)
        shutil.copy(runs[holds.removeprefix("run.json of ")] / "run.json", folder / "run.json")
    else:
        shutil.copytree(runs[holds], folder)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_both_ranks_end_at_once_with_the_same_error(scenario, setup, runs, make_run, fresh_policy, fork_ranks,
                                                     tmp_path):
    _, holds, phrase = SCENARIOS[scenario]
    for rank, what in enumerate(holds):
        fill(tmp_path / f"rank{rank}" / FOLDERS.get(scenario, "run"), what, runs)
    # the settings the stand-in generalist was described with: those the made runs were started with
    shutil.copy(runs["finished"] / "run.json", tmp_path / "description.json")
    fixtures = SimpleNamespace(make_run=make_run, fresh_policy=fresh_policy)
    start = time.monotonic()
    fork_ranks(_worker, scenario, str(tmp_path), setup, fixtures, timeout_s=TIMEOUT_S + 60,
               what=f"{scenario}: the 2 processes")
    wall = time.monotonic() - start
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    errors = [r["error"] for r in results]
    if phrase is None:  # rank 0's folder decided, and both ranks did the same
        assert errors == [None, None], errors
        assert results[0]["result"] == results[1]["result"], results
    else:
        assert errors[0] is not None and errors[0] == errors[1], errors
        assert "\n" not in errors[0] and phrase in errors[0], errors[0]
    assert max(r["seconds"] for r in results) < PROMPT_S, results
    assert wall < TIMEOUT_S, wall


def test_init_world_passes_the_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert init_world(CPU, timeout_s=12).rank == 1
    init_world(CPU)
    assert calls == [("gloo", {"timeout": datetime.timedelta(seconds=12)}),
                     ("gloo", {"timeout": datetime.timedelta(seconds=1800)})]


def test_one_process_decides_alone():
    world = distributed.World()
    assert decide_on_rank0(world, lambda: 3) == 3 and on_every_rank(world, lambda: 4) == 4
    with pytest.raises(ZeroDivisionError):
        decide_on_rank0(world, lambda: 1 / 0)


def test_ddp_timeout_is_a_positive_number_of_seconds():
    assert load_section(LLMConfig, {}, "config.toml").ddp_timeout == 1800
    assert load_section(LLMConfig, {"ddp_timeout": 60}, "config.toml").ddp_timeout == 60.0
    for bad in (0, -1, float("inf")):
        with pytest.raises(ConfigError, match="ddp_timeout"):
            load_section(LLMConfig, {"ddp_timeout": bad}, "config.toml")

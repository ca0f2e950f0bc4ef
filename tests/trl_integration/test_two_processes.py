"""AMATrainer on two processes (torchrun, gloo on CPU) and with loader workers: the draws, mixer weights and
parameters of one process.

Two processes with a global batch of 3 x 1 x 2 draw the global batches one process draws with 3 x 2 x 1, take
slots rank, rank + 2, ... of them, all-reduce the mixer's statistics to the same weights on both ranks, and
DDP's mean of W * sum(coefficients * losses) gives the parameters one process reaches. Over 50 steps the task
draws are those of amalab's own loop (``draw_batch`` from the mixer after the previous step's update), on one
process and on two, with and without a loader worker. The two-process runs are one ``torchrun`` launch of
two_process_child.py (a script, not a test module), shared by the tests here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from amalab.mixers import make_mixer
from amalab.training.sampler import TaskSampler
from amalab.training.state import draw_generator
from amalab.training.step import draw_batch

CHILD = Path(__file__).with_name("two_process_child.py")
ROOT = Path(__file__).resolve().parents[2]
#: the whole torchrun launch, startup included (10 to 25 s on two busy CPU cores)
LAUNCH_TIMEOUT_S = 300
STEPS, DRAW_STEPS, GLOBAL_BATCH = 10, 50, 6
#: the step after which the resumed two-process run was stopped (and checkpointed)
STOP = 4
#: the draw runs: AMA-S with EXP3's learning rate 1 (AMAConfig.exp3_eta), at which its weights move enough in a
#: step for a draw from the weights one update late to differ from step 1 on (at the default rate, the 50
#: steps' draws from late weights are the right draws); the reference mixer's options, the same
DRAW_SETTINGS = dict(mixer="ama-s", steps=DRAW_STEPS, fixed=True, exp3_eta=1.0)
DRAW_OPTIONS = {"gamma": 0.3, "eta": 1.0}
#: one process: 3 x 2 accumulation steps; two processes: 3 x 1 each, or 1 x 3 accumulation steps each
ONE = dict(per_device_train_batch_size=3, gradient_accumulation_steps=2)
TWO = dict(per_device_train_batch_size=3, gradient_accumulation_steps=1)
TWO_ACCUMULATING = dict(per_device_train_batch_size=1, gradient_accumulation_steps=3)


def _load_child():
    spec = importlib.util.spec_from_file_location("two_process_child", CHILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = _load_child()

#: runs compared with one process: name -> settings. Under plain SGD without clipping the step is the gradient
#: itself (Adam, or a clipped first step, would hide a wrong scale such as a loss without its factor W); at this
#: rate the clipped excess keeps the gradient nonzero for the first 4 steps
SGD = dict(optim="sgd", learning_rate=0.01, max_grad_norm=0.0)
COMPARED = {"ama-s": dict(mixer="ama-s", steps=STEPS),
            "ama-r-sim": dict(mixer="ama-r-sim", steps=STEPS),
            "ama-r-sim-sgd": dict(mixer="ama-r-sim", steps=STEPS, **SGD),
            "ama-s-sgd-accumulating": dict(mixer="ama-s", steps=STEPS, **SGD)}
#: how each compared run splits the global batch on two processes (ranks and accumulation both at once in the
#: last: statistics summed over micro-batches and ranks, the loss scaled for both)
TWO_OF = {name: TWO_ACCUMULATING if name.endswith("accumulating") else TWO for name in COMPARED}
#: the runs of the one torchrun launch, by name
TWO_PROCESS_RUNS = [
    *(dict(name=name, **settings, **TWO_OF[name]) for name, settings in COMPARED.items()),
    dict(name="draws", dataloader_num_workers=1, dataloader_prefetch_factor=4, **DRAW_SETTINGS, **TWO),
    # "ama-s" stopped after step STOP (a checkpoint there), then resumed in its folder by new trainers
    *(dict(name=name, folder="stopped-then-resumed", **COMPARED["ama-s"], **TWO, save_strategy="steps",
           save_steps=STOP, **part) for name, part in (("stopped", dict(stop_at=STOP)), ("resumed", dict(resume=True)))),
]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, free_port) -> dict[str, list[dict]]:
    """The runs of TWO_PROCESS_RUNS on two processes: name -> [rank 0's result, rank 1's]."""
    out = tmp_path_factory.mktemp("two_processes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(CHILD), str(out), json.dumps(TWO_PROCESS_RUNS)]
    try:
        done = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{(e.stdout or '')[-3000:]}"
                    f"\n{(e.stderr or '')[-5000:]}")
    if done.returncode != 0:
        pytest.fail(f"torchrun exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-8000:]}")
    results = {}
    for run in TWO_PROCESS_RUNS:
        results[run["name"]] = [torch.load(out / f"{run['name']}.rank{rank}.pt", weights_only=False)
                                for rank in range(2)]
    return results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, one_thread):
    """One-process runs in this process, by their settings (computed once each)."""
    out, done = tmp_path_factory.mktemp("one_process"), {}

    def run(**settings):
        key = json.dumps(settings, sort_keys=True)
        if key not in done:
            with one_thread():  # as the two processes
                trainer, record = child.record_run(out / f"run{len(done)}", **settings)
            assert trainer.accelerator.num_processes == 1
            done[key] = {"num_processes": 1, "record": record.as_dict(), "parameters": child.parameters(trainer)}
        return done[key]

    return run


def rank_rows(result: dict, step: int, micro_batches: int) -> list[int]:
    """The dataset rows a rank trained on in one step (its micro-batches in order)."""
    rows = result["record"]["rows"][step * micro_batches:(step + 1) * micro_batches]
    return [row for micro_batch in rows for row in micro_batch]


def rank_losses(result: dict, step: int, micro_batches: int) -> np.ndarray:
    return np.concatenate(result["record"]["losses"][step * micro_batches:(step + 1) * micro_batches])


def interleave(per_rank: list) -> np.ndarray:
    """The global batch from the ranks' slots (rank r holds slots r, r + W, ...)."""
    world = len(per_rank)
    out = np.empty(sum(len(p) for p in per_rank), dtype=np.asarray(per_rank[0]).dtype)
    for rank, values in enumerate(per_rank):
        out[rank::world] = values
    return out


def global_rows(results: list[dict], step: int, micro_batches: int | None = None) -> np.ndarray:
    """The rows of a step's global batch; ``micro_batches`` per rank (default: micro-batches of 3 pairs)."""
    micro = micro_batches or GLOBAL_BATCH // len(results) // 3
    return interleave([rank_rows(r, step, micro) for r in results])


def test_the_child_ran_on_two_processes(two_processes):
    for runs in two_processes.values():
        assert [r["rank"] for r in runs] == [0, 1]
        for result in runs:
            assert result["num_processes"] == 2
            assert result["distributed_type"] == "MULTI_CPU"


@pytest.mark.parametrize("name", list(COMPARED))
def test_two_processes_train_as_one(two_processes, one_process, name):
    one, two = one_process(**COMPARED[name], **ONE), two_processes[name]
    micro = TWO_OF[name]["gradient_accumulation_steps"]  # micro-batches per rank and step
    rank0, rank1 = (r["record"] for r in two)
    # every rank draws the same global batches, those of one process
    assert len(one["record"]["draws"]) == len(rank0["draws"]) == len(rank1["draws"]) == STEPS
    for step in range(STEPS):
        np.testing.assert_array_equal(rank0["draws"][step], one["record"]["draws"][step], err_msg=f"step {step}")
        np.testing.assert_array_equal(rank1["draws"][step], one["record"]["draws"][step], err_msg=f"step {step}")
        # ... and takes its slots of it: the same rows and (to float rounding) the same losses
        np.testing.assert_array_equal(global_rows(two, step, micro), global_rows([one], step),
                                      err_msg=f"step {step}")
        np.testing.assert_allclose(interleave([rank_losses(r, step, micro) for r in two]),
                                   rank_losses(one, step, 2), rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
    # the all-reduced statistics leave bit-identical mixers on the ranks, and one process's weights
    np.testing.assert_array_equal(np.array(rank0["weights"]), np.array(rank1["weights"]))
    np.testing.assert_array_equal(np.array(rank0["stats"]), np.array(rank1["stats"]))
    np.testing.assert_allclose(np.array(rank0["weights"]), np.array(one["record"]["weights"]), rtol=0, atol=1e-6)
    assert np.ptp(np.array(rank0["weights"])) > 1e-3  # the weights did move
    # DDP's gradient mean of W * sum(coefficients * losses): one process's parameters
    initial = child.tiny_tokenizer_and_models()[1](seed=0)
    for name, start in initial.named_parameters():
        torch.testing.assert_close(two[0]["parameters"][name], two[1]["parameters"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(two[0]["parameters"][name], one["parameters"][name], rtol=1e-5, atol=1e-5,
                                   msg=name)
    moved = two[0]["parameters"]["model.embed_tokens.weight"] - initial.model.embed_tokens.weight.detach()
    assert moved.abs().max() > 1e-3


def assert_amalabs_draws(results: list[dict]) -> None:
    """The draws of amalab's own loop: ``draw_batch`` from the mixer updated after each step with the
    statistics of the previous step's batch (the fixed stand-in losses of its rows)."""
    rows = child.multi_task_rows()
    names = sorted({row["task"] for row in rows})
    task_rows = [[i for i, row in enumerate(rows) if row["task"] == name] for name in names]
    losses, baselines = child.fixed_losses(), np.array([row["baseline_loss"] for row in rows])
    sizes = [len(r) for r in task_rows]
    reference = make_mixer("ama-s", len(names), sizes=sizes, **DRAW_OPTIONS)
    sampler, draw_rng = TaskSampler(sizes, 0, names), draw_generator(0)
    records = [r["record"] for r in results]
    for record in records:
        assert len(record["draws"]) == DRAW_STEPS
    for step in range(DRAW_STEPS):
        task_ids, picks, _ = draw_batch(reference, draw_rng, sampler, GLOBAL_BATCH)
        for record in records:
            np.testing.assert_array_equal(record["draws"][step], task_ids, err_msg=f"step {step}")
        batch_rows = np.array([task_rows[task][index] for task, index in picks])
        np.testing.assert_array_equal(global_rows(results, step), batch_rows, err_msg=f"step {step}")
        stats = reference.statistics(task_ids, losses[batch_rows], baselines[batch_rows])
        reference.update(stats)
        for record in records:  # one update per step, with the statistics of the step's batch
            assert len(record["stats"]) > step and len(record["weights"]) > step, f"step {step}: no update"
            np.testing.assert_allclose(record["stats"][step], stats, rtol=1e-12, atol=1e-12, err_msg=f"step {step}")
            np.testing.assert_allclose(record["weights"][step], reference.weights, rtol=1e-10, atol=1e-12,
                                       err_msg=f"step {step}")
    for record in records:
        assert len(record["stats"]) == len(record["weights"]) == DRAW_STEPS
    assert np.ptp(np.array(records[0]["weights"])) > 0.05  # the weights moved: the draws depend on them


def assert_logged_task_metrics(results: list[dict]) -> None:
    """Every step's logged per-task loss and clipped excess are those of the step's whole global batch (reduced
    over ranks), computed here from the fixed stand-in losses of its rows, and every rank logs the same; the
    logged weights are the mixer's."""
    rows = child.multi_task_rows()
    names = sorted({row["task"] for row in rows})
    losses, baselines = child.fixed_losses(), np.array([row["baseline_loss"] for row in rows])
    records = [r["record"] for r in results]
    for record in records:
        assert len(record["logs"]) == DRAW_STEPS
    for step in range(DRAW_STEPS):
        batch = global_rows(results, step)
        tasks = np.array([names.index(rows[row]["task"]) for row in batch])
        for i, name in enumerate(names):
            where = tasks == i
            expected = {} if not where.any() else {
                f"tasks/{name}/loss": losses[batch][where].mean(),
                f"tasks/{name}/excess": np.maximum(losses[batch][where] - baselines[batch][where], 0).mean()}
            for record in records:
                log = record["logs"][step]
                assert (f"tasks/{name}/loss" in log) == bool(expected), (step, name)  # only tasks in the batch
                for key, value in expected.items():
                    assert log[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
                assert log[f"weights/{name}"] == pytest.approx(record["weights"][step][i], abs=1e-12)
    for record in records[1:]:
        assert record["logs"] == records[0]["logs"]


def test_logged_task_metrics_are_the_global_batchs_on_one_and_two_processes(one_process, two_processes):
    assert_logged_task_metrics([one_process_draws(one_process, 0)])
    assert_logged_task_metrics(two_processes["draws"])


def one_process_draws(one_process, workers: int) -> dict:
    prefetch = {"dataloader_prefetch_factor": 4} if workers else {}
    return one_process(dataloader_num_workers=workers, **prefetch, **DRAW_SETTINGS, **ONE)


@pytest.mark.parametrize("workers", [0, 1])
def test_one_process_draws_as_amalabs_loop(one_process, workers):
    assert_amalabs_draws([one_process_draws(one_process, workers)])


def test_two_processes_draw_as_amalabs_loop(two_processes):
    assert_amalabs_draws(two_processes["draws"])


def test_a_loader_worker_changes_nothing(one_process):
    """The Trainer's loader only counts steps: a worker process and its prefetching change no draw, row, loss,
    weight or parameter (the two-process draws above ran with a worker too)."""
    without, with_worker = one_process_draws(one_process, 0), one_process_draws(one_process, 1)
    for key in ("draws", "rows", "losses", "stats", "weights"):
        np.testing.assert_array_equal(np.array(with_worker["record"][key]), np.array(without["record"][key]),
                                      err_msg=key)
    for name, parameter in without["parameters"].items():
        assert torch.equal(with_worker["parameters"][name], parameter), name


def test_two_processes_resumed_from_a_checkpoint_end_where_the_straight_run_ends(two_processes):
    """Stopped after step STOP and resumed (a checkpoint's mixer, samplers and draw generator, read by both
    ranks): the resumed steps draw the straight run's batches and end at its weights and parameters."""
    straight, stopped, resumed = (two_processes[name] for name in ("ama-s", "stopped", "resumed"))
    for rank in range(2):
        s, first, then = (r[rank]["record"] for r in (straight, stopped, resumed))
        assert len(first["draws"]) == STOP and len(then["draws"]) == STEPS - STOP
        for step in range(STEPS):
            drawn = first["draws"][step] if step < STOP else then["draws"][step - STOP]
            np.testing.assert_array_equal(drawn, s["draws"][step], err_msg=f"rank {rank} step {step}")
        assert first["rows"] + then["rows"] == s["rows"]
        for step in range(STOP, STEPS):  # every resumed step's update, not only the last
            np.testing.assert_allclose(then["weights"][step - STOP], s["weights"][step], rtol=1e-9, atol=1e-12,
                                       err_msg=f"rank {rank} step {step}")
        for name, parameter in straight[rank]["parameters"].items():
            torch.testing.assert_close(resumed[rank]["parameters"][name], parameter, rtol=1e-6, atol=1e-7, msg=name)

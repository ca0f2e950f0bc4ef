"""The job runner (amalab/runner.py), as the convex lab uses it: each job's result lands at its index whether
it runs in this process, in loky workers or on a Dask cluster; the results are the same bytes whatever the
number of workers (jobs seeded per job); jobs already done are not rerun; ``on_done`` sees each finished job
once (in this process: longest first); the progress bar counts every step; a job that raises, or a worker
that dies, stops the run naming the job; Ctrl-C stops the workers at once (a second one is ignored) and a
killed parent takes its workers with it.

Independent numbers: each job sums i^2 for i < n in a plain loop; the test compares with the closed form
n (n - 1) (2n - 1) / 6.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from amalab import runner
from amalab.convex.config import load_reproduction_config
from amalab.convex.reproduction import run_reproduction
from amalab.convex.results_io import CSV_FILES, write_results
from amalab.runner import Job, JobError, run_jobs

ROOT = Path(__file__).resolve().parents[2]


# The jobs are module-level functions: workers unpickle them by name.

def square_sum(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def noisy(seed: int, size: int) -> np.ndarray:
    """A job that draws from its own seeded generator, as the convex and MuJoCo jobs do."""
    return np.random.default_rng([seed, 0xC0FFEE]).standard_normal(size)


def failing(message: str) -> None:
    raise ValueError(message)


def dying(code: int) -> None:
    os._exit(code)


def _as_bytes(arrays: list[np.ndarray]) -> list[bytes]:
    """Each array as .npy bytes (dtype, shape and data; a pickle's bytes also depend on its memo)."""
    out = []
    for a in arrays:
        buffer = io.BytesIO()
        np.save(buffer, a)
        out.append(buffer.getvalue())
    return out


def closed_form(n: int) -> int:
    return n * (n - 1) * (2 * n - 1) // 6


class RecordingBar:
    """Stands in for tqdm: records the bar's total and every update."""

    made: list = []

    def __init__(self, total, **kwargs):
        self.total, self.updates, self.closed = total, [], False
        RecordingBar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


@pytest.fixture
def bar(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(runner, "tqdm", RecordingBar)
    return RecordingBar


SIZES = [30, 200, 5, 120]


@pytest.mark.parametrize("workers", [1, 2])
def test_each_job_gets_its_result_at_its_index_and_done_jobs_are_not_rerun(bar, workers):
    jobs = [Job(f"sum-{n}", square_sum, {"n": n}, n) for n in SIZES]
    jobs[1] = Job("done", failing, {"message": "a job given in `done` must not run"}, SIZES[1])
    finished = []
    results = run_jobs(jobs, workers, show_progress=False, done={1: "kept"},
                       on_done=lambda index, result: finished.append((index, result)))
    assert results == [closed_form(30), "kept", closed_form(5), closed_form(120)]
    assert sorted(finished) == [(0, closed_form(30)), (2, closed_form(5)), (3, closed_form(120))]
    if workers == 1:  # in this process the jobs run longest first
        assert [index for index, _ in finished] == [3, 0, 2]
    (made,) = bar.made
    assert made.total == 30 + 5 + 120 == sum(made.updates) and made.closed


def test_results_are_the_same_bytes_with_one_or_two_workers():
    jobs = [Job(f"noisy-{seed}", noisy, {"seed": seed, "size": 1000 + seed}, steps=seed % 3 + 1)
            for seed in range(6)]
    one, two = (run_jobs(jobs, workers, show_progress=False) for workers in (1, 2))
    assert _as_bytes(one) == _as_bytes(two)
    assert [len(r) for r in two] == [1000 + seed for seed in range(6)]


def test_nothing_left_to_run_starts_nothing(bar):
    jobs = [Job("a", failing, {"message": "must not run"}, 10), Job("b", failing, {"message": "must not run"}, 20)]
    finished = []
    results = run_jobs(jobs, 2, show_progress=False, done={0: 1.5, 1: [2]},
                       on_done=lambda index, result: finished.append(index))
    assert results == [1.5, [2]] and finished == []
    assert bar.made[0].total == 0 and bar.made[0].updates == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_job_that_raises_stops_the_run_with_its_name_and_message(bar, workers):
    jobs = [Job("fine", square_sum, {"n": 4}), Job("the-bad-one", failing, {"message": "bad input 7"})]
    with pytest.raises(JobError, match=r"^job the-bad-one failed: ValueError: bad input 7$"):
        run_jobs(jobs, workers, show_progress=False)


def test_a_worker_that_dies_stops_the_run_naming_the_jobs_left(bar):
    jobs = [Job("doomed", dying, {"code": 3}, 2), Job("doomed-too", dying, {"code": 3}, 1)]
    with pytest.raises(JobError, match=r"the run stopped with jobs still to run: doomed"):
        run_jobs(jobs, 2, show_progress=False)


def test_a_bad_backend_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="backend must be one of loky, dask, ray"):
        run_jobs([Job("a", square_sum, {"n": 1})], 2, backend="spark")
    with pytest.raises(ValueError, match="needs scheduler"):
        run_jobs([Job("a", square_sum, {"n": 1})], 2, backend="dask")


# ------------------------------------------------------------------ a Dask cluster

@pytest.fixture(scope="module")
def dask_cluster():
    """A local Dask cluster of two worker processes with one thread each."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        yield cluster


def test_the_dask_backend_gives_the_same_results_and_names_a_failing_job(dask_cluster):
    jobs = [Job(f"noisy-{seed}", noisy, {"seed": seed, "size": 500}) for seed in range(5)]
    finished = []
    results = run_jobs(jobs, 0, backend="dask", scheduler=dask_cluster.scheduler_address, show_progress=False,
                       on_done=lambda index, result: finished.append(index))
    assert _as_bytes(results) == _as_bytes(run_jobs(jobs, 1, show_progress=False))
    assert sorted(finished) == list(range(5))
    bad = jobs[:2] + [Job("the-bad-one", failing, {"message": "bad input 7"})]
    with pytest.raises(JobError, match="job the-bad-one failed: ValueError: bad input 7"):
        run_jobs(bad, 0, backend="dask", scheduler=dask_cluster.scheduler_address, show_progress=False)


# ------------------------------------------------------------------ the convex lab through the runner

def _tiny_reproduction(workers: int):
    config = load_reproduction_config(ROOT / "experiments" / "convex_rates" / "config.toml")
    return dataclasses.replace(
        config, workers=workers,
        rates=dataclasses.replace(config.rates, losses=["dpo"], horizons=[64, 128], seeds=2),
        worst_task=dataclasses.replace(config.worst_task, horizon=128, seeds=2),
        exp3=dataclasses.replace(config.exp3, horizons=[64], seeds=2),
        checks=dataclasses.replace(config.checks, slope_horizons=2))


def test_the_convex_results_are_the_same_bytes_with_one_or_two_workers(tmp_path):
    """A reduced reproduction (8 rate jobs, the worst-task and EXP3 jobs) with 1 and with 2 workers."""
    for workers in (1, 2):
        record = run_reproduction(_tiny_reproduction(workers), show_progress=False,
                                  checkpoint_dir=tmp_path / f"jobs-{workers}")
        record.pop("elapsed_s")
        record["config"].pop("workers")
        write_results(record, tmp_path / str(workers))
    for name in ["results.json", *CSV_FILES]:
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    assert len(list((tmp_path / "jobs-2").glob("*.json"))) >= 4  # every job was checkpointed as it finished


# ------------------------------------------------------------------ stopping: Ctrl-C and a killed parent

# Job 0 finishes at once (it is checkpointed); the others sleep, each writing its worker's pid first.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from amalab.runner import Job, run_jobs

    folder = Path(sys.argv[1])

    def job(i):
        (folder / f"pid-{i}").write_text(str(os.getpid()))
        time.sleep(0 if i == 0 else 120)
        return i

    try:
        run_jobs([Job(f"job-{i}", job, {"i": i}) for i in range(6)], 2, show_progress=False,
                 on_done=lambda index, result: (folder / f"done-{index}").write_text(""))
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as amalab's command line: stopping already
        print("interrupted", flush=True)
        sys.exit(130)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status is left


def _start_with_two_busy_workers(tmp_path):
    """Start SCRIPT; return it and its workers' pids once job 0 is done and two jobs are running."""
    (tmp_path / "script.py").write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "script.py"), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ((tmp_path / "done-0").exists() and len(list(tmp_path.glob("pid-*"))) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.2)  # the pid files are written; let the writes land
    workers = {int(p.read_text()) for p in tmp_path.glob("pid-*") if p.read_text()}
    assert len(workers) == 2 and proc.pid not in workers
    return proc, workers


def _wait_until_gone(workers, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(w) for w in workers)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_ctrl_c_twice_stops_the_workers_at_once(tmp_path):
    proc, workers = _start_with_two_busy_workers(tmp_path)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C during the clean-up must not hang it
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER prints where it hung
        pytest.fail("Ctrl-C hung: " + proc.communicate()[1][-4000:])
    assert time.monotonic() - start < 5, "Ctrl-C took too long"
    assert proc.returncode == 130 and out.strip() == "interrupted" and "Traceback" not in err, err
    assert _wait_until_gone(workers), "a worker outlived the interrupted run"
    assert not (tmp_path / "done-1").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    proc, workers = _start_with_two_busy_workers(tmp_path)
    proc.kill()  # SIGKILL: the parent runs no clean-up at all
    proc.communicate(timeout=10)
    assert _wait_until_gone(workers), "a worker outlived its parent"

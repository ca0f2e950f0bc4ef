"""The worker pool on its own (amalab/convex/worker_pool.py): each job's result lands at its index whether it
runs in this process or in spawned workers, jobs already done are not rerun, ``on_done`` sees each finished
job once (in this process: longest first), the progress bar counts every step, and a job that raises or a
worker that dies stops the run naming the job. Stopping on Ctrl-C and dying with a killed parent are tested
end to end in tests/test_cli.py.

Independent numbers: each job sums i^2 for i < n in a plain loop; the test compares with the closed form
n (n - 1) (2n - 1) / 6.
"""

from __future__ import annotations

import os

import pytest

from amalab.convex import worker_pool
from amalab.convex.worker_pool import WorkerError, run_jobs


# The jobs are module-level functions: spawned workers unpickle them by name.

def square_sum(n: int, progress) -> int:
    total = 0
    for i in range(n):
        total += i * i
        if (i + 1) % 10 == 0:
            progress(i + 1)
    progress(n)
    return total


def failing(message: str, progress) -> None:
    raise ValueError(message)


def dying(code: int, progress) -> None:
    os._exit(code)


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
    monkeypatch.setattr(worker_pool, "tqdm", RecordingBar)
    return RecordingBar


SIZES = [30, 200, 5, 120]


@pytest.mark.parametrize("workers", [1, 2])
def test_each_job_gets_its_result_at_its_index_and_done_jobs_are_not_rerun(bar, workers):
    jobs = [(square_sum, {"n": n}, n) for n in SIZES]
    jobs[1] = (failing, {"message": "a job given in `done` must not run"}, SIZES[1])
    finished = []
    results = run_jobs(jobs, workers, show_progress=False, done={1: "kept"},
                       on_done=lambda index, result: finished.append((index, result)))
    assert results == [closed_form(30), "kept", closed_form(5), closed_form(120)]
    assert sorted(finished) == [(0, closed_form(30)), (2, closed_form(5)), (3, closed_form(120))]
    if workers == 1:  # in this process the jobs run longest first
        assert [index for index, _ in finished] == [3, 0, 2]
    (made,) = bar.made
    assert made.total == 30 + 5 + 120 == sum(made.updates) and made.closed


def test_nothing_left_to_run_starts_nothing(bar):
    jobs = [(failing, {"message": "must not run"}, 10), (failing, {"message": "must not run"}, 20)]
    finished = []
    results = run_jobs(jobs, 2, show_progress=False, done={0: 1.5, 1: [2]},
                       on_done=lambda index, result: finished.append(index))
    assert results == [1.5, [2]] and finished == []
    assert bar.made[0].total == 0 and bar.made[0].updates == []


def test_a_job_that_raises_in_this_process_raises_as_it_is(bar):
    jobs = [(square_sum, {"n": 4}, 4), (failing, {"message": "bad input 7"}, 1)]
    with pytest.raises(ValueError, match="bad input 7"):
        run_jobs(jobs, 1, show_progress=False)


def test_a_job_that_raises_in_a_worker_stops_the_run_with_its_name_and_message(bar):
    jobs = [(square_sum, {"n": 4}, 4), (failing, {"message": "bad input 7"}, 1)]
    with pytest.raises(WorkerError) as raised:
        run_jobs(jobs, 2, show_progress=False, names=["fine", "the-bad-one"])
    text = str(raised.value)
    assert text.startswith("job the-bad-one failed in a worker:") and "ValueError: bad input 7" in text


def test_a_worker_that_dies_stops_the_run_naming_the_jobs_left(bar):
    with pytest.raises(WorkerError, match=r"died \(exit code 3\) with jobs still to run: doomed"):
        run_jobs([(dying, {"code": 3}, 1)], 2, show_progress=False, names=["doomed"])

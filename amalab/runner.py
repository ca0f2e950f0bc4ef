"""Run independent jobs in parallel through joblib: the convex lab's and the MuJoCo suite's one job runner.

What a caller can rely on:
  - results come back at their job's index, and each job's result is handed to ``on_done`` in this process
    as soon as it finishes (so a caller checkpoints it at once); a job must not depend on the others or on
    their order (seeds per job), so the results are the same whatever the number of workers;
  - ``workers = 1`` runs the jobs here, one after another; more run them in joblib's process backend
    ("loky"), each worker limited to one BLAS/OpenMP/torch thread; ``backend = "dask"`` (the cluster extra)
    or ``"ray"`` spread them over a cluster through joblib's backends;
  - Ctrl-C stops the run: joblib terminates the workers and the KeyboardInterrupt propagates; a second
    Ctrl-C during that clean-up is ignored, so it cannot leave the run half torn down;
  - a worker ends when its parent process ends, even a parent killed by SIGKILL (a watchdog thread);
  - a job that raises stops the run with a :class:`JobError` naming the job, with its error's message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import joblib
from tqdm import tqdm

from amalab.errors import ConfigError

BACKENDS = ("loky", "dask", "ray")
#: how often a worker's watchdog checks that its parent is still alive, in seconds
WATCHDOG_S = 0.2


@dataclass(frozen=True)
class Job:
    """``fn(**kwargs)``, named ``name`` in messages; ``steps`` is its share of the progress bar (and longer
    jobs start first). ``fn`` and ``kwargs`` must pickle, and the result too, unless ``workers = 1``."""

    name: str
    fn: Callable
    kwargs: dict = field(default_factory=dict)
    steps: int = 1


class JobError(RuntimeError):
    """A job raised; the message names the job and carries its error's type and message."""


def check_backend(backend: str, scheduler: str = "") -> None:
    """Raise ValueError naming the field if ``backend``/``scheduler`` cannot work (configs call this)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "dask" and not scheduler:
        raise ValueError('backend "dask" needs scheduler, the Dask scheduler\'s address ("tcp://host:8786")')
    if backend == "loky" and scheduler:
        raise ValueError('scheduler is for backend "dask" or "ray", not "loky"')


def run_jobs(jobs: list[Job], workers: int | None = None, backend: str = "loky", scheduler: str = "",
             on_done: Callable[[int, object], None] | None = None, done: dict | None = None,
             show_progress: bool = True, desc: str = "jobs") -> list:
    """Run ``jobs``; return their results in job order.

    ``workers``: 1 runs the jobs in this process, one after another, whatever the backend; otherwise, with
    "loky", that many worker processes (None or 0: every core); a cluster backend runs as many jobs at once
    as the cluster has worker threads. ``scheduler``: the Dask scheduler's (or Ray cluster's) address.
    ``done`` maps job indices to results already at hand (not rerun); ``on_done(index, result)`` is called
    here as each job finishes.
    """
    check_backend(backend, scheduler)
    done, on_done = done or {}, on_done or (lambda index, result: None)
    results = [done.get(i) for i in range(len(jobs))]
    todo = sorted((i for i in range(len(jobs)) if i not in done), key=lambda i: -jobs[i].steps)
    bar = tqdm(total=sum(jobs[i].steps for i in todo), unit="step", unit_scale=True, disable=not show_progress,
               mininterval=1.0, desc=desc, dynamic_ncols=True)
    try:
        with _one_interrupt(), contextlib.closing(_outputs(jobs, todo, workers or os.cpu_count() or 1,
                                                           backend, scheduler)) as outputs:
            for index, result in outputs:
                results[index] = result
                on_done(index, result)
                bar.update(jobs[index].steps)
    finally:
        bar.close()
    return results


def _outputs(jobs: list[Job], todo: list[int], workers: int, backend: str, scheduler: str):
    """``(index, result)`` of each job of ``todo`` as it finishes."""
    if workers == 1:  # no pool: also keeps pdb and profilers usable
        yield from (_run_one(i, jobs[i], None) for i in todo)
        return
    if not todo:
        return
    remaining = set(todo)
    n_jobs = min(workers, len(todo)) if backend == "loky" else -1  # a cluster: all its worker threads
    with _backend(backend, scheduler):
        parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered", batch_size=1,
                                   max_nbytes=None)  # no memmaps: jobs get their arrays as in-process
        outputs = parallel(joblib.delayed(_run_one)(i, jobs[i], os.getpid()) for i in todo)
        try:
            for index, result in outputs:
                remaining.discard(index)
                yield index, result
        except JobError:
            raise
        except Exception as e:  # a worker died, a cluster went away: no job to blame, so name those left
            left = ", ".join(jobs[i].name for i in sorted(remaining))
            raise JobError(f"the run stopped with jobs still to run: {left} ({type(e).__name__}: {e})") from e
        finally:
            outputs.close()  # stopped early (an error, Ctrl-C): joblib cancels the rest, ends the workers


@contextlib.contextmanager
def _backend(backend: str, scheduler: str):
    """joblib configured for ``backend``, connected to the cluster at ``scheduler`` for a cluster backend."""
    if backend == "loky":
        # one thread per worker: joblib sets the OpenMP/BLAS thread counts of the workers it starts
        with joblib.parallel_config(backend="loky", inner_max_num_threads=1):
            yield
    elif backend == "dask":
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError("backend \"dask\" needs the cluster extra: pip install -e '.[cluster]'") from None
        # joblib's dask backend uses this client; Dask's nannies already start workers with one BLAS thread
        with Client(scheduler), joblib.parallel_config(backend="dask"):
            yield
    else:
        try:
            import ray
            from ray.util.joblib import register_ray
        except ImportError:
            raise ConfigError("backend \"ray\" needs ray: pip install 'ray[default]'") from None
        register_ray()
        ray.init(address=scheduler or None, ignore_reinit_error=True)
        with joblib.parallel_config(backend="ray"):
            yield


def _run_one(index: int, job: Job, parent_pid: int | None) -> tuple[int, object]:
    """Run one job (in a worker when ``parent_pid`` is the pid of the process that started the run)."""
    if parent_pid is not None and os.getpid() != parent_pid:
        _as_worker(parent_pid)
    try:
        return index, job.fn(**job.kwargs)
    except Exception as e:
        # the type and message in one line; joblib and Dask attach the worker's traceback as the cause
        raise JobError(f"job {job.name} failed: {type(e).__name__}: {e}") from e


_worker_ready = False  # per process: set up once, at a worker's first job


def _as_worker(parent_pid: int) -> None:
    """A worker's set-up: one torch thread, Ctrl-C left to the parent, and no life after the parent's."""
    global _worker_ready
    if "torch" in sys.modules:  # the job's module imported it; a job may still choose its own count
        sys.modules["torch"].set_num_threads(1)
    if _worker_ready:
        return
    _worker_ready = True
    if threading.current_thread() is threading.main_thread():  # loky: yes; a Dask worker's thread: no
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() == parent_pid:  # started by the run's process (loky, a local cluster), not a remote one

        def watchdog() -> None:
            while os.getppid() == parent_pid:
                time.sleep(WATCHDOG_S)
            os._exit(1)

        threading.Thread(target=watchdog, daemon=True, name="parent-watchdog").start()


@contextlib.contextmanager
def _one_interrupt():
    """Within: the first Ctrl-C raises KeyboardInterrupt, later ones are ignored until the block is left
    (joblib is then stopping the workers, which a second KeyboardInterrupt could leave half done)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        # None: a handler not set from Python, which cannot be put back; the default one is the closest
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

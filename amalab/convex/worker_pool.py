"""Run independent jobs over worker processes, with one progress bar, and stop at once when asked.

What a user can rely on:
  - Ctrl-C (SIGINT) stops the run within about a second: the workers ignore SIGINT themselves, and the
    parent terminates them instead of letting them finish the queued jobs; every job that finished before
    has already been handed to ``on_done`` (which checkpoints it). A second Ctrl-C during that clean-up is
    ignored, so it can never leave the run hanging half torn down.
  - No worker outlives its parent, even a parent killed by SIGKILL: on Linux each worker asks the kernel
    for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), and everywhere a watchdog thread exits the
    worker as soon as ``os.getppid()`` changes.
  - A job that raises in a worker stops the run with the worker's message (and the job's name).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback

from tqdm import tqdm

#: how often the parent checks its workers and the watchdog checks the parent, in seconds
POLL_S = 0.2
#: how long terminated workers get to exit before they are killed
TERMINATE_GRACE_S = 2.0

PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """A job raised in a worker process (the message carries the worker's traceback)."""


def _die_with_parent(parent_pid: int) -> None:
    """Make sure this process ends when the process ``parent_pid`` ends, however it ends."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the watchdog below still covers this case
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="parent-watchdog").start()


def _worker(parent_pid: int, jobs, messages) -> None:
    """Worker loop: run ``(index, fn, kwargs)`` jobs until the ``None`` sentinel, reporting as it goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent_pid)
    while (job := jobs.get()) is not None:
        index, fn, kwargs = job
        last = 0

        def progress(done: int) -> None:
            nonlocal last
            messages.put(("progress", done - last))
            last = done

        try:
            messages.put(("done", index, fn(**kwargs, progress=progress)))
        except BaseException:  # noqa: BLE001 - reported to the parent, which stops the run
            messages.put(("error", index, traceback.format_exc()))
            return


def _stop(processes) -> None:
    """Terminate the workers and reap them; immune to a second Ctrl-C, bounded in time."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
    try:
        for p in processes:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_jobs(jobs: list[tuple], workers: int, show_progress: bool = True, done: dict | None = None,
             on_done=None, names: list[str] | None = None) -> list:
    """Run ``(fn, kwargs, steps)`` jobs, longest first, over ``workers`` processes, with one progress bar.

    ``fn(**kwargs, progress=callback)`` must return a picklable result; ``callback(steps_done)`` feeds the
    bar. ``done`` maps job indices to results already at hand (they are not rerun); ``on_done(index,
    result)`` is called in this process as each job finishes, so a caller can checkpoint it.
    KeyboardInterrupt propagates after the workers are stopped.
    """
    done = done or {}
    names = names or [str(i) for i in range(len(jobs))]
    on_done = on_done or (lambda index, result: None)
    results = [done.get(i) for i in range(len(jobs))]
    todo = sorted((i for i in range(len(jobs)) if i not in done), key=lambda i: -jobs[i][2])
    bar = tqdm(total=sum(jobs[i][2] for i in todo), unit="step", unit_scale=True, disable=not show_progress,
               mininterval=1.0, desc="convex rates", dynamic_ncols=True)
    try:
        if workers <= 1:
            for i in todo:
                fn, kwargs, _ = jobs[i]
                last = [0]

                def progress(n: int) -> None:
                    bar.update(n - last[0])
                    last[0] = n

                results[i] = fn(**kwargs, progress=progress)
                on_done(i, results[i])
        elif todo:
            _run_in_processes(jobs, todo, min(workers, len(todo)), results, on_done, bar, names)
    finally:
        bar.close()
    return results


def _run_in_processes(jobs, todo, workers, results, on_done, bar, names) -> None:
    context = multiprocessing.get_context("spawn")  # no fork: safe whatever threads numpy started
    job_queue, messages = context.Queue(), context.Queue()
    for i in todo:
        job_queue.put((i, jobs[i][0], jobs[i][1]))
    for _ in range(workers):
        job_queue.put(None)
    processes = [context.Process(target=_worker, args=(os.getpid(), job_queue, messages), daemon=True,
                                 name=f"amalab-worker-{w}") for w in range(workers)]
    try:
        for p in processes:
            p.start()
        remaining = set(todo)
        while remaining:
            try:
                message = messages.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(f"worker {dead[0].name} died (exit code {dead[0].exitcode}) "
                                      f"with jobs still to run: {', '.join(names[i] for i in sorted(remaining))}")
                continue
            if message[0] == "progress":
                bar.update(message[1])
            elif message[0] == "done":
                _, index, value = message
                results[index] = value
                remaining.discard(index)
                on_done(index, value)
            else:
                _, index, text = message
                raise WorkerError(f"job {names[index]} failed in a worker:\n{text}")
        for p in processes:
            p.join(TERMINATE_GRACE_S)
    finally:
        _stop(processes)
        job_queue.cancel_join_thread()
        messages.cancel_join_thread()

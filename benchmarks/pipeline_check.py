"""The whole LLM pipeline on one device, straight and killed-then-resumed: a part of the GPU check.

A tiny Llama (built from the config, random weights) on three generated tasks, with everything a GPU run
meets: the reference cache, LoRA specialists cross-fitted on 2 folds, every mixer, every merge of the LoRA
specialists (dense weights on the CPU against the base's), greedy generation scored by the verifiers, the
summary and an export of one generalist. It runs twice, each in its own process (``amalab llm run``): once
straight, once killed with SIGKILL as soon as a generalist's first checkpoint exists and then rerun, which
resumes. Passed when both end, the resumed summary equals the straight one (every number within
``ATOL + RTOL * |value|``: two processes need not round alike, CUDA's atomic adds and the CPU's kernels,
whose results depend on how their buffers are aligned, differ in the last bit; on the CPU two processes
gave reference log-probs 4.8e-7 apart and held-out margins ~1e-4 relative apart where the margin itself is
~1e-4), every method and merge is in it, and the generated tasks have a generation success.

The tasks are generated (``generated:`` sources) so that the check needs no data file: the GPU machine
has none of ``../shared/data``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.device_checks import REPO

#: tolerance of the resumed summary's numbers against the straight run's: |a - b| <= ATOL + RTOL * max(|a|, |b|)
ATOL, RTOL = 1e-5, 1e-4
METHODS = ["standard", "uniform", "doremi", "odm", "ama-r", "ama-r-sim", "ama-s"]
MERGES = ["linear", "task_arithmetic", "ties", "dare_ties"]

CONFIG = """
out = "{out}"
seed = 0
device = "{device}"

[model]
name = "tiny"
tiny = {{ hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, vocab_size = 400, seed = 0 }}
use_lora = true
lora = {{ r = 4, alpha = 8, dropout = 0.0 }}

[tokenize]
max_length = 64
max_prompt_length = 40

[loss]
loss_type = "dpo"
beta = 0.1

[[tasks]]
name = "sums"
source = "generated:arithmetic?n=24&hardness=1&seed=0"
held_out = 6

[[tasks]]
name = "units"
source = "generated:arithmetic?n=20&hardness=1&kind=conversion&seed=1"
held_out = 6

[[tasks]]
name = "format"
source = "generated:format?n=20&hardness=1&seed=2"
held_out = 6

[specialists]
cross_fit = 2

[specialists.optim]
max_steps = 4
batch_size = 4
learning_rate = 1e-2

[train]
max_steps = 6
batch_size = 6
learning_rate = 1e-2
eval_steps = 3
save_steps = 2

[methods]
names = {methods}
seeds = 1

[methods.options]
ama-r = {{ eta_alpha = 2.0 }}
ama-r-sim = {{ eta_alpha = 2.0 }}
doremi = {{ eta_alpha = 2.0 }}
ama-s = {{ gamma = 0.5 }}
odm = {{ gamma = 0.5 }}

[merges]
names = {merges}
seeds = 1
options = {{ task_arithmetic = {{ scale = 0.5 }}, ties = {{ density = 0.5 }}, dare_ties = {{ drop = 0.3 }} }}

[generation]
max_new_tokens = 8
batch_size = 8
"""

#: ``amalab llm run`` without importing amalab's CLI, which imports the convex lab (cvxpy: not on the GPU machine)
_RUN = "import sys; from amalab.llm.cli import run_llm_command; sys.exit(run_llm_command('run', sys.argv[1], False))"


def write_config(folder: Path, device: str) -> Path:
    path = folder / "config.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(CONFIG.format(out=folder / "run", device=device, methods=json.dumps(METHODS),
                                  merges=json.dumps(MERGES)))
    return path


def _start(config: Path, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TQDM_DISABLE="1")
    with open(log_path, "a") as log:
        return subprocess.Popen([sys.executable, "-c", _RUN, str(config)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process: subprocess.Popen, deadline: float, log_path: Path) -> None:
    """Wait for ``process`` until ``deadline``; a nonzero exit or the deadline raises with the log's tail."""
    try:
        status = process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise TimeoutError(f"the pipeline ran past the check's limit; log {log_path}") from None
    if status != 0:
        tail = " | ".join(log_path.read_text().strip().splitlines()[-3:])
        raise RuntimeError(f"the pipeline exited with {status}: {tail}")


def _first_generalist_checkpoint(run: Path) -> Path | None:
    found = sorted((run / "generalists").glob("*/seed*/checkpoints/step-*"))
    return found[0] if found else None


def _killed_at_first_checkpoint(config: Path, log_path: Path, deadline: float) -> str:
    """Start the pipeline, SIGKILL it once a generalist has a checkpoint; what existed then."""
    process = _start(config, log_path)
    while process.poll() is None and time.monotonic() < deadline:
        checkpoint = _first_generalist_checkpoint(config.parent / "run")
        if checkpoint is not None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return checkpoint.relative_to(config.parent / "run").as_posix()
        time.sleep(0.02)
    _finish(process, deadline, log_path)
    raise RuntimeError("the pipeline ended before any generalist checkpoint existed: nothing was killed")


def _numbers(value, path: str = "") -> dict[str, float]:
    """Every number of a JSON value by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}/{i}").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {path: float(value)}
    return {}


def _largest_excess(straight: dict, resumed: dict) -> tuple[float, str]:
    """(the largest |a - b| / (ATOL + RTOL * max(|a|, |b|)) over the two summaries' numbers (at most 1:
    within tolerance), where it is)."""
    a, b = _numbers(straight), _numbers(resumed)
    if a.keys() != b.keys():
        return math.inf, f"different entries: {sorted(a.keys() ^ b.keys())[:3]}"
    worst, where = 0.0, ""
    for key in a:
        if math.isnan(a[key]) and math.isnan(b[key]):
            continue
        ratio = abs(a[key] - b[key]) / (ATOL + RTOL * max(abs(a[key]), abs(b[key])))
        if not ratio <= worst:
            worst, where = ratio, key
    return worst, where


def _export(run: Path, out: Path, log_path: Path, deadline: float) -> None:
    code = ("import sys, pathlib; from amalab.llm.export import export_run, select_run; "
            "export_run(select_run(pathlib.Path(sys.argv[1]), 'ama-s', 0), pathlib.Path(sys.argv[2]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "a") as log:
        process = subprocess.Popen([sys.executable, "-c", code, str(run), str(out)], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _finish(process, deadline, log_path)


def pipeline_check(device: str, folder: Path, limit_s: float) -> dict:
    """The pipeline straight, then killed at its first generalist checkpoint and resumed (module docstring)."""
    began = time.monotonic()
    deadline = began + limit_s
    straight_config = write_config(folder / "straight", device)
    _finish(_start(straight_config, folder / "straight.log"), deadline, folder / "straight.log")
    straight_s = time.monotonic() - began
    resumed_config = write_config(folder / "resumed", device)
    killed_at = _killed_at_first_checkpoint(resumed_config, folder / "resumed.log", deadline)
    _finish(_start(resumed_config, folder / "resumed.log"), deadline, folder / "resumed.log")
    resumed_s = time.monotonic() - began - straight_s
    _export(straight_config.parent / "run", folder / "exported", folder / "export.log", deadline)
    straight = json.loads((straight_config.parent / "run" / "summary.json").read_text())
    resumed = json.loads((resumed_config.parent / "run" / "summary.json").read_text())
    difference, where = _largest_excess(straight, resumed)
    methods = sorted({r["method"] for r in straight["runs"]})
    expected = sorted(set(METHODS) | {f"merge-{m}" for m in MERGES} | {"base"})
    success = {task: metrics.get("success") for task, metrics in straight["runs"][0]["tasks"].items()}
    passed = (difference <= 1.0 and set(expected) <= set(methods)
              and all(s is not None for s in success.values()) and (folder / "exported").is_dir())
    return {"passed": passed, "device": device,
            "measured": {"straight_s": straight_s, "killed_and_resumed_s": resumed_s, "killed_at": killed_at,
                         "summary_difference_over_tolerance": difference, "where": where, "methods": methods,
                         "base_generation_success": success},
            "tolerance": {"summary_difference_over_tolerance": f"<= 1 (atol {ATOL}, rtol {RTOL})",
                          "methods": expected}}

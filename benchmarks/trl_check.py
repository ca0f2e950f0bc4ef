"""AMATrainer beside TRL's DPOTrainer on one device: a part of the GPU check.

Both train the same model (built in the check: no download) on the same multi-task pairs, with the same
settings, bf16 on CUDA: DPOTrainer as TRL ships it, AMATrainer with the ``ama-s`` mixer (EXP3 task
sampling) and stand-in baseline losses s(z) (this check is about the engine, not about s(z)). Passed when
both finish every step with finite losses, AMATrainer logs its per-task metrics and the mixer's weights,
and those weights are a distribution. Measured: median seconds per step of each after the first (which
compiles kernels and fills the allocator), their ratio, peak device memory, and the versions that ran.
"""

from __future__ import annotations

import math
import time
from importlib import metadata

import numpy as np
import torch

from benchmarks import workload

TASKS = ("sums", "greetings", "facts")
BETA = 0.1
#: the stand-in s(z) of every pair: a little under log 2, the loss of the untrained policy
BASELINE = 0.6


def versions() -> dict:
    found = {}
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "peft", "pyarrow"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def multi_task_rows(count: int, seed: int = 0) -> list[dict]:
    """``count`` HH-shaped synthetic pairs, dealt round-robin to the three tasks, with the stand-in s(z)."""
    pairs = workload.synthetic_pairs(count, seed=seed)
    return [{"task": TASKS[i % len(TASKS)], "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
             "baseline_loss": BASELINE} for i, p in enumerate(pairs)]


class _StepClock:
    """Wall-clock seconds of every optimizer step (the device synchronized at each end)."""

    def __init__(self, device: torch.device):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                workload.synchronize(device)
                clock.began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                workload.synchronize(device)
                clock.seconds.append(time.perf_counter() - clock.began)

        self.seconds: list[float] = []
        self.began = 0.0
        self.callback = Callback()


def _train(kind: str, model_name: str, device: torch.device, rows: list[dict], steps: int, batch_size: int,
           max_length: int, folder) -> dict:
    """One trainer (``dpo`` or ``ama``) for ``steps`` steps: its step times, losses and logs."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from amalab.trl import AMAConfig, AMATrainer

    model, tokenizer = workload.build_model(model_name, device, seed=0)
    reference, _ = workload.build_model(model_name, device, seed=0)
    cuda = device.type == "cuda"
    settings = dict(output_dir=str(folder / kind), beta=BETA, max_steps=steps, per_device_train_batch_size=batch_size,
                    learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, max_length=max_length,
                    bf16=cuda, use_cpu=not cuda, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                    disable_tqdm=True, dataloader_num_workers=0)
    if kind == "ama":
        args, trainer_class = AMAConfig(mixer="ama-s", **settings), AMATrainer
    else:
        args, trainer_class = DPOConfig(**settings), DPOTrainer
        rows = [{k: v for k, v in r.items() if k in ("prompt", "chosen", "rejected")} for r in rows]
    clock = _StepClock(device)
    trainer = trainer_class(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=[clock.callback])
    trainer.remove_callback(PrinterCallback)  # the logs are kept in log_history; the check prints one line
    baseline = workload.reset_peak_memory(device)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"steps": trainer.state.global_step, "step_seconds": clock.seconds,
              "losses": [entry["loss"] for entry in logs], "peak_memory": workload.peak_memory(device, baseline),
              "log_keys": sorted({key for entry in logs for key in entry})}
    if kind == "ama":
        result["weights"] = np.asarray(trainer.mixer.weights, dtype=float).tolist()
    return result


def trl_trainers(device: str, model_name: str = "tiny", steps: int = 6, batch_size: int = 8,
                 max_length: int = 128, folder=None) -> dict:
    """DPOTrainer, then AMATrainer (ama-s), on the same model, pairs and settings (module docstring)."""
    import tempfile
    from pathlib import Path

    device = torch.device(device)
    rows = multi_task_rows(batch_size * steps * 2)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(folder or scratch)
        runs = {kind: _train(kind, model_name, device, rows, steps, batch_size, max_length, folder)
                for kind in ("dpo", "ama")}
    median = {kind: float(np.median(run["step_seconds"][1:] or run["step_seconds"])) for kind, run in runs.items()}
    ama = runs["ama"]
    per_task = [f"tasks/{task}/excess" for task in TASKS if f"tasks/{task}/excess" not in ama["log_keys"]]
    weights = np.asarray(ama["weights"])
    checks = {
        "every step ran": all(run["steps"] == steps for run in runs.values()),
        "losses finite": all(math.isfinite(x) for run in runs.values() for x in run["losses"]),
        "per-task metrics logged": not per_task and any(k.startswith("weights/") for k in ama["log_keys"]),
        "weights a distribution": bool(np.all(weights >= 0) and abs(weights.sum() - 1) < 1e-6),
    }
    return {"passed": all(checks.values()), "checks": checks,
            "workload": {"model": model_name, "device": str(device), "steps": steps, "batch_size": batch_size,
                         "max_length": max_length, "bf16": device.type == "cuda", "mixer": "ama-s"},
            "measured": {"median_step_seconds": median, "ama_over_dpo": median["ama"] / median["dpo"],
                         "losses": {k: run["losses"] for k, run in runs.items()},
                         "peak_memory": {k: run["peak_memory"] for k, run in runs.items()},
                         "weights": ama["weights"], "missing_metrics": per_task},
            "versions": versions(),
            "tolerance": "runs: every step of both, finite losses, per-task metrics, weights a distribution "
                         "(the times are measurements)"}

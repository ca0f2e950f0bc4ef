"""DPOTrainer's and AMATrainer's ``training_step`` on the same batch, one model, one process: does either
trainer's step cost more on identical inputs?

    PYTHONPATH=. python -m benchmarks.trl_same_batch --model smollm2 --rounds 10 --out benchmarks/results-trl-same-batch

The model, LoRA adapter, pairs and settings of ``benchmarks.trl_step`` (``ama-s``, gamma 0.3). Each round
``AMATrainer.get_batch_samples`` draws one batch (after ``--warmup-rounds`` untimed rounds); both trainers
take a ``training_step`` on a copy of it (the order alternating round by round; gradients zeroed before
each; no optimizer step, so the model stays put), timed in two parts: ``compute_loss`` (policy and PEFT
reference forwards, the loss and, for TRL, its training metrics) and the backward pass
(``accelerator.backward``). Per round and part the ratio AMATrainer / DPOTrainer; the headline is the median
of the per-round ratios, with its 95 % bootstrap interval.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.trl_step import (REPO, TRL, _load, _machine, _median_interval, _spec, _trainer,
                                 add_workload_arguments)

PARTS = ("compute_loss", "backward")


def _timing(function, into: list):
    """``function``, appending the seconds of each call to ``into``."""
    def timed(*args, **kwargs):
        began = time.perf_counter()
        out = function(*args, **kwargs)
        into.append(time.perf_counter() - began)
        return out

    return timed


def _rounds(args, built: dict, times: dict, model) -> None:
    """The warm-up and timed rounds: one batch each, both trainers' training_step on it in turn."""
    import torch

    dpo, ama = built[TRL][0], built["ama-ama-s"][0]
    for k in range(-args.warmup_rounds, args.rounds):  # the rounds before 0 are dropped (first-call costs)
        if k == 0:
            for part_times in times.values():
                for values in part_times.values():
                    values.clear()
        (batch,), _ = ama.get_batch_samples(iter([None]), 1, torch.device("cpu"))
        for name, trainer in ((TRL, dpo), ("ama-ama-s", ama))[::1 if k % 2 == 0 else -1]:
            model.zero_grad(set_to_none=True)
            trainer.training_step(model, {key: value.clone() for key, value in batch.items()})
        ama._end_step()  # the mixer's update after the step, as the Trainer's on_step_end
        print(f"[{args.model}] round {k}{' (warm-up)' if k < 0 else ''}: " + ", ".join(
            f"{name} {part} {times[name][part][-1]:.3f}s" for name in built for part in PARTS), flush=True)


def run(args) -> dict:
    import torch

    from benchmarks import workload

    args.warmup_steps, args.timed_steps = 0, args.rounds  # the pairs of as many steps
    spec = _spec(args.model, args)
    shared = workload.build_model(args.model, torch.device("cpu"), seed=args.seed, lora=True)
    built = {name: _trainer(spec, name, None, shared) for name in (TRL, "ama-ama-s")}
    times = {name: {part: [] for part in PARTS} for name in built}
    for name, (trainer, *_) in built.items():
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1
        trainer.compute_loss = _timing(trainer.compute_loss, times[name]["compute_loss"])
        trainer.accelerator.backward = _timing(trainer.accelerator.backward, times[name]["backward"])
    try:
        _rounds(args, built, times, shared[0])
    finally:
        for *_, out_dir in built.values():
            shutil.rmtree(out_dir, ignore_errors=True)
    ratios = {}
    for part in PARTS:
        per_round = list(np.array(times["ama-ama-s"][part]) / np.array(times[TRL][part]))
        ratios[part] = {"per_round": [float(x) for x in per_round], "median": float(np.median(per_round)),
                        "median_interval_95": _median_interval(per_round)}
    return {"command": "python -m benchmarks.trl_same_batch " + " ".join(args.argv), "settings": spec,
            "seconds": times, "ratio_ama_s_vs_trl": ratios}


def main(argv=None) -> dict:
    import sys

    from amalab.atomic_write import write_json_atomic

    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_same_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
    add_workload_arguments(parser)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results-trl-same-batch"))
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started, began, machine = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter(), _machine()
    results = {**run(args), "started": started, "machine": machine}
    results.update(wall_seconds=time.perf_counter() - began, load_average_at_end=_load())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    for part, r in results["ratio_ama_s_vs_trl"].items():
        print(f"[{args.model}] {part}: ama-s / {TRL} median {r['median']:.4f} "
              f"(95 % bootstrap interval {r['median_interval_95']})", flush=True)
    return results


if __name__ == "__main__":
    main()

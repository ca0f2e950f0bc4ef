"""AMATrainer's step against plain TRL DPOTrainer's, on the same model, LoRA adapter, pairs and batch.

    PYTHONPATH=. python -m benchmarks.trl_step --models smollm2 tiny --out benchmarks/results-trl

Variants (``--variants``): ``trl-dpo`` (``trl.DPOTrainer``), ``ama-ama-s`` (``amalab.trl.AMATrainer``, mixer
``ama-s``, gamma 0.3) and ``ama-standard`` (mixer ``standard``). Two ways to alternate them (``--interleave``):

  ``runs``   each run its own subprocess, in rounds that run every variant once (the order reversed every
             other round); each run takes ``--warmup-steps`` untimed optimizer steps, then ``--timed-steps``
             timed ones; a round's time of a variant is its run's median step.
  ``steps``  one subprocess builds every variant's model and trainer and trains each in its own thread, the
             threads taking optimizer steps in turn (:class:`Turns`: one step of each variant per round, the
             order rotated by one every round; the waiting threads are blocked, not spinning); after
             ``--warmup-steps`` rounds, ``--rounds`` timed ones. Neighbouring steps are seconds apart, so the
             machine's drift between runs minutes apart (a SmolLM2 step moved 16-25 s from run to run)
             falls on both sides of a round's ratio alike.

Per round the ratio of each AMATrainer variant to that round's ``trl-dpo``; the headline is the median of the
per-round ratios. Gate: ``--gate`` (1.02) on SmolLM2; the tiny model's ratio is reported without a gate.

Both sides: the model and LoRA adapter of ``benchmarks.workload.build_model(..., lora=True)`` (r 16 on every
projection, seeded), TRL's PEFT reference (a frozen copy "ref" of the initial adapter;
``precompute_ref_log_probs=False``), the same
tokenized HH-RLHF pairs, all of one shape (every row ``--seq-len`` tokens, of which ``--completion-len`` are
its completion: ``benchmarks.workload.fixed_shape_pairs``; TRL's tokenization bypassed for amalab's token ids,
as in ``benchmarks.workers.trl_step``) with a synthetic ``task`` column (three task names in turn)
and a constant ``baseline_loss`` column (the plain DPOTrainer gets the same rows; its collator ignores the
two extra columns), ``per_device_train_batch_size`` pairs per step, AdamW, clipping at 1.0, beta 0.1, float32
on CPU (``use_cpu=True, bf16=False``), gradient checkpointing off, ``report_to=[]``.

Two times per optimizer step, from a ``TrainerCallback`` registered last (after AMATrainer's own
``on_step_end``, which updates the mixer and logs the per-task metrics):
  ``step_seconds``   ``on_step_begin`` -> ``on_step_end``: forward (policy + PEFT reference), loss, backward,
                     clipping, AdamW, scheduler, and AMATrainer's mixer update and per-task metrics;
  ``cycle_seconds``  ``on_step_end`` -> next ``on_step_end``: the above plus the Trainer's
                     ``get_batch_samples`` (TRL: the dataloader's fetch and collation; AMATrainer: the mixer's
                     draws and the collation of ``train_dataset[row]``) and the Trainer's per-step bookkeeping
                     (with ``--interleave steps``: from the trainer's turn to its ``on_step_end``, the same
                     span without the other trainers' steps between).
The gate is taken on ``cycle_seconds`` (the whole cost of a step to a user); both ratios are reported.

``completion_tokens_per_step`` (per run, its timed steps): the completion positions of the step's batch
(``labels != -100``), whose log-probs the loss sums. The two trainers take different
pairs in a step (TRL: its seeded shuffle; AMATrainer: the mixer's draws); since every pair has the same shape,
every step of either scores the same count (recorded to show it), so both do the same work per step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "amalab-trl-step/1"
VARIANTS = ("trl-dpo", "ama-ama-s", "ama-standard")
TRL = "trl-dpo"
TASKS = ("task-a", "task-b", "task-c")
BASELINE_LOSS = 0.69  # a constant s(z) near log 2: the values change AMA-S's weights, not a step's cost
GAMMA = 0.3
GATE = 1.02
GATED_MODELS = ("smollm2",)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-independent settings of a step (shared with benchmarks/trl_same_batch.py)."""
    from benchmarks.shared_data import HH_HARMLESS

    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (pairs)")
    parser.add_argument("--seq-len", type=int, default=128, help="max_length; every row has exactly this many")
    parser.add_argument("--completion-len", type=int, default=32,
                        help="completion tokens of every row (the rest of --seq-len is prompt)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--data", default=str(HH_HARMLESS), help="HH-RLHF jsonl.gz ('' : synthetic pairs)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_step", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "tiny"], choices=["smollm2", "tiny"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps per run (>= 1)")
    parser.add_argument("--timed-steps", type=int, help="timed optimizer steps per run (default 3)")
    add_workload_arguments(parser)
    parser.add_argument("--gate", type=float, default=GATE, help="AMATrainer / DPOTrainer ratio at most")
    parser.add_argument("--interleave", choices=["runs", "steps"], default="runs",
                        help="runs: each run its own subprocess, variants alternating run by run; steps: every "
                             "variant in one process, alternating step by step (a round: one timed step of each)")
    parser.add_argument("--in-process", action="store_true", help="no subprocesses (tests)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results-trl"))
    args = parser.parse_args(argv)
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1 (the first cycle has no previous step end)")
    if args.interleave == "steps" and args.timed_steps is not None:
        parser.error("--timed-steps is for --interleave runs; with steps, --rounds is the timed steps of each")
    if args.timed_steps is None and args.interleave == "runs":
        args.timed_steps = 3
    if len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants names a variant twice: {' '.join(args.variants)}")
    return args


# ----------------------------------------------------------------------------------------- one run


def _trainer(spec: dict, variant: str, callback, shared=None):
    """The model (seeded, LoRA) and the trainer of one variant, ``callback`` registered last (after
    AMATrainer's mixer update and per-task metrics); the folder the trainer writes in; the per-step count of
    completion positions (module docstring). ``shared``: a (model, tokenizer) another trainer trains too."""
    import torch
    from datasets import Dataset

    from benchmarks import workload

    torch.manual_seed(spec["seed"])
    model, tokenizer = shared or workload.build_model(spec["model"], torch.device("cpu"), seed=spec["seed"],
                                                      lora=True)
    if "ref" in model.peft_config:  # TRL copies the adapter as the reference "ref" once per trainer
        model.delete_adapter("ref")
        model.set_adapter("default")
    completion_tokens = []

    def count_completion_tokens(module, args, kwargs):
        if torch.is_grad_enabled() and kwargs.get("labels") is not None:  # the policy's forward, not the reference's
            completion_tokens.append(int((kwargs["labels"][:, 1:] != -100).sum()))

    if shared is None:  # one hook per model: a shared model's is its first trainer's
        model.register_forward_pre_hook(count_completion_tokens, with_kwargs=True)
    steps = spec["warmup_steps"] + spec["timed_steps"]
    data = Path(spec["data"]) if spec.get("data") else None
    pairs, source = workload.fixed_shape_pairs(tokenizer, spec["batch_size"] * steps, spec["seq_len"],
                                               spec["completion_len"], data=data)
    dataset = Dataset.from_dict({
        "prompt_ids": [list(p.prompt_ids) for p in pairs],
        "chosen_ids": [list(p.chosen_ids) for p in pairs],
        "rejected_ids": [list(p.rejected_ids) for p in pairs],
        "task": [TASKS[i % len(TASKS)] for i in range(len(pairs))],
        "baseline_loss": [BASELINE_LOSS] * len(pairs)})
    out_dir = Path(tempfile.mkdtemp(prefix="trl-step-bench-"))
    try:
        trainer = _build_trainer(spec, variant, model, tokenizer, dataset, out_dir, steps)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if callback is not None:
        trainer.add_callback(callback)
    return trainer, model, source, completion_tokens, out_dir


def _build_trainer(spec: dict, variant: str, model, tokenizer, dataset, out_dir: Path, steps: int):
    from trl import DPOConfig, DPOTrainer

    from amalab.trl import AMAConfig, AMATrainer

    class Pretokenized:
        """TRL's dataset preparation bypassed for amalab's token ids (the same tokens on both sides)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    class PretokenizedDPO(Pretokenized, DPOTrainer):
        pass

    class PretokenizedAMA(Pretokenized, AMATrainer):
        pass

    common = dict(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=0, beta=0.1, loss_type=["sigmoid"],
        max_length=spec["seq_len"], precompute_ref_log_probs=False, gradient_checkpointing=False,
        bf16=False, use_cpu=True, logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"])
    if variant == TRL:
        trainer = PretokenizedDPO(model=model, args=DPOConfig(**common), train_dataset=dataset,
                                  processing_class=tokenizer)
    else:
        mixer = variant.removeprefix("ama-")
        options = {"gamma": GAMMA} if mixer == "ama-s" else {}
        trainer = PretokenizedAMA(model=model, args=AMAConfig(**common, mixer=mixer, **options),
                                  train_dataset=dataset, processing_class=tokenizer)
    return trainer


def _usage() -> tuple[float, float, int]:
    """This process's (user CPU seconds, system CPU seconds, minor page faults) so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _usage_between(before: tuple, after: tuple) -> dict:
    return {key: b - a for key, a, b in zip(("user_seconds", "system_seconds", "minor_faults"), before, after)}


def _allocator(maps: str | None = None) -> str:
    """The malloc this process runs on, from its memory map (``/proc/self/maps``): jemalloc or tcmalloc where
    one is loaded (``LD_PRELOAD``), else glibc's."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "unknown"
    return next((name for name in ("jemalloc", "tcmalloc") if f"/lib{name}" in maps), "glibc")


def _result(spec, variant, model, source, completion_tokens, step, cycle, usage, steps_run, began) -> dict:
    import torch

    warm = spec["warmup_steps"]
    return {"variant": variant, "model": spec["model"], "data": source, "steps_run": steps_run,
            "step_seconds": step, "cycle_seconds": cycle, "cycle_usage": usage,
            "median_step_seconds": float(np.median(step)), "median_cycle_seconds": float(np.median(cycle)),
            "tokens_per_step": 2 * spec["batch_size"] * spec["seq_len"],
            "completion_tokens_per_step": completion_tokens[warm:],
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "torch_threads": torch.get_num_threads(), "allocator": _allocator(),
            "wall_seconds": time.perf_counter() - began}


def run_variant(spec: dict) -> dict:
    """One run of one variant (``--interleave runs``): build, train warmup + timed steps, return the per-step
    times."""
    import torch
    from transformers import TrainerCallback

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.began, self.last_end, self.step, self.cycle, self.usage = None, None, [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now, usage = time.perf_counter(), _usage()
            self.step.append(now - self.began)
            if self.last_end is not None:
                self.cycle.append(now - self.last_end)
                self.usage.append(_usage_between(self.last_usage, usage))
            self.last_end, self.last_usage = now, usage

    timer = StepTimer()
    began = time.perf_counter()
    trainer, model, source, completion_tokens, out_dir = _trainer(spec, spec["variant"], timer)
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    warm = spec["warmup_steps"]
    return _result(spec, spec["variant"], model, source, completion_tokens, timer.step[warm:],
                   timer.cycle[warm - 1:], timer.usage[warm - 1:], len(timer.step), began)


class Turns:
    """The optimizer steps of several trainers, each training in its own thread, taken one at a time: step k of
    every trainer in turn, in ``names``' order rotated by k (``--interleave steps``), so that over rounds each
    trainer takes each place (and, with three or more trainers, none takes two steps in a row; with two the
    order is A B, B A, A B, ...). While one trainer computes, the others
    wait on a condition variable (no busy thread)."""

    def __init__(self, names: list[str], steps: int):
        n = len(names)
        self.schedule = [name for k in range(steps) for name in names[k % n:] + names[:k % n]]
        self.position, self.failed = 0, None
        self.changed = threading.Condition()
        self.started = threading.Barrier(len(names))

    def wait_for_turn(self, name: str) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.failed or self.schedule[self.position] == name)
            self._raise_if_failed()

    def end_turn(self) -> None:
        with self.changed:
            self.position += 1
            self.changed.notify_all()

    def wait_for_all(self) -> None:
        """Until every trainer's last step is done, so that no trainer's end of training overlaps a timed step."""
        with self.changed:
            self.changed.wait_for(lambda: self.failed or self.position == len(self.schedule))
            self._raise_if_failed()

    def fail(self, error: str) -> None:
        with self.changed:
            self.failed = error
            self.changed.notify_all()
        self.started.abort()

    def _raise_if_failed(self) -> None:
        if self.failed:
            raise RuntimeError(f"another trainer failed: {self.failed}")


def run_interleaved(spec: dict) -> list[dict]:
    """Every variant of ``spec["variants"]`` in this process, each with its own model and trainer in its own
    thread, their optimizer steps alternating (:class:`Turns`). Per step, ``step_seconds`` as in
    :func:`run_variant` and ``cycle_seconds`` from the trainer's turn to its ``on_step_end`` (the same span
    as a separate run's ``on_step_end`` -> ``on_step_end``, without the other trainers' turns between)."""
    import torch
    from transformers import TrainerCallback

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    names, steps = list(spec["variants"]), spec["warmup_steps"] + spec["timed_steps"]
    turns = Turns(names, steps)

    class TurnTimer(TrainerCallback):
        def __init__(self, name):
            self.name, self.turn_began, self.began, self.step = name, None, None, []
            self.spans = []  # (turn began, on_step_end) of every step, on perf_counter's clock
            self.usage = []  # the process's CPU time and page faults over each span (the others wait meanwhile)

        def begin_turn(self):
            turns.wait_for_turn(self.name)
            self.turn_began, self.turn_usage = time.perf_counter(), _usage()

        def on_train_begin(self, args, state, control, **kwargs):
            turns.started.wait()  # every trainer built and set up before the first turn
            self.begin_turn()

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step.append(now - self.began)
            self.spans.append((self.turn_began, now))
            self.usage.append(_usage_between(self.turn_usage, _usage()))
            turns.end_turn()
            if len(self.step) < steps:
                self.begin_turn()
            else:
                turns.wait_for_all()

    began = time.perf_counter()
    built, timers = {}, {name: TurnTimer(name) for name in names}
    try:
        for name in names:
            built[name] = _trainer(spec, name, timers[name])
    except BaseException:
        for *_, out_dir in built.values():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    errors = {}

    def train(name):
        try:
            trainer = built[name][0]
            trainer.train()
            if trainer.state.global_step < steps:  # stopped early: its remaining turns would never come
                raise RuntimeError(f"stopped after {trainer.state.global_step} of {steps} steps")
        except BaseException as e:
            errors[name] = f"{type(e).__name__}: {e}"
            turns.fail(f"{name}: {errors[name]}")

    threads = [threading.Thread(target=train, args=(name,), name=name) for name in names]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for trainer, *_, out_dir in built.values():
            shutil.rmtree(out_dir, ignore_errors=True)
    if errors:
        raise RuntimeError("; ".join(f"{name}: {error}" for name, error in errors.items()))
    warm, results = spec["warmup_steps"], []
    for name, (_, model, source, completion_tokens, _) in built.items():
        timer = timers[name]
        cycle = [end - turn_began for turn_began, end in timer.spans]
        results.append(_result(spec, name, model, source, completion_tokens, timer.step[warm:], cycle[warm:],
                               timer.usage[warm:], len(timer.step), began))
        results[-1]["turn_spans"] = timer.spans[warm:]
    return results


def _run(spec: dict, in_process: bool) -> dict | list[dict]:
    """:func:`run_interleaved` where ``spec`` names several variants, else :func:`run_variant`; in a
    subprocess unless ``in_process``."""
    work = run_interleaved if "variants" in spec else run_variant
    if in_process:
        return work(spec)
    with tempfile.TemporaryDirectory(prefix="trl-step-") as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "benchmarks.trl_step", "--worker", json.dumps(spec), str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker exit {proc.returncode}: {proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _step_rounds(run: dict) -> list[dict]:
    """An interleaved run cut into its rounds (round k: the k-th timed step of every variant), each shaped as
    a separate run of one timed step, so that one summary serves both ``--interleave`` modes."""
    rounds, run = [], dict(run)
    spans = run.pop("turn_spans")
    for k, (step, cycle) in enumerate(zip(run["step_seconds"], run["cycle_seconds"])):
        rounds.append(dict(run, round=k, step_seconds=[step], cycle_seconds=[cycle], median_step_seconds=step,
                           median_cycle_seconds=cycle, turn_span=spans[k], cycle_usage=run["cycle_usage"][k:k + 1],
                           completion_tokens_per_step=run["completion_tokens_per_step"][k:k + 1]))
    return rounds


# ----------------------------------------------------------------------------------------- summary


def _stats(values) -> dict:
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "median": None, "min": None, "max": None}
    return {"n": len(values), "median": float(np.median(values)), "min": min(values), "max": max(values)}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _median_interval(values: list[float], resamples: int = 10_000) -> list[float] | None:
    """A 95 % percentile-bootstrap interval of the median of ``values`` (seeded: the same values give the same
    interval), or None under 3 values."""
    if len(values) < 3:
        return None
    medians = np.median(np.random.default_rng(0).choice(values, (resamples, len(values))), axis=1)
    return [float(x) for x in np.percentile(medians, [2.5, 97.5])]


def _round_median(run: dict, kind: str) -> float | None:
    """A run's median step or cycle time, or the median CPU time (user or system) of its cycles (None for
    results that predate ``cycle_usage``)."""
    if kind in ("user", "system"):
        usage = run.get("cycle_usage")
        return float(np.median([u[f"{kind}_seconds"] for u in usage])) if usage else None
    return run[f"median_{kind}_seconds"]


def summarize(model: str, runs: list[dict], gate: float) -> dict:
    """Per variant its times; per AMATrainer variant the per-round ratios to that round's trl-dpo run."""
    variants = {}
    for name in {r["variant"] for r in runs}:
        mine = [r for r in runs if r["variant"] == name]
        ok = [r for r in mine if "error" not in r]
        variants[name] = {
            "step_seconds": _stats([s for r in ok for s in r["step_seconds"]]),
            "cycle_seconds": _stats([s for r in ok for s in r["cycle_seconds"]]),
            **{f"cycle_{key}": _stats([u[key] for r in ok for u in r.get("cycle_usage", [])])
               for key in ("user_seconds", "system_seconds", "minor_faults")},
            "errors": [r["error"] for r in mine if "error" in r],
            "rounds": mine}
    ratios = {}
    for name in variants:
        if name == TRL or TRL not in variants:
            continue
        per_round = {"step": [], "cycle": [], "user": [], "system": []}
        for trl_run, ama_run in zip(variants[TRL]["rounds"], variants[name]["rounds"]):
            if "error" in trl_run or "error" in ama_run:
                continue
            for kind in per_round:  # None where either took no time (a short step can take no system time)
                ama, trl = _round_median(ama_run, kind), _round_median(trl_run, kind)
                per_round[kind].append(ama / trl if ama and trl else None)
        ratios[name] = {}
        for kind, values in per_round.items():
            known = [v for v in values if v is not None]
            ratios[name][kind] = {"per_round": values, "median": float(np.median(known)) if known else None,
                                  "median_interval_95": _median_interval(known)}
    gated = model in GATED_MODELS
    met = ({name: (r["cycle"]["median"] is not None and r["cycle"]["median"] <= gate)
            for name, r in ratios.items()} if gated else None)
    return {"variants": variants, "ratio_vs_trl": ratios,
            "gate": {"at_most": gate if gated else None, "on": "cycle median of per-round ratios", "met": met}}


def _spec(model: str, args) -> dict:
    return {"model": model, "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "completion_len": args.completion_len,
            "lr": args.lr, "seed": args.seed, "threads": args.threads, "data": args.data}


def _separate_rounds(model: str, args) -> list[dict]:
    """``--interleave runs``: each run its own subprocess, every variant once per round."""
    runs = []
    for round_index in range(args.rounds):
        order = list(args.variants) if round_index % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            load = _load()
            try:
                result = _run(dict(_spec(model, args), variant=variant), args.in_process)
            except Exception as e:  # recorded, the other runs go on
                result = {"variant": variant, "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-3000:]}
            result.update(round=round_index, load_average_before=load, load_average_after=_load())
            runs.append(result)
            shown = (f"step {result['median_step_seconds']:.4f}s cycle {result['median_cycle_seconds']:.4f}s, "
                     f"system {_round_median(result, 'system'):.2f}s, "
                     f"{np.median([u['minor_faults'] for u in result['cycle_usage']]):.0f} page faults a step"
                     if "error" not in result else result["error"][:200])
            print(f"[{model}] round {round_index} {variant}: {shown} (load {load})", flush=True)
    return runs


def _interleaved_rounds(model: str, args) -> list[dict]:
    """``--interleave steps``: one process trains every variant, the steps alternating (:func:`run_interleaved`);
    round k is the k-th timed step of each."""
    spec = dict(_spec(model, args), variants=list(args.variants), timed_steps=args.rounds)
    load = _load()
    try:
        per_variant = _run(spec, args.in_process)
    except Exception as e:  # recorded on every variant
        error = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:], "round": 0}
        return [dict(error, variant=variant) for variant in args.variants]
    runs = []
    for run in per_variant:
        run.update(load_average_before=load, load_average_after=_load())
        runs += _step_rounds(run)
    for k in range(args.rounds):
        shown = ", ".join(f"{r['variant']} step {r['median_step_seconds']:.4f}s cycle {r['median_cycle_seconds']:.4f}s"
                          for r in runs if r["round"] == k)
        print(f"[{model}] round {k}: {shown}", flush=True)
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    from amalab.atomic_write import write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {"schema": SCHEMA, "command": "python -m benchmarks.trl_step " + " ".join(argv or sys.argv[1:]),
               "started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "in_process")},
               "models": {}}
    for model in args.models:
        runs = _interleaved_rounds(model, args) if args.interleave == "steps" else _separate_rounds(model, args)
        results["models"][model] = summarize(model, runs, args.gate)
        write_json_atomic(out / "results.json", results)
    results["wall_seconds"] = time.perf_counter() - started
    results["load_average_at_end"] = _load()
    write_json_atomic(out / "results.json", results)
    for model, block in results["models"].items():
        for name, r in block["ratio_vs_trl"].items():
            print(f"[{model}] {name} / {TRL}: cycle median {r['cycle']['median']} (95 % bootstrap interval "
                  f"{r['cycle']['median_interval_95']}) per round "
                  f"{[round(x, 4) for x in r['cycle']['per_round']]}; step median {r['step']['median']}; "
                  f"user CPU time median {r['user']['median']}, system {r['system']['median']}", flush=True)
        if block["gate"]["met"] is not None:
            print(f"[{model}] gate <= {block['gate']['at_most']}: {block['gate']['met']}", flush=True)
    return results


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _machine() -> dict:
    import platform

    import torch
    import transformers
    import trl

    return {"platform": platform.platform(), "cpu": _cpu_model(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "allocator_environment": {k: v for k, v in os.environ.items() if k == "LD_PRELOAD" or k.startswith("MALLOC_")},
            "transformers": transformers.__version__, "trl": trl.__version__,
            "load_average_at_start": _load()}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        from amalab.atomic_write import write_json_atomic

        write_json_atomic(Path(sys.argv[3]), _run(json.loads(sys.argv[2]), in_process=True))
    else:
        main()

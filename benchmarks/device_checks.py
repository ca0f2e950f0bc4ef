"""The checks of ``python -m benchmarks.gpu_check`` that run in its own process, and what they share.

Every check trains or scores through amalab's real code (``run_training`` and its step, ``sequence_logps``,
``compile_layers``) on the benchmark's models and pairs (:mod:`benchmarks.workload`), and returns a dict:
``measured`` numbers, the ``tolerance`` they are held to, and ``passed``. The driver adds the name, the time
and any error. On CUDA a check compares with float32 / eager / the CPU; in the plumbing run (no CUDA) the same
functions run on the CPU, with CPU bf16 autocast standing in for CUDA's, so every line of them runs.

Tolerances (why these numbers):
* bf16 autocast against float32 training, and compiled against eager layers under bf16: the per-step mean
  DPO loss within ``LOSS_RTOL`` = 1e-1 relative, a bound for gross errors (a lost gradient, a NaN, a wrong
  row or mask), not for rounding. bf16 keeps 8 significant bits; a sequence log-prob of a few dozen
  completion tokens is then off by up to a few tenths of a nat (0.32 at most for 8 SmolLM2 pairs under the
  CPU's bf16 autocast), and once the weights have moved these errors no longer cancel against the
  reference's: beta = 0.1 and the loss's slope 1/2 make a few hundredths per pair. Measured on the CPU's
  bf16 autocast: SmolLM2 + LoRA (2 pairs per step, lr 5e-4) 0, 2.7e-2 and 5.6e-2 at steps 1-3; the tiny
  model (8 pairs, 30 steps) 6.5e-4 at most. Each bf16 run computes its reference in its own precision, as a
  real run does, so step 1 is log 2 in both; compiled and eager runs share the eager reference. The float32
  log-prob parity below is the strict check.
* float32 on CUDA against float32 on the CPU: sequence log-probs within ``FP32_LOGP_ATOL`` = 1e-2 nats (the
  sum of ~100 token log-probs, each off by ~1e-5 from a different summation order).
* bf16 autocast on CUDA against float32 on the CPU: ``BF16_LOGP_PER_TOKEN_ATOL`` = 5e-2 nats per completion
  token on average over the pairs (sum of |differences| over sum of completion tokens; relative rounding
  2e-3 of logits of size ~20 is ~4e-2 per token at worst; the LM head itself runs in float32, see
  amalab.llm.logprobs). It catches gross errors (a wrong mask or row, a non-finite value); the float32
  comparison is the strict one. On the CPU's bf16 autocast, 8 SmolLM2 pairs differ by at most 0.32 nats per
  sequence, 0.020 per token.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from amalab.llm.collate import collate_pairs
from amalab.llm.config import LoraConfig
from amalab.training.config import OptimConfig
from amalab.training.distributed import World
from amalab.llm.evaluate import pair_logps
from amalab.llm.logprobs import sequence_logps
from amalab.objectives.preference import PreferenceLoss
from amalab.llm.models import apply_lora, compile_layers
from amalab.llm.precision import autocast_context
from amalab.llm.train import TrainingRun, run_training
from amalab.mixers import make_mixer
from benchmarks import workload

LOSS_RTOL = 1e-1
FP32_LOGP_ATOL = 1e-2
BF16_LOGP_PER_TOKEN_ATOL = 5e-2
BETA = 0.1
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    """One model and its training sizes: what a check trains or scores."""

    model: str  # a benchmark model name: tiny, smollm2
    device: str  # cuda or cpu
    lora: bool = False
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 10
    lr: float = 1e-3
    data: str = ""  # a pairs file ('' : synthetic pairs)
    seed: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def describe(self) -> dict:
        """The sizes, and the pairs' source (synthetic when the file has too few full-length pairs)."""
        _, source = _pairs(self.model, self.batch_size * self.steps, self.seq_len, self.data)
        return {"model": self.model + ("+lora" if self.lora else ""), "device": self.device,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "steps": self.steps, "lr": self.lr,
                "data": source}


@functools.lru_cache(maxsize=None)
def _master(name: str):
    """(float32 model on the CPU, tokenizer), loaded once per process (SmolLM2 takes seconds to load)."""
    return workload.build_model(name, torch.device("cpu"), seed=0)


@functools.lru_cache(maxsize=None)
def _pairs(name: str, count: int, seq_len: int, data: str):
    _, tokenizer = _master(name)
    return workload.tokenized_pairs(tokenizer, count, seq_len, full_length=True, data=Path(data) if data else None)


def load(work: Workload, device: torch.device | None = None):
    """(a fresh trainable copy of the model on ``device``, pad id, the check's pairs): the same each call."""
    model, tokenizer = _master(work.model)
    model = copy.deepcopy(model).to(device or work.torch_device)
    if work.lora:
        with torch.random.fork_rng(devices=[]):  # the same adapter initialization in every copy
            torch.manual_seed(work.seed)
            model = apply_lora(model, LoraConfig())
    model.train()
    pairs, _ = _pairs(work.model, work.batch_size * work.steps, work.seq_len, work.data)
    return model, tokenizer.pad_token_id, pairs


def bf16_autocast(device: torch.device):
    """The autocast under test: amalab's own on CUDA; on the CPU (plumbing) torch's CPU bf16 autocast."""
    if device.type == "cuda":
        return lambda: autocast_context(device)
    return lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def reference_of(model, pairs, pad_token_id: int, work: Workload, autocast):
    """The reference log-probs (pi_ref = the model at step 0) under ``autocast``."""
    return pair_logps(model, pairs, pad_token_id, work.batch_size, work.torch_device, autocast=autocast)


def train_records(model, pairs, pad_token_id: int, work: Workload, autocast, reference,
                  world: World = World(), run_dir: Path | None = None, stop_after: int | None = None,
                  micro_batch_size: int = 0) -> list[dict]:
    """``work.steps`` DPO steps of amalab's loop (mixer 'standard' over two tasks): the step records it logs.

    ``run_dir``: the run's folder, where it writes its checkpoints (at ``stop_after`` and at the end) and from
    which a later call with the same folder resumes (without it, a temporary folder and no checkpoints);
    ``stop_after``: stop after that step with a checkpoint, as an interruption would; ``micro_batch_size``:
    accumulate the step over micro-batches of that many pairs (0: one pass)."""
    tasks = [pairs[0::2], pairs[1::2]]
    optim = OptimConfig(max_steps=work.steps, batch_size=work.batch_size, learning_rate=work.lr,
                        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                        per_device_eval_batch_size=work.batch_size, micro_batch_size=micro_batch_size)
    records: list[dict] = []
    with contextlib.ExitStack() as stack:
        folder = run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amalab-gpu-check-")))
        run = TrainingRun(
            name="gpu-check", run_dir=folder, mixer=make_mixer("standard", 2, sizes=[len(t) for t in tasks]),
            task_names=["even", "odd"], train_sets=tasks, eval_sets=[[], []], reference=reference,
            baseline_losses=None, specialist_caches=[None, None], optim=optim, loss=PreferenceLoss("dpo", BETA),
            seed=work.seed, pad_token_id=pad_token_id)
        checkpoints = {} if run_dir else {"write_checkpoint": lambda state: None}
        run_training(model, run, work.torch_device, world, show_progress=False, stop_after=stop_after,
                     log=records.append, autocast=autocast, **checkpoints)
    return [r for r in records if r["kind"] == "train"]


def losses_within(reference: list[float], other: list[float], rtol: float) -> dict:
    """The per-step loss curves and their largest relative difference."""
    relative = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference, other)]
    finite = all(np.isfinite(other)) and len(other) == len(reference)
    return {"max_relative_difference": max(relative), "final_relative_difference": relative[-1],
            "within": bool(finite and max(relative) <= rtol)}


def median_seconds(records: list[dict], skip: int) -> float:
    """Median step time after the first ``skip`` steps (compilation, allocator warm-up)."""
    return float(np.median([r["seconds"] for r in records[skip:]]))


# ----------------------------------------------------------------------------------------- checks


def bf16_training(work: Workload) -> dict:
    """The same DPO run in float32 and under bf16 autocast (each with its own reference, as a real run has):
    the loss curves agree within LOSS_RTOL at every step."""
    device = work.torch_device
    curves, seconds = {}, {}
    for precision, autocast in (("fp32", contextlib.nullcontext), ("bf16", bf16_autocast(device))):
        model, pad, pairs = load(work)
        records = train_records(model, pairs, pad, work, autocast, reference_of(model, pairs, pad, work, autocast))
        curves[precision] = [r["loss"] for r in records]
        seconds[precision] = median_seconds(records, skip=1)
    compared = losses_within(curves["fp32"], curves["bf16"], LOSS_RTOL)
    return {"passed": compared.pop("within"), "workload": work.describe(),
            "measured": {"loss_fp32": curves["fp32"], "loss_bf16": curves["bf16"], **compared,
                         "fp32_loss_change": curves["fp32"][-1] - curves["fp32"][0],
                         "median_step_seconds": seconds},
            "tolerance": {"loss_rtol_every_step": LOSS_RTOL}}


def compiled_layers(work: Workload, **compile_options) -> dict:
    """Eager against ``compile_layers`` (every decoder layer compiled) under the device's autocast: the loss
    curves agree within LOSS_RTOL; the median step time of each after two warm-up steps (the compilation)."""
    device = work.torch_device
    autocast = bf16_autocast(device)
    curves, seconds = {}, {}
    for variant in ("eager", "compiled"):
        model, pad, pairs = load(work)
        reference = reference_of(model, pairs, pad, work, autocast)  # eager: only training shapes compile
        if variant == "compiled":
            compile_layers(model, **compile_options)
        records = train_records(model, pairs, pad, work, autocast, reference)
        curves[variant] = [r["loss"] for r in records]
        seconds[variant] = median_seconds(records, skip=2)
        seconds[f"{variant}_first_step"] = records[0]["seconds"]
    compared = losses_within(curves["eager"], curves["compiled"], LOSS_RTOL)
    return {"passed": compared.pop("within"), "workload": work.describe(),
            "measured": {"loss_eager": curves["eager"], "loss_compiled": curves["compiled"], **compared,
                         "median_step_seconds": {"eager": seconds["eager"], "compiled": seconds["compiled"]},
                         "first_step_seconds": {"eager": seconds["eager_first_step"],
                                                "compiled": seconds["compiled_first_step"]},
                         "step_time_ratio_compiled_over_eager": seconds["compiled"] / seconds["eager"],
                         "compile_options": compile_options},
            "tolerance": {"loss_rtol_every_step": LOSS_RTOL}}


@torch.no_grad()
def _logps(model, batch, autocast) -> np.ndarray:
    with autocast():
        logps = sequence_logps(model, batch)
    return torch.cat([logps.chosen, logps.rejected]).double().cpu().numpy()


def logprob_parity(work: Workload, pairs_scored: int = 8) -> dict:
    """``sequence_logps`` of the same pairs on the CPU (float32) and on the device, in float32 and under the
    bf16 autocast: the largest differences per sequence and per completion token."""
    model, pad, pairs = load(work, torch.device("cpu"))
    model.eval()
    batch = collate_pairs(pairs[:pairs_scored], pad)
    cpu = _logps(model, batch, contextlib.nullcontext)
    device = work.torch_device
    model.to(device)
    on_device = batch.to(device)
    tokens = batch.completion_token_counts.double().numpy()
    measured = {"pairs": len(batch.ids), "completion_tokens": int(tokens.sum()),
                "cpu_logps": cpu.tolist()}
    for precision, autocast in (("fp32", contextlib.nullcontext), ("bf16", bf16_autocast(device))):
        difference = np.abs(_logps(model, on_device, autocast) - cpu)
        measured[f"{precision}_max_abs_difference"] = float(difference.max())
        measured[f"{precision}_mean_abs_difference_per_token"] = float(difference.sum() / tokens.sum())
    passed = (measured["fp32_max_abs_difference"] <= FP32_LOGP_ATOL
              and measured["bf16_mean_abs_difference_per_token"] <= BF16_LOGP_PER_TOKEN_ATOL)
    return {"passed": bool(passed), "workload": work.describe(), "measured": measured,
            "tolerance": {"fp32_max_abs_difference": FP32_LOGP_ATOL,
                          "bf16_mean_abs_difference_per_token": BF16_LOGP_PER_TOKEN_ATOL},
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def run_limited(command: list[str], limit_s: float, log_path: Path, env: dict | None = None) -> int:
    """Run ``command`` in the repository with output to ``log_path``; past ``limit_s`` end it and every
    process it started (its own session), then raise ``TimeoutError``. Returns the exit status."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise TimeoutError(f"{' '.join(command[:4])} ran past its limit of {limit_s:.0f} s") from None


def step_benchmark(work: Workload, out: Path, timeout_s: float, plumbing: bool) -> dict:
    """amalab's step against TRL's DPOTrainer, by the benchmark itself (``python -m benchmarks``, a subprocess
    with a time limit): median ms per step, tokens/s, MFU and peak memory of each, and their ratio.

    MFU = 6 x N x tokens/s / peak, N = all parameters (a tied embedding once: the LM head's matmul), for
    full fine-tuning (2N forward + 4N backward FLOPs per token; attention scores not counted, ~3% at 128
    tokens for SmolLM2). The peak is the bf16 dense tensor-core peak of the device (benchmarks/workload.py).
    """
    command = [sys.executable, "-m", "benchmarks", "--models", work.model, "--parts", "step",
               "--mixers", "standard", "--rounds", "1", "--warmup-steps", "1" if plumbing else "3",
               "--timed-steps", str(work.steps), "--batch-size", str(work.batch_size),
               "--seq-len", str(work.seq_len), "--lr", str(work.lr), "--device", work.device, "--data", work.data,
               "--out", str(out)] + (["--in-process", "--threads", "1"] if plumbing else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               TQDM_DISABLE="1")
    out.mkdir(parents=True, exist_ok=True)
    status = run_limited(command, timeout_s, out / "benchmark.log", env)
    if status != 0:
        tail = " | ".join((out / "benchmark.log").read_text().strip().splitlines()[-3:])
        raise RuntimeError(f"the benchmark exited with {status}: {tail}")
    results = json.loads((out / "results.json").read_text())
    block = results["step_time"][work.model]
    measured = {"peak_tflops": results["settings"]["peak_tflops"],
                "peak_tflops_source": results["settings"]["peak_tflops_source"],
                "amalab_over_trl_step_time": block["ratio_vs_trl"]}
    for variant in ("amalab-standard", "trl-dpo"):
        v = block["variants"][variant]
        memory = v.get("peak_cuda_allocated_mib") or v.get("peak_rss_growth_mib") or {}
        measured[variant] = {"errors": v["errors"], "steps": v["step_seconds"]["n"],
                             "ms_per_step": 1000 * v["step_seconds"].get("median", float("nan")),
                             "tokens_per_step": v.get("tokens_per_step"), "tokens_per_s": v.get("tokens_per_s"),
                             "mfu": v.get("mfu"), "parameters": v.get("parameters"),
                             "peak_memory_mib": memory.get("median"),
                             "peak_memory_measure": ("torch.cuda.max_memory_allocated" if "peak_cuda_allocated_mib" in v
                                                     else "peak RSS growth")}
    passed = all(not measured[v]["errors"] and measured[v]["steps"] == work.steps
                 for v in ("amalab-standard", "trl-dpo"))
    described = {**asdict(work), "data": block["variants"]["amalab-standard"].get("data")}  # the benchmark's pairs
    return {"passed": passed, "workload": described, "measured": measured,
            "tolerance": "runs: both frameworks complete every timed step (the numbers are measurements)",
            "mfu_formula": "6 x parameters (tied embedding once) x tokens/s / bf16 dense peak; full fine-tuning",
            "results": str(out / "results.json")}

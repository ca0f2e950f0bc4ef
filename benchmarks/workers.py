"""One measurement each: a function of a JSON-able spec that returns a JSON-able result.

The driver (:mod:`benchmarks.run`) calls each one in its own subprocess
(``python -m benchmarks.workers SPEC_JSON OUT_JSON``), so the peak memory of one variant is not the
leftover of another; ``--in-process`` calls them directly (the fast test does that).

- :func:`amalab_step`: generalist steps through amalab's real loop, ``amalab.llm.train.run_training``, and
  its real step; the step times are the per-step wall ``seconds`` the step itself reports to the loop's log
  (here a list, through the loop's ``log`` argument). Nothing of amalab is patched: the checkpoint writer
  (replaced by a memory reading) and the autocast context are arguments of the loop.
- :func:`trl_step`: TRL's ``DPOTrainer`` on the same model, pairs (the same token ids), batch, optimizer;
  each optimizer step timed by a ``TrainerCallback`` from ``on_step_begin`` to ``on_step_end``.
- :func:`cache_throughput`: ``pair_logps`` (length-sorted batches) against data-order batches.
- :func:`logprob_memory`: peak memory of forward + backward of ``sequence_logps`` or the full log-softmax.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import workload

#: the mixers' options in the benchmark: those of tests/llm/test_train.py (timing does not depend on them)
MIXER_OPTIONS = {"ama-r": {"eta_alpha": 5.0}, "ama-s": {"gamma": 0.5}, "standard": {}}


def _device(spec: dict) -> torch.device:
    from amalab.llm.precision import resolve_device

    return resolve_device(spec.get("device", "auto"))


def _apply_gradient_checkpointing(model, spec: dict) -> None:
    from amalab.llm.models import prepare_model

    if spec.get("gradient_checkpointing"):
        prepare_model(model, gradient_checkpointing=True)


def _step_pairs(tokenizer, spec: dict):
    """The timed pairs: every row exactly ``seq_len`` tokens, or (``variable_length``) the data's own lengths
    up to ``seq_len``, what length grouping is measured on."""
    steps = spec["warmup_steps"] + spec["timed_steps"]
    return workload.tokenized_pairs(tokenizer, spec["batch_size"] * steps, spec["seq_len"],
                                    full_length=not spec.get("variable_length"), data=_data_path(spec))


def _data_path(spec: dict) -> Path | None:
    """The pairs file of the spec (None: synthetic pairs)."""
    return Path(spec["data"]) if spec.get("data") else None


def _checkpointing_active(model) -> bool:
    """Whether activation (gradient) checkpointing is on, as transformers reports it (checked, not assumed)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if flag is None else flag)


def _timing_summary(seconds: list[float], tokens: list[float]) -> dict:
    return {"step_seconds": seconds, "tokens_per_step": tokens,
            "median_step_seconds": float(np.median(seconds)) if seconds else None}


# ----------------------------------------------------------------------------------------- amalab


def amalab_step(spec: dict) -> dict:
    """Generalist steps of amalab's loop with mixer ``spec['mixer']``; the first ``warmup_steps`` dropped."""
    from amalab.training.cache import ValueCache
    from amalab.training.config import OptimConfig
    from amalab.llm.evaluate import pair_logps, pair_losses
    from amalab.objectives.preference import PreferenceLoss
    from amalab.llm.precision import autocast_context
    from amalab.llm.train import TrainingRun, run_training
    from amalab.mixers import make_mixer

    device = _device(spec)
    torch.manual_seed(spec["seed"])
    model, tokenizer = workload.build_model(spec["model"], device, seed=spec["seed"])
    _apply_gradient_checkpointing(model, spec)
    pairs, source = _step_pairs(tokenizer, spec)
    tasks = [pairs[0::2], pairs[1::2]]  # two tasks, so the mixers have something to mix
    # the run's autocast ([model] autocast; on CUDA fp32_on_cuda turns it off: what the autocast feature is
    # measured against), for the reference as in a real run
    autocast = contextlib.nullcontext if spec.get("fp32_on_cuda") else (
        lambda: autocast_context(device, spec.get("autocast", "auto")))
    reference = pair_logps(model, pairs, tokenizer.pad_token_id, spec["batch_size"], device, autocast=autocast)
    ids = [p.id for p in pairs]
    # The specialists' losses that AMA-R / AMA-S clip against: here the reference's own DPO losses lowered
    # by a spread, so some excesses are positive. The values change the weights, not the cost of a step.
    losses, _ = pair_losses(reference, reference, ids, PreferenceLoss("dpo", 0.1))
    specialist = ValueCache(ids, {"loss": losses - 0.01 * (np.arange(len(ids)) % 5)})
    if spec.get("compile"):
        # After the reference pass, so only training shapes are compiled (the warm-up steps absorb the
        # compilation). nn.Module.compile works in place: parameter names and get_decoder() are unchanged.
        model.get_decoder().compile()
    mixer = make_mixer(spec["mixer"], 2, sizes=[len(t) for t in tasks], **MIXER_OPTIONS[spec["mixer"]])
    steps = spec["warmup_steps"] + spec["timed_steps"]
    optim = OptimConfig(max_steps=steps, batch_size=spec["batch_size"], learning_rate=spec["lr"],
                        warmup_steps=0,
                        weight_decay=0.0, max_grad_norm=1.0, per_device_eval_batch_size=spec["batch_size"],
                        micro_batch_size=spec.get("micro_batch_size", 0),
                        group_by_length=spec.get("group_by_length", False))
    memory_at_end, records = {}, []

    def read_memory_instead_of_saving(state):
        # The loop writes a checkpoint after its last step (after the timing). The benchmark skips the write
        # (gigabytes for SmolLM2, nothing to measure) and reads the training peak memory at that moment.
        memory_at_end.update(workload.peak_memory(device, baseline))

    run_dir = Path(tempfile.mkdtemp(prefix="amalab-bench-"))
    try:
        run = TrainingRun(
            name=f"bench-{spec['mixer']}", run_dir=run_dir / "run", mixer=mixer,
            task_names=["task0", "task1"], train_sets=tasks, eval_sets=[[], []], reference=reference,
            baseline_losses=[specialist] * 2 if mixer.baseline == "specialist" else None,
            specialist_caches=[None, None], optim=optim, loss=PreferenceLoss("dpo", 0.1), seed=spec["seed"],
            pad_token_id=tokenizer.pad_token_id)
        baseline = workload.reset_peak_memory(device)
        run_training(model, run, device, show_progress=False, write_checkpoint=read_memory_instead_of_saving,
                     log=records.append, autocast=autocast)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    train = [r for r in records if r["kind"] == "train"][spec["warmup_steps"]:]
    result = _timing_summary([r["seconds"] for r in train], [r["tokens"] for r in train])
    result["padded_tokens_per_step"] = [r["padded_tokens"] for r in train]
    result["mixer_seconds_per_step"] = [r["mixer_seconds"] for r in train]
    result.update(memory=memory_at_end, data=source, parameters=workload.count_parameters(model),
                  gradient_checkpointing_active=_checkpointing_active(model))
    return result


# ----------------------------------------------------------------------------------------- TRL


def trl_step(spec: dict) -> dict:
    """TRL DPOTrainer steps on the same pairs (the same token ids); the first ``warmup_steps`` are dropped.

    TRL tokenizes prompt + completion jointly; to give both frameworks the very same tokens, the trainer's
    dataset preparation is bypassed for an already tokenized dataset (``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` from amalab's tokenizer). Everything timed is TRL's own code.
    """
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step: forward, backward, clipping, AdamW, scheduler, zero_grad."""

        def __init__(self, device):
            self.device, self.seconds, self.began, self.baseline = device, [], None, None

        def on_train_begin(self, args, state, control, **kwargs):
            # after the reference precompute, which DPOTrainer.__init__ ran
            self.baseline = workload.reset_peak_memory(self.device)

        def on_step_begin(self, args, state, control, **kwargs):
            workload.synchronize(self.device)
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            workload.synchronize(self.device)
            self.seconds.append(time.perf_counter() - self.began)

    device = _device(spec)
    torch.manual_seed(spec["seed"])
    model, tokenizer = workload.build_model(spec["model"], device, seed=spec["seed"])
    _apply_gradient_checkpointing(model, spec)
    pairs, source = _step_pairs(tokenizer, spec)
    dataset = Dataset.from_dict({"prompt_ids": [list(p.prompt_ids) for p in pairs],
                                 "chosen_ids": [list(p.chosen_ids) for p in pairs],
                                 "rejected_ids": [list(p.rejected_ids) for p in pairs]})
    steps = spec["warmup_steps"] + spec["timed_steps"]
    on_cuda = device.type == "cuda"
    out_dir = Path(tempfile.mkdtemp(prefix="trl-bench-"))
    config = DPOConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["lr"], weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", lr_scheduler_type="cosine", warmup_steps=0, beta=0.1, loss_type=["sigmoid"],
        max_length=spec["seq_len"], precompute_ref_log_probs=True,
        precompute_ref_batch_size=spec["batch_size"],
        # TRL defaults gradient checkpointing on and bf16 on: set both as amalab runs (amalab autocasts bf16
        # on CUDA and, by default, runs plain fp32 on CPU; spec "bf16": accelerate's autocast on CPU too)
        gradient_checkpointing=bool(spec.get("gradient_checkpointing")),
        bf16=(on_cuda and not spec.get("fp32_on_cuda")) or bool(spec.get("bf16")), use_cpu=not on_cuda,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=spec["seed"], data_seed=spec["seed"])
    timer = StepTimer(device)
    try:
        trainer = PretokenizedDPOTrainer(model=model, args=config, train_dataset=dataset,
                                         processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        memory = workload.peak_memory(device, timer.baseline)
        checkpointing = _checkpointing_active(trainer.model)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    tokens = 2 * spec["batch_size"] * spec["seq_len"]  # every pair has two rows of exactly seq_len tokens
    result = _timing_summary(timer.seconds[spec["warmup_steps"]:], [tokens] * spec["timed_steps"])
    result.update(memory=memory, data=source, parameters=workload.count_parameters(model),
                  gradient_checkpointing_active=checkpointing)
    return result


# ----------------------------------------------------------------------------------------- cache building


@torch.no_grad()
def _data_order_logps(model, pairs, pad_token_id: int, batch_size: int, device) -> int:
    """pair_logps without the length sort: batches of consecutive pairs in data order (the naive way)."""
    from amalab.llm.collate import collate_pairs
    from amalab.llm.logprobs import sequence_logps
    from amalab.llm.precision import autocast_context

    was_training = model.training
    model.eval()
    padded = 0
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad_token_id).to(device)
        with autocast_context(device):
            logps = sequence_logps(model, batch)
        logps.chosen.double().cpu()
        padded += batch.input_ids.numel()
    model.train(was_training)
    return padded


def cache_throughput(spec: dict) -> dict:
    """Pairs/s of reference-cache building, length-sorted (amalab) against data order, interleaved repeats."""
    from amalab.llm.collate import length_sorted_batches
    from amalab.llm.evaluate import pair_logps

    device = _device(spec)
    model, tokenizer = workload.build_model(spec["model"], device, seed=spec["seed"])
    pairs, source = workload.tokenized_pairs(tokenizer, spec["pairs"], spec["seq_len"], full_length=False,
                                             data=_data_path(spec))
    batch = spec["batch_size"]
    real = sum(p.chosen_length + p.rejected_length for p in pairs)
    sorted_padded = sum(2 * len(g) * max(max(p.chosen_length, p.rejected_length) for p in g)
                        for g in length_sorted_batches(pairs, batch))
    times = {"length_sorted": [], "data_order": []}
    pair_logps(model, pairs[:batch], tokenizer.pad_token_id, batch, device)  # warm-up
    for _ in range(spec["repeats"]):
        for method in times:
            synchronize_and_start = workload.synchronize(device) or time.perf_counter()
            if method == "length_sorted":
                pair_logps(model, pairs, tokenizer.pad_token_id, batch, device)
            else:
                order_padded = _data_order_logps(model, pairs, tokenizer.pad_token_id, batch, device)
            workload.synchronize(device)
            times[method].append(time.perf_counter() - synchronize_and_start)
    result = {"pairs": len(pairs), "batch_size": batch, "seq_len": spec["seq_len"], "data": source,
              "real_tokens": real,
              "padded_tokens": {"length_sorted": sorted_padded, "data_order": order_padded}}
    for method, seconds in times.items():
        result[method] = {"seconds": seconds, "pairs_per_s": [len(pairs) / s for s in seconds],
                          "median_pairs_per_s": float(np.median([len(pairs) / s for s in seconds]))}
    medians = {method: result[method]["median_pairs_per_s"] for method in times}
    result["speedup"] = medians["length_sorted"] / medians["data_order"]
    return result


# ----------------------------------------------------------------------------------------- log-prob memory


def logprob_memory(spec: dict) -> dict:
    """Peak memory and time of one forward + backward of a DPO loss through one log-prob method."""
    from amalab.llm.collate import collate_pairs
    from amalab.llm.logprobs import full_logits_sequence_logps, sequence_logps
    from amalab.objectives.preference import preference_losses

    device = _device(spec)
    model, tokenizer = workload.build_model(spec["model"], device, seed=spec["seed"])
    pairs, source = workload.tokenized_pairs(tokenizer, spec["batch_size"], spec["seq_len"], full_length=True,
                                             data=_data_path(spec))
    batch = collate_pairs(pairs, tokenizer.pad_token_id).to(device)
    methods = {"sequence_logps": sequence_logps, "full_log_softmax": full_logits_sequence_logps}
    scorer = methods[spec["method"]]
    reference = torch.zeros(len(pairs), device=device)

    def step():
        logps = scorer(model, batch)
        losses, _ = preference_losses("dpo", logps.chosen, logps.rejected, reference, reference, 0.1)
        losses.mean().backward()
        model.zero_grad(set_to_none=False)

    # The first step is the measured one: a warm-up step would leave its freed memory in the allocator (glibc
    # keeps large freed blocks once its mmap threshold has grown), hiding the second step's growth in RSS.
    # The gradient buffers it allocates are the same for both methods.
    baseline = workload.reset_peak_memory(device)
    step()
    memory = workload.peak_memory(device, baseline)
    workload.synchronize(device)
    began = time.perf_counter()
    step()  # timed separately, after the buffers exist
    workload.synchronize(device)
    seconds = time.perf_counter() - began
    return {"method": spec["method"], "model": spec["model"], "vocab_size": model.config.vocab_size,
            "rows": int(batch.input_ids.shape[0]), "seq_len": int(batch.input_ids.shape[1]),
            "completion_tokens": int(batch.completion_mask.sum()), "seconds": seconds, "memory": memory,
            "data": source}


# ----------------------------------------------------------------------------------------- bf16 log-prob error


def _perturb_adapter(model, scale: float, seed: int) -> None:
    """Random LoRA B matrices (std ``scale``; peft starts them at zero), so the policy differs from pi_ref."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def _errors(a: np.ndarray, b: np.ndarray) -> dict:
    difference = np.abs(a - b)
    return {"max": float(difference.max()), "mean": float(difference.mean()),
            "median": float(np.median(difference)), "p95": float(np.percentile(difference, 95))}


def logprob_error(spec: dict) -> dict:
    """Sequence log-probs of ``pairs`` pairs under bf16 autocast against float32 (the same model, both with the
    LM head in float32): the error of pi_ref's cached log-probs, and of a LoRA-perturbed policy's DPO reward
    margin and loss when policy and reference are both computed in bf16 (as a bf16 run does)."""
    from amalab.llm.evaluate import pair_logps, pair_losses
    from amalab.objectives.preference import PreferenceLoss
    from amalab.llm.precision import autocast_context

    device = _device(spec)
    model, tokenizer = workload.build_model(spec["model"], device, seed=spec["seed"], lora=True)
    pairs, source = workload.tokenized_pairs(tokenizer, spec["pairs"], spec["seq_len"], full_length=False,
                                             data=_data_path(spec))
    ids, loss = [p.id for p in pairs], PreferenceLoss("dpo", spec["beta"])
    logps = {}
    for setting in ("none", "bf16"):
        with model.disable_adapter():
            logps[("reference", setting)] = pair_logps(model, pairs, tokenizer.pad_token_id, spec["batch_size"],
                                                       device, autocast=lambda: autocast_context(device, setting))
    _perturb_adapter(model, spec["adapter_scale"], spec["seed"])
    for setting in ("none", "bf16"):
        logps[("policy", setting)] = pair_logps(model, pairs, tokenizer.pad_token_id, spec["batch_size"], device,
                                                autocast=lambda: autocast_context(device, setting))
    columns = ("chosen", "rejected")
    result = {"pairs": len(pairs), "data": source, "beta": spec["beta"], "adapter_scale": spec["adapter_scale"],
              "tokens_per_sequence": _errors(np.concatenate([logps[("reference", "none")].get(f"{c}_tokens", ids)
                                                             for c in columns]), 0.0)}
    for who in ("reference", "policy"):
        fp32, bf16 = (np.concatenate([logps[(who, s)].get(c, ids) for c in columns]) for s in ("none", "bf16"))
        tokens = np.concatenate([logps[(who, "none")].get(f"{c}_tokens", ids) for c in columns])
        result[f"{who}_sequence_logp_abs_error_nats"] = _errors(fp32, bf16)
        result[f"{who}_per_token_abs_error_nats"] = _errors(fp32 / tokens, bf16 / tokens)
    outcome = {}
    for s in ("none", "bf16"):
        losses, margins = pair_losses(logps[("policy", s)], logps[("reference", s)], ids, loss)
        outcome[s] = (losses, margins)
    result["dpo_margin_fp32"] = _errors(outcome["none"][1], 0.0)  # |beta * (log-ratio difference)| itself
    result["dpo_margin_abs_error"] = _errors(outcome["none"][1], outcome["bf16"][1])
    result["dpo_loss_abs_error"] = _errors(outcome["none"][0], outcome["bf16"][0])
    result["dpo_mean_loss"] = {s: float(outcome[s][0].mean()) for s in outcome}
    return result


WORKERS = {"amalab_step": amalab_step, "trl_step": trl_step, "cache_throughput": cache_throughput,
           "logprob_memory": logprob_memory, "logprob_error": logprob_error}


def run_spec(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return WORKERS[spec["worker"]](spec)


if __name__ == "__main__":
    spec_json, out_path = sys.argv[1], sys.argv[2]
    Path(out_path).write_text(json.dumps(run_spec(json.loads(spec_json))))

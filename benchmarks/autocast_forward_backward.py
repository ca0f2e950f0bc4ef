"""Forward + backward of SmolLM2-135M-Instruct with the SmolLM2 experiment's LoRA adapter, float32 against
bf16 autocast on this machine's CPU, interleaved in one process (so both see the same load):

    PYTHONPATH=$PWD python benchmarks/autocast_forward_backward.py [--rounds 3]

One call is a forward of 16 random sequences x 128 tokens (8 pairs at the experiment's max_length) under
``torch.autocast("cpu", bfloat16)`` or none, a float32 log-sum-exp of the logits and a backward pass into
the adapter; one untimed call of each first. Prints each round's two times and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from amalab.llm.config import LoraConfig
from amalab.llm.models import load_model, prepare_model, smollm2_gguf_path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(smollm2_gguf_path(), device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    model = prepare_model(model, gradient_checkpointing=False, lora=LoraConfig(r=16, alpha=32.0, target_modules=TARGETS))
    ids = torch.randint(10, 40000, (16, 128))

    def seconds(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        model.zero_grad()
        return time.perf_counter() - start

    seconds(False), seconds(True)
    for r in range(args.rounds):
        fp32, bf16 = seconds(False), seconds(True)
        print(f"round {r}: fp32 {fp32:.2f}s bf16 {bf16:.2f}s ratio {bf16 / fp32:.2f}", flush=True)


if __name__ == "__main__":
    main()

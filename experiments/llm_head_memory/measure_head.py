"""Peak memory and time of the LM head's forward and backward over N completion positions, three ways:
all N positions at once, in amalab's chunks without a checkpoint, and as ``head_token_logps`` runs it
(chunks, each a checkpoint segment). Writes one JSON line per (N, way) to stdout, and a markdown table.

    PYTHONPATH=. python experiments/llm_head_memory/measure_head.py              # CUDA: H 896, V 151936
    PYTHONPATH=. python experiments/llm_head_memory/measure_head.py --small      # CPU: times only, tiny sizes

The head is a float32 Linear (H, V) without bias, the hidden states random (N, H) with a gradient, the
targets random; the loss is the sum of the token log-probs. Peak memory is torch.cuda.max_memory_allocated
over the forward and backward, less what was allocated before (the weight, the inputs); CPU runs report
no memory. Time: the median of 5 runs after 2 warm-ups, the device synchronized.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.utils.checkpoint

from amalab.llm.logprobs import _chunk_token_logps, head_chunks, head_token_logps


def all_at_once(head, hidden, targets):
    return _chunk_token_logps(head, hidden, targets)


def chunks_without_checkpoint(head, hidden, targets):
    sizes = head_chunks(hidden.shape[0])
    return torch.cat([_chunk_token_logps(head, h, t) for h, t in zip(hidden.split(sizes), targets.split(sizes))])


WAYS = {"all at once": all_at_once, "chunks": chunks_without_checkpoint, "chunks + checkpoint": head_token_logps}


def measure(way, head, n: int, device: torch.device) -> dict:
    hidden = torch.randn(n, head.in_features, device=device, requires_grad=True)
    targets = torch.randint(0, head.out_features, (n,), device=device)
    seconds, peak = [], None
    for run in range(7):
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        began = time.perf_counter()
        WAYS[way](head, hidden, targets).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        if run >= 2:
            seconds.append(time.perf_counter() - began)
    return {"n": n, "way": way, "chunks": len(head_chunks(n)), "peak_gib": peak,
            "ms": 1000 * statistics.median(seconds)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    hidden_size, vocab, sizes = (64, 4096, (600, 2048)) if args.small else (896, 151936, (2048, 16384))
    head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device)
    rows = [measure(way, head, n, device) for n in sizes for way in WAYS]
    for row in rows:
        print(json.dumps(row))
    print(f"\nH {hidden_size}, V {vocab}, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print("| N | way | chunks | peak GiB | ms |\n|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['n']} | {r['way']} | {r['chunks'] if r['way'] != 'all at once' else 1} | {peak} | {r['ms']:.1f} |")
    return rows


if __name__ == "__main__":
    main()

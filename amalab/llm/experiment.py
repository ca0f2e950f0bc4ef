"""What every stage of an LLM experiment shares, set up once: the config, the base model (pi_ref), the
tokenized tasks and the reference log-probs (docs/maths.md section 11).

:func:`prepare` reads and tokenizes the tasks, loads (or builds) the base model, writes ``data.json``, a
copy of the config and the tokenizer, and builds or reuses the reference cache, into a frozen
:class:`Experiment`; the stages (:mod:`amalab.llm.stages`) take it as data.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from amalab.atomic_write import atomic_folder, write_bytes_atomic, write_json_atomic
from amalab.errors import ConfigError
from amalab.llm.config import LLMConfig, TokenizeConfig
from amalab.llm.data.tasks import TaskData, load_tasks
from amalab.llm.evaluate import pair_logps
from amalab.llm.fingerprint import model_fingerprint, tokenizer_fingerprint
from amalab.llm.logprobs import SUM_DTYPE
from amalab.llm.models import (
    cast_frozen, check_attention, load_model, load_tokenizer, settings_manifest, smollm2_gguf_path,
)
from amalab.llm.precision import autocast_context, autocast_manifest, resolve_device
from amalab.llm.progress import Progress
from amalab.llm.tiny import tiny_llama, tiny_tokenizer
from amalab.llm.tokenize import TokenizedPair, tokenize_pairs
from amalab.training.cache import ValueCache, data_hash
from amalab.training.distributed import World

#: the experiment's tokenizer, saved by :func:`prepare` (the tiny model's is trained on the tasks' text)
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class Experiment:
    """What every stage shares: the config, where it runs, the base model (pi_ref) and its tokenizer, the
    tokenized tasks, and the reference cache (pi_ref's log-probs of every pair) with its manifest.

    ``base_model`` stays on the CPU: its log-probs are cached, so the compute device holds only the policies
    (each a copy made on the CPU and then moved, :meth:`on_device`), not a second model for the whole run.
    """

    config: LLMConfig
    device: torch.device
    world: World
    tokenizer: object
    base_model: torch.nn.Module
    tasks: list[TaskData]
    train_sets: list[list[TokenizedPair]]
    eval_sets: list[list[TokenizedPair]]
    reference: ValueCache
    reference_manifest: dict
    progress: Progress

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def on_device(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """A copy of ``model`` on the compute device; the original stays put. By default the base model, pi_ref
        as the reference cache scored it: its frozen weights in ``[model] frozen_dtype``."""
        if model is not None:
            return copy.deepcopy(model).to(self.device)
        return cast_frozen(copy.deepcopy(self.base_model), self.config.model.frozen_dtype).to(self.device)

    @property
    def autocast(self):
        """The forwards' autocast context factory (``[model] autocast`` on this device)."""
        return functools.partial(autocast_context, self.device, self.config.model.autocast)


def base_model(config: LLMConfig, tokenizer, device: torch.device) -> torch.nn.Module:
    """The base model (pi_ref) of ``config``, with ``[model] attn_implementation``; the tiny Llama is built over
    ``tokenizer``'s vocabulary."""
    m = config.model
    if m.name == "tiny":
        check_attention(m.attn_implementation)
        model = tiny_llama(len(tokenizer), hidden_size=m.tiny.hidden_size, num_layers=m.tiny.num_hidden_layers,
                           num_heads=m.tiny.num_attention_heads, num_kv_heads=m.tiny.num_key_value_heads,
                           intermediate_size=m.tiny.intermediate_size, seed=m.tiny.seed,
                           max_position_embeddings=max(512, config.tokenize.max_length),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           attn_implementation=m.attn_implementation)
        return model.to(device)
    if m.name == "smollm2":
        return load_model(smollm2_gguf_path(), device=device, attn_implementation=m.attn_implementation)
    return load_model(m.name, gguf_file=m.gguf_file or None, device=device,
                      attn_implementation=m.attn_implementation)


def _load_tokenizer(config: LLMConfig, corpus: list[str]):
    m = config.model
    if m.name == "tiny":
        return tiny_tokenizer(corpus, vocab_size=m.tiny.vocab_size)
    if m.name == "smollm2":
        return load_tokenizer(smollm2_gguf_path())
    return load_tokenizer(m.name, gguf_file=m.gguf_file or None)


def _tokenized(tasks: list[TaskData], tokenizer, settings: TokenizeConfig, progress: Progress):
    """(train sets, eval sets, data.json's per-task report) of every task tokenized."""
    train_sets, eval_sets, report = [], [], {}
    for t in tasks:
        train, train_report = tokenize_pairs(t.train, tokenizer, settings)
        evals, eval_report = tokenize_pairs(t.eval, tokenizer, settings)
        if not train:
            raise ConfigError(f"task {t.name!r}: no training pair is left after tokenization "
                              f"({train_report.summary()})")
        train_sets.append(train)
        eval_sets.append(evals)
        report[t.name] = dict(source=t.source, train=len(train), eval=len(evals), dropped_rows=t.dropped,
                              tokenization_train=train_report.summary(), tokenization_eval=eval_report.summary())
        progress.say(f"{t.summary()}; tokenized: {len(train)} train / {len(evals)} held-out pairs "
                     f"(train: {train_report.summary()})")
    return train_sets, eval_sets, report


def _write_inputs(config: LLMConfig, out: Path, report: dict, tokenizer) -> None:
    """data.json, a copy of the config and the tokenizer (what `amalab llm export` ships with a run)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "data.json", report, indent=1)
    if config.source_path is not None:
        write_bytes_atomic(out / "config.toml", Path(config.source_path).read_bytes())
    with atomic_folder(out / TOKENIZER_DIR) as folder:
        tokenizer.save_pretrained(folder)


def _device(config: LLMConfig, world: World) -> torch.device:
    device = resolve_device(config.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def prepare(config: LLMConfig, world: World = World(), show_progress: bool = True) -> Experiment:
    """Read and tokenize the tasks, load the base model, and build (or reuse) the reference cache."""
    out, device, progress = Path(config.out), _device(config, world), Progress(world, show_progress)
    tasks = load_tasks(config.tasks, base_dir=config.base_dir)
    corpus = [text for t in tasks for p in t.train + t.eval for text in (p.prompt, p.chosen, p.rejected)]
    tokenizer = _load_tokenizer(config, corpus)
    base = base_model(config, tokenizer, torch.device("cpu"))  # the class docstring says why the CPU
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    train_sets, eval_sets, report = _tokenized(tasks, tokenizer, config.tokenize, progress)
    if world.is_main:
        _write_inputs(config, out, report, tokenizer)
    every = [p for pairs in train_sets + eval_sets for p in pairs]
    unique = list({p.id: p for p in every}.values())
    manifest = {
        "kind": "reference log-probs", "model": model_fingerprint(base), "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": config.tokenize.to_dict(), "data": data_hash(sorted(p.id for p in unique)),
        "sum_dtype": str(SUM_DTYPE), **autocast_manifest(device, config.model.autocast),
        **settings_manifest(config.model)}
    autocast = functools.partial(autocast_context, device, config.model.autocast)
    # pi_ref in frozen_dtype, as the policy's frozen base is (models.trainable): a fresh adapter computes
    # exactly the reference log-probs
    reference = progress.cached(
        out / "caches" / "reference", manifest, "reference log-probs", len(unique),
        lambda bar: pair_logps(cast_frozen(copy.deepcopy(base), config.model.frozen_dtype).to(device), unique,
                               int(tokenizer.pad_token_id), config.train.per_device_eval_batch_size, device,
                               world, bar, autocast))
    return Experiment(config, device, world, tokenizer, base, tasks, train_sets, eval_sets, reference, manifest,
                      progress)

"""What every stage of an LLM experiment shares, set up once: the config, the base model (pi_ref), the
tokenized tasks and the reference log-probs (docs/maths.md section 11), and the cached per-example losses.

:func:`prepare` reads and tokenizes the tasks, loads (or builds) the base model, writes ``data.json``, a
copy of the config and the tokenizer, and builds or reuses the reference cache; :meth:`Experiment.policy` hands out fresh
trainable copies of the base.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from amalab.atomic_write import atomic_folder, write_bytes_atomic, write_json_atomic
from amalab.errors import ConfigError
from amalab.training.cache import ValueCache, cached, data_hash
from amalab.training.checkpoint import load_latest
from amalab.llm.config import LLMConfig, ModelConfig
from amalab.llm.data import TaskData, load_tasks
from amalab.training.distributed import World
from amalab.llm.evaluate import evaluate, pair_logps, pair_losses
from amalab.llm.logprobs import SUM_DTYPE, shard_causal_lm
from amalab.llm.models import (autocast_context, autocast_manifest, compile_layers, decoder_layers, load_model, load_tokenizer,
                               model_fingerprint, prepare_model, resolve_device, smollm2_gguf_path, tiny_llama,
                               tiny_tokenizer, tokenizer_fingerprint)
from amalab.llm.tokenize import TokenizedPair, tokenize_pairs
from amalab.llm.train import TrainingRun, run_training
from amalab.training.state import load_trainable_state

#: the experiment's tokenizer, saved by :func:`prepare` (the tiny model's is trained on the tasks' text)
TOKENIZER_DIR = "tokenizer"


@dataclass
class Experiment:
    """What every stage shares: the config, the base model (pi_ref), the tokenized tasks, the reference cache."""

    config: LLMConfig
    out: Path
    device: torch.device
    world: World
    tokenizer: object
    base_model: torch.nn.Module
    tasks: list[TaskData]
    train_sets: list[list[TokenizedPair]]
    eval_sets: list[list[TokenizedPair]]
    reference: ValueCache | None = None
    reference_manifest: dict | None = None
    show_progress: bool = True

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def autocast(self):
        """The forwards' autocast context (``[model] autocast`` on this device): every forward's factory."""
        return autocast_context(self.device, self.config.model.autocast)

    def relative(self, path: Path) -> str:
        """``path`` (a run's folder) as the summary names it: relative to the experiment's ``out``."""
        return Path(path).relative_to(self.out).as_posix()

    def say(self, message: str) -> None:
        if self.show_progress and self.world.is_main:
            print(message, flush=True)

    def policy(self, seed: int) -> torch.nn.Module:
        """A fresh trainable copy of the base model (with a LoRA adapter initialized from ``seed`` if asked).

        With ``[model] torch_compile`` each decoder layer is compiled; with ``[model] fsdp`` under torchrun the copy
        is sharded over the ranks (:func:`amalab.llm.logprobs.shard_causal_lm`).
        """
        settings = self.config.model
        model = trainable(copy.deepcopy(self.base_model), settings, seed).to(self.device)
        if settings.torch_compile:
            compile_layers(model)
        if settings.fsdp and self.world.distributed:
            model = shard_causal_lm(model, decoder_layers(model), self.world)
        return model

    def described(self, run: TrainingRun, mixer: dict) -> TrainingRun:
        """``run`` with its description (run.json): a rerun with other settings into its folder is refused."""
        # report_to only adds event files beside metrics.jsonl: switching it on or off continues the same run
        optim = {k: v for k, v in asdict(run.optim).items() if k != "report_to"}
        run.description = {"name": run.name, "mixer": mixer, "seed": run.seed, "optim": optim,
                           "loss": asdict(run.loss), "reference": self.reference_manifest}
        return run

    def train(self, run: TrainingRun) -> tuple[torch.nn.Module, dict]:
        """A fresh policy trained by ``run`` (or holding its finished result), and the run's final metrics."""
        model = self.policy(run.seed)
        final = run_training(model, run, self.device, self.world, self.show_progress, autocast=self.autocast)
        return model, final

    def scored(self, model, losses, run_dir: Path, final: dict) -> dict:
        """``final`` with the held-out metrics of ``model`` (docs/maths.md (48)-(52)) against ``losses`` (a
        :class:`~amalab.llm.specialists.SpecialistLosses`: its evaluation caches), stamped with them, and the
        generation scores of the verifiable tasks."""
        from amalab.llm.baseline_merges import add_generation

        config = self.config
        final = {**final, **evaluate(model, self.eval_sets, self.task_names, self.reference, losses.evaluation,
                                     config.loss, self.pad_token_id, config.train.per_device_eval_batch_size,
                                     self.device, self.world, autocast=self.autocast),
                 "specialist_losses": losses.stamp()}
        return add_generation(self, model, run_dir, final)

    def trained_policy(self, run_dir: Path, seed: int) -> torch.nn.Module | None:
        """A fresh policy holding the trained parameters of ``run_dir``'s last checkpoint; None without one."""
        checkpoint = load_latest(run_dir)
        if checkpoint is None:
            return None
        model = self.policy(seed)
        load_trainable_state(model, checkpoint.model_state)
        return model

    def timed(self, what: str, n: int, fn):
        """``fn(progress)`` with a progress bar over its ``n`` pairs (rank 0); then its time and throughput."""
        start = time.perf_counter()
        with tqdm(total=n, desc=what, unit="pair", dynamic_ncols=True, mininterval=1.0,
                  disable=not (self.show_progress and self.world.is_main)) as bar:
            # each rank scores about 1/W of the pairs: rank 0's count, scaled, is the whole job's progress
            result = fn(lambda done: bar.update(done * self.world.size))
        seconds = time.perf_counter() - start
        self.say(f"{what}: {n} pairs in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} pairs/s)")
        return result

    def cached(self, folder: Path, manifest: dict, what: str, n: int, build) -> ValueCache:
        """The cache in ``folder`` (:func:`amalab.training.cache.cached`), built by ``build(progress)`` over ``n``
        pairs, timed, when missing."""
        return cached(folder, manifest, lambda: self.timed(what, n, build), log=self.say, world=self.world)

    def loss_cache(self, model, pairs: list[TokenizedPair], folder: Path, manifest: dict, what: str) -> ValueCache:
        """Per-example losses of ``model`` on ``pairs`` (baseline losses s(z), docs/maths.md section 1), cached."""
        unique = list({p.id: p for p in pairs}.values())
        ids = [p.id for p in unique]
        loss = self.config.loss

        def build(progress):
            logps = pair_logps(model, unique, self.pad_token_id, self.config.train.per_device_eval_batch_size,
                               self.device, self.world, progress, self.autocast)
            losses, _ = pair_losses(logps, self.reference, ids, loss)
            return ValueCache(ids, {"loss": losses})

        manifest = {**manifest, "reference": self.reference_manifest["model"], "loss": asdict(loss),
                    **autocast_manifest(self.device, self.config.model.autocast),
                    "data": data_hash(sorted(ids))}
        return self.cached(folder, manifest, what, len(unique), build)


def trainable(model: torch.nn.Module, settings: ModelConfig, seed: int) -> torch.nn.Module:
    """``model`` made a policy as ``[model]`` says: all weights trainable, or frozen under a LoRA adapter
    initialized from ``seed``; gradient checkpointing if asked."""
    lora = settings.lora if settings.use_lora else None
    for p in model.parameters():  # the base is frozen (it is pi_ref); peft freezes all but the adapter
        p.requires_grad_(lora is None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return prepare_model(model, gradient_checkpointing=settings.gradient_checkpointing, lora=lora)


def base_model(config: LLMConfig, tokenizer, device: torch.device) -> torch.nn.Module:
    """The base model (pi_ref) of ``config``; the tiny Llama is built over ``tokenizer``'s vocabulary."""
    m = config.model
    if m.name == "tiny":
        model = tiny_llama(len(tokenizer), hidden_size=m.tiny.hidden_size, num_layers=m.tiny.num_hidden_layers,
                           num_heads=m.tiny.num_attention_heads, num_kv_heads=m.tiny.num_key_value_heads,
                           intermediate_size=m.tiny.intermediate_size, seed=m.tiny.seed,
                           max_position_embeddings=max(512, config.tokenize.max_length),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return model.to(device)
    if m.name == "smollm2":
        return load_model(smollm2_gguf_path(), device=device)
    return load_model(m.name, gguf_file=m.gguf_file or None, device=device)


def _load_base(config: LLMConfig, corpus: list[str], device: torch.device):
    m = config.model
    if m.name == "tiny":
        tokenizer = tiny_tokenizer(corpus, vocab_size=m.tiny.vocab_size)
    elif m.name == "smollm2":
        tokenizer = load_tokenizer(smollm2_gguf_path())
    else:
        tokenizer = load_tokenizer(m.name, gguf_file=m.gguf_file or None)
    return tokenizer, base_model(config, tokenizer, device)


def _tokenized(experiment: Experiment) -> dict:
    """Tokenize every task into the experiment's train and eval sets; return data.json's per-task report."""
    report = {}
    for t in experiment.tasks:
        train, train_report = tokenize_pairs(t.train, experiment.tokenizer, experiment.config.tokenize)
        evals, eval_report = tokenize_pairs(t.eval, experiment.tokenizer, experiment.config.tokenize)
        if not train:
            raise ConfigError(f"task {t.name!r}: no training pair is left after tokenization "
                              f"({train_report.summary()})")
        experiment.train_sets.append(train)
        experiment.eval_sets.append(evals)
        report[t.name] = dict(source=t.source, train=len(train), eval=len(evals), dropped_rows=t.dropped,
                              tokenization_train=train_report.summary(), tokenization_eval=eval_report.summary())
        experiment.say(f"{t.summary()}; tokenized: {len(train)} train / {len(evals)} held-out pairs "
                       f"(train: {train_report.summary()})")
    return report


def prepare(config: LLMConfig, world: World = World(), show_progress: bool = True) -> Experiment:
    """Read and tokenize the tasks, load the base model, and build (or reuse) the reference cache."""
    out = Path(config.out)
    device = resolve_device(config.device)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    tasks = load_tasks(config.tasks, base_dir=config.base_dir)
    corpus = [text for t in tasks for p in t.train + t.eval for text in (p.prompt, p.chosen, p.rejected)]
    tokenizer, base = _load_base(config, corpus, device)
    base.eval()
    for p in base.parameters():
        p.requires_grad_(False)
    experiment = Experiment(config, out, device, world, tokenizer, base, tasks, [], [], show_progress=show_progress)
    report = _tokenized(experiment)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "data.json", report, indent=1)
        if config.source_path is not None:
            write_bytes_atomic(out / "config.toml", Path(config.source_path).read_bytes())
        with atomic_folder(out / TOKENIZER_DIR) as folder:  # what `amalab llm export` ships with a run
            tokenizer.save_pretrained(folder)
    every = [p for pairs in experiment.train_sets + experiment.eval_sets for p in pairs]
    unique = list({p.id: p for p in every}.values())
    experiment.reference_manifest = {
        "kind": "reference log-probs", "model": model_fingerprint(base), "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": config.tokenize.to_dict(), "data": data_hash(sorted(p.id for p in unique)),
        "sum_dtype": str(SUM_DTYPE), **autocast_manifest(device, config.model.autocast)}
    experiment.reference = experiment.cached(
        out / "caches" / "reference", experiment.reference_manifest, "reference log-probs", len(unique),
        lambda progress: pair_logps(base, unique, experiment.pad_token_id, config.train.per_device_eval_batch_size,
                                    device, world, progress, experiment.autocast))
    return experiment

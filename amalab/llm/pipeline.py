"""The whole LLM experiment from one config: data, caches, specialists, generalists, summary, figures.

    out/
      config.toml                        the config the run was started with
      data.json                          pairs per task, and every dropped row counted by reason
      caches/reference/                  pi_ref log-probs of every pair (spec section 9)
      caches/specialist-<task>/          s(z): the specialist's loss on every pair of its task
      caches/standard/                   the standard generalist's losses (DoReMi's baseline)
      specialists/<task>/                a training run (checkpoints, metrics.jsonl, final.json)
      generalists/<method>/seed<s>/      a training run per method and seed
      summary.json, summary.csv          final held-out metrics of every generalist
      figures/                           per-task excess and accuracy, mixer weights, worst-task excess

Every stage reuses what is on disk (caches are checked against their manifests; finished runs are not
rerun; interrupted runs resume), so rerunning the command after an interruption continues the work.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amalab.errors import ConfigError
from amalab.llm.baseline_merges import add_generation, merged_specialists
from amalab.llm.cache import ValueCache, cached, data_hash, load_cache, save_cache
from amalab.llm.checkpoint import load_latest
from amalab.llm.config import LLMConfig, method_mixer_and_loss
from amalab.llm.data import TaskData, load_tasks
from amalab.llm.distributed import World, any_rank, barrier, is_sharded, shard_policy
from amalab.llm.evaluate import pair_logps, pair_losses
from amalab.llm.models import (load_model, load_tokenizer, model_fingerprint, prepare_model, resolve_device,
                               smollm2_gguf_path, tiny_llama, tiny_tokenizer, tokenizer_fingerprint)
from amalab.llm.tokenize import TokenizationConfig, TokenizedPair, tokenize_pairs
from amalab.llm.train import TrainingRun, load_trainable_state, run_training, trainable_state
from amalab.mixers import make_mixer


@dataclass
class Experiment:
    """What every stage shares: the config, the base model (pi_ref), the tokenized tasks, the caches."""

    config: LLMConfig
    out: Path
    device: torch.device
    world: World
    tokenizer: object
    base_model: torch.nn.Module
    tasks: list[TaskData]
    train_sets: list[list[TokenizedPair]]
    eval_sets: list[list[TokenizedPair]]
    reference: ValueCache
    reference_manifest: dict
    show_progress: bool = True

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def say(self, message: str) -> None:
        if self.show_progress and self.world.is_main:
            print(message, flush=True)

    def policy(self, seed: int) -> torch.nn.Module:
        """A fresh trainable copy of the base model (with a LoRA adapter initialized from ``seed`` if asked).

        With ``[model] compile`` each decoder layer is compiled; with ``[model] fsdp`` under torchrun the copy
        is sharded over the ranks (:func:`amalab.llm.distributed.shard_policy`).
        """
        model = copy.deepcopy(self.base_model)
        lora = asdict(self.config.model.lora) if self.config.model.use_lora else None
        for p in model.parameters():  # the base is frozen (it is pi_ref); peft freezes all but the adapter
            p.requires_grad_(lora is None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = prepare_model(model, gradient_checkpointing=self.config.model.gradient_checkpointing, lora=lora)
        model = model.to(self.device)
        if self.config.model.compile:
            compile_layers(model)
        if self.config.model.fsdp and self.world.distributed:
            model = shard_policy(model, self.world)
        return model

    def trained_policy(self, run_dir: Path, seed: int) -> torch.nn.Module | None:
        """A fresh policy holding the trained parameters of ``run_dir``'s last checkpoint; None without one."""
        checkpoint = load_latest(run_dir)
        if checkpoint is None:
            return None
        model = self.policy(seed)
        load_trainable_state(model, checkpoint.model_state)
        return model


def compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer in place (names and checkpoints unchanged; composes with FSDP2).

    Layers rather than the whole backbone: the layers are identical, so one compiled graph serves them all,
    and the backbone's mask building and our head-at-completions indexing stay eager.
    """
    from amalab.llm.logprobs import backbone_and_head

    backbone, _ = backbone_and_head(model)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError(f"[model] compile: {type(backbone).__name__} has no `layers` list of decoder layers")
    for layer in layers:
        layer.compile()


def _fingerprint(model) -> str:
    """:func:`model_fingerprint` of a policy; of a sharded one, a hash of its gathered trainable tensors
    (every rank gets the same; gathering is a collective)."""
    if not is_sharded(model):
        return model_fingerprint(model)
    import hashlib

    digest = hashlib.sha256(b"sharded policy, trainable tensors:")
    for name, tensor in sorted(trainable_state(model).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cached(experiment: "Experiment", folder: Path, manifest: dict, build) -> ValueCache:
    """:func:`cached` for several ranks: all build (``build`` is sharded) unless all find it; rank 0 writes."""
    world = experiment.world
    if not world.distributed:
        return cached(folder, manifest, build, log=experiment.say)
    cache = load_cache(folder, manifest)
    if not any_rank(cache is None, world):
        experiment.say(f"reusing {folder} ({len(cache)} examples)")
        return cache
    cache = build()
    if world.is_main:
        save_cache(folder, manifest, cache)
    barrier(world)  # no rank reads the folder before it is complete
    return cache


# --------------------------------------------------------------------------------------------- set-up

def _load_base(config: LLMConfig, corpus: list[str], device: torch.device):
    m = config.model
    if m.name == "tiny":
        tokenizer = tiny_tokenizer(corpus, vocab_size=m.tiny.vocab_size)
        model = tiny_llama(len(tokenizer), hidden_size=m.tiny.hidden_size, num_layers=m.tiny.num_hidden_layers,
                           num_heads=m.tiny.num_attention_heads, num_kv_heads=m.tiny.num_key_value_heads,
                           intermediate_size=m.tiny.intermediate_size, seed=m.tiny.seed,
                           max_position_embeddings=max(512, config.tokenize.max_length),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return tokenizer, model.to(device)
    if m.name == "smollm2":
        path = smollm2_gguf_path()
        return load_tokenizer(path), load_model(path, device=device)
    gguf = m.gguf_file or None
    return load_tokenizer(m.name, gguf_file=gguf), load_model(m.name, gguf_file=gguf, device=device)


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
    tok = TokenizationConfig(max_length=config.tokenize.max_length,
                             max_prompt_length=config.tokenize.max_prompt_length)
    train_sets, eval_sets, report = [], [], {}
    for t in tasks:
        train, train_report = tokenize_pairs(t.train, tokenizer, tok)
        evals, eval_report = tokenize_pairs(t.eval, tokenizer, tok)
        if not train:
            raise ConfigError(f"task {t.name!r}: no training pair is left after tokenization "
                              f"({train_report.summary()})")
        train_sets.append(train)
        eval_sets.append(evals)
        report[t.name] = dict(source=t.source, train=len(train), eval=len(evals), dropped_rows=t.dropped,
                              tokenization_train=train_report.summary(), tokenization_eval=eval_report.summary())
    experiment = Experiment(config, out, device, world, tokenizer, base, tasks, train_sets, eval_sets,
                            reference=None, reference_manifest={}, show_progress=show_progress)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps(report, indent=1))
        if config.source_path is not None:
            shutil.copyfile(config.source_path, out / "config.toml")
    for t, (name, r) in zip(tasks, report.items()):
        experiment.say(f"{t.summary()}; tokenized: {r['train']} train / {r['eval']} held-out pairs "
                       f"(train: {r['tokenization_train']})")
    every = [p for pairs in train_sets + eval_sets for p in pairs]
    unique = list({p.id: p for p in every}.values())
    experiment.reference_manifest = {
        "kind": "reference log-probs", "model": model_fingerprint(base), "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": tok.to_dict(), "data": data_hash(sorted(p.id for p in unique))}
    experiment.reference = _cached(
        experiment, out / "caches" / "reference", experiment.reference_manifest,
        lambda: _timed(experiment, "reference log-probs", len(unique),
                       lambda progress: pair_logps(base, unique, experiment.pad_token_id,
                                                   config.train.eval_batch_size, device, world, progress)))
    return experiment


def _timed(experiment: Experiment, what: str, n: int, fn):
    """``fn(progress)`` with a progress bar over its ``n`` pairs (rank 0); then its time and throughput."""
    import time

    start = time.perf_counter()
    with tqdm(total=n, desc=what, unit="pair", dynamic_ncols=True, mininterval=1.0,
              disable=not (experiment.show_progress and experiment.world.is_main)) as bar:
        # each rank scores about 1/W of the pairs: rank 0's count, scaled, is the whole job's progress
        result = fn(lambda done: bar.update(done * experiment.world.size))
    seconds = time.perf_counter() - start
    experiment.say(f"{what}: {n} pairs in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} pairs/s)")
    return result


def _loss_cache(experiment: Experiment, model, pairs: list[TokenizedPair], folder: Path, manifest: dict,
                what: str) -> ValueCache:
    """Per-example losses of ``model`` on ``pairs`` (the baseline s(z)), cached in ``folder``."""
    unique = list({p.id: p for p in pairs}.values())

    def build(progress):
        logps = pair_logps(model, unique, experiment.pad_token_id, experiment.config.train.eval_batch_size,
                           experiment.device, experiment.world, progress)
        ids = [p.id for p in unique]
        losses, _ = pair_losses(logps, experiment.reference, ids, experiment.config.loss.name,
                                experiment.config.loss.beta)
        return ValueCache(ids, {"loss": losses})

    manifest = {**manifest, "reference": experiment.reference_manifest["model"],
                "loss": experiment.config.loss.name, "beta": experiment.config.loss.beta,
                "data": data_hash(sorted(p.id for p in unique))}
    return _cached(experiment, folder, manifest, lambda: _timed(experiment, what, len(unique), build))


# ------------------------------------------------------------------------------------------ stages

def _train(experiment: Experiment, name: str, run_dir: Path, mixer, train_sets, eval_sets, task_names,
           baselines, specialists, seed: int, optim, description: dict, loss: str | None = None
           ) -> tuple[torch.nn.Module, dict]:
    """Train one model; ``loss``: its training loss (default the config's; evaluation always uses the config's)."""
    model = experiment.policy(seed)
    config_loss = experiment.config.loss
    loss = loss or config_loss.name
    run = TrainingRun(name=name, run_dir=run_dir, mixer=mixer, task_names=task_names, train_sets=train_sets,
                      eval_sets=eval_sets, reference=experiment.reference, baseline_losses=baselines,
                      specialist_caches=specialists, optim=optim, loss=loss, beta=config_loss.beta, seed=seed,
                      pad_token_id=experiment.pad_token_id, eval_loss=config_loss.name,
                      description={"name": name, "mixer": description, "seed": seed, "optim": asdict(optim),
                                   "loss": {**asdict(config_loss), "name": loss},
                                   "reference": experiment.reference_manifest})
    final = run_training(model, run, experiment.device, experiment.world, experiment.show_progress)
    return model, final


def specialists(experiment: Experiment, allow_training: bool = True) -> list[ValueCache]:
    """Train (or load) one specialist per task and cache its losses on every pair of its task."""
    config, caches = experiment.config, []
    for i, name in enumerate(experiment.task_names):
        pairs = experiment.train_sets[i] + experiment.eval_sets[i]
        given = config.specialists.load.get(name)
        if given is not None:
            model, source = _load_given_specialist(experiment, Path(config.resolve(given))), {"loaded": given}
        else:
            run_dir = experiment.out / "specialists" / name
            if not allow_training and not (run_dir / "final.json").is_file():
                raise ConfigError(f"specialist {name!r} is not trained yet ({run_dir}): run `amalab llm specialists "
                                  f"{config.source_path}` first, or `amalab llm run`")
            model, final = _train(experiment, f"specialist {name}", run_dir, make_mixer("uniform", 1),
                                  [experiment.train_sets[i]], [experiment.eval_sets[i]], [name], None, [None],
                                  config.seed, config.specialists.optim, {"name": "uniform", "task": name})
            source = {"trained": str(run_dir), "steps": config.specialists.optim.steps}
            experiment.say(f"specialist {name}: held-out {_short(final['tasks'].get(name, {}))}")
        manifest = {"kind": "specialist losses", "task": name, "specialist": _fingerprint(model), **source}
        caches.append(_loss_cache(experiment, model, pairs, experiment.out / "caches" / f"specialist-{name}",
                                  manifest, f"specialist {name} losses"))
        del model
    return caches


def _load_given_specialist(experiment: Experiment, path: Path) -> torch.nn.Module:
    if (path / "config.json").is_file():
        return load_model(path, device=experiment.device)
    model = experiment.trained_policy(path, experiment.config.seed)
    if model is None:
        raise ConfigError(f"specialists.load: {path} is neither a model folder (config.json) nor a run folder "
                          "with checkpoints")
    return model


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")


def generalists(experiment: Experiment, specialist_caches: list[ValueCache]) -> list[dict]:
    """Train every method of the config with its seeds; return one record per run."""
    config, k = experiment.config, len(experiment.tasks)
    sizes = [len(s) for s in experiment.train_sets]
    records, standard_cache = [], None
    for method in config.methods.names:
        for s in range(config.methods.seeds_of(method)):
            seed = config.seed + s
            options = dict(config.methods.options.get(method, {}))
            mixer_name, loss = method_mixer_and_loss(method, config.loss.name)
            mixer = make_mixer(mixer_name, k, sizes=sizes, **options)
            if mixer.baseline == "specialist":
                baselines = specialist_caches
            elif mixer.baseline == "standard":
                if standard_cache is None:
                    raise ConfigError("doremi needs the standard generalist: list 'standard' before it")
                baselines = [standard_cache] * k
            else:
                baselines = None
            run_dir = experiment.out / "generalists" / method / f"seed{s}"
            model, final = _train(experiment, f"{method} seed {s}", run_dir, mixer, experiment.train_sets,
                                  experiment.eval_sets, experiment.task_names, baselines, specialist_caches,
                                  seed, config.train, {"name": mixer_name, "options": options}, loss)
            if method == "standard" and standard_cache is None:
                every = [p for pairs in experiment.train_sets + experiment.eval_sets for p in pairs]
                standard_cache = _loss_cache(
                    experiment, model, every, experiment.out / "caches" / "standard",
                    {"kind": "standard generalist losses", "model": _fingerprint(model), "run": str(run_dir)},
                    "standard generalist losses")
            final = add_generation(experiment, model, run_dir, final)
            records.append({"method": method, "seed": s, **final})
            experiment.say(f"{method} seed {s}: worst-task excess {final.get('worst_excess', float('nan')):.4f} "
                           f"({final.get('worst_task')})")
            del model
    return records


# ----------------------------------------------------------------------------------------- summary

def summarize(experiment: Experiment, records: list[dict]) -> dict:
    """summary.json / summary.csv and the printed table: per method, mean and spread over seeds."""
    names = experiment.task_names
    methods: dict[str, dict] = {}
    for r in records:
        entry = methods.setdefault(r["method"], {"seeds": 0, "tasks": {n: {} for n in names}, "worst_excess": []})
        entry["seeds"] += 1
        entry["worst_excess"].append(r.get("worst_excess", float("nan")))
        for n in names:
            for metric, value in r["tasks"].get(n, {}).items():
                entry["tasks"][n].setdefault(metric, []).append(value)
    summary = {"tasks": names, "methods": {}, "runs": records}
    for method, entry in methods.items():
        summary["methods"][method] = {
            "seeds": entry["seeds"],
            "worst_excess": _spread(entry["worst_excess"]),
            "tasks": {n: {m: _spread(v) for m, v in metrics.items() if m != "n"} for n, metrics in entry["tasks"].items()},
        }
    if experiment.world.is_main:
        (experiment.out / "summary.json").write_text(json.dumps(summary, indent=1))
        with (experiment.out / "summary.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "seed", "task", "loss", "excess", "accuracy", "margin", "success", "worst_excess"])
            for r in records:
                for n in names:
                    t = r["tasks"].get(n, {})
                    w.writerow([r["method"], r["seed"], n] + [t.get(m, "") for m in ("loss", "excess", "accuracy", "margin", "success")]
                               + [r.get("worst_excess", "")])
    return summary


def _spread(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max()), "n": int(len(arr))}


def summary_table(summary: dict) -> str:
    """A plain-text table: worst-task excess, per-task excess and accuracy, and the generation success of the
    verifiable tasks; mean (std) over seeds."""
    names = summary["tasks"]
    generated = [n for n in names if any("success" in m["tasks"][n] for m in summary["methods"].values())]
    header = (["method", "seeds", "worst excess"] + [f"{n} excess" for n in names] + [f"{n} acc" for n in names]
              + [f"{n} success" for n in generated])

    def fmt(entry: dict, metric: str) -> str:
        s = entry.get(metric)
        if s is None:
            return "-"
        return f"{s['mean']:.4f}" + (f" ({s['std']:.4f})" if s["n"] > 1 else "")

    rows = []
    for method, m in summary["methods"].items():
        rows.append([method, str(m["seeds"]), fmt(m, "worst_excess")]
                    + [fmt(m["tasks"][n], "excess") for n in names] + [fmt(m["tasks"][n], "accuracy") for n in names]
                    + [fmt(m["tasks"][n], "success") for n in generated])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def run_all(config: LLMConfig, stages: tuple[str, ...] = ("specialists", "generalists"), world: World = World(),
            show_progress: bool = True) -> dict | None:
    """Run the named stages (caches are always prepared); return the summary if generalists ran.

    Without "specialists" among the stages, the specialists must have been trained already.
    """
    experiment = prepare(config, world, show_progress)
    specialist_caches = specialists(experiment, allow_training="specialists" in stages)
    if "generalists" not in stages:
        return None
    records = generalists(experiment, specialist_caches) + merged_specialists(experiment, specialist_caches)
    return _report(experiment, records)


def reevaluate(config: LLMConfig, world: World = World(), show_progress: bool = True) -> dict:
    """Evaluate every finished generalist again from its last checkpoint; rewrite the summary and figures."""
    from amalab.llm.evaluate import evaluate

    experiment = prepare(config, world, show_progress)
    specialist_caches = specialists(experiment, allow_training=False)
    records = []
    for method in config.methods.names:
        for s in range(config.methods.seeds_of(method)):
            run_dir = experiment.out / "generalists" / method / f"seed{s}"
            if not (run_dir / "final.json").is_file():
                experiment.say(f"{method} seed {s}: not finished ({run_dir}); skipped")
                continue
            model = experiment.trained_policy(run_dir, config.seed + s)
            final = json.loads((run_dir / "final.json").read_text())
            final.update(evaluate(model, experiment.eval_sets, experiment.task_names, experiment.reference,
                                  specialist_caches, config.loss.name, config.loss.beta, experiment.pad_token_id,
                                  config.train.eval_batch_size, experiment.device, world))
            final = add_generation(experiment, model, run_dir, final)
            if world.is_main:
                (run_dir / "final.json").write_text(json.dumps(final, indent=1))
            records.append({"method": method, "seed": s, **final})
    records += merged_specialists(experiment, specialist_caches)
    if not records:
        raise ConfigError(f"{experiment.out}: no finished generalist to evaluate: run `amalab llm train` first")
    return _report(experiment, records)


def _report(experiment: Experiment, records: list[dict]) -> dict:
    summary = summarize(experiment, records)
    if experiment.world.is_main:
        from amalab.llm.figures import make_figures

        paths = make_figures(experiment.out, summary)
        print(summary_table(summary))  # the result: printed even with --quiet
        print("wrote " + ", ".join(str(p) for p in [experiment.out / "summary.json"] + paths))
    return summary

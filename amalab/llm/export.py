"""A trained run as a plain transformers model folder: ``amalab llm export RUN_DIR OUT_DIR``.

The folder holds the run's policy at its last checkpoint, any LoRA adapter merged into the weights
(``merge_and_unload``), in float32 safetensors with tied weights as the model's config says; the
experiment's tokenizer; and ``amalab_export.json`` naming the run, method, seed, step and checkpoint.
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load it without amalab, and
its sequence log-probs (docs/maths.md section 9) are the trained policy's, so lm-eval-harness or vLLM score
the model that was trained.

The base model is rebuilt from the experiment's copy of its config (``config.toml``) and its saved tokenizer
(``tokenizer/``), and checked against the fingerprints the run recorded in ``run.json`` before anything is
written: an export never silently pairs a checkpoint with another base.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from amalab.atomic_write import atomic_folder
from amalab.errors import ConfigError
from amalab.training.checkpoint import load_latest
from amalab.llm.config import load_llm_config
from amalab.llm.experiment import TOKENIZER_DIR, base_model
from amalab.llm.models import load_tokenizer, trainable
from amalab.llm.fingerprint import model_fingerprint, tokenizer_fingerprint
from amalab.training.state import load_trainable_state

EXPORT_FILE = "amalab_export.json"


@dataclass(frozen=True)
class RunFolder:
    """A training run of an experiment: its folder, the experiment's ``out``, and what it trained."""

    path: Path
    experiment: Path
    method: str  # a generalist's method, or "specialist"
    seed: int | None  # the generalist's seed index; None for a specialist
    task: str | None = None  # the specialist's task

    def label(self) -> str:
        return f"specialist {self.task}" if self.task is not None else f"{self.method} seed {self.seed}"


def _experiment_of(run_dir: Path) -> Path:
    for folder in run_dir.parents:
        if (folder / "config.toml").is_file() and (folder / "data.json").is_file():
            return folder
    raise ConfigError(f"{run_dir}: no experiment folder (config.toml and data.json) above this run folder")


def describe_run(run_dir: Path) -> RunFolder:
    """The :class:`RunFolder` of a run folder (``generalists/<method>/seed<s>`` or ``specialists/<task>``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir}: not a training run folder (no run.json)")
    experiment = _experiment_of(run_dir)
    parts = run_dir.relative_to(experiment).parts
    if len(parts) == 3 and parts[0] == "generalists" and parts[2].startswith("seed") and parts[2][4:].isdigit():
        return RunFolder(run_dir, experiment, parts[1], int(parts[2][4:]))
    if len(parts) == 2 and parts[0] == "specialists":
        return RunFolder(run_dir, experiment, "specialist", None, parts[1])
    raise ConfigError(f"{run_dir}: expected a folder generalists/<method>/seed<s> or specialists/<task> of "
                      f"the experiment {experiment}")


def experiment_runs(experiment: Path) -> list[RunFolder]:
    """Every generalist run of an experiment folder, by method then seed."""
    found = [describe_run(p) for p in sorted(Path(experiment).glob("generalists/*/seed*"))
             if (p / "run.json").is_file()]
    return sorted(found, key=lambda r: (r.method, r.seed))


def select_run(path: Path, method: str | None = None, seed: int | None = None) -> RunFolder:
    """The run ``path`` names: a run folder itself, or the one generalist of the experiment folder ``path``
    with ``method`` and ``seed`` (each optional while one run is left)."""
    path = Path(path)
    if (path / "run.json").is_file():
        run = describe_run(path)
        runs = [run]
    else:
        if not (path / "generalists").is_dir():
            raise ConfigError(f"{path}: neither a run folder (run.json) nor an experiment folder (generalists/)")
        runs = experiment_runs(path)
    chosen = [r for r in runs if (method is None or r.method == method) and (seed is None or r.seed == seed)]
    if len(chosen) != 1:
        asked = " ".join(f"--{k} {v}" for k, v in (("method", method), ("seed", seed)) if v is not None)
        listed = ", ".join(r.label() for r in runs) or "none"
        raise ConfigError(f"{path}: {asked or 'no selection'} matches {len(chosen)} runs, not one; runs there: "
                          f"{listed}")
    return chosen[0]


def _check_base(run: RunFolder, base, tokenizer) -> None:
    """The rebuilt base and tokenizer are the ones the run was trained from (run.json's fingerprints)."""
    recorded = json.loads((run.path / "run.json").read_text()).get("reference") or {}
    for what, expected, found in (("base model", recorded.get("model"), lambda: model_fingerprint(base)),
                                  ("tokenizer", recorded.get("tokenizer"), lambda: tokenizer_fingerprint(tokenizer))):
        if expected is not None and found() != expected:
            raise ConfigError(f"{run.path}: the {what} rebuilt from {run.experiment} is not the one this run "
                              "was trained from (its fingerprint differs from run.json's)")


def merged_policy(run: RunFolder):
    """(the run's policy at its last checkpoint with any LoRA adapter merged in, on the CPU; the tokenizer;
    the checkpoint)."""
    checkpoint = load_latest(run.path, weights_only=True)  # an export never needs the optimizer state
    if checkpoint is None:
        raise ConfigError(f"{run.path}: no checkpoint to export yet")
    if not (run.experiment / TOKENIZER_DIR).is_dir():
        raise ConfigError(f"{run.experiment}: no saved tokenizer ({TOKENIZER_DIR}/); run any `amalab llm` stage "
                          "of its config once with this version of amalab to write it")
    config = load_llm_config(run.experiment / "config.toml")
    tokenizer = load_tokenizer(run.experiment / TOKENIZER_DIR)
    base = base_model(config, tokenizer, torch.device("cpu"))
    _check_base(run, base, tokenizer)
    # the adapter's initialization (seed 0) is overwritten by the checkpoint; no gradient checkpointing, which
    # would write use_cache = false into the exported config
    policy = trainable(base, dataclasses.replace(config.model, gradient_checkpointing=False), seed=0)
    load_trainable_state(policy, checkpoint.model_state)
    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    for p in policy.parameters():
        p.requires_grad_(False)
    return policy.eval(), tokenizer, checkpoint


def export_run(run: RunFolder, out_dir: Path, force: bool = False) -> dict:
    """Write the model folder of ``run`` into ``out_dir`` atomically; return what ``amalab_export.json`` says.

    A non-empty ``out_dir`` is refused unless ``force`` (then it is replaced).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise ConfigError(f"{out_dir}: exists and is not empty; choose another folder or pass --force to "
                          "replace it")
    policy, tokenizer, checkpoint = merged_policy(run)
    info = {"run": run.path.relative_to(run.experiment).as_posix(), "experiment": str(run.experiment.resolve()),
            "name": run.label(), "method": run.method, "seed": run.seed, "task": run.task,
            "step": checkpoint.step, "checkpoint": str(checkpoint.path.resolve()),
            "finished": (run.path / "final.json").is_file()}
    with atomic_folder(out_dir) as folder:
        policy.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / EXPORT_FILE).write_text(json.dumps(info, indent=1))
        _readable(folder)
    return info


def _readable(folder: Path) -> None:
    """A model folder others may read (an inference server under another user): safetensors writes its
    files private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)

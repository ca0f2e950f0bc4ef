"""Baseline losses s(z) for :class:`~amalab.trl.AMATrainer` (docs/maths.md sections 3, 11 and 12), computed
as the trainer computes its own losses, and a record of what they were computed with.

    data = add_baseline_losses(data, {"sums": sums_model, "facts": "out/facts"}, args,
                               ref_model=reference, processing_class=tokenizer)       # in-sample (46)
    data = add_baseline_losses(data, train_fold, args, ref_model=reference,
                               processing_class=tokenizer, folds=2)                  # cross-fitted (53)-(54)
    data = add_baseline_losses(data, standard_model, args, ref_model=reference,
                               processing_class=tokenizer)                           # doremi's baseline (47)
    AMATrainer(..., args=args, train_dataset=data)       # checks the record: check_baseline_record

**The forward.** Each model scores its rows through a plain TRL ``DPOTrainer`` built on them (``model`` the
scoring model, ``ref_model`` the generalist's reference, ``args`` the generalist's config): TRL's own
tokenization and collator, :func:`amalab.trl.forward.sequence_logps` (TRL's fused log-prob head, ``ld_alpha``,
a precomputed, PEFT or separate reference) and :class:`~amalab.objectives.preference.PreferenceLoss` built
from the trainer's settings, as ``AMATrainer.compute_loss`` builds it. Without ``ref_model`` the reference is
TRL's: a PEFT model's disabled adapter; a full model without ``ref_model`` is refused (TRL would make the
scoring model its own reference, and every loss would be log 2).

**Cross-fitting** (``folds=K``): each task's rows are cut into K folds by
:func:`amalab.llm.stages.cross_fit.fold_indices` on the pairs' content ids (:func:`baseline_folds`; identical
pairs share a fold); for fold f the caller's ``train(task, f, rows)`` returns a model (or a folder) trained
on ``rows``, the task's raw rows outside fold f, and that model scores fold f. The caller trains (with
TRL's ``DPOTrainer``, say: tests/trl_integration/test_baselines.py does): how long and with what optimizer
is the caller's choice, and nothing here guesses it.

**The record.** One line of ``dataset.info.description``, ``amalab-baseline-record: {json}`` (other lines of
the description are kept), so it travels with ``Dataset.save_to_disk``/``load_from_disk``, ``select``,
``map`` and TRL's tokenization. Its JSON object: ``version``; ``column`` and ``task_column``; ``kind``
(``specialists`` (46), ``cross-fit`` (54) or ``generalist`` (47), doremi's baseline); ``tasks``; ``models``
(task -> the scoring model's :func:`~amalab.llm.fingerprint.model_fingerprint`, a list of K under
cross-fitting; ``"*"`` for a generalist); ``reference`` (:func:`reference_fingerprint`); ``folds`` (null or
``{"k", "seed", "ids"}``); ``settings`` (loss_type, beta, label_smoothing, f_divergence_type,
f_alpha_divergence_coef, ld_alpha, discopop_tau, max_length, truncation_mode); ``values`` (sha256 of the
column as float64, in row order); ``dropped_by_trl`` (the pairs TRL's preparation drops with these
settings, a completion truncated away: their value is NaN, left out of the digest, and the trainer, which
drops them too, never reads it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import DPOTrainer

from amalab.llm.data.pairs import example_id
from amalab.llm.fingerprint import model_fingerprint
from amalab.llm.stages.cross_fit import fold_indices
from amalab.objectives.preference import PreferenceLoss
from amalab.training.tensor_identity import state_digest
from amalab.trl.forward import sequence_logps
from amalab.trl.tasks import NOT_PER_EXAMPLE, TaskIndex

#: the marker of the record's line in ``dataset.info.description``
RECORD_MARKER = "amalab-baseline-record: "
RECORD_VERSION = 1
#: the mixers' baseline kinds (amalab.mixers) -> the record kinds that measure it
_KINDS = {"specialist": ("specialists", "cross-fit"), "standard": ("generalist",)}
#: a record setting -> the config field that sets it
SETTING_FIELDS = {"loss_type": "loss_type", "beta": "beta", "label_smoothing": "label_smoothing",
                   "f_divergence_type": "f_divergence_type", "f_alpha_divergence_coef": "f_alpha_divergence_coef",
                   "ld_alpha": "ld_alpha", "discopop_tau": "discopop_tau", "max_length": "max_length",
                   "truncation_mode": "truncation_mode"}

Model = "torch.nn.Module | str | os.PathLike"


# --- the settings and fingerprints ----------------------------------------------------------------------

def loss_settings(trainer) -> dict:
    """The settings of a (DPO/AMA) trainer that change a pair's loss, as JSON values."""
    args = trainer.args
    values = {"loss_type": trainer.loss_types[0] if len(trainer.loss_types) == 1 else list(trainer.loss_types),
              "beta": trainer.beta, "label_smoothing": trainer.label_smoothing,
              "f_divergence_type": trainer.f_divergence_type,
              "f_alpha_divergence_coef": trainer.f_alpha_divergence_coef, "ld_alpha": trainer.ld_alpha,
              "discopop_tau": args.discopop_tau, "max_length": args.max_length,
              "truncation_mode": args.truncation_mode}
    return json.loads(json.dumps(values, default=lambda v: getattr(v, "value", str(v))))


def preference_loss_of(trainer) -> PreferenceLoss:
    """amalab's per-example loss with the trainer's settings: what ``AMATrainer`` trains and scores with."""
    if len(trainer.loss_types) != 1 or trainer.loss_types[0] in NOT_PER_EXAMPLE:
        raise ValueError(f"DPOConfig.loss_type {trainer.loss_types}: baseline losses need one per-example loss type")
    return PreferenceLoss(trainer.loss_types[0], trainer.beta, label_smoothing=trainer.label_smoothing,
                          discopop_tau=trainer.args.discopop_tau, f_divergence_type=trainer.f_divergence_type,
                          f_alpha_divergence_coef=trainer.f_alpha_divergence_coef)


def reference_fingerprint(trainer) -> str:
    """Fingerprint of the reference a trainer's forward uses: its ``ref_model``; with none, a PEFT policy's
    base weights (every adapter but one named ``ref`` left out: the adapter TRL switches off); else the policy
    itself, the reference TRL's ``precompute_ref_log_probs`` computed from at construction (call this before
    training)."""
    unwrap = trainer.accelerator.unwrap_model
    if trainer.ref_model is not None:
        return model_fingerprint(unwrap(trainer.ref_model))
    model = unwrap(trainer.model)
    if not is_peft_model(model):
        return model_fingerprint(model)
    adapters = [name for name in model.peft_config if name != "ref"]
    state = {key: value for key, value in model.state_dict().items()
             if not any(f".{name}." in key or key.endswith(f".{name}") for name in adapters)}
    return "peft-base:" + state_digest(state, prefix="peft base weights")


def values_digest(values) -> str:
    """sha256 of the baseline column as float64, in row order, without the rows TRL drops (NaN here: see
    :func:`add_baseline_losses`), which the trainer never sees."""
    values = np.asarray(values, dtype=np.float64)
    return hashlib.sha256(values[~np.isnan(values)].tobytes()).hexdigest()


# --- the folds ----------------------------------------------------------------------------------------

def _pair_id(row: dict) -> str:
    fields = [row[key] if isinstance(row[key], str) else json.dumps(row[key], sort_keys=True)
              for key in ("prompt", "chosen", "rejected")]
    return example_id(*fields)


def baseline_folds(dataset: Dataset, args, k: int, seed: int | None = None) -> list[int]:
    """The fold (0..k-1) of every row: per task, :func:`amalab.llm.stages.cross_fit.fold_indices` over the
    task's distinct pair ids (content hashes), seeded by ``seed`` (default ``args.seed``); identical pairs
    share a fold, so no specialist scores a copy of a pair it trained on."""
    index = TaskIndex.of(dataset, args)
    seed = args.seed if seed is None else seed
    where = [-1] * len(dataset)
    for name, rows in zip(index.names, index.rows):
        ids = [_pair_id(dataset[r]) for r in rows]
        distinct = list(dict.fromkeys(ids))
        try:
            fold_of = dict(zip(distinct, fold_indices(distinct, k, seed)))
        except ValueError as e:
            raise ValueError(f"task {name!r} ({len(distinct)} distinct pairs), folds={k}: {e}") from None
        for row, pair in zip(rows, ids):
            where[row] = fold_of[pair]
    return where


# --- scoring --------------------------------------------------------------------------------------------

def _load(model, args):
    if not isinstance(model, (str, os.PathLike)):
        return model
    path, kwargs = Path(model), dict(args.model_init_kwargs or {})
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


#: the column that carries each pair's position through TRL's preparation, which may drop pairs
_POSITION = "__amalab_position__"


def _scorer(model, args, ref_model, processing_class, rows: Dataset) -> DPOTrainer:
    """A plain TRL DPOTrainer on ``rows``: its tokenized dataset, collator and forward score them."""
    if ref_model is None and not is_peft_model(model):
        raise ValueError("add_baseline_losses: give ref_model (the generalist's reference): without it a full "
                         "model would be its own reference")
    had_ref_adapter = is_peft_model(model) and "ref" in model.peft_config
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=processing_class,
                         train_dataset=rows.add_column(_POSITION, list(range(len(rows)))))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if ref_model is None and is_peft_model(unwrapped) and "ref" in unwrapped.peft_config and not had_ref_adapter:
        # TRL copies a model's trained adapter into a frozen "ref" adapter and uses that as the reference, which
        # makes a specialist its own reference (every loss log 2). The generalist's reference is the base
        # with the adapter disabled, so the copy goes and TRL falls back to disabling the adapter.
        unwrapped.delete_adapter("ref")
    return trainer


def _score(trainer, batch_size: int) -> np.ndarray:
    """Per-example losses of the trainer's train rows, in order, by AMATrainer's forward and loss."""
    loss, data, values = preference_loss_of(trainer), trainer.train_dataset, []
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            inputs = trainer._prepare_inputs(trainer.data_collator(
                [data[r] for r in range(start, min(start + batch_size, len(data)))]))
            with torch.no_grad():
                values.append(sequence_logps(trainer, model, inputs).losses(loss).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(values)


def add_baseline_losses(dataset: Dataset, specialists, args, *, processing_class, ref_model=None,
                        folds: int | None = None, fold_seed: int | None = None,
                        batch_size: int | None = None) -> Dataset:
    """``dataset`` with ``args.baseline_column`` (replaced if present): each pair's loss s(z) under its
    scoring model, by the generalist's forward and loss (module docstring), and the record of what computed
    it in ``info.description``.

    ``specialists``: a mapping task -> model or folder (each task's rows scored by its specialist, (46));
    one model or folder (every row scored by it: the standard generalist of ``doremi``, (47)); or, with
    ``folds=K`` >= 2, a function ``train(task, fold, rows) -> model or folder`` called once per task and
    fold with the task's raw rows outside that fold (:func:`baseline_folds`, seeded by ``fold_seed``,
    default ``args.seed``), whose model scores the fold (54). ``args``: the generalist's AMAConfig (or
    DPOConfig: its ``task_column``/``baseline_column`` default to "task"/"baseline_loss").
    ``ref_model``: the generalist's reference (required unless the scoring models are PEFT models sharing
    the generalist's base). ``batch_size``: default ``args.per_device_eval_batch_size``.
    """
    args_view = _with_columns(args)
    index = TaskIndex.of(dataset, args_view)
    column = args_view.baseline_column
    raw = dataset.remove_columns([column]) if column in dataset.column_names else dataset
    batch_size = batch_size or args.per_device_eval_batch_size
    values = np.full(len(raw), np.nan)
    models: dict = {}
    references: set[str] = set()
    reference_of: dict[int, str] = {}

    def score(model, rows: list[int]) -> str:
        trainer = _scorer(_load(model, args), args, ref_model, processing_class, raw.select(rows))
        unwrapped = trainer.accelerator.unwrap_model(trainer.ref_model or trainer.model)
        key = id(unwrapped) if trainer.ref_model is not None else None
        if key is None or key not in reference_of:
            fingerprint = reference_fingerprint(trainer)
            if key is not None:
                reference_of[key] = fingerprint
        references.add(reference_of[key] if key is not None else fingerprint)
        # TRL drops the pairs whose completion its truncation leaves empty; they stay NaN here, as the
        # generalist's own preparation (same settings: the record checks them) drops them too
        kept = np.asarray(trainer.train_dataset[_POSITION], dtype=int)
        values[np.asarray(rows)[kept]] = _score(trainer, batch_size)
        dropped[0] += len(rows) - len(kept)
        settings.update(loss_settings(trainer))
        return model_fingerprint(trainer.accelerator.unwrap_model(trainer.model))

    settings: dict = {}
    dropped = [0]
    fold_record = None
    if folds is not None and folds != 1:
        if not callable(specialists) or isinstance(specialists, torch.nn.Module):
            raise ValueError("add_baseline_losses: folds=K needs specialists = train(task, fold, rows) -> model")
        seed = args.seed if fold_seed is None else fold_seed
        where = baseline_folds(raw, args_view, folds, seed)
        kind = "cross-fit"
        for name, rows in zip(index.names, index.rows):
            models[name] = []
            for f in range(folds):
                trained_on = [r for r in rows if where[r] != f]
                model = specialists(name, f, raw.select(trained_on))
                models[name].append(score(model, [r for r in rows if where[r] == f]))
        fold_record = {"k": folds, "seed": seed, "ids": "amalab.llm.data.pairs.example_id of prompt, chosen, "
                       "rejected (JSON when not text); amalab.llm.stages.cross_fit.fold_indices per task"}
    elif isinstance(specialists, Mapping):
        missing = [name for name in index.names if name not in specialists]
        if missing:
            raise ValueError(f"add_baseline_losses: no specialist for task {missing[0]!r} "
                             f"(tasks: {', '.join(index.names)})")
        kind = "specialists"
        for name, rows in zip(index.names, index.rows):
            models[name] = score(specialists[name], rows)
    else:
        if callable(specialists) and not isinstance(specialists, torch.nn.Module):
            raise ValueError("add_baseline_losses: a training function needs folds=K >= 2")
        kind = "generalist"
        models["*"] = score(specialists, list(range(len(raw))))
    if len(references) != 1:
        raise ValueError(f"add_baseline_losses: the scoring models have {len(references)} different references "
                         "(PEFT models on different bases?): give ref_model")
    record = {"version": RECORD_VERSION, "column": column, "task_column": args_view.task_column, "kind": kind,
              "tasks": index.names, "models": models, "reference": references.pop(), "folds": fold_record,
              "settings": settings, "values": values_digest(values), "dropped_by_trl": dropped[0]}
    out = raw.add_column(column, values.tolist())
    # add_column gives the new dataset its own copy of the info: the input's description is left alone
    out.info.description = _with_record(out.info.description, record)
    return out


def _with_columns(args):
    """``args`` itself if it names the columns (AMAConfig), else a view with the AMAConfig defaults."""
    if hasattr(args, "task_column") and hasattr(args, "baseline_column"):
        return args

    class _View:
        task_column, baseline_column, task_names = "task", "baseline_loss", None

    return _View()


# --- the record -----------------------------------------------------------------------------------------

def _with_record(description: str | None, record: dict) -> str:
    lines = [line for line in (description or "").splitlines() if not line.startswith(RECORD_MARKER)]
    return "\n".join([*lines, RECORD_MARKER + json.dumps(record, sort_keys=True)])


def read_baseline_record(dataset) -> dict | None:
    """The record :func:`add_baseline_losses` left in ``dataset.info.description``, or None."""
    info = getattr(dataset, "info", None)
    for line in ((info.description if info is not None else None) or "").splitlines():
        if line.startswith(RECORD_MARKER):
            return json.loads(line[len(RECORD_MARKER):])
    return None


def check_baseline_record(trainer) -> None:
    """Refuse (ValueError, one line naming the differing setting) a train dataset whose baseline record does
    not match the trainer: its column, kind (specialists for AMA, a generalist for doremi), tasks, loss
    settings, reference fingerprint, or the column's values themselves.

    Nothing to check for a mixer without baseline losses. A dataset without a record is accepted: hand-made
    baseline values (or values computed elsewhere) are the user's responsibility.
    """
    record = read_baseline_record(trainer.train_dataset)
    source = trainer.mixer.baseline
    if record is None or source == "none":
        return
    args, prefix = trainer.args, "train_dataset's baseline record"
    redo = "recompute it with amalab.trl.baselines.add_baseline_losses"
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"{prefix}: version {record.get('version')!r}, expected {RECORD_VERSION}; {redo}")
    if record["column"] != args.baseline_column:
        raise ValueError(f"{prefix}: computed for column {record['column']!r}, the trainer reads "
                         f"{args.baseline_column!r} (AMAConfig.baseline_column)")
    if record["kind"] not in _KINDS.get(source, ()):
        wanted = " or ".join(_KINDS.get(source, ("?",)))
        raise ValueError(f"{prefix}: kind {record['kind']!r}, mixer {args.mixer!r} measures against "
                         f"{wanted} losses; {redo}")
    if record["kind"] != "generalist" and list(record["tasks"]) != list(trainer.tasks.names):
        raise ValueError(f"{prefix}: tasks {record['tasks']}, the trainer's are {trainer.tasks.names}; {redo}")
    ours = loss_settings(trainer)
    for name, field in SETTING_FIELDS.items():
        if record["settings"].get(name) != ours[name]:
            raise ValueError(f"{prefix}: {name} was {record['settings'].get(name)!r}, the trainer's is "
                             f"{ours[name]!r} (DPOConfig.{field}); {redo}")
    if values_digest(trainer.tasks.baseline) != record["values"]:
        raise ValueError(f"{prefix}: column {args.baseline_column!r} holds other values than the record's "
                         f"(edited after add_baseline_losses?); {redo}")
    reference = reference_fingerprint(trainer)
    if reference != record["reference"]:
        raise ValueError(f"{prefix}: reference fingerprint {record['reference'][:16]}..., the trainer's reference "
                         f"is {reference[:16]}... (another ref_model); {redo}")

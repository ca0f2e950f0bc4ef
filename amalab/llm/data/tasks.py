"""Tasks: the preference datasets D_i of docs/maths.md section 1, each split into training and held-out pairs.

A task is described by a :class:`TaskConfig` and read by :func:`load_tasks` into a :class:`TaskData`
(training and held-out pairs, and the count of every row that was dropped). Reading a source is
:func:`amalab.llm.data.sources.read_pairs`; here are the rules on top of it: deterministic subsets
(``max_examples``), the held-out split or a second evaluation source, and distinct task names. A task with
no usable pair and a task name given twice are errors (:class:`ConfigError`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair
from amalab.llm.data.sources import check_source, read_pairs, source_kind
from amalab.llm.data.synthetic.verifier import with_verified_labels


@dataclass(frozen=True)
class TaskConfig:
    """One task of a config: where its pairs come from and how its held-out pairs are chosen.

    ``source``: a local file (``.jsonl``, ``.jsonl.gz``, ``.json`` list of objects, ``.parquet``; relative
    paths are relative to the config's folder), ``hf:<dataset id>`` (Hugging Face ``datasets``, needs a
    network), ``truthfulqa:<csv path>`` or ``generated:<family>?n=..&hardness=..&noise=..&seed=..``
    (:func:`amalab.llm.data.synthetic.generator.parse_source`).
    ``held_out``: the evaluation pairs taken out of ``source``: a fraction in [0, 1) (float) or a count
    (int); default 0.1. Exclusive with ``eval_source``, which reads the evaluation pairs from a second
    source of the same kinds instead (its pairs that are also training pairs are dropped).
    ``split`` / ``eval_split``: the split names of ``hf:`` sources.
    ``max_examples``: keep at most this many pairs of ``source`` (a deterministic subset, see
    :func:`select_by_hash`), applied before the held-out split.
    ``seed``: seeds the subset and the held-out split (both are functions of example ids and seed only).
    """

    name: str
    source: str
    split: str = "train"
    held_out: int | float | None = None
    eval_source: str | None = None
    eval_split: str = "test"
    max_examples: int | None = None
    seed: int = 0

    def check(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        check_source(self.source, "source")
        if self.eval_source is not None:
            check_source(self.eval_source, "eval_source")
            if self.held_out is not None:
                raise ValueError("held_out and eval_source are exclusive: give one way to get "
                                 "evaluation pairs")
        held_out = self.held_out
        if isinstance(held_out, bool) or not (held_out is None or isinstance(held_out, (int, float))):
            raise ValueError(f"held_out must be a fraction in [0, 1) or a count >= 0, got {held_out!r}")
        if isinstance(held_out, float) and not (0.0 <= held_out < 1.0):
            raise ValueError(f"held_out as a fraction must lie in [0, 1), got {held_out!r} "
                             f"(write an integer for a count)")
        if isinstance(held_out, int) and held_out < 0:
            raise ValueError(f"held_out as a count must be >= 0, got {held_out!r}")
        if self.max_examples is not None and (isinstance(self.max_examples, bool)
                                              or not isinstance(self.max_examples, int)
                                              or self.max_examples < 1):
            raise ValueError(f"max_examples must be an integer >= 1, got {self.max_examples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def held_out_amount(self) -> int | float:
        """The held-out fraction or count in force: 0 with an eval_source, 0.1 when not given."""
        if self.eval_source is not None:
            return 0
        return 0.1 if self.held_out is None else self.held_out


@dataclass
class TaskData:
    """The pairs of one task: ``train`` and held-out ``eval`` lists, and why rows were dropped."""

    name: str
    train: list[PreferencePair]
    eval: list[PreferencePair]
    dropped: dict[str, int]
    source: str
    rows: int = 0  # rows read from the source(s), before any drop

    def summary(self) -> str:
        """One line for logs: how many rows were read, kept for training and evaluation, and dropped why."""
        total = sum(self.dropped.values())
        return (f"task {self.name!r} ({self.source}): {self.rows} rows, {len(self.train)} train, "
                f"{len(self.eval)} eval, {total} dropped"
                + (f" ({_format_counts(self.dropped)})" if total else ""))


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items() if n) or "none"


# --- deterministic subsets ---------------------------------------------------------------------------

def hash_key(pair_id: str, seed: int, purpose: str) -> str:
    """A pseudo-random sort key of an example: a function of its id, the seed and the purpose only."""
    return hashlib.sha256(f"{purpose}\0{seed}\0{pair_id}".encode()).hexdigest()


def select_by_hash(pairs: list[PreferencePair], count: int, seed: int, purpose: str) -> list[bool]:
    """Mark the ``count`` pairs with the smallest hash keys (see :func:`hash_key`).

    The marked set depends on the ids and the seed, not on the row order, and grows by inclusion:
    with the same seed, the pairs marked for ``count`` are among those marked for ``count + 1``.
    """
    order = sorted(range(len(pairs)), key=lambda i: hash_key(pairs[i].id, seed, purpose))
    marked = [False] * len(pairs)
    for i in order[:count]:
        marked[i] = True
    return marked


def held_out_count(n: int, held_out: int | float) -> int:
    """Evaluation pairs out of ``n``: a count as given, a fraction rounded (at least 1 if positive)."""
    if isinstance(held_out, float):
        return max(1, round(held_out * n)) if held_out > 0 else 0
    return held_out


# --- loading -----------------------------------------------------------------------------------------

def load_task(config: TaskConfig, base_dir: str | Path = ".") -> TaskData:
    """Read, validate, deduplicate, subsample and split one task (see the module docstring)."""
    config.check()
    pairs, dropped, rows = read_pairs(config.source, config.name, config.split, base_dir)
    if config.max_examples is not None and len(pairs) > config.max_examples:
        keep = select_by_hash(pairs, config.max_examples, config.seed, "max_examples")
        dropped["over_max_examples"] += len(pairs) - config.max_examples
        pairs = [p for p, k in zip(pairs, keep) if k]
    if not pairs:
        why = f"dropped: {_format_counts(dropped)}" if rows else "the source is empty"
        raise ConfigError(f"{config.source}: task {config.name!r} has no usable pairs ({rows} rows; {why})")
    if config.eval_source is not None:
        train = pairs
        eval_pairs, eval_dropped, eval_rows = read_pairs(config.eval_source, config.name, config.eval_split,
                                                         base_dir)
        train_ids = {p.id for p in train}
        leaked = sum(p.id in train_ids for p in eval_pairs)
        eval_pairs = [p for p in eval_pairs if p.id not in train_ids]
        for reason, n in eval_dropped.items():
            dropped[reason] += n
        dropped["eval_in_train"] += leaked
        rows += eval_rows
        source = f"{config.source} + eval {config.eval_source}"
    else:
        n_eval = held_out_count(len(pairs), config.held_out_amount)
        if n_eval >= len(pairs):
            raise ConfigError(f"{config.source}: task {config.name!r}: held_out = {config.held_out_amount!r} "
                              f"takes {n_eval} of its {len(pairs)} pairs and leaves none for training")
        is_eval = select_by_hash(pairs, n_eval, config.seed, "held_out")
        train = [p for p, e in zip(pairs, is_eval) if not e]
        eval_pairs = [p for p, e in zip(pairs, is_eval) if e]
        source = config.source
        if source_kind(config.source)[0] == "generated":
            eval_pairs = with_verified_labels(eval_pairs)
    return TaskData(config.name, train, eval_pairs, dropped, source, rows)


def check_distinct_task_names(configs: list[TaskConfig]) -> None:
    """The one rule on task names: no two tasks share one (their caches and runs are keyed by name)."""
    first_index: dict[str, int] = {}
    for index, config in enumerate(configs):
        if config.name in first_index:
            raise ConfigError(f"tasks[{index}]: field 'name': task name {config.name!r} is already used by "
                              f"tasks[{first_index[config.name]}] (duplicate task name {config.name!r})")
        first_index[config.name] = index


def load_tasks(configs: list[TaskConfig], base_dir: str | Path = ".") -> list[TaskData]:
    """Load every task of a config, in order; task names must be distinct.

    ``base_dir``: the folder relative file sources are read from (the config file's folder).
    """
    check_distinct_task_names(configs)
    return [load_task(config, base_dir) for config in configs]

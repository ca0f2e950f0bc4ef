"""Preference pairs of the tasks (docs/maths.md section 1): z = (x, y_w, y_l) with a stable id and its task.

A task is one preference dataset D_i, described by a :class:`TaskConfig` and read by :func:`load_tasks`
into a :class:`TaskData` (training and held-out pairs, and the count of every row that was dropped).

Row formats (each file is one format, decided by its first row):

- explicit prompt (TRL's standard preference format): string fields ``prompt``, ``chosen``, ``rejected``;
- implicit prompt (HH-RLHF style): ``chosen`` and ``rejected`` are whole transcripts sharing a prefix,
  which becomes the prompt (:func:`split_shared_prompt`); dialogue transcripts whose shared prefix holds
  no ``"\\n\\nAssistant:"`` turn have no reply to split off and are dropped (``no_assistant_turn``);
- TruthfulQA (source ``truthfulqa:<csv>``): ``Best Answer`` preferred to ``Best Incorrect Answer``;
- generated (source ``generated:<family>?n=..&hardness=..&noise=..&seed=..``): verifiable pairs the project
  makes itself (:mod:`amalab.llm.generated`), as explicit-prompt rows.

Extra fields are ignored. A field that is missing or not a string, malformed JSON, a missing file, a
task with no usable pair and a task name given twice are errors (:class:`ConfigError`, one line naming
the file, line and field); rows that are merely unusable are dropped and counted per reason.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from amalab.errors import ConfigError


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: ``chosen`` (y_w) is preferred to ``rejected`` (y_l) as a reply to ``prompt``.

    ``id`` is a content hash, stable across runs and machines, that caches key on.
    """

    id: str
    task: str
    prompt: str
    chosen: str
    rejected: str


#: the turn marker of HH-RLHF transcripts; an implicit prompt ends with the last one the replies share
ASSISTANT_MARKER = "\n\nAssistant:"
#: the other turn marker of HH-RLHF transcripts: a transcript holding either marker is a dialogue
HUMAN_MARKER = "\n\nHuman:"

#: why a row can be dropped; every TaskData.dropped holds all of them (zeros included)
DROP_REASONS = (
    "identical_chosen_rejected",  # no preference to learn: chosen == rejected
    "empty_completion",           # chosen or rejected is empty or whitespace after the prompt
    "empty_prompt",               # nothing to condition on (or, implicit format, no shared prefix)
    "no_assistant_turn",          # implicit format: dialogues that share no "Assistant:" turn
    "duplicate",                  # same (prompt, chosen, rejected) as an earlier row of the task
    "eval_in_train",              # a pair of eval_source that is also a training pair (no leakage)
    "over_max_examples",          # cut by max_examples
)

SOURCE_KINDS = ("file", "hf", "truthfulqa", "generated")

#: the offline data folder beside the repository checkout (``../shared/data`` from the repository root):
#: real datasets read in place, never copied into the repository (tests, benchmarks and timing scripts)
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass(frozen=True)
class TaskConfig:
    """One task of a config: where its pairs come from and how its held-out pairs are chosen.

    ``source``: a local file (``.jsonl``, ``.jsonl.gz``, ``.json`` list of objects, ``.parquet``; relative
    paths are relative to the config's folder), ``hf:<dataset id>`` (Hugging Face ``datasets``, needs a
    network), ``truthfulqa:<csv path>`` or ``generated:<family>?n=..&hardness=..&noise=..&seed=..``
    (:func:`amalab.llm.generated.parse_source`).
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
        _check_source(self.source, "source")
        if self.eval_source is not None:
            _check_source(self.eval_source, "eval_source")
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


def _check_source(source, name: str) -> None:
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{name} must be a non-empty string, got {source!r}")
    kind, rest = source_kind(source)
    if not rest:
        raise ValueError(f"{name} {source!r} names no dataset after {kind!r}:")
    if kind == "file" and not rest.endswith(FILE_SUFFIXES):
        raise ValueError(f"{name} {source!r}: a local file must end with one of {', '.join(FILE_SUFFIXES)} "
                         f"(or use hf:<dataset id> or truthfulqa:<csv path>)")
    if kind == "truthfulqa" and not rest.endswith(".csv"):
        raise ValueError(f"{name} {source!r}: truthfulqa: takes the path of a TruthfulQA .csv file")
    if kind == "generated":
        from amalab.llm.generated import parse_source  # imported here: it imports this module

        parse_source(rest)  # unknown family or a bad knob: ConfigError, a ValueError


def source_kind(source: str) -> tuple[str, str]:
    """``("hf", id)``, ``("truthfulqa", csv path)``, ``("generated", family?knobs)`` or ``("file", path)``."""
    for kind in ("hf", "truthfulqa", "generated"):
        if source.startswith(kind + ":"):
            return kind, source[len(kind) + 1:]
    return "file", source


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


def example_id(prompt: str, chosen: str, rejected: str) -> str:
    """Content hash of a pair: 32 hex digits of sha256(prompt NUL chosen NUL rejected).

    Independent of the task, the file and the row order, so caches keyed on it survive reshuffles. NUL
    separates the fields so that moving text between fields changes the id.
    """
    data = "\0".join((prompt, chosen, rejected)).encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:32]


def is_dialogue(transcript: str) -> bool:
    """Whether a transcript is an HH-RLHF dialogue: it holds ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"``."""
    return HUMAN_MARKER in transcript or ASSISTANT_MARKER in transcript


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two transcripts sharing a prefix into (prompt, chosen completion, rejected completion).

    HH-RLHF transcripts: the prompt ends with the last ``"\\n\\nAssistant:"`` inside the longest common
    prefix, so both completions are whole assistant replies starting after "Assistant:" (usually with a
    space), even when the two replies happen to begin with the same words. Other transcripts follow
    TRL's ``extract_prompt`` (trl/data_utils.py): the longest common prefix, moved back by one character
    when it ends just after a space, so that the completions keep their leading space.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    marker = chosen.rfind(ASSISTANT_MARKER, 0, n)
    if marker >= 0:
        n = marker + len(ASSISTANT_MARKER)
    elif n < limit and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


# --- reading rows ------------------------------------------------------------------------------------

def _decode_utf8(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; invalid bytes are a ConfigError naming the line and column of the first one.

    ``where`` is ``"path:line"`` of the first line of ``data`` (a file's text or one of its lines).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        path, _, first = where.rpartition(":")
        line = int(first) + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8: byte 0x{data[e.start]:02x} at column {column} "
                          f"({e.reason}); save the file as UTF-8") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                line = _decode_utf8(raw, f"{path}:{number}")
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.rstrip("\r\n"))  # an error at the line's end is then in this line
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{number}: malformed JSON: {e.msg} "
                                      f"(column {e.colno})") from None
                yield f"{path}:{number}", row
    except EOFError:  # a gzip stream cut short, as by an interrupted download or copy
        stops = f"after line {number}" if number else "within line 1"
        raise ConfigError(f"{path}: truncated gzip file: its data stops {stops}") from None
    except (zlib.error, gzip.BadGzipFile) as e:
        if number == 0 and str(e).startswith("Not a gzipped file"):
            raise ConfigError(f"{path}: not a gzip file, although its name ends in .gz") from None
        raise ConfigError(f"{path}: corrupt gzip data after line {number} ({e})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None


def _iter_json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(_decode_utf8(raw, f"{path}:1"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
    # json does not keep positions, so a row is named by its index in the list
    for index, row in enumerate(data):
        yield f"{path}: item {index}", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise ConfigError(f"{path}: not a readable Parquet file: {e}") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", row


def _iter_hf(dataset_id: str, split: str) -> Iterator[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"hf:{dataset_id}: loading a Hugging Face dataset needs the `datasets` package "
                          f"(pip install datasets)") from None
    try:
        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, missing dataset or split: report it as one line
        raise ConfigError(f"hf:{dataset_id} (split {split!r}): cannot load: {e}") from None
    for index, row in enumerate(rows):
        yield f"hf:{dataset_id}[{split}]: row {index}", row


def _read_rows(source: str, split: str, base_dir: Path) -> Iterator[tuple[str, object]]:
    kind, rest = source_kind(source)
    if kind == "hf":
        yield from _iter_hf(rest, split)
        return
    if kind == "generated":
        yield from _iter_generated(rest)
        return
    path = Path(rest)
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"{path}: no such data file")
    if kind == "truthfulqa":
        yield from _iter_truthfulqa(path)
    elif path.name.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.name.endswith(".json"):
        yield from _iter_json(path)
    else:
        yield from _iter_jsonl(path)


TRUTHFULQA_COLUMNS = ("Question", "Best Answer", "Best Incorrect Answer")


def _iter_truthfulqa(path: Path) -> Iterator[tuple[str, object]]:
    """TruthfulQA rows as explicit-prompt rows, in the HH dialogue format.

    Needs the January 2025 release (TruthfulQA-2025-790.csv here): its ``Best Incorrect Answer`` is the
    curated wrong answer of the binary-choice setting, so each question gives exactly one pair,
    chosen = ``Best Answer``, rejected = ``Best Incorrect Answer`` (the 2023 release lacks that column).
    The question becomes ``"\\n\\nHuman: <question>\\n\\nAssistant:"`` and the answers start with a space,
    the same shape as the HH-RLHF pairs, so that tasks mixed in one model share one dialogue format and
    a completion is never glued to its prompt without a separator.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    # some copies of the file start with a byte-order mark (data README)
    text = _decode_utf8(raw.removeprefix(codecs.BOM_UTF8), f"{path}:1")
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in TRUTHFULQA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"{path}:1: missing column {missing[0]!r} (truthfulqa: needs the 2025 "
                                  f"release with columns {', '.join(TRUTHFULQA_COLUMNS)})")
            start = reader.line_num + 1
            for record in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1  # a quoted field may span lines: the next record starts here
                values = {c: record[c] for c in TRUTHFULQA_COLUMNS}
                for column, value in values.items():
                    if value is None:
                        raise ConfigError(f"{where}: field {column!r}: missing (short row)")
                yield where, {
                    "prompt": f"\n\nHuman: {values['Question'].strip()}{ASSISTANT_MARKER}",
                    "chosen": " " + values["Best Answer"].strip(),
                    "rejected": " " + values["Best Incorrect Answer"].strip(),
                }
    except csv.Error as e:
        raise ConfigError(f"{path}: cannot read CSV: {e}") from None


def _iter_generated(rest: str) -> Iterator[tuple[str, object]]:
    """The pairs of a generated task as explicit-prompt rows (the task name is set by :func:`read_pairs`)."""
    from amalab.llm.generated import generate_task, parse_source

    for index, pair in enumerate(generate_task(parse_source(rest)).pairs):
        yield f"generated:{rest}: pair {index}", {"prompt": pair.prompt, "chosen": pair.chosen,
                                                   "rejected": pair.rejected}


def _string_field(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise ConfigError(f"{where}: field {key!r}: missing")
    value = row[key]
    if not isinstance(value, str):
        hint = " (conversational message lists are not supported)" if isinstance(value, list) else ""
        raise ConfigError(f"{where}: field {key!r}: expected a string, got {type(value).__name__}{hint}")
    return value


def read_pairs(source: str, task: str, split: str = "train", base_dir: str | Path = ".",
               ) -> tuple[list[PreferencePair], dict[str, int], int]:
    """All usable pairs of one source, in file order, with the dropped-row counts and the number of rows.

    The format (explicit or implicit prompt) is decided by the first row: if it has a ``prompt`` field,
    every row must have one.
    """
    dropped = dict.fromkeys(DROP_REASONS, 0)
    pairs: list[PreferencePair] = []
    seen: set[str] = set()
    explicit = None
    rows = 0
    for where, row in _read_rows(source, split, Path(base_dir)):
        rows += 1
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object with fields chosen and rejected, "
                              f"got {type(row).__name__}")
        if explicit is None:
            explicit = "prompt" in row
        chosen = _string_field(row, "chosen", where)
        rejected = _string_field(row, "rejected", where)
        dialogue = False
        if explicit:
            prompt = _string_field(row, "prompt", where)
        else:
            dialogue = is_dialogue(chosen) or is_dialogue(rejected)
            prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
        if chosen == rejected:
            dropped["identical_chosen_rejected"] += 1
        elif dialogue and not prompt.endswith(ASSISTANT_MARKER):
            # "\n\nHuman: hi" vs "\n\nHuman: hello" would split mid-word into "h" / "i" / "ello"
            dropped["no_assistant_turn"] += 1
        elif not chosen.strip() or not rejected.strip():
            dropped["empty_completion"] += 1
        elif not prompt.strip():
            dropped["empty_prompt"] += 1
        else:
            pair_id = example_id(prompt, chosen, rejected)
            if pair_id in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(pair_id)
                pairs.append(PreferencePair(pair_id, task, prompt, chosen, rejected))
    return pairs, dropped, rows


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
            from amalab.llm.generated import with_verified_labels  # imported here: it imports this module

            eval_pairs = with_verified_labels(eval_pairs)
    return TaskData(config.name, train, eval_pairs, dropped, source, rows)


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items() if n) or "none"


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


__all__ = [
    "ASSISTANT_MARKER", "DROP_REASONS", "PreferencePair", "SHARED_DATA", "TaskConfig", "TaskData",
    "check_distinct_task_names", "example_id", "held_out_count", "load_task", "load_tasks", "read_pairs", "select_by_hash",
    "split_shared_prompt", "source_kind",
]

"""Sources of preference pairs: what a ``source`` string names, the reader of each kind, and the usable pairs.

Source kinds (:func:`source_kind`): a local file (``.jsonl``, ``.jsonl.gz``, ``.json`` list of objects,
``.parquet``), ``hf:<dataset id>`` (Hugging Face ``datasets``, needs a network), ``truthfulqa:<csv path>``
and ``generated:<family>?n=..&hardness=..&noise=..&seed=..`` (:mod:`amalab.llm.data.synthetic`).

Row formats (each file is one format, decided by its first row):

- explicit prompt (TRL's standard preference format): string fields ``prompt``, ``chosen``, ``rejected``;
- implicit prompt (HH-RLHF style): ``chosen`` and ``rejected`` are whole transcripts sharing a prefix,
  which becomes the prompt (:func:`~amalab.llm.data.pairs.split_shared_prompt`); dialogue transcripts whose
  shared prefix holds no ``"\\n\\nAssistant:"`` turn have no reply to split off and are dropped
  (``no_assistant_turn``);
- TruthfulQA (source ``truthfulqa:<csv>``): ``Best Answer`` preferred to ``Best Incorrect Answer``;
- generated (source ``generated:<family>?...``): verifiable pairs the project makes itself, as
  explicit-prompt rows.

Extra fields are ignored. A field that is missing or not a string, malformed JSON and a missing file are
errors (:class:`ConfigError`, one line naming the file, line and field); rows that are merely unusable are
dropped and counted per reason (:data:`DROP_REASONS`).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from amalab.errors import ConfigError
from amalab.llm.data.pairs import (
    ASSISTANT_MARKER, PreferencePair, example_id, is_dialogue, single_turn_prompt, split_shared_prompt,
)
from amalab.llm.data.synthetic.generator import generate_task, parse_source

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

FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
TRUTHFULQA_COLUMNS = ("Question", "Best Answer", "Best Incorrect Answer")


def source_kind(source: str) -> tuple[str, str]:
    """``("hf", id)``, ``("truthfulqa", csv path)``, ``("generated", family?knobs)`` or ``("file", path)``."""
    for kind in ("hf", "truthfulqa", "generated"):
        if source.startswith(kind + ":"):
            return kind, source[len(kind) + 1:]
    return "file", source


def check_source(source, name: str) -> None:
    """ValueError unless ``source`` names a dataset of a known kind (``name``: its config field)."""
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
        parse_source(rest)  # unknown family or a bad knob: ConfigError, a ValueError


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


def _iter_truthfulqa(path: Path) -> Iterator[tuple[str, object]]:
    """TruthfulQA rows as explicit-prompt rows, in the HH dialogue form.

    Needs the January 2025 release (TruthfulQA-2025-790.csv): its ``Best Incorrect Answer`` is the
    curated wrong answer of the binary-choice setting, so each question gives exactly one pair,
    chosen = ``Best Answer``, rejected = ``Best Incorrect Answer`` (the 2023 release lacks that column).
    The question becomes ``"\\n\\nHuman: <question>\\n\\nAssistant:"`` and the answers start with a space
    (:func:`~amalab.llm.data.pairs.single_turn_prompt`).
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
                    "prompt": single_turn_prompt(values["Question"].strip()),
                    "chosen": " " + values["Best Answer"].strip(),
                    "rejected": " " + values["Best Incorrect Answer"].strip(),
                }
    except csv.Error as e:
        raise ConfigError(f"{path}: cannot read CSV: {e}") from None


def _iter_generated(rest: str) -> Iterator[tuple[str, object]]:
    """The pairs of a generated task as explicit-prompt rows (the task name is set by :func:`read_pairs`)."""
    for index, pair in enumerate(generate_task(parse_source(rest)).pairs):
        yield f"generated:{rest}: pair {index}", {"prompt": pair.prompt, "chosen": pair.chosen,
                                                   "rejected": pair.rejected}


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


# --- rows to pairs -----------------------------------------------------------------------------------

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
    every row must have one. ``base_dir``: the folder relative file paths are read from.
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

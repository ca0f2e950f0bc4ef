"""Results on disk: the output folder (checked writable, locked against a second run), results.json and
its CSVs, a strict reader that rejects malformed results with one line, and the comparison of a run with
committed results.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from amalab.atomic_write import write_json_atomic, write_text_atomic
from amalab.errors import ConfigError

CSV_FILES = ("rates.csv", "worst_task.csv", "exp3.csv")


@contextlib.contextmanager
def locked_output_folder(out: Path):
    """Create ``out`` if needed and hold ``out/.lock`` while the body runs.

    Raises ConfigError (one line) if ``out`` cannot be created or written (a read-only folder, a parent
    that is a file), or if another run holds the lock: two runs into one folder would mix their
    checkpoints and overwrite each other's results.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a")
    except OSError as e:
        raise ConfigError(f"{out}: cannot write the output folder: {e.strerror or e}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{out}: another amalab run is writing to this folder (it holds {out / '.lock'}); "
                              "wait for it to finish or choose another --out") from None
        if not os.access(out, os.W_OK):  # root passes this; the write below then fails the same way
            raise ConfigError(f"{out}: cannot write the output folder: permission denied")
        try:
            yield out
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_results(record: dict, out_dir: Path) -> list[Path]:
    """results.json (everything) plus one CSV per experiment, for people who want a spreadsheet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json"] + [out_dir / name for name in CSV_FILES]
    write_json_atomic(paths[0], record, indent=1, allow_nan=True)
    for path, rows in zip(paths[1:], (_rate_rows(record), _worst_task_rows(record), _exp3_rows(record))):
        text = io.StringIO(newline="")
        csv.writer(text).writerows(rows)
        write_text_atomic(path, text.getvalue())
    return paths


def _rate_rows(record: dict):
    yield ["loss", "algorithm", "T", "seed", "gap", "bound", "opt"]
    for loss, entry in record["rates"].items():
        for algorithm, r in entry["algorithms"].items():
            for T, gaps, bound in zip(entry["horizons"], r["gap"], r["bound"]):
                for s, gap in enumerate(gaps):
                    yield [loss, algorithm, T, s, f"{gap:.6e}", f"{bound:.6e}", f"{entry['opt']:.9e}"]


def _worst_task_rows(record: dict):
    wt = record["worst_task"]
    yield ["algorithm", "seed"] + [f"E_{i}" for i in range(len(wt["task_names"]))] + ["worst", "opt"]
    for algorithm, r in wt["algorithms"].items():
        for s, excess in enumerate(r["task_excess"]):
            yield [algorithm, s] + [f"{e:.6e}" for e in excess] + [f"{max(excess):.6e}", f"{wt['opt']:.6e}"]


def _exp3_rows(record: dict):
    yield ["sequence", "T", "gamma", "mean_regret", "stderr", "bound"]
    for sequence, r in record["exp3"]["sequences"].items():
        for row in zip(r["horizons"], r["gamma"], r["mean_regret"], r["stderr"], r["bound"]):
            yield [sequence, *row]


# ------------------------------------------------------------------------------------ strict reading

class _Invalid(Exception):
    pass


def _get(node, key: str, where: str):
    if not isinstance(node, dict):
        raise _Invalid(f"{where}: expected a table, got {type(node).__name__}")
    if key not in node:
        raise _Invalid(f"{where}: missing field {key!r}")
    return node[key]


def _table(node, key: str, where: str) -> dict:
    value = _get(node, key, where)
    if not isinstance(value, dict) or not value:
        raise _Invalid(f"{where}.{key}: expected a non-empty table")
    return value


def _numbers(node, key: str, where: str, shape: tuple | None = None) -> np.ndarray:
    """A finite numeric array (optionally of ``shape``, -1 for any length >= 1)."""
    value = _get(node, key, where)
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise _Invalid(f"{where}.{key}: expected numbers, got {str(value)[:60]}") from None
    if arr.size == 0:
        raise _Invalid(f"{where}.{key}: is empty")
    if not np.all(np.isfinite(arr)):
        raise _Invalid(f"{where}.{key}: contains a non-finite value (NaN or infinity)")
    if shape is not None and (arr.ndim != len(shape) or any(s not in (-1, n) for s, n in zip(shape, arr.shape))):
        raise _Invalid(f"{where}.{key}: expected shape {tuple('any' if s == -1 else s for s in shape)}, "
                       f"got {arr.shape}")
    return arr


def _validate(record) -> None:
    if not isinstance(record, dict):
        raise _Invalid("expected a JSON object")
    checks = _table(_table(record, "config", "results"), "checks", "config")
    for name in ("slope_horizons", "slope_gate", "duality_slope_gate", "gap_tolerance", "exp3_z"):
        value = _get(checks, name, "config.checks")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _Invalid(f"config.checks.{name}: expected a number, got {value!r}")
    for loss, entry in _table(record, "rates", "results").items():
        where = f"rates.{loss}"
        T = _numbers(entry, "horizons", where, (-1,))
        _numbers(entry, "opt", where, ())
        if len(T) < checks["slope_horizons"]:
            raise _Invalid(f"{where}.horizons: {len(T)} horizons, fewer than slope_horizons = "
                           f"{checks['slope_horizons']}")
        for algorithm, r in _table(entry, "algorithms", where).items():
            w = f"{where}.algorithms.{algorithm}"
            _numbers(r, "gap", w, (len(T), -1))
            for key in ("median", "q25", "q75", "bound"):
                _numbers(r, key, w, (len(T),))
            for key in ("slope", "slope_se"):
                _numbers(r, key, w, ())
            if "duality_gap" in r:
                _numbers(r, "duality_gap", w, (len(T),))
                _numbers(r, "duality_slope", w, ())
    wt = _get(record, "worst_task", "results")
    names = _get(wt, "task_names", "worst_task")
    _numbers(wt, "opt", "worst_task", ())
    _numbers(wt, "horizon", "worst_task", ())
    for algorithm, r in _table(wt, "algorithms", "worst_task").items():
        w = f"worst_task.algorithms.{algorithm}"
        _numbers(r, "task_excess", w, (-1, len(names)))
        seeds = len(r["task_excess"])
        _numbers(r, "average_weights", w, (seeds, len(names)))
        C = len(_numbers(r, "curve_steps", w, (-1,)))
        _numbers(r, "curve", w, (seeds, C))
    exp3 = _get(record, "exp3", "results")
    _numbers(exp3, "k", "exp3", ())
    for sequence, r in _table(exp3, "sequences", "exp3").items():
        w = f"exp3.sequences.{sequence}"
        n = len(_numbers(r, "horizons", w, (-1,)))
        for key in ("gamma", "mean_regret", "stderr", "bound"):
            _numbers(r, key, w, (n,))


def load_results(path: str | Path) -> dict:
    """Read a results.json, rejecting with one line (ConfigError) anything the checks or figures cannot use."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such results file (run `amalab convex-rates CONFIG` first)")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a results file: not UTF-8 text (a binary file?)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not a results file: invalid JSON: {e}") from None
    try:
        _validate(record)
    except _Invalid as e:
        raise ConfigError(f"{path}: not a valid convex-rates results file: {e}") from None
    return record


# ---------------------------------------------------------------------------------------- comparison

def _read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _cells_differ(a: str, b: str, rtol: float) -> bool:
    if a == b:
        return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return True
    return not math.isclose(x, y, rel_tol=rtol, abs_tol=1e-15)


#: config fields that do not change the numbers
_RUN_ONLY_FIELDS = ("out", "compare_with", "workers")


def _configs_differ(new_dir: Path, committed_dir: Path) -> list[str]:
    """Top-level config tables (or fields) in which the two runs' results.json differ."""
    try:
        a, b = (json.loads((d / "results.json").read_text())["config"] for d in (new_dir, committed_dir))
    except (OSError, ValueError, KeyError, TypeError):
        return ["(the committed config could not be read)"]
    return sorted(key for key in set(a) | set(b) if key not in _RUN_ONLY_FIELDS and a.get(key) != b.get(key))


def compare_results(new_dir: Path, committed_dir: Path, rtol: float = 1e-6) -> list[str]:
    """One line per CSV saying whether ``new_dir``'s numbers equal ``committed_dir``'s (to ``rtol``), and
    a first line naming the config tables that differ (which explains differing numbers)."""
    differ = _configs_differ(new_dir, committed_dir)
    lines = [f"configs differ in: {', '.join(differ)}" if differ else "same config as the committed run"]
    for name in CSV_FILES:
        new, old = new_dir / name, committed_dir / name
        if not old.is_file():
            lines.append(f"{name}: no committed copy in {committed_dir}")
            continue
        a, b = _read_csv(new), _read_csv(old)
        key_len = 4 if name == "rates.csv" else 2  # (loss, algorithm, T, seed), (algorithm, seed), (sequence, T)
        old_rows = {tuple(r[:key_len]): r for r in b[1:]}
        changed = added = 0
        for row in a[1:]:
            ref = old_rows.pop(tuple(row[:key_len]), None)
            if ref is None:
                added += 1
            elif len(ref) != len(row) or any(_cells_differ(x, y, rtol) for x, y in zip(row, ref)):
                changed += 1
        if a[0] != b[0]:
            lines.append(f"{name}: DIFFERS: columns changed ({', '.join(b[0])} -> {', '.join(a[0])})")
        elif changed or added or old_rows:
            lines.append(f"{name}: DIFFERS: {changed} rows changed, {added} new, {len(old_rows)} gone "
                         f"(of {len(b) - 1} committed)")
        else:
            lines.append(f"{name}: matches ({len(a) - 1} rows, relative tolerance {rtol:g})")
    return lines

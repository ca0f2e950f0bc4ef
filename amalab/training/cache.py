"""Per-example values computed once without gradients and kept on disk (docs/maths.md section 11).

Two kinds: the reference policy's log-probs (log pi_ref(y_w|x), log pi_ref(y_l|x)) of every example, and
baseline losses s(z) (a task's specialist, or the standard generalist for DoReMi) of every example. A
generalist step then costs one policy forward and backward, as a plain DPO step with precomputed
reference log-probs does.

A cache is a folder: ``manifest.json`` (what the values were computed from: model fingerprint, data
hash, tokenization, loss, beta...), ``ids.json`` (example ids, in row order) and ``values.npz`` (float64
columns). It is written into a temporary folder and renamed into place, so a crash never leaves half a
cache. Opening a cache whose manifest differs from what the run asks for is an error naming the
differing fields: never a silent reuse. :func:`cached_arrays` keeps named arrays (a behaviour policy,
simulated segments) the same way, ``arrays.npz`` in place of the columns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from amalab.atomic_write import atomic_folder
from amalab.errors import ConfigError
from amalab.training.distributed import World, any_rank, decide_on_rank0, on_every_rank


class CacheMismatch(ConfigError):
    """A cache on disk was computed from something other than what this run asks for."""


def data_hash(ids: list[str]) -> str:
    """Hash of the ordered example ids (each id is itself a content hash of the example)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class ValueCache:
    """Per-example float64 columns keyed by example id."""

    def __init__(self, ids: list[str], columns: dict[str, np.ndarray]):
        self.ids = list(ids)
        self.columns = {name: np.asarray(col, dtype=np.float64) for name, col in columns.items()}
        for name, col in self.columns.items():
            if col.shape != (len(self.ids),):
                raise ValueError(f"cache column {name!r} has shape {col.shape}, expected ({len(self.ids)},)")
        self.row = {example_id: i for i, example_id in enumerate(self.ids)}
        if len(self.row) != len(self.ids):
            raise ValueError("cache ids are not unique")

    def get(self, name: str, ids: list[str]) -> np.ndarray:
        """Column ``name`` for ``ids``, in that order; a missing id is an error, never a default."""
        try:
            rows = [self.row[i] for i in ids]
        except KeyError as e:
            raise KeyError(f"example {e.args[0]} is not in the cache") from None
        return self.columns[name][rows]

    def __len__(self) -> int:
        return len(self.ids)


def _differences(found: dict, wanted: dict) -> list[str]:
    keys = sorted(set(found) | set(wanted))
    return [f"{k}: cached {found.get(k)!r}, wanted {wanted.get(k)!r}" for k in keys if found.get(k) != wanted.get(k)]


def has_cache(folder: Path, manifest: dict) -> bool:
    """True if ``folder`` holds a cache computed from ``manifest``, False if it holds none; CacheMismatch if
    it holds one computed from something else (naming the differing fields): never a silent reuse."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return False
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CacheMismatch(f"{folder}: unreadable cache ({e}); delete the folder to rebuild it") from None
    differences = _differences(found, json.loads(json.dumps(manifest)))
    if differences:
        raise CacheMismatch(f"{folder}: the cache was computed from something else ({'; '.join(differences)}); "
                            "delete the folder to rebuild it, or use another run directory")
    return True


def load_cache(folder: Path, manifest: dict) -> ValueCache | None:
    """The cache in ``folder`` if there is one; None if there is none; CacheMismatch if it differs."""
    folder = Path(folder)
    if not has_cache(folder, manifest):
        return None
    try:
        ids = json.loads((folder / "ids.json").read_text())
        with np.load(folder / "values.npz") as values:
            columns = {name: values[name] for name in values.files}
    except (OSError, ValueError) as e:
        raise CacheMismatch(f"{folder}: unreadable cache ({e}); delete the folder to rebuild it") from None
    return ValueCache(ids, columns)


def save_cache(folder: Path, manifest: dict, cache: ValueCache) -> None:
    """Write atomically (:func:`amalab.atomic_write.atomic_folder`): a temporary sibling folder, fsynced,
    then renamed over ``folder``."""
    with atomic_folder(folder) as tmp:
        (tmp / "ids.json").write_text(json.dumps(cache.ids))
        np.savez(tmp / "values.npz", **cache.columns)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))


def cached(folder: Path, manifest: dict, build: Callable[[], ValueCache], log=print,
           world: World = World()) -> ValueCache:
    """Load the cache in ``folder`` if it matches ``manifest``, else build it with ``build()`` and save it.

    Under several ranks: every rank builds (``build`` is then sharded, a collective) unless every rank finds
    the cache; rank 0 writes, and no rank returns before the folder is complete. A cache one rank cannot use
    (computed from something else, unreadable) and rank 0's failure to save stop every rank with that error
    (docs/distributed.md, "Decisions every rank shares").
    """
    # each rank reads its own disk: one rank's CacheMismatch raised alone would leave the others in any_rank
    cache = on_every_rank(world, lambda: load_cache(folder, manifest))
    if not any_rank(cache is None, world):
        log(f"reusing {folder} ({len(cache)} examples)")
        return cache
    cache = build()
    # rank 0 writes; the others wait in its broadcast, so none reads the folder before it is complete
    decide_on_rank0(world, lambda: save_cache(folder, manifest, cache))
    return cache


def cached_arrays(folder: Path, manifest: dict, build: Callable[[], dict[str, np.ndarray]],
                  log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """Named arrays (not per-example columns: a behaviour policy, simulated segments) in a cache folder of
    their own, ``manifest.json`` and ``arrays.npz``: those in ``folder`` if its manifest is ``manifest``,
    else ``build()``, saved there first (atomically)."""
    folder = Path(folder)
    if has_cache(folder, manifest):
        with np.load(folder / "arrays.npz") as arrays:
            log(f"reusing {folder}")
            return {name: arrays[name] for name in arrays.files}
    arrays = build()
    with atomic_folder(folder) as temp:
        np.savez(temp / "arrays.npz", **arrays)
        (temp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return arrays

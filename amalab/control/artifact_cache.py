"""Arrays computed once and kept on disk with the manifest of what they were computed from (as the LLM
caches of docs/maths.md section 11): behaviour policies and simulated segments.

A cache is a folder with ``manifest.json`` and ``arrays.npz``, written whole by
:func:`~amalab.atomic_write.atomic_folder`; a folder whose manifest differs from the one asked for is an
error naming the differing fields, never a silent reuse.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from amalab.atomic_write import atomic_folder
from amalab.llm.cache import CacheMismatch


def cached_arrays(folder: Path, manifest: dict, build: Callable[[], dict[str, np.ndarray]],
                  log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """The arrays in ``folder`` if its manifest is ``manifest``; else ``build()``, saved there first."""
    folder = Path(folder)
    wanted = json.loads(json.dumps(manifest))
    if (folder / "manifest.json").is_file():
        found = json.loads((folder / "manifest.json").read_text())
        differing = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        if differing:
            raise CacheMismatch(f"{folder}: computed from other settings (differs in {', '.join(differing)}); "
                                "delete the folder to rebuild it, or use another `out`")
        with np.load(folder / "arrays.npz") as arrays:
            log(f"reusing {folder}")
            return {name: arrays[name] for name in arrays.files}
    arrays = build()
    with atomic_folder(folder) as temp:
        np.savez(temp / "arrays.npz", **arrays)
        (temp / "manifest.json").write_text(json.dumps(wanted, indent=1, sort_keys=True))
    return arrays

"""The real preference pairs the benchmarks and timing scripts measure on: HH-RLHF harmless-base test.

The offline data folder is ``$AMALAB_SHARED_DATA`` when set, else ``../shared/data`` beside the repository
checkout; the datasets are read in place, never copied into the repository. Every script that reads them
takes ``--data`` to name another file.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from amalab.llm.data.pairs import ASSISTANT_MARKER, PreferencePair

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AMALAB_SHARED_DATA") or REPO.parent / "shared" / "data")
HH_HARMLESS = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def hh_pairs(limit: int, path: Path = HH_HARMLESS) -> list[PreferencePair]:
    """The first ``limit`` rows whose chosen and rejected share the prompt before the last reply.

    A minimal split at the last ``"\\n\\nAssistant:"`` of the chosen transcript, not the data module's
    loader (:func:`amalab.llm.data.sources.read_pairs`); ids name the line (``hh-harmless-test:<line>``).
    """
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            row = json.loads(line)
            cut = row["chosen"].rfind(ASSISTANT_MARKER) + len(ASSISTANT_MARKER)
            prompt = row["chosen"][:cut]
            if not row["rejected"].startswith(prompt):
                continue
            pairs.append(PreferencePair(f"hh-harmless-test:{line_number}", "harmless", prompt,
                                        row["chosen"][cut:], row["rejected"][cut:]))
            if len(pairs) == limit:
                break
    return pairs

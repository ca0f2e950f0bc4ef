"""Real HH-RLHF harmless-base pairs for the SmolLM2 test and timing, split at the last "Assistant:" turn.

Read from the shared data folder (never copied into the repo); a minimal split, not the data module's loader.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from amalab.llm.data import SHARED_DATA, PreferencePair

HH_HARMLESS_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SEPARATOR = "\n\nAssistant:"


def hh_pairs(limit: int, path: Path = HH_HARMLESS_TEST) -> list[PreferencePair]:
    """The first ``limit`` rows whose chosen and rejected share the prompt before the last reply."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            row = json.loads(line)
            cut = row["chosen"].rfind(SEPARATOR) + len(SEPARATOR)
            prompt = row["chosen"][:cut]
            if not row["rejected"].startswith(prompt):
                continue
            pairs.append(PreferencePair(f"hh-harmless-test:{line_number}", "harmless", prompt,
                                        row["chosen"][cut:], row["rejected"][cut:]))
            if len(pairs) == limit:
                break
    return pairs

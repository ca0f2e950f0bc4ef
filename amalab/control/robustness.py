"""Whether a body's committed results survive a rerun: the main comparison recomputed from scratch, plain or
with every reset state nudged by one ulp (:func:`~amalab.control.simulator.resets_nudged_by_one_ulp`, as
another machine's instruction set might move it), and compared with the committed summary: the tasks left
out, the worst-task means (docs/maths.md (63)) and the paired verdicts ((65)).

``experiments/mujoco_diagnostic/one_ulp.py`` prints the comparison; a slow test holds Hopper's committed
summary to it (the tolerance is the README's).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from amalab.control.config import load_diagnose_config
from amalab.control.diagnose import diagnose
from amalab.control.simulator import resets_nudged_by_one_ulp
from amalab.control.summary import verdicts


def main_comparison_config(text: str, out: Path) -> str:
    """A config's text with its sweeps and ``[run]`` table dropped, writing into ``out`` (no figures), run in
    this process (where a nudge applies)."""
    text = re.sub(r"^\[(sweeps|run)\]\n(?:(?!\[).*\n?)*", "", text, flags=re.M) + "\n[run]\nworkers = 1\n"
    text = re.sub(r"^out = .*$", f'out = "{out}"', text, flags=re.M)
    return re.sub(r"^figures = .*$", 'figures = ""', text, flags=re.M)


def rerun_main(path: str | Path, out: Path, nudged: bool) -> dict:
    """The main comparison of the config at ``path`` recomputed into ``out``: its summary's ``main``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(main_comparison_config(Path(path).read_text(), out))
    with resets_nudged_by_one_ulp() if nudged else contextlib.nullcontext():
        return diagnose(load_diagnose_config(out / "config.toml"), show_progress=False)["main"]


def committed_main(path: str | Path) -> dict:
    """The ``main`` of the summary the config at ``path`` committed into its figures folder."""
    return json.loads((Path(load_diagnose_config(path).figures) / "summary.json").read_text())["main"]


def compare_mains(committed: dict, rerun: dict) -> dict:
    """The tasks each leaves out, each method's worst-task mean rerun minus committed, and the verdicts kept,
    lost and new."""
    deltas = {m: rerun["methods"][m]["worst"]["mean"] - c["worst"]["mean"]
              for m, c in committed["methods"].items() if c["worst"] and rerun["methods"][m]["worst"]}
    kept, was = set(verdicts(rerun)), set(verdicts(committed))
    return {"left_out": {"rerun": rerun["left_out"], "committed": committed["left_out"]}, "worst_deltas": deltas,
            "kept": sorted(kept & was), "lost": sorted(was - kept), "new": sorted(kept - was)}

"""Rerun a body's main comparison with every reset state nudged by one ulp and compare it with the committed
summary: the tasks left out, the worst-task means and the paired verdicts (docs/maths.md (65)).

    OMP_NUM_THREADS=1 python experiments/mujoco_diagnostic/one_ulp.py experiments/mujoco_diagnostic/halfcheetah.toml

One worker (the nudge lives in this process), outputs under /tmp/one_ulp/<config name>; about 6 minutes for
HalfCheetah on one core.
"""

import json
import re
import sys
from pathlib import Path

from amalab.control.simulator import resets_nudged_by_one_ulp
from amalab.control.config import load_diagnose_config
from amalab.control.diagnose import diagnose
from amalab.control.summary import verdicts


def main(path: str) -> None:
    text = Path(path).read_text()
    committed = json.loads((Path(load_diagnose_config(path).figures) / "summary.json").read_text())["main"]
    out = Path("/tmp/one_ulp") / Path(path).stem
    # the main comparison alone, in this process: drop the [sweeps] and [run] tables, then run one worker
    text = re.sub(r"^\[(sweeps|run)\]\n(?:(?!\[).*\n?)*", "", text, flags=re.M) + "\n[run]\nworkers = 1\n"
    text = re.sub(r"^out = .*$", f'out = "{out}"', text, flags=re.M)
    text = re.sub(r"^figures = .*$", 'figures = ""', text, flags=re.M)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(text)
    with resets_nudged_by_one_ulp():
        nudged = diagnose(load_diagnose_config(out / "config.toml"), show_progress=False)["main"]
    print("left out: nudged", nudged["left_out"], "committed", committed["left_out"])
    deltas = {m: nudged["methods"][m]["worst"]["mean"] - c["worst"]["mean"]
              for m, c in committed["methods"].items() if c["worst"]}
    print("worst-task mean, nudged minus committed:", {m: round(v, 3) for m, v in deltas.items()})
    kept, was = set(verdicts(nudged)), set(verdicts(committed))
    print(f"verdicts: {len(kept & was)} kept, {len(was - kept)} lost, {len(kept - was)} new")
    print("lost:", sorted(was - kept))
    print("new:", sorted(kept - was))


if __name__ == "__main__":
    main(sys.argv[1])

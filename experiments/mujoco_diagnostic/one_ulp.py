"""Rerun a body's main comparison with every reset state nudged by one ulp and compare it with the committed
summary: the tasks left out, the worst-task means and the paired verdicts (docs/maths.md (65);
amalab/control/robustness.py).

    OMP_NUM_THREADS=1 python experiments/mujoco_diagnostic/one_ulp.py experiments/mujoco_diagnostic/halfcheetah.toml

One worker (the nudge lives in this process), outputs under /tmp/one_ulp/<config name>; about 6 minutes per
body on one core.
"""

import sys
from pathlib import Path

from amalab.control.robustness import committed_main, compare_mains, rerun_main


def main(path: str) -> None:
    found = compare_mains(committed_main(path), rerun_main(path, Path("/tmp/one_ulp") / Path(path).stem, nudged=True))
    print("left out: nudged", found["left_out"]["rerun"], "committed", found["left_out"]["committed"])
    print("worst-task mean, nudged minus committed:", {m: round(v, 3) for m, v in found["worst_deltas"].items()})
    print(f"verdicts: {len(found['kept'])} kept, {len(found['lost'])} lost, {len(found['new'])} new")
    print("lost:", found["lost"])
    print("new:", found["new"])


if __name__ == "__main__":
    main(sys.argv[1])

"""The suite's conclusions survive float-level differences (docs/maths.md (65)): every simulator state
after a reset nudged by one ulp, as another machine's instruction set might, leaves the verdicts unchanged.
The tiny config's version runs by default; the shipped config's, with its committed summary, is slow."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from amalab.control import simulator  # noqa: E402
from amalab.control.config import load_diagnose_config  # noqa: E402
from amalab.control.diagnose import diagnose  # noqa: E402
from amalab.control.summary import verdicts  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nudge_states(monkeypatch):
    """Calling it makes every reset state one ulp larger in each position coordinate (this process only:
    the runs below use one worker)."""
    real = simulator.Simulators.reset

    def nudged(self, seeds):
        real(self, seeds)
        for env in self.envs[:len(seeds)]:
            env.set_state(np.nextafter(env.data.qpos, np.inf), env.data.qvel.copy())
        return np.stack([env._get_obs() for env in self.envs[:len(seeds)]])

    return lambda: monkeypatch.setattr(simulator.Simulators, "reset", nudged)


def _main_only(text: str) -> str:
    return text[:text.index("[sweeps]")] + "\n[run]\nworkers = 1\n"


def test_one_ulp_leaves_the_tiny_configs_verdicts_unchanged(make_tiny_config, tmp_path, nudge_states):
    plain = diagnose(load_diagnose_config(make_tiny_config(_main_only)), show_progress=False)
    nudge_states()
    path = make_tiny_config(_main_only)
    path.write_text(path.read_text().replace(str(tmp_path / "out"), str(tmp_path / "nudged")))
    nudged = diagnose(load_diagnose_config(path), show_progress=False)
    assert nudged["main"]["methods"]["standard"]["returns"] != plain["main"]["methods"]["standard"]["returns"]
    assert verdicts(plain["main"]), "the test needs conclusions that are not all ties"
    assert verdicts(nudged["main"]) == verdicts(plain["main"])

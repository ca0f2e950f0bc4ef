"""`amalab diagnose` needs the mujoco extra only: the tiny config runs end to end in a Python where importing
transformers or peft fails, and importing the suite imports neither."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

ROOT = Path(__file__).resolve().parents[2]

#: a sitecustomize.py (run at start-up) whose meta-path finder refuses transformers and peft, as if they were
#: not installed, and logs every attempt to the file named by $BLOCKED_LOG
BLOCKER = '''
import os
import sys

BLOCKED = ("transformers", "peft")


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(os.environ["BLOCKED_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{name} is blocked (the mujoco extra alone)")
        return None


sys.meta_path.insert(0, Blocker())
'''


def _python(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run this Python with the blocker on start-up and this checkout first on the path; (result, attempts)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "blocked.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "BLOCKED_LOG": str(log)}
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    return result, log.read_text().split() if log.exists() else []


def test_the_blocker_blocks(tmp_path):
    result, attempts = _python(tmp_path, "-c", "import transformers")
    assert result.returncode != 0 and "transformers is blocked" in result.stderr
    assert attempts == ["transformers"]


def test_importing_the_suite_imports_no_model_library(tmp_path):
    code = ("import sys, amalab.cli, amalab.control.diagnose; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft', 'trl'}))")
    result, attempts = _python(tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]" and attempts == []


def test_diagnose_runs_without_transformers_or_peft(tmp_path, tiny_config):
    result, attempts = _python(tmp_path, "-m", "amalab", "diagnose", str(tiny_config), "--quiet")
    assert result.returncode == 0, result.stderr
    assert attempts == []  # nothing even tried to import them
    for folder in (tmp_path / "out", tmp_path / "figures"):
        for name in ("summary.json", "table.md", "per_task.png", "sweeps.png"):
            assert (folder / name).is_file(), folder / name
    assert any((tmp_path / "out" / "models").rglob("records/ama-r-1.json"))

"""A diagnostic config built over another (``base``): its keys replace the base's, table by table."""

from pathlib import Path

import pytest

from amalab.cli import main
from amalab.control.config import load_diagnose_config


def test_a_config_over_its_base_replaces_only_what_it_names(tiny_config, tmp_path):
    full = tmp_path / "more" / "full.toml"
    full.parent.mkdir()
    full.write_text('base = "../tiny.toml"\nseed = 3\n\n[methods]\nseeds = 10\n\n[sweeps]\nseeds = 5\n')
    base, found = load_diagnose_config(tiny_config), load_diagnose_config(full)
    assert found.seed == 3 and found.methods.seeds == 10 and found.sweeps.seeds == 5
    # every other key is the base's: the tables' other keys, the tasks, the top level
    assert found.methods.names == base.methods.names and found.sweeps.imbalance == base.sweeps.imbalance
    assert found.tasks == base.tasks and found.out == base.out and found.behaviour == base.behaviour
    # [[tasks]] given in the config replace the base's list
    full.write_text('base = "../tiny.toml"\n\n[[tasks]]\nname = "back"\nvelocity = -1.0\n\n[train]\nbatch_size = 3\n')
    assert [t.name for t in load_diagnose_config(full).tasks] == ["back"]


@pytest.mark.parametrize("text, message", [
    ('base = "tiny.toml"\n', "leads back to this config"),
    ('base = "missing.toml"\n', "missing.toml: no such config file"),
    ("base = 3\n", "base: expected a path to a config, got 3"),
])
def test_a_bad_base_is_one_line(tiny_config, capsys, text, message):
    tiny_config.write_text(text + tiny_config.read_text())
    assert main(["diagnose", str(tiny_config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "experiments" / "mujoco_diagnostic").rglob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    """The configs the README names (default, full/ and tried/) parse and pass every check of their settings."""
    config = load_diagnose_config(path)
    assert config.tasks and config.out.startswith("runs/mujoco_diagnostic/")

"""Config keys under TRL's names (amalab/llm/old_names.py): an old name is one line naming the new one,
`amalab llm ... --out DIR` replaces the config's `out`, and the README's table lists every renamed key."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import trl
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from amalab.cli import main
from amalab.config import load_section
from amalab.errors import ConfigError
from amalab.llm.config import LLMConfig, LoraConfig, ModelConfig, OptimConfig, TokenizeConfig, load_llm_config
from amalab.llm.losses import PreferenceLoss
from amalab.llm.old_names import OLD_NAMES, TRL

ROOT = Path(__file__).resolve().parents[2]

#: config table -> the dataclass it fills ("" is the top level)
SECTIONS = {"": LLMConfig, "train": OptimConfig, "specialists.optim": OptimConfig, "loss": PreferenceLoss,
            "model": ModelConfig, "model.lora": LoraConfig, "tokenize": TokenizeConfig}

OPTIM = """max_steps = 1
batch_size = 2
learning_rate = 1e-2
max_grad_norm = 1.0
eval_steps = 0
save_steps = 0
save_total_limit = 1
per_device_eval_batch_size = 4
min_lr_rate = 0.1"""

CONFIG = """
out = "{out}"
device = "cpu"

[model]
name = "tiny"
tiny = {{ hidden_size = 16, intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, vocab_size = 300, seed = 0 }}
torch_compile = false

[tokenize]
max_length = 40
max_prompt_length = 24

[loss]
loss_type = "dpo"
beta = 0.1

[[tasks]]
name = "sums"
source = "generated:arithmetic?n=12&hardness=1&noise=0.0&seed=0"
held_out = 4

[[tasks]]
name = "more_sums"
source = "generated:arithmetic?n=12&hardness=1&noise=0.0&seed=1"
held_out = 4

[specialists.optim]
{optim}

[train]
{optim}

[methods]
names = ["standard"]

[generation]
enabled = false
"""

RENAMED = [(table, old, new, whose) for table, names in OLD_NAMES.items() for old, (new, whose) in names.items()]


def write_config(folder: Path, out: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(CONFIG.format(out=out, optim=OPTIM))
    return path


def test_the_config_under_the_new_names_loads(tmp_path):
    config = load_llm_config(write_config(tmp_path, tmp_path / "out"))
    assert (config.train.max_steps, config.specialists.optim.save_total_limit, config.train.min_lr_rate,
            config.loss.loss_type, config.model.torch_compile) == (1, 1, 0.1, "dpo", False)


@pytest.mark.parametrize("table, old, new, whose", RENAMED, ids=[f"{t}.{o}" for t, o, _, _ in RENAMED])
def test_an_old_name_is_one_line_naming_the_new_one(tmp_path, capsys, table, old, new, whose):
    path = write_config(tmp_path, tmp_path / "out")
    text = path.read_text()
    key = re.compile(rf"^{new} = ", re.M).search(text, text.index(f"\n[{table}]\n"))
    path.write_text(text[:key.start()] + f"{old} = " + text[key.end():])
    assert main(["llm", "run", str(path), "--quiet"]) == 2
    assert capsys.readouterr().err == f"amalab: error: {path}: [{table}] {old} is now {new} ({whose})\n"
    if (table, old) == ("train", "steps"):
        assert whose == "TRL's name"


def test_each_old_name_names_a_field_that_trl_has():
    dpo_fields = {f.name for f in dataclasses.fields(trl.DPOConfig)}
    schedule = inspect.signature(get_cosine_with_min_lr_schedule_with_warmup).parameters
    for table, names in OLD_NAMES.items():
        assert SECTIONS[table].old_names is names
        fields = {f.name for f in dataclasses.fields(SECTIONS[table])}
        for old, (new, whose) in names.items():
            assert new in fields and old not in fields, (table, old)
            assert new in (dpo_fields if whose == TRL else schedule), (table, new)


def test_out_on_the_command_line_replaces_the_configs_out(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path / "experiment", tmp_path / "config-out")
    monkeypatch.chdir(tmp_path)  # a relative --out is relative to the working folder, as for convex-rates
    assert main(["llm", "specialists", str(path), "--out", "cli-out", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli-out" / "specialists").iterdir()) == ["more_sums", "sums"]
    assert not (tmp_path / "config-out").exists()
    assert not (tmp_path / "experiment" / "cli-out").exists()


def readme_rows() -> list[list[str]]:
    """The cells of each row of the README's "Names a TRL user knows" table (header and rule left out)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Names a TRL user knows\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def keys_of(cell: str) -> list[tuple[str, str]]:
    """(table, key) of each key in a row's first cell: `[table] key` sets the table, a bare `key` keeps it."""
    table, keys = "", []
    for code in re.findall(r"`([^`]+)`", cell.split(" (was ")[0]):
        match = re.fullmatch(r"(?:\[([\w.]+)\] )?(\w+)", code)
        assert match, f"README table: cannot read the key {code!r}"
        table = match.group(1) if match.group(1) is not None else table
        keys.append((table, match.group(2)))
    return keys


def test_the_readme_table_lists_every_renamed_key_and_only_real_keys():
    rows = readme_rows()
    listed, renamed = [], set()
    for cells in rows:
        keys = keys_of(cells[0])
        listed += keys
        old = re.search(r"\(was `(\w+)`\)", cells[0])
        if old:
            assert len(keys) == 1, cells[0]
            renamed.add((keys[0][0], old.group(1), keys[0][1]))
    # [specialists.optim] takes [train]'s keys, as the README says
    assert OLD_NAMES["specialists.optim"] is OLD_NAMES["train"]
    assert renamed == {(table, old, new) for table, names in OLD_NAMES.items() if table != "specialists.optim"
                       for old, (new, _) in names.items()}
    for table, key in listed:
        assert key in {f.name for f in dataclasses.fields(SECTIONS[table])}, (table, key)
    assert len(rows) >= 20 and len(listed) == len(set(listed))


def test_the_readme_table_lists_every_optimizer_and_loss_key():
    listed = {key for cells in readme_rows() for key in keys_of(cells[0])}
    for table, section in (("train", OptimConfig), ("loss", PreferenceLoss)):
        missing = {f.name for f in dataclasses.fields(section)} - {key for t, key in listed if t == table}
        assert not missing, f"README's TRL names table: add [{table}] {sorted(missing)}"


def test_the_diagnostic_suites_loss_table_takes_loss_type_too():
    control = pytest.importorskip("amalab.control.config")
    with pytest.raises(ConfigError) as error:
        load_section(control.LossConfig, {"name": "dpo"}, "config.toml", "loss")
    assert str(error.value) == "config.toml: [loss] name is now loss_type (TRL's name)"
    assert load_section(control.LossConfig, {"loss_type": "ipo"}, "config.toml", "loss").loss_type == "ipo"

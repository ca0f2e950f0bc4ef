"""Config keys under TRL's names: the config loads under them, `amalab llm ... --out DIR` replaces the
config's `out`, and the table of docs/config.md lists every optimizer and loss key and only real keys."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from amalab.cli import main
from amalab.config import load_section
from amalab.errors import ConfigError
from amalab.llm.config import LLMConfig, LoraConfig, ModelConfig, TokenizeConfig, load_llm_config
from amalab.training.config import OptimConfig
from amalab.objectives.preference import PreferenceLoss

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


def write_config(folder: Path, out: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(CONFIG.format(out=out, optim=OPTIM))
    return path


def test_the_config_under_the_new_names_loads(tmp_path):
    config = load_llm_config(write_config(tmp_path, tmp_path / "out"))
    assert (config.train.max_steps, config.specialists.optim.save_total_limit, config.train.min_lr_rate,
            config.loss.loss_type, config.model.torch_compile) == (1, 1, 0.1, "dpo", False)


def test_out_on_the_command_line_replaces_the_configs_out(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path / "experiment", tmp_path / "config-out")
    monkeypatch.chdir(tmp_path)  # a relative --out is relative to the working folder, as for convex-rates
    assert main(["llm", "specialists", str(path), "--out", "cli-out", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli-out" / "specialists").iterdir()) == ["more_sums", "sums"]
    assert not (tmp_path / "config-out").exists()
    assert not (tmp_path / "experiment" / "cli-out").exists()


def readme_rows() -> list[list[str]]:
    """The cells of each row of docs/config.md's "Names a TRL user knows" table (header and rule left out)."""
    text = (ROOT / "docs" / "config.md").read_text()
    section = re.split(r"\n#+ Names a TRL user knows\n", text, maxsplit=1)[1].split("\n#", 1)[0]
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


def test_the_table_lists_only_real_keys_each_once():
    rows = readme_rows()
    listed = [key for cells in rows for key in keys_of(cells[0])]
    for table, key in listed:
        assert key in {f.name for f in dataclasses.fields(SECTIONS[table])}, (table, key)
    assert len(rows) >= 20 and len(listed) == len(set(listed))


def test_the_table_lists_every_optimizer_and_loss_key():
    listed = {key for cells in readme_rows() for key in keys_of(cells[0])}
    for table, section in (("train", OptimConfig), ("loss", PreferenceLoss)):
        missing = {f.name for f in dataclasses.fields(section)} - {key for t, key in listed if t == table}
        assert not missing, f"docs/config.md's TRL names table: add [{table}] {sorted(missing)}"


def test_the_diagnostic_suites_loss_table_takes_loss_type():
    control = pytest.importorskip("amalab.control.config")
    assert load_section(control.LossConfig, {"loss_type": "ipo"}, "config.toml", "loss").loss_type == "ipo"


# --- sequential AMA-R and micro-batches: refused only as real accumulation, once the world size is known

def amar_config(experiment, tmp_path: Path, micro: int, batch: int = 4, names: str = '["ama-r"]') -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return experiment(tmp_path, names=names, batch=str(batch),
                      **{"save_steps = 2\n": f"save_steps = 2\nmicro_batch_size = {micro}\n"})


def test_sequential_amar_takes_one_micro_batch_a_rank(tmp_path, experiment):
    """micro_batch_size = batch_size / world size is one micro-batch on each rank, not accumulation: the
    config loads (it was refused at load, compared with the global batch) and two ranks take it; one process,
    whose share is the whole batch of 4, refuses it in one line naming the setting, as does every rank of four
    when a batch of 6 gives ranks 0 and 1 two examples and micro-batches of one (also the ranks holding one
    example, so that no rank is left alone in a collective)."""
    from amalab.llm.stages.generalists import check_generalist_batches
    from amalab.training.distributed import World

    config = load_llm_config(amar_config(experiment, tmp_path, micro=2))
    assert (config.train.micro_batch_size, config.train.batch_size) == (2, 4)
    for rank in (0, 1):
        check_generalist_batches(config, World(rank, 2))
    check_generalist_batches(config, World(0, 4))
    with pytest.raises(ConfigError) as refused:
        check_generalist_batches(config, World())
    message = str(refused.value)
    assert message.startswith(f"{config.source_path}: [train] micro_batch_size = 2 is under the 4 examples "
                              "a rank")
    assert "[methods] ama-r" in message and "ama-r-sim" in message and "\n" not in message
    six = load_llm_config(amar_config(experiment, tmp_path / "six", micro=1, batch=6))
    for rank in range(4):  # ranks 0 and 1 hold 2 examples, ranks 2 and 3 one: all four refuse
        with pytest.raises(ConfigError, match=r"micro_batch_size = 1 is under the 2 examples a rank "
                                              r"\(batch_size 6 over 4 processes\)"):
            check_generalist_batches(six, World(rank, 4))
    # what is not sequential AMA-R, or not a split, is never refused
    check_generalist_batches(load_llm_config(amar_config(experiment, tmp_path / "sim", micro=1,
                                                         names='["ama-r-sim", "ama-s"]')), World())
    check_generalist_batches(load_llm_config(amar_config(experiment, tmp_path / "zero", micro=0)), World())


def test_one_process_refuses_sequential_amar_accumulation_before_any_generalist(tmp_path, capsys, experiment):
    config = amar_config(experiment, tmp_path, micro=2)
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "[train] micro_batch_size = 2 is under the 4 examples a rank" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run" / "generalists").exists()

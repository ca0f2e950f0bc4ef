"""The command line as a user meets it: the shipped config, clear one-line errors, and the README's command."""

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from amalab.cli import main
from amalab.convex.reproduction import ReproductionConfig, load_config
from amalab.convex.theory_checks import check_results

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "convex_rates" / "config.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _shipped_with(overrides: dict) -> str:
    """The shipped config's text with some `key = value` lines replaced (first occurrence after a table)."""
    text = CONFIG.read_text()
    for (table, key), value in overrides.items():
        start = text.index(f"[{table}]\n") if table else 0
        match = re.compile(rf"^{key} = .*$", re.M).search(text, start)
        text = text[:match.start()] + f"{key} = {value}" + text[match.end():]
    return text


def test_shipped_config_loads_and_matches_the_defaults():
    config = load_config(CONFIG)
    assert config == ReproductionConfig()  # the README's numbers come from the documented defaults


@pytest.mark.parametrize("edit,message", [
    ({("rates", "losses"): '["dpo", "kl"]'}, r"\[rates\]: losses: unknown 'kl'"),
    ({("rates.problem", "k"): "0"}, r"\[rates\]: the number of tasks k must be an integer >= 1|k must be"),
    ({("rates.problem", "sizes"): "[200, -120, 60]"}, r"sizes must be integers >= 1"),
    ({("worst_task.problem", "conflict_angle"): "170.0"}, r"\[worst_task\]: conflict_angle 170 degrees"),
    ({("rates", "seeds"): '"many"'}, r"\[rates\] seeds: expected int, got 'many'"),
    ({("rates", "horizons"): "[512, 256]"}, r"horizons must be distinct increasing"),
    ({("rates", "algorithms"): '["standard"]'}, r"algorithms \(rate checks\): unknown 'standard'"),
    ({("worst_task", "ama_s_gain_scale"): '"huge"'}, r"ama_s_gain_scale must be 'bound' or 'running'"),
    ({("rates.problem", "clip"): '"sometimes"'}, r"clip must be one of example, task, none"),
    ({("worst_task", "ama_s_gamma"): "1.5"}, r"\[worst_task\]: ama_s_gamma must lie in \(0, 1\], got 1.5"),
    ({("worst_task", "ama_s_gamma"): "0.0"}, r"ama_s_gamma must lie in \(0, 1\]"),
    ({("worst_task", "ama_s_gamma"): '"often"'}, r"ama_s_gamma must be 'theory' or a number"),
])
def test_bad_config_gives_one_clear_line(tmp_path, capsys, edit, message):
    path = _write(tmp_path, _shipped_with(edit))
    assert main(["convex-rates", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"amalab: error: {path}: ")
    assert re.search(message, err), err
    assert "Traceback" not in err and err.count("\n") == 1


def test_unknown_key_missing_file_and_bad_toml(tmp_path, capsys):
    assert main(["convex-rates", str(_write(tmp_path, "[rates]\nsteps = 3\n"))]) == 2
    assert f"{tmp_path / 'config.toml'}: [rates]: unknown key 'steps'; known keys: losses" in capsys.readouterr().err
    assert main(["convex-rates", str(tmp_path / "nope.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["convex-rates", str(_write(tmp_path, "seed = 0\nout = \n"))]) == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err and "line 2" in err
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_a_small_reproduction_end_to_end(tmp_path, capsys):
    """The whole pipeline on a reduced copy of the shipped config: results, CSVs, figures, checks."""
    text = _shipped_with({
        ("rates", "horizons"): "[256, 512, 1024, 2048]", ("rates", "seeds"): "3", ("rates", "slope_from"): "256",
        ("rates", "losses"): '["dpo", "hinge"]', ("worst_task", "horizon"): "512", ("worst_task", "seeds"): "2",
        ("exp3", "horizons"): "[256, 1024]", ("exp3", "seeds"): "8", ("", "workers"): "1",
    })
    out = tmp_path / "out"
    status = main(["convex-rates", str(_write(tmp_path, text)), "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert status == (1 if check_results(record) else 0)
    for name in ["results.json", "rates.csv", "worst_task.csv", "exp3.csv", "rates.png", "worst_task.png",
                 "exp3_regret.png"]:
        assert (out / name).stat().st_size > 0 and name in printed
    assert set(record["rates"]) == {"dpo", "hinge"}
    assert len(record["rates"]["dpo"]["algorithms"]["ama-s"]["gap"][0]) == 3
    assert len(record["rates"]["dpo"]["algorithms"]["ama-r-full"]["gap"][0]) == 1
    rows = (out / "rates.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4 * (1 + 3 + 3)
    # figures redraw from the saved results alone, and the checks rerun on them
    (out / "rates.png").unlink()
    assert main(["plot", str(out / "results.json")]) == 0 and (out / "rates.png").exists()
    assert main(["check", str(out / "results.json")]) == status


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_names_the_shipped_config_and_the_test_command():
    commands = _readme_commands()
    assert any("amalab convex-rates experiments/convex_rates/config.toml" in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(c for c in commands if "pytest" in c)
    assert "pytest" in ci and "-e \".[test]\"" in ci and "[test]" in test_command
    assert "torch" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.mark.slow
def test_readme_reproduction_command(tmp_path):
    """The README's main command, exactly as written (about 100 s on 2 cores): all checks pass."""
    command = next(c for c in _readme_commands() if "amalab convex-rates" in c)
    command = command.split("&&")[-1].strip() + f" --out {tmp_path} --quiet"
    done = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert check_results(json.loads((tmp_path / "results.json").read_text())) == []


def test_readme_python_example_runs():
    """cvxpylayers-style: the README's mixer example runs as written and does what it says."""
    readme = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    task_ids, coeffs = namespace["task_ids"], namespace["coeffs"]
    assert task_ids.shape == (12,) and coeffs.shape == (12,)
    active = namespace["losses"] > namespace["baseline_losses"]
    assert coeffs == pytest.approx(active / 12)  # AMA-S: unweighted mean of the clipped excess
    assert namespace["mixer"].steps == 1 and namespace["stats"].shape == (3, 3)


def test_interrupted_reproduction_resumes_without_rerunning_finished_jobs(tmp_path, monkeypatch):
    """Jobs finished before an interruption are checkpointed, reused on the next run, then cleaned up."""
    from amalab.convex import reproduction

    text = _shipped_with({
        ("rates", "horizons"): "[256, 512]", ("rates", "seeds"): "2", ("rates", "slope_from"): "256",
        ("rates", "losses"): '["dpo"]', ("worst_task", "horizon"): "256", ("worst_task", "seeds"): "2",
        ("exp3", "horizons"): "[256]", ("exp3", "seeds"): "4", ("", "workers"): "1",
    })
    config_path, out = _write(tmp_path, text), tmp_path / "out"
    calls = []
    real_rate_job = reproduction.rate_job

    def interrupted_rate_job(**kwargs):
        calls.append(kwargs["algorithm"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_rate_job(**kwargs)

    monkeypatch.setattr(reproduction, "rate_job", interrupted_rate_job)
    assert main(["convex-rates", str(config_path), "--out", str(out), "--quiet"]) == 130
    assert len(list((out / ".jobs").glob("*.json"))) == 1  # the job that finished is kept

    monkeypatch.setattr(reproduction, "rate_job", lambda **kw: calls.append(kw["algorithm"]) or real_rate_job(**kw))
    calls.clear()
    main(["convex-rates", str(config_path), "--out", str(out), "--quiet"])
    assert len(calls) == 2  # three rate jobs; the checkpointed one was not rerun
    assert not (out / ".jobs").exists() and (out / "results.json").exists()
    fresh = json.loads((out / "results.json").read_text())
    assert len(fresh["rates"]["dpo"]["algorithms"]) == 3

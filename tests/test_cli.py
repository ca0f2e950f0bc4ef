"""The command line as a user meets it: the shipped config, clear one-line errors, and the README's command."""

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from amalab.cli import main
from amalab.convex.config import ReproductionConfig, load_reproduction_config
from amalab.convex.theory_checks import check_results, failures

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
    config = load_reproduction_config(CONFIG)
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
    ({("rates", "batch_size"): "10"}, r"\[rates\]: batch_size = 10 does not suit algorithm 'ama-r': .*multiple"),
    ({("worst_task", "batch_size"): "4"}, r"\[worst_task\]: batch_size = 4 does not suit algorithm 'uniform'"),
    ({("checks", "slope_gate"): "0.1"}, r"\[checks\]: slope_gate must lie in \[-2, 0\)"),
    ({("checks", "slope_horizons"): "12"}, r"slope_horizons = 12 needs at least that many \[rates\] horizons"),
    ({("exp3", "seeds"): "1"}, r"\[exp3\]: seeds must be >= 2"),
    ({("", "out"): '" "'}, r"out must name an output folder"),
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


SMALL = {
    ("rates", "horizons"): "[256, 512, 1024, 2048]", ("rates", "seeds"): "3", ("checks", "slope_horizons"): "4",
    ("checks", "slope_gate"): "-0.1", ("checks", "duality_slope_gate"): "-0.3",
    ("rates", "losses"): '["dpo", "hinge"]', ("worst_task", "horizon"): "512", ("worst_task", "seeds"): "2",
    ("exp3", "horizons"): "[256, 1024]", ("exp3", "seeds"): "8", ("", "workers"): "1",
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A reduced copy of the shipped config, run once through the command line."""
    tmp = tmp_path_factory.mktemp("small")
    out = tmp / "out"
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["convex-rates", str(_write(tmp, _shipped_with(SMALL))), "--out", str(out), "--quiet"])
    return status, printed.getvalue(), out


def test_a_small_reproduction_end_to_end(small_run, capsys):
    """The whole pipeline on a reduced config: results, CSVs, figures, every gate printed, checks pass."""
    status, printed, out = small_run
    record = json.loads((out / "results.json").read_text())
    # 3 seeds and T <= 2048: the fixed seeds give median slopes < -0.1 (loose gates) and gaps far under bounds
    assert status == 0, printed
    for name in ["results.json", "rates.csv", "worst_task.csv", "exp3.csv", "rates.png", "worst_task.png",
                 "exp3_regret.png"]:
        assert (out / name).stat().st_size > 0 and name in printed
    assert set(record["rates"]) == {"dpo", "hinge"}
    assert len(record["rates"]["dpo"]["algorithms"]["ama-s"]["gap"][0]) == 3
    full = record["rates"]["dpo"]["algorithms"]["ama-r-full"]
    assert len(full["gap"][0]) == 1
    # weak duality: the duality gap of the averaged pair is at least the primal gap
    assert all(d >= g[0] - 1e-6 for d, g in zip(full["duality_gap"], full["gap"]))
    rows = (out / "rates.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4 * (1 + 3 + 3 + 3)  # losses x horizons x (ama-r-full, ama-r, ama-r-sim, ama-s seeds)
    for gate in ("slope of median gap, last 4 T <= -0.1", "slope of duality gap, last 4 T <= -0.3",
                 "gap >= -1e-06", "mean regret <= bound + 3 s.e."):
        assert gate in printed
    assert "compared with the committed results" in printed and "configs differ in: " in printed
    # figures redraw from the saved results alone, and the checks rerun on them
    (out / "rates.png").unlink()
    assert main(["plot", str(out / "results.json")]) == 0 and (out / "rates.png").exists()
    assert main(["check", str(out / "results.json")]) == 0
    assert "theory checks passed" in capsys.readouterr().out


def _broken(record: dict, how: str) -> dict:
    record = json.loads(json.dumps(record))
    if how == "empty rates":
        record["rates"] = {}
    elif how == "missing field":
        del record["rates"]["dpo"]["algorithms"]["ama-r"]["bound"]
    elif how == "nan gap":
        record["rates"]["dpo"]["algorithms"]["ama-r"]["gap"][1][0] = float("nan")
    elif how == "empty gap":
        record["rates"]["dpo"]["algorithms"]["ama-r"]["gap"] = []
    elif how == "missing gates":
        del record["config"]["checks"]
    return record


@pytest.mark.parametrize("how,message", [
    ("empty rates", "rates: expected a non-empty table"),
    ("missing field", "rates.dpo.algorithms.ama-r: missing field 'bound'"),
    ("nan gap", "rates.dpo.algorithms.ama-r.gap: contains a non-finite value"),
    ("empty gap", "rates.dpo.algorithms.ama-r.gap: is empty"),
    ("missing gates", "config: missing field 'checks'"),
    ("binary", "not UTF-8 text"),
    ("not json", "invalid JSON"),
])
@pytest.mark.parametrize("command", ["check", "plot"])
def test_check_and_plot_reject_malformed_results(small_run, tmp_path, capsys, how, message, command):
    record = json.loads((small_run[2] / "results.json").read_text())
    path = tmp_path / "results.json"
    if how == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif how == "not json":
        path.write_text("{rates: ")
    else:
        path.write_text(json.dumps(_broken(record, how)))
    capsys.readouterr()
    assert main([command, str(path)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.startswith(f"amalab: error: {path}: ")
    assert captured.err.count("\n") == 1 and "passed" not in captured.out
    assert not (tmp_path / "rates.png").exists()


def test_output_folder_errors_are_one_line(tmp_path, capsys):
    config = _write(tmp_path, _shipped_with(SMALL))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["convex-rates", str(config), "--out", str(blocker / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"amalab: error: {blocker / 'out'}: cannot write the output folder") and err.count("\n") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_one_line(tmp_path, capsys):
    config = _write(tmp_path, _shipped_with(SMALL))
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(["convex-rates", str(config), "--out", str(out), "--quiet"]) == 2
    finally:
        out.chmod(0o700)
    assert "cannot write the output folder" in capsys.readouterr().err


def test_second_run_into_the_same_folder_refuses(tmp_path, capsys):
    """A run holds OUT/.lock; another run into OUT refuses at once instead of mixing their files."""
    config = _write(tmp_path, _shipped_with(SMALL))
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running reproduction holds it
        assert main(["convex-rates", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "another amalab run is writing to this folder" in err and err.count("\n") == 1
    assert not (out / "results.json").exists()


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_names_the_shipped_config_and_the_test_command():
    commands = _readme_commands()
    assert any("amalab convex-rates experiments/convex_rates/config.toml" in c for c in commands)
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(c for c in commands if "pytest" in c)
    # CI runs the README's test command: the same installs (torch pinned first), then pytest
    steps = [step.strip() for step in test_command.split("&&")]
    assert steps[0] == "pip install torch==2.13.0" and "torch==2.13.0" in ci
    assert steps[1] == 'pip install -e ".[llm,test,mujoco,trl,cluster]"' and '-e ".[llm,test,mujoco,trl,cluster]"' in ci
    assert ci.index("torch==2.13.0") < ci.index('-e ".[llm,test,mujoco,trl,cluster]"') < ci.index("pytest")
    assert "torch" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


@pytest.mark.slow
def test_readme_reproduction_command(tmp_path):
    """The README's main command, exactly as written, from scratch: every CSV matches the committed one
    and every theory check passes (the default suite reruns a stated part: tests/convex/test_committed_results.py)."""
    command = next(c for c in _readme_commands() if "amalab convex-rates" in c)
    command = command.split("&&")[-1].strip() + f" --out {tmp_path} --quiet"
    done = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("rates.csv", "worst_task.csv", "exp3.csv"):
        assert f"{name}: matches" in done.stdout, done.stdout
    assert failures(check_results(json.loads((tmp_path / "results.json").read_text()))) == []


def test_docs_python_example_runs():
    """cvxpylayers-style: the mixer example of docs/config.md runs as written and does what it says."""
    docs = (ROOT / "docs" / "config.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", docs, re.S)
    namespace = {}
    exec(compile(example, "docs/config.md", "exec"), namespace)
    task_ids, coeffs = namespace["task_ids"], namespace["coeffs"]
    assert task_ids.shape == (12,) and coeffs.shape == (12,)
    active = namespace["losses"] > namespace["baseline_losses"]
    assert coeffs == pytest.approx(active / 12)  # AMA-S: unweighted mean of the clipped excess
    assert namespace["mixer"].steps == 1 and namespace["stats"].shape == (3, 3)


def test_interrupted_reproduction_resumes_without_rerunning_finished_jobs(tmp_path, monkeypatch):
    """Jobs finished before an interruption are checkpointed, reused on the next run, then cleaned up."""
    from amalab.convex import reproduction

    text = _shipped_with({
        ("rates", "horizons"): "[256, 512]", ("rates", "seeds"): "2", ("checks", "slope_horizons"): "2",
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
    assert len(calls) == 7  # eight rate jobs (4 algorithms x 2 horizons); the checkpointed one was not rerun
    assert not (out / ".jobs").exists() and (out / "results.json").exists()
    fresh = json.loads((out / "results.json").read_text())
    assert len(fresh["rates"]["dpo"]["algorithms"]) == 4


def test_a_stale_checkpoint_is_recomputed_and_the_run_says_so(tmp_path, monkeypatch, capsys):
    """A checkpoint left by a run on another problem (here: another noise level) is not reused."""
    from amalab.convex import reproduction

    small = {("rates", "horizons"): "[256, 512]", ("rates", "seeds"): "2", ("checks", "slope_horizons"): "2",
             ("rates", "losses"): '["dpo"]', ("worst_task", "horizon"): "256", ("worst_task", "seeds"): "2",
             ("exp3", "horizons"): "[256]", ("exp3", "seeds"): "4", ("", "workers"): "1"}
    out, calls = tmp_path / "out", []
    real_rate_job = reproduction.rate_job

    def interrupted_rate_job(**kwargs):
        calls.append(kwargs["algorithm"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_rate_job(**kwargs)

    monkeypatch.setattr(reproduction, "rate_job", interrupted_rate_job)
    assert main(["convex-rates", str(_write(tmp_path, _shipped_with(small))), "--out", str(out), "--quiet"]) == 130
    assert len(list((out / ".jobs").glob("*.json"))) == 1
    monkeypatch.setattr(reproduction, "rate_job", lambda **kw: calls.append(kw["algorithm"]) or real_rate_job(**kw))
    calls.clear()
    capsys.readouterr()
    other_noise = _shipped_with({**small, ("rates.problem", "noise"): "0.2"})
    main(["convex-rates", str(_write(tmp_path, other_noise)), "--out", str(out), "--quiet"])
    assert len(calls) == 8  # every rate job ran: the checkpoint came from the other problem
    assert "recomputing 1 jobs whose checkpoints" in capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert record["rates"]["dpo"]["problem"]["noise"] == 0.2


# ------------------------------------------------------------------ interrupts with several workers

# 49 jobs (40 rate jobs, one per loss, horizon and seed; 6 worst-task; 3 EXP3). The compiled steps are fast:
# with horizons up to 4096 the jobs after the first checkpoint finished in under a second, sometimes before
# the test's Ctrl-C arrived (exit status 1 from the theory checks instead of 130). With these horizons the
# first checkpoint comes after about 4.5 s and the run needs about 7 s more (2 cores, compiled and cached).
INTERRUPTIBLE = {
    ("rates", "losses"): '["dpo", "hinge"]', ("rates", "horizons"): "[16384, 32768, 65536, 131072, 262144]",
    ("rates", "seeds"): "4", ("worst_task", "horizon"): "2048", ("worst_task", "seeds"): "2",
    ("exp3", "horizons"): "[256, 1024]", ("exp3", "seeds"): "8", ("", "workers"): "2",
}


def _children(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children |= {int(c) for c in (task / "children").read_text().split()}
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status is left


def _start_and_wait_for_a_checkpoint(tmp_path):
    """Start the reproduction with 2 workers and wait until its first job is checkpointed."""
    config, out = _write(tmp_path, _shipped_with(INTERRUPTIBLE)), tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, "-m", "amalab", "convex-rates", str(config), "--out", str(out),
                             "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not list((out / ".jobs").glob("*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    workers = _children(proc.pid)
    return proc, out, {w for w in workers if "amalab" in Path(f"/proc/{w}/cmdline").read_text(errors="replace")
                       or "loky" in Path(f"/proc/{w}/cmdline").read_text(errors="replace")}


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_ctrl_c_twice_stops_the_workers_at_once_and_keeps_finished_jobs(tmp_path):
    proc, out, workers = _start_and_wait_for_a_checkpoint(tmp_path)
    assert len(workers) >= 2
    kept = set((out / ".jobs").glob("*.json"))
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # a second Ctrl-C during the clean-up must not hang it
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER prints where it hung
        pytest.fail("Ctrl-C hung: " + proc.communicate()[1][-4000:])
    assert time.monotonic() - start < 5, "Ctrl-C took too long"
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert kept <= set((out / ".jobs").glob("*.json"))  # every finished job is still there
    assert len(list((out / ".jobs").glob("*.json"))) < 49  # it stopped: not every job ran
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    assert not (out / "results.json").exists()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_workers_die_with_a_killed_parent(tmp_path):
    proc, out, workers = _start_and_wait_for_a_checkpoint(tmp_path)
    assert len(workers) >= 2
    proc.kill()  # SIGKILL: the parent runs no clean-up at all
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "a worker outlived its parent"

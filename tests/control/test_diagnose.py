"""The diagnostic suite end to end on the tiny config (conftest.py): every method, merge and sweep; resume; the CLI."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from amalab.cli import main  # noqa: E402
from amalab.control.config import load_diagnose_config  # noqa: E402
from amalab.control.diagnose import diagnose  # noqa: E402
from amalab.control.policy import GaussianMLP  # noqa: E402
from amalab.control.run import Run, settings_key  # noqa: E402
from amalab.control.tasks import task_reward  # noqa: E402


def _independent_returns(policy: GaussianMLP, config, seed: int) -> np.ndarray:
    """Mean-action rollouts with plain gymnasium, one environment at a time (not the suite's batch), on the
    evaluation episodes of training seed ``seed``."""
    import gymnasium

    from amalab.control.evaluation import evaluation_seeds

    returns = []
    for task in config.tasks:
        total = 0.0
        for episode in evaluation_seeds(config.evaluation, seed):
            env = gymnasium.make(config.environment)
            obs, _ = env.reset(seed=episode)
            data = env.unwrapped.data
            for _ in range(config.evaluation.horizon):
                with torch.no_grad():
                    mean = policy(torch.as_tensor(np.concatenate([obs, task.goal]), dtype=torch.float32))
                obs, *_ = env.step(np.clip(mean.double().numpy(), -1, 1))
                total += float(task_reward(task, data.qpos, data.qvel, data.ctrl))
        returns.append(total / config.evaluation.episodes)
    return np.array(returns)


def test_tiny_config_end_to_end_and_resume(tmp_path, tiny_config, capsys):
    path = tiny_config
    config = load_diagnose_config(path)
    summary = diagnose(config, show_progress=False)
    main_point = summary["main"]["methods"]
    expected = {*config.methods.names, *config.merges.names, "specialist-forward", "specialist-still"}
    assert set(main_point) == expected
    assert all(m["seeds"] == 6 for m in main_point.values())
    # forward's specialists do not beat the reference (their gain's interval contains 0): no scale, one
    # line naming both returns; the worst task is the one task left, still
    gain = summary["main"]["specialist_gain"]
    assert gain[0]["low"] <= 0 < gain[1]["low"] and summary["main"]["left_out"] == ["forward"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("task ")]
    assert printed == [f"task forward: its specialists ({summary['main']['specialist_returns'][0]:.1f}, gain "
                       f"{gain[0]['mean']:+.2f} [{gain[0]['low']:+.2f}, {gain[0]['high']:+.2f}] over seeds) do not "
                       f"beat the reference ({summary['main']['reference_returns'][0]:.1f}) by more than "
                       f"{summary['main']['gain_floor'][0]:.2f}: no normalized score; "
                       "the worst task is taken over still"]
    for m in main_point.values():
        assert m["normalized"][0] is None and m["worst"] == m["normalized"][1]
    assert "no scale" in (tmp_path / "figures" / "table.md").read_text()
    # a specialist's normalized return on its own task averages to 1 over seeds, by definition
    assert main_point["specialist-still"]["normalized"][1]["mean"] == pytest.approx(1.0)
    assert main_point["specialist-still"]["excess"][1]["mean"] == 0.0  # its own task: excess over itself
    assert {"imbalance-3-apo_zero", "mistake-0.3-dpo", "mistake-0.3-ipo", "mistake-0.3-robust",
            "poor_share-0.2-ipo"} <= set(summary)
    for name in ("table.md", "per_task.png", "sweeps.png", "summary.json"):
        assert (tmp_path / "figures" / name).is_file()

    # the evaluation's returns against an independent rollout of the saved model
    models = tmp_path / "out" / "models" / settings_key(config)
    point = next(p for p in models.iterdir() if p.name.endswith("apo_zero0.1") and "imbalance1-" in p.name
                 and "poor0.5" in p.name and "mistake0-" in p.name)
    record = json.loads((point / "records" / "ama-r-1.json").read_text())
    policy = Run(config, show_progress=False).new_policy(0, [])
    policy.load_state_dict(torch.load(point / "models" / "ama-r-1.pt", weights_only=True))
    np.testing.assert_allclose(record["returns"], _independent_returns(policy, config, 1), rtol=1e-6)

    # resume: nothing retrains, the summary is the same
    stamps = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}
    assert diagnose(config, show_progress=False) == json.loads(json.dumps(summary))
    assert stamps == {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}


def test_cli_reports_a_bad_config_in_one_line(tiny_config, capsys):
    path = tiny_config
    path.write_text(path.read_text().replace("velocity = 2.0", "velocity = 2.0\nspeed = 3"))
    assert main(["diagnose", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'speed'" in err and "tasks.0" in err


def test_a_config_where_no_task_has_a_scale_stops_before_the_generalists_in_one_line(make_tiny_config, capsys):
    path = make_tiny_config(lambda text: text.replace("[specialists]\nmax_steps = 40\nbatch_size = 8\n"
                                                      "learning_rate = 3e-3", "[specialists]\nmax_steps = 40\n"
                                                      "batch_size = 8\nlearning_rate = 1e-30"))  # below float32 resolution
    assert main(["diagnose", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no task's specialists beat the reference" in err
    assert "task forward" in err and "task still" in err and "gain +0.00 [+0.00, +0.00]" in err
    config = load_diagnose_config(path)
    trained = [p.name for p in (path.parent / "out" / "models" / settings_key(config)).rglob("*.pt")
               if p.parent.name != "references"]
    assert trained and all(name.startswith("specialist-") for name in trained)


def test_selection_runs_on_seeds_the_comparison_never_uses(make_tiny_config, capsys):
    """--selection: the references and specialists of the main comparison on moved data, training and
    evaluation seeds, one line per task, exit 1 when a task has no scale; nothing of the comparison."""
    from amalab.control.selection import SEED_OFFSET, selection_config

    path = make_tiny_config()
    config = load_diagnose_config(path)
    chosen = selection_config(config)
    assert chosen.seed == config.seed + SEED_OFFSET and chosen.evaluation.seed == config.evaluation.seed + SEED_OFFSET
    assert main(["diagnose", str(path), "--quiet", "--selection"]) in (0, 1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("selection ")]
    assert [line.split(":")[0] for line in lines] == ["selection forward", "selection still"]
    found = json.loads((path.parent / "out" / "selection" / "selection.json").read_text())
    assert found["seed"] == SEED_OFFSET and len(found["scale"]["reference_by_seed"]) == config.methods.seeds
    assert main(["diagnose", str(path), "--quiet", "--selection"]) == (0 if all(found["scale"]["scaled"]) else 1)
    trained = {p.name for p in (path.parent / "out").rglob("*.pt")}
    assert trained and all(name.startswith("specialist-") or "imbalance" in name for name in trained)
    assert not (path.parent / "out" / "summary.json").exists()


def test_several_configs_and_the_across_bodies_report(make_tiny_config, tmp_path):
    """Two configs in one command (here the tiny one twice, main comparison only): each runs, and --across
    writes the report keyed by the configs' names."""
    path = make_tiny_config(lambda text: text[:text.index("[sweeps]")])
    second = tmp_path / "second.toml"
    second.write_text(path.read_text().replace(str(tmp_path / "out"), str(tmp_path / "out2")))
    assert main(["diagnose", str(path), str(second), "--quiet", "--across", str(tmp_path / "across")]) == 0
    report = json.loads((tmp_path / "across" / "across_bodies.json").read_text())
    assert list(report["bodies"]) == ["tiny", "second"]
    assert report["bodies"]["tiny"] == report["bodies"]["second"]  # the same settings: the same numbers
    assert (tmp_path / "across" / "across_bodies.md").read_text().count("| tiny |") == 2

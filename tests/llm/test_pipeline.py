"""The LLM pipeline as a user runs it: `amalab llm run CONFIG` on a tiny model, errors as one clear line.

The end-to-end run is the test-sized twin of experiments/llm_tiny (same code path, tiny sizes): caches,
specialists, every method, summary, figures; a second run reuses everything; `eval` re-evaluates. The
config is written by the ``experiment`` fixture (tests/conftest.py), shared with other test modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amalab.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_run_end_to_end_then_reuse_then_eval(tmp_path, capsys, experiment, experiment_tables):
    config = experiment(tmp_path, extra=experiment_tables.merges, extra_task=experiment_tables.generated_task,
                        batch="6")
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    trained = {"standard", "uniform", "doremi", "odm", "ama-r", "ama-r-sim", "ama-s"}
    merged = {"merge-linear", "merge-task_arithmetic", "merge-ties", "merge-dare_ties"}
    assert set(summary["methods"]) == trained | merged | {"base"}
    runs = {(r["method"], r["seed"]): r for r in summary["runs"]}
    assert runs["base", 0]["steps"] == 0 and runs["base", 0]["tokens"] == 0
    assert runs["ama-r", 0]["steps"] == 4 and runs["ama-r", 0]["tokens"] > 0
    assert runs["merge-ties", 0]["steps"] == 3 * 3  # the three specialists' steps it merges
    assert summary["methods"]["ama-s"]["seeds"] == 2 and summary["methods"]["ama-r"]["seeds"] == 1
    assert summary["methods"]["merge-dare_ties"]["seeds"] == 2 and summary["methods"]["merge-ties"]["seeds"] == 1
    tasks = ("alpha", "beta", "sums")
    for name, method in summary["methods"].items():
        for task in tasks:
            metrics = method["tasks"][task]
            assert metrics["excess"]["mean"] >= 0
            assert 0 <= metrics["accuracy"]["mean"] <= 1 if name != "base" else "accuracy" not in metrics
        assert 0 <= method["tasks"]["sums"]["success"]["mean"] <= 1  # generation scored by the verifier
        assert "success" not in method["tasks"]["alpha"]  # no verifier, no generation
        assert method["worst_excess"]["mean"] == max(method["tasks"][t]["excess"]["mean"] for t in tasks) \
            or method["seeds"] > 1
    paired = {(r["method"], r["against"], r["metric"]) for r in summary["paired"]}
    best = min((m for m in merged), key=lambda m: summary["methods"][m]["worst_excess"]["mean"])
    assert ("ama-s", "standard", "worst_excess") in paired and ("ama-r", best, "worst_success") in paired
    for name in ("task_excess", "task_accuracy", "worst_excess", "weights", "eval_curves", "generation_success",
                 "paired_differences"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    manifests = {cache: json.loads((out / "caches" / cache / "manifest.json").read_text())
                 for cache in ("reference", "specialist-alpha", "specialist-beta", "specialist-sums", "standard")}
    assert manifests["reference"]["sum_dtype"] == "torch.float64"  # a float32-summed cache is refused
    for cache in ("specialist-alpha", "standard"):  # the loss with every option, TRL's defaults filled in
        assert manifests[cache]["loss"] == {"loss_type": "dpo", "beta": 0.1, "label_smoothing": 0.0,
                                            "discopop_tau": 0.05, "f_divergence_type": "reverse_kl",
                                            "f_alpha_divergence_coef": 0.5}
    data = json.loads((out / "data.json").read_text())
    assert data["alpha"]["train"] == 12 and data["alpha"]["eval"] == 4
    printed = capsys.readouterr().out
    assert "worst excess" in printed and "ama-s" in printed  # the summary table, even with --quiet
    # the eval lines: every eval_steps steps and at the end
    lines = [json.loads(x) for x in (out / "generalists" / "ama-r" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "eval"] == [2, 4]
    assert len([x for x in lines if x["kind"] == "train"]) == 4

    # a second run finds everything done and changes nothing
    before = (out / "summary.json").read_text()
    stamp = (out / "generalists" / "ama-s" / "seed1" / "final.json").stat().st_mtime_ns
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    assert (out / "summary.json").read_text() == before
    assert (out / "generalists" / "ama-s" / "seed1" / "final.json").stat().st_mtime_ns == stamp

    # eval re-evaluates the finished runs from their checkpoints: the same numbers
    assert main(["llm", "eval", str(config), "--quiet"]) == 0
    again = json.loads((out / "summary.json").read_text())
    for method, entry in summary["methods"].items():
        assert again["methods"][method]["worst_excess"]["mean"] == pytest.approx(entry["worst_excess"]["mean"],
                                                                                  abs=1e-9)


def test_changed_beta_is_refused_not_silently_reused(tmp_path, capsys, experiment):
    config = experiment(tmp_path, names='["standard"]')
    assert main(["llm", "specialists", str(config), "--quiet"]) == 0
    config.write_text(config.read_text().replace("beta = 0.1", "beta = 0.2"))
    assert main(["llm", "specialists", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "beta" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_train_before_specialists_says_what_to_do(tmp_path, capsys, experiment):
    config = experiment(tmp_path, names='["standard"]')
    assert main(["llm", "train", str(config), "--quiet"]) == 2
    assert "amalab llm specialists" in capsys.readouterr().err


@pytest.mark.parametrize("change,message", [
    ({'names = ["standard"]': 'names = ["dpo-union"]'}, "unknown method 'dpo-union'"),
    ({'names = ["standard"]': 'names = ["doremi", "standard"]'}, "list 'standard' before it"),
    ({'name = "beta"': 'name = "alpha"'}, "duplicate task name 'alpha'"),
    ({'source = "beta.jsonl"': 'source = "missing.jsonl"'}, "missing.jsonl"),
    ({"beta = 0.1": "beta = -1.0"}, "beta must be > 0"),
    ({"max_length = 40": "max_length = 20"}, "max_prompt_length"),
    ({"max_steps = 4": "max_steps = 0"}, "max_steps must be >= 1"),
    ({'names = ["standard"]': 'names = ["uniform"]', "batch": "5"}, "multiple of the number of tasks k=2"),
    ({'device = "cpu"': 'device = "tpu"'}, "device must be one of"),
    ({"learning_rate = 1e-2\neval_steps": "gradient_accumulation_steps = 2\nlearning_rate = 1e-2\n"
                                           "eval_steps"},
     "unknown key 'gradient_accumulation_steps'"),
    ({'names = ["standard"]': 'names = ["ama-r"]', "eta_alpha = 2.0 }\nama-r-sim": "eta = 2.0 }\nama-r-sim"},
     "takes no option eta"),
])
def test_config_mistakes_are_one_clear_line(tmp_path, capsys, change, message, experiment):
    config = experiment(tmp_path, names='["standard"]', **change)
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_bad_data_row_names_file_line_and_field(tmp_path, capsys, experiment):
    config = experiment(tmp_path, names='["standard"]')
    with (tmp_path / "beta.jsonl").open("a") as f:
        f.write('{"prompt": "Human: x? Assistant:", "chosen": 3, "rejected": " no"}\n')
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "beta.jsonl:11" in err and "chosen" in err


def test_shipped_tiny_experiment_config_loads(hh_harmless_test):  # skips without the shared data
    from amalab.llm.config import load_llm_config
    from amalab.llm.data.tasks import load_tasks

    config = load_llm_config(ROOT / "experiments" / "llm_tiny" / "config.toml")
    tasks = load_tasks(config.tasks, base_dir=config.base_dir)
    assert [t.name for t in tasks] == ["harmless", "truthful"]
    assert [len(t.eval) for t in tasks] == [40, 40]


def test_lora_run_trains_and_checkpoints_only_the_adapter(tmp_path, experiment):
    lora = '[model]\nuse_lora = true\nlora = { r = 2, alpha = 4.0, dropout = 0.1, target_modules = ["q_proj", "v_proj"] }\n'
    config = experiment(tmp_path, names='["ama-s"]', **{"[model]\n": lora})
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    from amalab.training.checkpoint import load_latest

    state = load_latest(tmp_path / "run" / "generalists" / "ama-s" / "seed0").model_state
    assert state and all("lora_" in name for name in state)  # the checkpoint holds the adapter alone
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["methods"]["ama-s"]["seeds"] == 2


def test_lora_on_a_model_without_the_target_modules_is_a_clear_error(tmp_path, capsys, experiment):
    lora = '[model]\nuse_lora = true\nlora = { r = 2, alpha = 4.0, dropout = 0.0, target_modules = ["c_attn"] }\n'
    config = experiment(tmp_path, names='["standard"]', **{"[model]\n": lora})
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    assert "c_attn" in capsys.readouterr().err


def test_given_specialists_are_loaded_instead_of_trained(tmp_path, experiment):
    first = tmp_path / "first"
    first.mkdir()
    in_sample = "[specialists]\ncross_fit = 1\n\n[specialists.optim]"  # a loaded specialist is not cross-fitted
    config_a = experiment(first, names='["standard"]', **{"[specialists.optim]": in_sample})
    assert main(["llm", "specialists", str(config_a), "--quiet"]) == 0
    trained = {t: json.loads((first / "run" / "caches" / f"specialist-{t}" / "ids.json").read_text()) for t in ("alpha", "beta")}

    second = tmp_path / "second"
    second.mkdir()
    load = f'[specialists]\ncross_fit = 1\nload = {{ alpha = "{first / "run" / "specialists" / "alpha"}", beta = "{first / "run" / "specialists" / "beta"}" }}\n\n[specialists.optim]'
    config_b = experiment(second, names='["standard"]', **{"[specialists.optim]": load})
    assert main(["llm", "specialists", str(config_b), "--quiet"]) == 0
    assert not (second / "run" / "specialists").exists()  # nothing was trained
    import numpy as np

    for task in ("alpha", "beta"):
        manifest = json.loads((second / "run" / "caches" / f"specialist-{task}" / "manifest.json").read_text())
        assert manifest["loaded"].endswith(f"specialists/{task}")
        # the loaded specialist gives the very losses the trained one gave
        a = np.load(first / "run" / "caches" / f"specialist-{task}" / "values.npz")["loss"]
        b = np.load(second / "run" / "caches" / f"specialist-{task}" / "values.npz")["loss"]
        ids_b = json.loads((second / "run" / "caches" / f"specialist-{task}" / "ids.json").read_text())
        assert ids_b == trained[task]
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_sft_baseline_trains_on_chosen_nll_and_is_evaluated_in_the_config_loss(tmp_path, experiment):
    config = experiment(tmp_path, names='["standard", "sft"]')
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    out = tmp_path / "run"

    def metrics(method):
        path = out / "generalists" / method / "seed0" / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]

    run = json.loads((out / "generalists" / "sft" / "seed0" / "run.json").read_text())
    assert run["loss"]["loss_type"] == "sft" and run["mixer"]["name"] == "standard"
    first = {m: next(x for x in metrics(m) if x["kind"] == "train") for m in ("standard", "sft")}
    # DPO at the first step is log 2 (policy == reference); SFT is the chosen tokens' NLL, about log(vocab 300)
    assert first["standard"]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert first["sft"]["loss"] > 3.0
    sft_eval = [x for x in metrics("sft") if x["kind"] == "eval"][-1]
    summary = json.loads((out / "summary.json").read_text())
    for task in ("alpha", "beta"):  # evaluated in DPO: the same held-out loss the summary reports, near log 2
        assert sft_eval["tasks"][task]["loss"] < 2.0
        assert summary["methods"]["sft"]["tasks"][task]["loss"]["mean"] == pytest.approx(
            sft_eval["tasks"][task]["loss"])


@pytest.mark.parametrize("change,message", [
    # the rule is the mixer's baseline, not the name doremi: ama-r against the standard generalist's losses too
    ({'names = ["standard"]': 'names = ["ama-r", "standard"]', "ama-r = { eta_alpha = 2.0 }":
      'ama-r = { eta_alpha = 2.0, baseline = "standard" }'},
     "[methods] names: ama-r measures excess over the standard generalist: list 'standard' before it"),
    ({"[model]\n": '[model]\nuse_lora = true\nlora = { r = 2, alpha = 0.0, dropout = 0.0, target_modules = ["q_proj"] }\n'},
     "[model.lora]: alpha: expected a positive number, got 0.0"),
    ({"max_length = 40": "max_length = 1"}, "[tokenize]: max_length: expected an integer >= 2, got 1"),
    ({'name = "beta"': 'name = "alpha"'},
     "[[tasks]] tasks[1]: field 'name': task name 'alpha' is already used by tasks[0]"),
])
def test_each_config_rule_is_checked_once_at_load_with_the_file_and_table(tmp_path, capsys, change, message,
                                                                           experiment):
    config = experiment(tmp_path, names='["standard"]', **change)
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{config}: {message}" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before anything is read, built or written

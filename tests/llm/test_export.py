"""`amalab llm export`: a trained run as a transformers folder that plain transformers loads, scoring
pairs exactly as the trained policy does.

The oracle is independent of amalab: a subprocess that imports only torch and transformers loads the
exported folder with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and computes sequence log-probs the plain
way (full logits, log_softmax, gather); amalab's ``sequence_logps`` of the policy the pipeline rebuilds from
the run's checkpoint must give the same numbers.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amalab.cli import main

LORA = '[model]\nuse_lora = true\nlora = { r = 2, alpha = 4.0, dropout = 0.0, target_modules = ["q_proj", "v_proj"] }\n'

#: runs with no amalab on its path: loads the export, scores the given token ids and tokenizes the texts
PLAIN_TRANSFORMERS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, request = sys.argv[1], json.loads(sys.stdin.read())
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
logps = []
for prompt, completion in request["sequences"]:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    per_token = torch.log_softmax(logits[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    logps.append(float(per_token[len(prompt) - 1:].sum()))
texts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in request["texts"]]
names = [name for name, _ in model.named_parameters()]
print(json.dumps({"logps": logps, "texts": texts, "class": type(model).__name__, "names": names,
                  "amalab_imported": any(m.startswith("amalab") for m in sys.modules)}))
"""


@pytest.fixture(scope="module", params=["full", "lora"])
def trained(request, tmp_path_factory, experiment):
    """An experiment trained by the real pipeline: two tasks, ama-s with two seeds (full weights or LoRA)."""
    tmp = tmp_path_factory.mktemp(request.param)
    config = experiment(tmp, names='["ama-s"]', **({"[model]\n": LORA} if request.param == "lora" else {}))
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    return request.param, config, tmp / "run"


def plain_transformers(folder: Path, request: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder)], input=json.dumps(request),
                          capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"},
                          cwd=folder)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_export_loads_in_plain_transformers_with_the_trained_policys_logps(trained, tmp_path, capsys):
    from amalab.llm.collate import collate_pairs
    from amalab.llm.config import load_llm_config
    from amalab.llm.experiment import prepare
    from amalab.llm.logprobs import sequence_logps
    from amalab.llm.stages.policies import trained_policy

    kind, config_path, out = trained
    dest = tmp_path / "export"
    assert main(["llm", "export", str(out), str(dest), "--method", "ama-s", "--seed", "1"]) == 0
    assert "exported ama-s seed 1 (step 4, generalists/ama-s/seed1)" in capsys.readouterr().out
    info = json.loads((dest / "amalab_export.json").read_text())
    assert (info["method"], info["seed"], info["step"], info["run"], info["finished"]) == \
        ("ama-s", 1, 4, "generalists/ama-s/seed1", True)
    assert (dest / "model.safetensors").is_file() and not (dest / "adapter_config.json").exists()

    exp = prepare(load_llm_config(config_path), show_progress=False)
    policy = trained_policy(exp, out / "generalists" / "ama-s" / "seed1", seed=1).eval()
    pairs = [p for pairs in exp.eval_sets for p in pairs]
    with torch.no_grad():
        ours = sequence_logps(policy, collate_pairs(pairs, exp.pad_token_id))
    texts = ["Human: alpha question 3? Assistant:", " beta good 7 yes", "Paris <|im_end|> x"]
    request = {"sequences": [[list(p.prompt_ids), list(c)] for p in pairs for c in (p.chosen_ids, p.rejected_ids)],
               "texts": texts}
    plain = plain_transformers(dest, request)
    assert not plain["amalab_imported"] and plain["class"] == "LlamaForCausalLM"
    assert not any("lora" in name for name in plain["names"])  # the adapter is merged into the weights
    expected = torch.stack([ours.chosen, ours.rejected], dim=1).flatten().tolist()
    assert plain["logps"] == pytest.approx(expected, abs=1e-5, rel=0)
    assert plain["texts"] == [exp.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # not vacuous: training moved the policy away from pi_ref (the reference cache's log-probs)
    reference = exp.reference.get("chosen", [p.id for p in pairs])
    assert max(abs(a - b) for a, b in zip(ours.chosen.tolist(), reference)) > 1e-3


def test_summary_names_each_runs_folder_and_export_takes_it(trained, tmp_path):
    _, _, out = trained
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert sorted(r["run_dir"] for r in runs) == ["base", "generalists/ama-s/seed0", "generalists/ama-s/seed1"]
    rows = [r for r in csv.DictReader((out / "summary.csv").open()) if r["method"] != "base"]
    assert {(r["method"], r["seed"], r["run_dir"]) for r in rows} == {
        ("ama-s", "0", "generalists/ama-s/seed0"), ("ama-s", "1", "generalists/ama-s/seed1")}
    assert main(["llm", "export", str(out / rows[0]["run_dir"]), str(tmp_path / "a")]) == 0
    info = json.loads((tmp_path / "a" / "amalab_export.json").read_text())
    assert info["run"] == rows[0]["run_dir"]
    umask = os.umask(0)
    os.umask(umask)  # the folder is as readable as any the user writes (not private to the exporting user)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "a" / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    # a specialist's run folder exports too
    assert main(["llm", "export", str(out / "specialists" / "beta"), str(tmp_path / "b")]) == 0
    info = json.loads((tmp_path / "b" / "amalab_export.json").read_text())
    assert (info["name"], info["task"], info["seed"], info["step"]) == ("specialist beta", "beta", None, 3)


@pytest.mark.parametrize("args,message", [
    (["--method", "ama-s"], "--method ama-s matches 2 runs, not one; runs there: ama-s seed 0, ama-s seed 1"),
    (["--method", "ama-r", "--seed", "0"], "--method ama-r --seed 0 matches 0 runs, not one; runs there: "
                                          "ama-s seed 0, ama-s seed 1"),
])
def test_a_selection_matching_no_run_or_several_is_one_line_listing_the_runs(trained, tmp_path, capsys, args,
                                                                              message):
    _, _, out = trained
    assert main(["llm", "export", str(out), str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_non_empty_out_is_refused_unless_forced(trained, tmp_path, capsys):
    _, _, out = trained
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    run = ["llm", "export", str(out), str(dest), "--method", "ama-s", "--seed", "0"]
    assert main(run) == 2
    err = capsys.readouterr().err.strip()
    assert "exists and is not empty" in err and "--force" in err and len(err.splitlines()) == 1
    assert (dest / "keep.txt").read_text() == "mine"
    assert main([*run, "--force"]) == 0
    assert not (dest / "keep.txt").exists() and (dest / "config.json").is_file()


def test_a_base_other_than_the_runs_is_refused(trained, tmp_path, capsys):
    kind, _, out = trained
    if kind == "lora":
        pytest.skip("one base check is enough")
    copy_root = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy_root)
    config = copy_root / "config.toml"
    config.write_text(config.read_text().replace("num_key_value_heads = 1, vocab_size = 300, seed = 0",
                                                 "num_key_value_heads = 1, vocab_size = 300, seed = 5"))
    assert main(["llm", "export", str(copy_root), str(tmp_path / "x"), "--method", "ama-s", "--seed", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "base model" in err and "fingerprint" in err and len(err.splitlines()) == 1

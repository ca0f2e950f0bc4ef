"""``torchrun --nproc-per-node 2 -m amalab llm run CONFIG`` on a tiny config, against one process.

The whole pipeline (reference cache, a specialist per task, its loss cache, one generalist, summary) runs on
2 gloo ranks with the policy sharded by FSDP2, and in this process on one rank; rank 0 alone prints the
progress and writes files, and the held-out results agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from amalab.llm.config import load_llm_config
from amalab.llm.pipeline import run_all

CONFIG = """\
out = "{out}"
seed = 0
device = "cpu"

[model]
name = "tiny"
tiny = {{ hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, vocab_size = 300, seed = 0 }}
fsdp = {fsdp}

[tokenize]
max_length = 48
max_prompt_length = 32

[[tasks]]
name = "first"
source = "first.jsonl"
held_out = 4

[[tasks]]
name = "second"
source = "second.jsonl"
held_out = 4

[specialists.optim]
max_steps = 2
batch_size = 4
learning_rate = 1e-3
per_device_eval_batch_size = 4

[train]
max_steps = 3
batch_size = 4
learning_rate = 1e-3
per_device_eval_batch_size = 4
save_steps = 2

[methods]
names = ["ama-s"]
"""


def write_config(folder: Path, out: str, fsdp: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t, name in enumerate(("first", "second")):
        with (folder / f"{name}.jsonl").open("w") as f:
            for i in range(12):
                f.write(json.dumps({"prompt": f"Human: question {i} of {name}? Assistant:",
                                    "chosen": f" a good answer {i} {'yes ' * (i % 3)}",
                                    "rejected": f" a bad answer {i + t} {'no ' * (i % 4)}"}) + "\n")
    path = folder / "config.toml"
    path.write_text(CONFIG.format(out=out, fsdp=str(fsdp).lower()))
    return path


@pytest.mark.slow  # ~60 s on 2 cores: two torchrun processes and a one-process run of the whole pipeline
def test_torchrun_two_ranks_fsdp_equals_one_process(tmp_path, one_thread):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    config = write_config(tmp_path / "dist", str(tmp_path / "dist" / "out"), fsdp=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "--standalone", "-m", "amalab", "llm", "run",
                           str(config)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "dist" / "out"
    # rank 0 alone speaks and writes: each message once
    assert done.stdout.count("task 'first'") == 1 and done.stdout.count("wrote ") == 1, done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p.name for p in (out / "generalists" / "ama-s" / "seed0" / "checkpoints").iterdir()) == [
        "latest", "step-000002", "step-000003"]
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob(".*.tmp"))

    single = load_llm_config(write_config(tmp_path / "single", str(tmp_path / "single" / "out"), fsdp=False))
    with one_thread():
        reference = run_all(single, show_progress=False)
    def generalist(summary):  # the runs also hold the untrained base model's record
        return next(r for r in summary["runs"] if r["method"] == "ama-s")

    ours, theirs = generalist(summary), generalist(reference)
    for task, metrics in theirs["tasks"].items():
        for key, value in metrics.items():
            assert ours["tasks"][task][key] == pytest.approx(value, rel=1e-3, abs=1e-5), (task, key)
    assert ours["average_weights"] == pytest.approx(theirs["average_weights"], abs=1e-6)

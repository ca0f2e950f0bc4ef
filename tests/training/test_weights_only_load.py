"""Loading a checkpoint's weights alone (amalab.training.checkpoint, ``weights_only``;
docs/reproducibility.md, "Checkpoints"): what evaluates, merges or exports a finished run never opens
optimizer.pt nor the other parts a resume needs, reads the model's tensors memory-mapped, and gets the
values the full load gets; under FSDP2 each rank copies in only its shards
(amalab.training.state.load_trainable_state).

The run folders are "damaged" copies of a finished tiny run: every part but state.json and
model.safetensors overwritten with bytes no reader accepts, or optimizer.pt deleted. Whatever opened one of
them would fail; a resume must (it needs them), naming the file in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

from amalab.cli import main
from amalab.errors import ConfigError
from amalab.llm.logprobs import shard_causal_lm
from amalab.llm.models import decoder_layers
from amalab.llm.train import run_training
from amalab.training.checkpoint import list_checkpoints, load_checkpoint, load_latest
from amalab.training.distributed import World, unwrap
from amalab.training.state import load_trainable_state, trainable_state

CPU = torch.device("cpu")
STEPS = 2
#: every part of a checkpoint a resume reads besides the weights (state.json lists the ones saved)
RESUME_PARTS = ("optimizer.pt", "scheduler.pt", "mixer.npz", "sampler.json", "rng.json")
TIMEOUT_S = 30  # the process group's timeout in the 2-process test: a hang fails after it


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory, make_run, fresh_policy, one_thread):
    """A finished run (``STEPS`` steps), its final metrics and its trained parameters."""
    root = tmp_path_factory.mktemp("finished")
    with one_thread():
        run = make_run(setup, root, "ama-s", "run", max_steps=STEPS, save_steps=1)
        model = fresh_policy(setup)
        final = run_training(model, run, CPU, show_progress=False)
    return run.run_dir, final, {name: p.detach().clone() for name, p in model.named_parameters()}


def damage(run_dir: Path, delete: bool = False) -> None:
    """Overwrite the resume parts of every checkpoint of ``run_dir`` with garbage (``delete``: delete
    optimizer.pt instead)."""
    checkpoints = list_checkpoints(run_dir)
    assert checkpoints
    for _, folder in checkpoints:
        listed = json.loads((folder / "state.json").read_text())["files"]
        assert set(RESUME_PARTS) <= set(listed)  # a run's checkpoint holds every part
        for name in RESUME_PARTS:
            if delete and name == "optimizer.pt":
                (folder / name).unlink()
            elif not delete:
                (folder / name).write_bytes(b"\x00 not a checkpoint part \xff" * 3)


def damaged(run_dir: Path, into: Path, delete: bool = False) -> Path:
    """A copy of ``run_dir``, damaged (:func:`damage`)."""
    copy_dir = into / "damaged"
    shutil.copytree(run_dir, copy_dir)
    damage(copy_dir, delete)
    return copy_dir


def test_a_weights_only_load_reads_nothing_else_and_equals_the_full_load(finished, tmp_path):
    run_dir, _, _ = finished
    whole = load_latest(run_dir)
    assert whole.optimizer_state  # the intact run's full load reads everything
    light = load_latest(damaged(run_dir, tmp_path), weights_only=True)
    assert light.step == whole.step == STEPS and light.weights_only
    assert (light.optimizer_state, light.scheduler_state, light.mixer_state, light.sampler_state,
            light.rng_states) == (None,) * 5
    assert light.model_state.keys() == whole.model_state.keys()
    for name, tensor in whole.model_state.items():
        assert torch.equal(light.model_state[name], tensor), name
    with pytest.raises(ValueError, match="weights_only, which cannot resume a run"):
        light.state_dict()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_the_weights_are_memory_mapped(finished):
    """The tensors are pages of model.safetensors mapped into the process, not a copy read into memory."""
    run_dir, _, _ = finished
    checkpoint = load_latest(run_dir, weights_only=True)
    mapped = Path("/proc/self/maps").read_text()
    assert str((checkpoint.path / "model.safetensors").resolve()) in mapped
    del checkpoint


@pytest.mark.parametrize("delete", [False, True], ids=["corrupt", "deleted"])
def test_a_finished_run_loads_its_weights_without_the_optimizer(finished, setup, make_run, fresh_policy,
                                                                tmp_path, delete):
    """``run_training`` of a finished run (what evaluation and the merges call) works from the weights alone;
    resuming the same folder once it is not finished refuses, naming the part it needs."""
    run_dir, final, params = finished
    folder = damaged(run_dir, tmp_path, delete)
    run = make_run(setup, tmp_path, "ama-s", folder.name, max_steps=STEPS, save_steps=1)
    model = fresh_policy(setup)
    assert run_training(model, run, CPU, show_progress=False) == final
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params[name]), name
    (folder / "final.json").unlink()
    with pytest.raises(ConfigError, match="optimizer.pt") as refused:
        run_training(fresh_policy(setup), run, CPU, show_progress=False)
    assert "\n" not in str(refused.value) and "cannot resume" in str(refused.value)


def test_a_full_load_of_a_damaged_checkpoint_names_the_part(finished, tmp_path):
    folder = list_checkpoints(damaged(finished[0], tmp_path))[-1][1]
    with pytest.raises(ConfigError, match=r"optimizer\.pt: unreadable"):
        load_checkpoint(folder)
    assert load_checkpoint(folder, weights_only=True).step == STEPS


# --- the pipeline: evaluation, merges' and export's loads -------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, experiment):
    """The tiny experiment trained by the real pipeline (ama-s, one seed): two specialists, one generalist."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = experiment(tmp, names='["ama-s"]', **{"ama-s = 2 }": "ama-s = 1 }"})
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    return config, tmp / "run"


def test_the_pipeline_evaluates_and_exports_runs_without_their_optimizer_state(pipeline, tmp_path, capsys):
    """Every run's resume parts damaged in place: rerunning the finished experiment (its runs' weights),
    evaluating it again (``trained_policy``) and exporting a run work and give the same numbers; training
    on from a run that is no longer finished refuses in one line naming optimizer.pt."""
    config, out = pipeline
    generalist = out / "generalists" / "ama-s" / "seed0"
    weights = load_latest(generalist).model_state  # the intact run's full load
    evaluated = json.loads((generalist / "final.json").read_text())["tasks"]
    for run_dir in [generalist, *sorted((out / "specialists").iterdir())]:
        damage(run_dir)
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    assert main(["llm", "eval", str(config), "--quiet"]) == 0
    again = json.loads((generalist / "final.json").read_text())["tasks"]
    for task, metrics in evaluated.items():
        for key, value in metrics.items():
            assert again[task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
    assert main(["llm", "export", str(generalist), str(tmp_path / "export")]) == 0
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(exported) & set(weights) == set(exported) and exported
    for name, tensor in exported.items():
        assert torch.equal(tensor, weights[name]), name
    capsys.readouterr()
    (generalist / "final.json").unlink()
    assert main(["llm", "train", str(config), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "optimizer.pt: unreadable" in error and "cannot resume" in error, error


# --- FSDP2: each rank copies in its shards ----------------------------------------------------------------

def _sharded_load(world: World, setup: dict, run_dir: str, out: str, fresh_policy, own_rows_only) -> None:
    """One rank of 2: a fresh sharded policy loads the damaged run's weights, every row of them NaN but
    the rank's own part (FSDP2 shards dimension 0 as ``torch.chunk``); it saves what it holds.
    ``fresh_policy`` and ``own_rows_only`` are the conftest fixtures' values (the fork hands them over)."""
    from torch.distributed.tensor import DTensor

    rank = world.rank
    model = fresh_policy(setup)
    model = shard_causal_lm(model, decoder_layers(model), world)
    state = load_latest(run_dir, world=world, weights_only=True).model_state
    load_trainable_state(model, {name: own_rows_only(tensor, rank) for name, tensor in state.items()})
    named = list(unwrap(model).named_parameters())
    local = {name: p.detach().to_local().clone() for name, p in named if isinstance(p, DTensor)}
    torch.save({"local": local, "whole": trainable_state(model)}, Path(out) / f"rank{rank}.pt")


def test_each_rank_of_a_sharded_policy_reads_only_its_part_of_the_weights(finished, setup, fresh_policy,
                                                                           own_rows_only, fork_gloo_ranks,
                                                                           tmp_path):
    """Each rank copies in its own rows of each full tensor, from its own copy: the other rows of its copy,
    which it never reads, are NaN, yet the gathered policy is the checkpoint's exactly (a load that spread
    rank 0's whole tensors, as ``set_model_state_dict`` of full tensors does, would give rank 1 NaNs)."""
    run_dir, _, params = finished
    folder = damaged(run_dir, tmp_path)
    fork_gloo_ranks(_sharded_load, setup, str(folder), str(tmp_path), fresh_policy, own_rows_only,
                    group_timeout_s=TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        assert rank["whole"].keys() == params.keys()
        for name, tensor in rank["whole"].items():
            assert torch.equal(tensor, params[name]), name
    assert ranks[0]["local"].keys() == params.keys()  # every parameter is sharded
    for name, whole in params.items():
        parts = [rank["local"][name] for rank in ranks]
        assert all(part.numel() < whole.numel() for part in parts), name  # each rank holds a part only
        assert torch.equal(torch.cat(parts), whole), name  # FSDP2 shards dimension 0 in rank order

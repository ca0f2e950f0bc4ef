"""Resuming the optimizer state (amalab.training.state.load_optimizer_state; docs/distributed.md,
"Checkpoints"): optimizer.pt is memory-mapped, and under FSDP2 each rank copies in only its part of every
moment tensor, so no rank reads, or moves to its device, the whole optimizer state of a sharded parameter.

A checkpoint holds the optimizer state as full tensors (what lets a run continue on any number of ranks).
``set_optimizer_state_dict`` of full tensors would move each whole tensor to every rank's device and scatter
rank 0's copy; the test gives each rank a copy whose rows outside its own part are NaN, so a load that used
another rank's rows (or rank 0's copy) ends with NaN moments on rank 1.
"""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch

from amalab.llm.logprobs import shard_causal_lm
from amalab.llm.models import decoder_layers
from amalab.llm.train import run_training
from amalab.training.checkpoint import load_latest
from amalab.training.distributed import World, unwrap
from amalab.training.state import load_optimizer_state

CPU = torch.device("cpu")
TIMEOUT_S = 30  # the process group's timeout: a hang fails after it


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory, make_run, fresh_policy, one_thread):
    """A run of 2 steps (one process, not sharded) and the optimizer state its last checkpoint holds."""
    root = tmp_path_factory.mktemp("finished")
    with one_thread():
        run = make_run(setup, root, "ama-s", "run", max_steps=2, save_steps=1)
        run_training(fresh_policy(setup), run, CPU, show_progress=False)
    # a copy in memory: the loaded state maps optimizer.pt, which the mapping tests must see unmapped
    return run.run_dir, copy.deepcopy(load_latest(run.run_dir).optimizer_state)


def adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    """AdamW with a learning-rate schedule, as a run has (the schedule adds ``initial_lr`` to its groups)."""
    optimizer = torch.optim.AdamW(params)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer


def poisoned_for(optimizer_state: dict, rank: int, own_rows_only) -> dict:
    """The optimizer state with every moment tensor NaN outside ``rank``'s rows (the step counts kept);
    ``own_rows_only`` is the conftest fixture's value."""
    return {"state": {name: {key: own_rows_only(value, rank) if value.dim() else value
                             for key, value in per_param.items()}
                      for name, per_param in optimizer_state["state"].items()},
            "param_groups": optimizer_state["param_groups"]}


def _sharded_load(world: World, setup: dict, run_dir: str, out: str, fresh_policy, own_rows_only) -> None:
    """One rank of 2: a fresh sharded policy's AdamW loads the poisoned optimizer state; the rank saves
    its local moments and the whole state gathered from both ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    rank = world.rank
    model = fresh_policy(setup)
    model = shard_causal_lm(model, decoder_layers(model), world)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad])
    state = load_latest(run_dir, world=world).optimizer_state
    load_optimizer_state(model, optimizer, poisoned_for(state, rank, own_rows_only))
    local = {id(p): {key: value.to_local().clone() for key, value in optimizer.state[p].items()
                     if isinstance(value, DTensor)}
             for p in optimizer.param_groups[0]["params"]}
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    whole = get_optimizer_state_dict(unwrap(model), optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    torch.save({"local": {names[key]: value for key, value in local.items()},
                "whole": {name: {key: value.cpu() for key, value in per.items()}
                          for name, per in whole["state"].items()}}, Path(out) / f"rank{rank}.pt")


def test_each_rank_of_a_sharded_policy_reads_only_its_part_of_the_optimizer_state(finished, setup, fresh_policy,
                                                                                   own_rows_only, fork_gloo_ranks,
                                                                                   tmp_path):
    run_dir, saved = finished
    fork_gloo_ranks(_sharded_load, setup, str(run_dir), str(tmp_path), fresh_policy, own_rows_only,
                    group_timeout_s=TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert saved["state"] and {"exp_avg", "exp_avg_sq", "step"} <= set(next(iter(saved["state"].values())))
    for rank in ranks:
        assert rank["whole"].keys() == saved["state"].keys()
        for name, per_param in saved["state"].items():
            for key, value in per_param.items():
                assert torch.equal(rank["whole"][name][key], value), (name, key)
    for name, per_param in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            parts = [rank["local"][name][key] for rank in ranks]
            assert all(part.numel() < per_param[key].numel() for part in parts), (name, key)  # a part each
            assert torch.equal(torch.cat(parts), per_param[key]), (name, key)


def test_a_plain_policy_loads_the_whole_state_into_memory_of_its_own(finished, setup, fresh_policy):
    """One process, not sharded: the optimizer gets the checkpoint's state as ``load_state_dict`` would, as
    copies (AdamW updates its moments in place: they must not be the loaded tensors)."""
    run_dir, saved = finished
    loaded = load_latest(run_dir).optimizer_state
    model = fresh_policy(setup)
    params = dict(model.named_parameters())
    optimizer = adamw(list(params.values()))
    load_optimizer_state(model, optimizer, loaded)
    assert len(optimizer.state) == len(saved["state"])
    for name, per_param in saved["state"].items():
        for key, value in per_param.items():
            held = optimizer.state[params[name]][key]
            assert torch.equal(held, value), (name, key)
            assert held.untyped_storage().data_ptr() != loaded["state"][name][key].untyped_storage().data_ptr()


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_optimizer_pt_is_mapped_while_loading_and_not_after(finished, setup, fresh_policy):
    """The moments are read from pages of optimizer.pt mapped into the process (a rank touches only the pages
    of the rows it copies), not from a copy of the whole file; once loaded, the optimizer holds none of them,
    so the mapping ends (a pruned checkpoint's disk space is freed)."""
    run_dir, _ = finished
    checkpoint = load_latest(run_dir)
    file = str((checkpoint.path / "optimizer.pt").resolve())
    gc.collect()
    assert file in mapped_files()
    model = fresh_policy(setup)
    optimizer = adamw(list(model.parameters()))
    load_optimizer_state(model, optimizer, checkpoint.optimizer_state)
    del checkpoint
    gc.collect()
    assert file not in mapped_files()
    assert optimizer.state  # the state outlives the mapping

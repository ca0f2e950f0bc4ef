"""2 gloo processes train as one does (docs/maths.md section 8), replicated and sharded (FSDP2).

One spawn of 2 CPU processes runs every distributed scenario (starting processes that import torch and
transformers costs most of the time on 2 cores); each rank saves what it saw, and the tests compare it with
independent single-process runs of the same global batch made here:

* the mixer state is bit-identical on both ranks after every update (a digest per step and rank);
* first-step gradients agree tightly, parameters after 4 steps within Adam's amplification of rounding
  (see test_two_ranks_equal_one), mixer weights within 1e-12;
* a run stopped after 2 steps and resumed with a fresh model, mixer and optimizer read from the checkpoint
  ends where the straight 2-rank run ends; a checkpoint written by 2 ranks continues on 1;
* a non-finite loss on rank 1 only stops both ranks with TrainingDiverged (no hang);
* sharded (FSDP2) training equals single-process training, its checkpoint continues on 1 rank, and on 2
  sharded ranks, each loading only its part, to the straight sharded run's end bitwise;
* cache building and evaluation shard pairs over ranks and gather them back under the right ids.

Both sides use one CPU thread and micro-batches of one pair, so the per-pair forward passes are the same
computations and the losses equal bitwise; what differs is only the order in which per-rank sums are added
(float64 mixer statistics, float32 gradients).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from amalab.training.cache import ValueCache
from amalab.training.distributed import World, shard_policy, unwrap
from amalab.llm.logprobs import sequence_logps, shard_causal_lm
from amalab.llm.models import decoder_layers
from amalab.training.tensor_identity import state_digest
from amalab.llm.evaluate import pair_logps
from amalab.llm.train import run_training
from amalab.training.run import TrainingDiverged
from amalab.training.state import trainable_state

CPU = torch.device("cpu")
WORLD = 2
STEPS = 4


def record_digests(run, digests: list) -> None:
    """After every mixer update, keep a digest of the mixer's whole state."""
    update = run.mixer.update

    def recorded(stats):
        update(stats)
        digests.append(state_digest(run.mixer.state_dict()))

    run.mixer.update = recorded


def metric_weights(run_dir) -> list:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["weights"] for x in lines if x["kind"] == "train"]


def _worker(world: World, setup: dict, out: str, make_run, recording_adamw, fresh_policy) -> None:
    """One rank of 2: every scenario in turn; results to ``out/rank{rank}.pt``. ``make_run``,
    ``recording_adamw`` and ``fresh_policy`` are the conftest fixtures' values (the fork hands them over as
    they are)."""
    import pathlib

    import torch.distributed as dist

    rank = world.rank
    root = pathlib.Path(out)
    torch.optim.AdamW = recording_adamw  # train.py looks AdamW up at call time
    results = {}

    def train(name, mixer="ama-s", sharded=False, stop_after=None, **optim):
        run = make_run(setup, root, mixer, name, max_steps=STEPS, micro_batch_size=1, **optim)
        digests = []
        record_digests(run, digests)
        recording_adamw.steps = []
        model = fresh_policy(setup)
        if sharded:
            model = shard_causal_lm(model, decoder_layers(model), world)
        final = run_training(model, run, CPU, world, show_progress=False, stop_after=stop_after)
        state = {n: t.clone() for n, t in trainable_state(model).items()}  # collective under FSDP
        first_grads = [g for g in recording_adamw.steps[0]] if recording_adamw.steps and not sharded else None
        return dict(final=final, params=state, digests=digests, first_grads=first_grads)

    for mixer in ("ama-s", "ama-r-sim"):
        results[f"straight-{mixer}"] = train(f"straight-{mixer}", mixer)
    # resume: stop after 2 steps; a fresh model, mixer and optimizer continue from the checkpoint alone
    results["first-half"] = train("halves", stop_after=2)
    if rank == 0:
        shutil.copytree(root / "halves", root / "halves-at-2")  # for the 1-rank continuation
    dist.barrier()
    results["resumed"] = train("halves")
    # FSDP2: the same run with the policy sharded over both ranks
    results["fsdp"] = train("fsdp", sharded=True)
    results["fsdp-halves"] = train("fsdp-halves", sharded=True, stop_after=2)
    if rank == 0:
        shutil.copytree(root / "fsdp-halves", root / "fsdp-halves-at-2")
    dist.barrier()
    results["fsdp-resumed"] = train("fsdp-halves", sharded=True)  # each rank loads its part of every tensor
    # evaluation / cache building: sharded pairs, uneven per rank (7 pairs, batches of 3: 2 batches on rank 0,
    # 1 on rank 1), replicated and sharded models
    pairs = [p for s in setup["train"] for p in s][:7]
    pad = setup["tokenizer"].pad_token_id
    cache = pair_logps(setup["base"], pairs, pad, 3, CPU, world)
    results["logps"] = {"ids": cache.ids, **cache.columns}
    base_policy = fresh_policy(setup)
    sharded_base = shard_causal_lm(base_policy, decoder_layers(base_policy), world)
    cache = pair_logps(sharded_base, pairs, pad, 3, CPU, world)
    results["logps-fsdp"] = {"ids": cache.ids, **cache.columns}
    # a non-finite loss on rank 1 only: both ranks must stop with TrainingDiverged
    run = make_run(setup, root, "ama-s", "diverge", max_steps=STEPS, micro_batch_size=1)
    if rank == 1:
        ids = setup["reference"].ids
        run = dataclasses.replace(run, reference=ValueCache(ids, {**setup["reference"].columns,
                                                                   "chosen": np.full(len(ids), np.nan)}))
    try:
        run_training(fresh_policy(setup), run, CPU, world, show_progress=False)
        results["diverged"] = None
    except TrainingDiverged as e:
        results["diverged"] = str(e)
    torch.save(results, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def spawned(setup, tmp_path_factory, make_run, recording_adamw, fresh_policy, fork_gloo_ranks):
    """Run the 2-process scenarios once; return (setup, folder, per-rank results)."""
    out = tmp_path_factory.mktemp("dist")
    # forked (spawn would re-import torch and transformers in each child, ~25 s of the ~30 s here); a short
    # process-group timeout: a rank left waiting in a collective fails the test instead of hanging it
    fork_gloo_ranks(_worker, setup, str(out), make_run, recording_adamw, fresh_policy, group_timeout_s=60,
                    nprocs=WORLD, timeout_s=180, poll_s=5, what="the 2-process scenarios")
    return setup, out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(spawned, tmp_path_factory, make_run, recording_adamw, fresh_policy, one_thread):
    """Single-process runs of the same global batches (one thread, micro-batches of one pair)."""
    setup, _, _ = spawned
    out = tmp_path_factory.mktemp("single")
    results = {}
    with one_thread():
        for mixer in ("ama-s", "ama-r-sim"):
            run = make_run(setup, out, mixer, mixer, max_steps=STEPS, micro_batch_size=1)
            recording_adamw.steps = []
            original, torch.optim.AdamW = torch.optim.AdamW, recording_adamw
            try:
                model = fresh_policy(setup)
                final = run_training(model, run, CPU, show_progress=False)
            finally:
                torch.optim.AdamW = original
            results[mixer] = dict(final=final, params={n: p.detach().clone() for n, p in model.named_parameters()},
                                  first_grads=recording_adamw.steps[0], weights=metric_weights(run.run_dir))
    return results


def assert_params_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # Adam divides each gradient entry by its running RMS: an entry that is ~0 up to rounding becomes
        # a step of up to ~lr in either direction, so float32 rounding differences of the summed gradients
        # (ranks add in another order) can move such a parameter by a fraction of lr = 5e-3 per step
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("mixer", ["ama-s", "ama-r-sim"])
def test_two_ranks_equal_one(spawned, single, mixer):
    setup, out, ranks = spawned
    mine, ref = ranks[0][f"straight-{mixer}"], single[mixer]
    # (a) both ranks hold bit-identical mixer state after every step
    assert len(mine["digests"]) == STEPS
    assert ranks[0][f"straight-{mixer}"]["digests"] == ranks[1][f"straight-{mixer}"]["digests"]
    # (b) the first step's summed gradient is the single-process batch gradient (same start, rounding only)
    for a, b in zip(mine["first_grads"], ref["first_grads"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert max(g.abs().max() for g in ref["first_grads"]) > 1e-3  # a real gradient
    assert_params_close(mine["params"], ref["params"])
    np.testing.assert_allclose(metric_weights(out / f"straight-{mixer}"), ref["weights"], rtol=0, atol=1e-12)
    assert mine["final"]["tasks"].keys() == ref["final"]["tasks"].keys()
    for task, metrics in ref["final"]["tasks"].items():
        for key, value in metrics.items():
            assert mine["final"]["tasks"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)
    assert ranks[1][f"straight-{mixer}"]["final"] == mine["final"]  # every rank returns the gathered eval


def test_resume_under_two_ranks_equals_the_straight_run(spawned):
    _, out, ranks = spawned
    for r in range(WORLD):
        assert ranks[r]["first-half"]["final"] == {} and len(ranks[r]["first-half"]["digests"]) == 2
        assert ranks[r]["resumed"]["digests"] == ranks[r]["straight-ama-s"]["digests"][2:]
        for name, value in ranks[r]["straight-ama-s"]["params"].items():
            assert torch.equal(ranks[r]["resumed"]["params"][name], value), name  # bitwise: same ranks, same sums
    assert ranks[0]["resumed"]["final"] == ranks[0]["straight-ama-s"]["final"]
    assert metric_weights(out / "halves") == metric_weights(out / "straight-ama-s")


def test_a_sharded_run_resumed_under_two_ranks_equals_the_straight_one(spawned):
    """FSDP2: each rank resumes with only its part of the weights and of the optimizer moments
    (load_trainable_state, load_optimizer_state), and the run ends bitwise where the straight one does."""
    _, out, ranks = spawned
    for r in range(WORLD):
        assert ranks[r]["fsdp-resumed"]["digests"] == ranks[r]["fsdp"]["digests"][2:]
        assert ranks[r]["fsdp-resumed"]["params"].keys() == ranks[r]["fsdp"]["params"].keys()
        for name, value in ranks[r]["fsdp"]["params"].items():
            assert torch.equal(ranks[r]["fsdp-resumed"]["params"][name], value), name
    assert ranks[0]["fsdp-resumed"]["final"] == ranks[0]["fsdp"]["final"]
    assert metric_weights(out / "fsdp-halves") == metric_weights(out / "fsdp")


@pytest.mark.parametrize("saved_by", ["halves-at-2", "fsdp-halves-at-2"])
def test_a_two_rank_checkpoint_continues_on_one_rank(spawned, single, saved_by, make_run, fresh_policy):
    """Replicated or sharded (FSDP2), the 2-rank checkpoint at step 2 continues on 1 process to the same end."""
    setup, out, ranks = spawned
    run = make_run(setup, out, "ama-s", saved_by, max_steps=STEPS, micro_batch_size=1)
    model = fresh_policy(setup)
    final = run_training(model, run, CPU, show_progress=False)
    assert_params_close({n: p.detach() for n, p in model.named_parameters()}, ranks[0]["straight-ama-s"]["params"])
    np.testing.assert_allclose(metric_weights(out / saved_by), single["ama-s"]["weights"], rtol=0, atol=1e-12)
    assert final["tasks"].keys() == single["ama-s"]["final"]["tasks"].keys()


def test_fsdp_equals_one_process(spawned, single):
    _, out, ranks = spawned
    assert ranks[0]["fsdp"]["digests"] == ranks[1]["fsdp"]["digests"]
    assert ranks[0]["fsdp"]["params"].keys() == single["ama-s"]["params"].keys()
    assert ranks[0]["fsdp"]["params"] and all(t.shape == single["ama-s"]["params"][n].shape
                                              for n, t in ranks[0]["fsdp"]["params"].items())  # full, gathered
    assert_params_close(ranks[0]["fsdp"]["params"], single["ama-s"]["params"])
    np.testing.assert_allclose(metric_weights(out / "fsdp"), single["ama-s"]["weights"], rtol=0, atol=1e-12)
    for task, metrics in single["ama-s"]["final"]["tasks"].items():
        for key, value in metrics.items():
            assert ranks[0]["fsdp"]["final"]["tasks"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("which", ["logps", "logps-fsdp"])
def test_sharded_scoring_returns_every_pair_under_its_id(spawned, which):
    setup, _, ranks = spawned
    pairs = [p for s in setup["train"] for p in s][:7]
    ref = pair_logps(setup["base"], pairs, setup["tokenizer"].pad_token_id, 3, CPU)
    for r in range(WORLD):
        got = ranks[r][which]
        assert sorted(got["ids"]) == sorted(p.id for p in pairs)
        cache = ValueCache(list(got["ids"]), {k: v for k, v in got.items() if k != "ids"})
        ids = [p.id for p in pairs]
        for column in ("chosen", "rejected", "chosen_tokens", "rejected_tokens"):
            np.testing.assert_allclose(cache.get(column, ids), ref.get(column, ids), rtol=1e-5, atol=1e-5)


def test_non_finite_loss_on_one_rank_stops_both(spawned):
    _, _, ranks = spawned
    assert ranks[1]["diverged"] is not None and "non-finite loss" in ranks[1]["diverged"]
    assert ranks[0]["diverged"] is not None and "another rank saw a non-finite loss" in ranks[0]["diverged"]


def test_fsdp_needs_several_ranks():
    with pytest.raises(ValueError, match="torchrun"):
        shard_policy(torch.nn.Linear(2, 2), World(), [], sequence_logps)


def test_unwrap_of_a_plain_model_is_the_model():
    model = torch.nn.Linear(2, 2)
    assert unwrap(model) is model

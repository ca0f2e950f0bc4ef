"""The checks of ``python -m benchmarks.gpu_check`` that need a ``torch.distributed`` process group, each run
in a process of its own (``python -m benchmarks.process_group_checks SPEC_JSON OUT_JSON``), so a hung or
crashed collective is ended by the driver's time limit without taking the other checks with it.

Both join a process group of one rank (nccl on CUDA, gloo on the CPU; a file store, no port) and compare
amalab's training through it with the same training in a plain process (docs/maths.md section 8):
* ``fsdp2_one_rank``: the policy sharded by :func:`amalab.llm.logprobs.shard_causal_lm` (FSDP2, one unit per
  decoder layer, the log-prob root) against the plain policy, straight and stopped after 2 steps then resumed
  from its checkpoint by a fresh sharded policy;
* ``nccl_one_process``: an all-reduce of a mixer's statistics (float64, one rank: must come back bit-equal),
  then the replicated path (statistics and gradients all-reduced, ranks' mixer states compared) against the
  plain one, counting the calls of torch.distributed's collectives (each still runs): at least one
  all-reduce of the statistics and one per gradient tensor in every step.
amalab's collectives run only when ``World.distributed``, which a World of size 1 is not (``torchrun
--nproc-per-node 1`` gives exactly that: no process group, nothing distributed runs). :class:`OneProcessGroup`
is a one-rank World that says it is distributed, so here every collective of the step runs through the
backend, each a sum over one rank.

Tolerances: the same computation either way (a sum over one rank is the identity), so the only differences
are CUDA's non-deterministic atomic adds (~1e-7 relative), which AdamW can amplify in a few elements whose
gradient is near zero. Per-step loss and gradient norm within SAME_RTOL = 1e-3 relative, and the parameters
within PARAMETER_RTOL = 1e-2 of the distance the plain run moved them (L2). A lost, doubled or unsynchronized
gradient changes the gradient norm by O(1); a parameter not gathered changes the loss.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from amalab.atomic_write import write_json_atomic
from amalab.training.distributed import World, all_reduce_sum, any_rank, barrier, check_ranks_agree
from amalab.llm.logprobs import shard_causal_lm
from amalab.llm.models import decoder_layers
from amalab.llm.precision import autocast_context
from amalab.training.state import trainable_state
from amalab.mixers import make_mixer
from benchmarks.device_checks import Workload, load, reference_of, train_records

SAME_RTOL = 1e-3
PARAMETER_RTOL = 1e-2


@dataclass(frozen=True)
class OneProcessGroup(World):
    """One rank in a process group: amalab's collectives run (each a sum over this one rank)."""

    @property
    def distributed(self) -> bool:
        return True


@contextlib.contextmanager
def counted_collectives(names=("all_reduce", "all_gather_object", "barrier")):
    """{name: calls} of these ``torch.distributed`` functions while inside (each still runs as it is)."""
    counts, originals = dict.fromkeys(names, 0), {name: getattr(dist, name) for name in names}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in names:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def join_group(device: torch.device, store: Path) -> str:
    if device.type != "cuda":
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        return "gloo"
    device = torch.device("cuda", device.index or 0)
    torch.cuda.set_device(device)  # nccl's collectives and all_gather_object use the current device
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1, device_id=device)
    return "nccl"


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def same_training(plain: list[dict], other: list[dict], initial: dict, plain_state: dict, other_state: dict) -> dict:
    """How far ``other`` (records, final parameters) is from the plain run, and whether within tolerance."""
    moved = sum(float((plain_state[k] - initial[k]).double().norm() ** 2) for k in initial) ** 0.5
    apart = sum(float((other_state[k] - plain_state[k]).double().norm() ** 2) for k in initial) ** 0.5
    largest = max(float((other_state[k] - plain_state[k]).abs().max()) for k in initial)
    result = {"loss_plain": [r["loss"] for r in plain], "loss_other": [r["loss"] for r in other],
              "loss_max_relative_difference": _relative([r["loss"] for r in plain], [r["loss"] for r in other]),
              "grad_norm_max_relative_difference": _relative([r["grad_norm"] for r in plain],
                                                             [r["grad_norm"] for r in other]),
              "parameters_l2_difference_over_l2_update": apart / max(moved, 1e-30),
              "parameters_max_abs_difference": largest}
    result["within"] = bool(len(plain) == len(other) and set(other_state) == set(plain_state)
                            and result["loss_max_relative_difference"] <= SAME_RTOL
                            and result["grad_norm_max_relative_difference"] <= SAME_RTOL
                            and result["parameters_l2_difference_over_l2_update"] <= PARAMETER_RTOL)
    return result


def _plain_run(work: Workload, autocast, micro_batch_size: int = 0):
    model, pad, pairs = load(work)
    initial = trainable_state(model)
    reference = reference_of(model, pairs, pad, work, autocast)
    records = train_records(model, pairs, pad, work, autocast, reference, micro_batch_size=micro_batch_size)
    return records, initial, trainable_state(model), reference


TOLERANCE = {"loss_and_grad_norm_rtol": SAME_RTOL, "parameters_l2_difference_over_l2_update": PARAMETER_RTOL}


def fsdp2_one_rank(work: Workload, backend: str) -> dict:
    """Training the FSDP2-sharded policy on one rank equals training the plain policy, straight and when
    stopped after 2 steps and resumed by a fresh sharded policy (each rank's part of the weights and optimizer
    moments: amalab.training.state.load_optimizer_state). Both accumulate each step over 2 micro-batches
    (gradients reduce-scattered into the shards after each: amalab.training.step)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    autocast = lambda: autocast_context(work.torch_device)  # noqa: E731 - amalab's policy of the device
    micro = max(1, work.batch_size // 2)
    plain, initial, plain_state, reference = _plain_run(work, autocast, micro)
    world = OneProcessGroup()

    def sharded_policy():
        model, pad, pairs = load(work)
        return shard_causal_lm(model, decoder_layers(model), world), pad, pairs

    root, pad, pairs = sharded_policy()
    sharded = all(isinstance(p, DTensor) for p in root.parameters()) and isinstance(root, FSDPModule)
    records = train_records(root, pairs, pad, work, autocast, reference, world, micro_batch_size=micro)
    compared = same_training(plain, records, initial, plain_state, trainable_state(root))
    with tempfile.TemporaryDirectory(prefix="amalab-gpu-check-") as folder:
        run_dir = Path(folder) / "run"
        first = train_records(sharded_policy()[0], pairs, pad, work, autocast, reference, world, run_dir, 2,
                              micro_batch_size=micro)
        resumed_root = sharded_policy()[0]
        rest = train_records(resumed_root, pairs, pad, work, autocast, reference, world, run_dir,
                             micro_batch_size=micro)
    resumed = same_training(plain, first + rest, initial, plain_state, trainable_state(resumed_root))
    passed = compared.pop("within") and resumed.pop("within") and sharded and len(first) == 2
    return {"passed": passed, "workload": {**work.describe(), "micro_batch_size": micro}, "backend": backend,
            "measured": {**compared, "parameters_are_dtensors": sharded,
                         "resumed_after_2_steps": {key: value for key, value in resumed.items()
                                                   if key not in ("loss_plain", "loss_other")}},
            "tolerance": TOLERANCE}


def nccl_one_process(work: Workload, backend: str) -> dict:
    """A mixer's statistics all-reduced bit-equal; replicated training through the group equals plain."""
    world = OneProcessGroup()
    mixer = make_mixer("ama-s", 2, sizes=[4, 4], gamma=0.5)
    rng = np.random.default_rng(0)
    tasks, losses = np.array([0, 1, 1, 0, 1, 0]), rng.random(6) / 3
    statistics = mixer.statistics(tasks, losses, losses - rng.random(6) / 7)
    reduced = all_reduce_sum(statistics, world)
    statistics_equal = bool(np.array_equal(reduced, statistics) and reduced.dtype == np.float64)
    flagged = any_rank(True, world) and not any_rank(False, world)
    autocast = lambda: autocast_context(work.torch_device)  # noqa: E731
    plain, initial, plain_state, reference = _plain_run(work, autocast)
    model, pad, pairs = load(work)
    tensors = sum(p.requires_grad for p in model.parameters())
    with counted_collectives() as counts:  # the collectives that really went through the backend
        records = train_records(model, pairs, pad, work, autocast, reference, world)
        check_ranks_agree({"weights": np.asarray([r["weights"] for r in records])}, world)  # all_gather_object
        barrier(world)
    all_reduces = counts["all_reduce"]
    expected = work.steps * (1 + tensors)  # per step: the statistics, then every gradient tensor
    compared = same_training(plain, records, initial, plain_state, trainable_state(model))
    passed = compared.pop("within") and statistics_equal and flagged and all_reduces >= expected
    return {"passed": passed, "workload": work.describe(), "backend": backend,
            "measured": {**compared, "statistics_all_reduce_bit_equal": statistics_equal,
                         "any_rank_flag": flagged, "collectives": counts,
                         "all_reduces_expected_at_least": expected},
            "tolerance": {**TOLERANCE, "statistics": "bit-equal (a float64 sum over one rank)"}}


CHECKS = {"fsdp2_one_rank": fsdp2_one_rank, "nccl_one_process": nccl_one_process}


def main(spec: dict) -> dict:
    work = Workload(**spec["work"])
    if work.device == "cpu":
        torch.set_num_threads(1)  # the plumbing run shares a small machine
    with tempfile.TemporaryDirectory(prefix="amalab-process-group-") as folder:
        backend = join_group(work.torch_device, Path(folder) / "store")
        try:
            return CHECKS[spec["check"]](work, backend)
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    spec_json, out_path = sys.argv[1], sys.argv[2]
    try:
        result = main(json.loads(spec_json))
    except Exception as error:  # noqa: BLE001 - the driver reads the error from the result file
        traceback.print_exc()
        result = {"passed": False, "error": f"{type(error).__name__}: {error}"}
    write_json_atomic(Path(out_path), result, indent=1)

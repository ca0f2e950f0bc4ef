"""One point of the diagnostic run: on one dataset, the specialists, every method and every merge, for each
seed (docs/maths.md section 7). Each seed's generalists and merges use that seed's specialists: their
cached losses s(z) for AMA, their parameters for the merges. DoReMi-style measures the excess over the
seed's ``standard`` generalist, so ``standard`` trains first. Each seed has its own data too (behaviour
policies, segments, labels and reference: :func:`~amalab.control.run.data_seed`), so seeds are independent
draws of the whole experiment, and :mod:`amalab.control.diagnose` runs each (point, seed) as jobs of :mod:`amalab.runner`: the
specialists first (the run checks that they beat the reference before any generalist trains,
docs/maths.md (62)), then the methods and merges.
"""

from __future__ import annotations

import copy

from amalab.control.config import DiagnoseConfig
from amalab.control.run import Point, Run, workspace
from amalab.control.training import (segment_pair_example_losses, segment_pair_losses, segment_pair_values,
                                     train_policy)
from amalab.mixers import make_mixer
from amalab.mixers.methods import baseline_losses, make_method
from amalab.training.cache import ValueCache
from amalab.training.merge import merge_state_dicts


def _loss_caches(policies, data, reference, loss) -> list[ValueCache]:
    """Per task, s(z) = the loss of ``policies[i]`` on each of task i's training pairs."""
    return [ValueCache([p.id for p in d.train], {"loss": segment_pair_losses(policy, d.train, reference,
                                                                               loss.loss_type, loss.beta,
                                                                               loss.options)})
            for policy, d in zip(policies, data)]


def _point_inputs(run: Run, point: Point, seed: int) -> tuple:
    """Training seed ``seed``'s datasets of the point, its reference (trained or read from disk), the
    reference's cached log-probs, and the records' common fields."""
    data = run.datasets(point, seed)
    reference = run.reference(point, seed, data)
    pairs = [p for d in data for p in d.train + d.held_out]
    reference_logps = ValueCache([p.id for p in pairs], segment_pair_values(reference, pairs))
    return data, reference, reference_logps, {"counts": [d.counts for d in data]}


def _seed_trainer(run: Run, point: Point, seed: int, reference, reference_logps):
    """``train(name, optim, train_sets, mixer, baselines, loss_name)``: the seed's model ``name``, trained from
    the reference and saved, or read from disk."""
    folder, train_seed = run.models / point.folder, run.config.seed + seed

    def train(name, optim, train_sets, mixer, baselines, loss_name):
        options = point.loss.options if loss_name == point.loss.loss_type else {}  # sft takes none
        losses = segment_pair_example_losses(loss_name, point.loss.beta, reference_logps, options)
        return run.trained(folder / "models" / f"{name}-{seed}.pt", reference, lambda policy: train_policy(
            policy, train_sets, losses, mixer, baselines, optim, train_seed, name))

    return train


def _specialists(run: Run, point: Point, seed: int, inputs: tuple) -> list:
    data, reference, reference_logps, _ = inputs
    train = _seed_trainer(run, point, seed, reference, reference_logps)
    return [train(f"specialist-{task.name}", run.config.specialists, [data[i].train], make_mixer("uniform", 1), None,
                  point.loss.loss_type) for i, task in enumerate(run.config.tasks)]


def _evaluator(run: Run, point: Point, seed: int, inputs: tuple):
    data, _, reference_logps, about = inputs
    return lambda policy, kind, name: run.record(
        run.models / point.folder / "records" / f"{name}-{seed}.json", policy, data, reference_logps, point.loss,
        {**about, "kind": kind, "method": name, "seed": seed})


def specialist_records(run: Run, point: Point, seed: int) -> list[dict]:
    """Seed ``seed``'s records of ``point``: the reference's on the seed's evaluation episodes, then its
    specialists' (one per task, trained from the reference)."""
    inputs = _point_inputs(run, point, seed)
    evaluate = _evaluator(run, point, seed, inputs)
    return [evaluate(inputs[1], "reference", "reference")] + [
        evaluate(policy, "specialist", f"specialist-{task.name}")
        for policy, task in zip(_specialists(run, point, seed, inputs), run.config.tasks)]


def method_records(run: Run, point: Point, seed: int) -> list[dict]:
    """Seed ``seed``'s records of each method and merge of ``point``, in order, from that seed's specialists
    (read from disk, or trained if missing)."""
    c, k = run.config, len(run.config.tasks)
    inputs = _point_inputs(run, point, seed)
    data, reference, reference_logps, _ = inputs
    sizes, train_seed, records = [len(d.train) for d in data], c.seed + seed, []
    train, evaluate = _seed_trainer(run, point, seed, reference, reference_logps), _evaluator(run, point, seed, inputs)
    specialists = _specialists(run, point, seed, inputs)
    specialist_losses, generalists = _loss_caches(specialists, data, reference_logps, point.loss), {}
    for name in point.methods:
        mixer, loss_name = make_method(name, k, sizes, c.methods.options.get(name, {}), point.loss.loss_type)
        # the mixer's baseline s(z): the specialists' losses, the standard generalist's (it trains first), none
        baselines = baseline_losses(mixer, specialist=lambda: specialist_losses, standard=lambda: _loss_caches(
            [generalists["standard"]] * k, data, reference_logps, point.loss))
        generalists[name] = train(name, c.train, [d.train for d in data], mixer, baselines, loss_name)
        records.append(evaluate(generalists[name], "method", name))
    base = reference.state_dict()
    for name in point.merges:
        merged = copy.deepcopy(reference)  # the reference's architecture and input standardization
        merged.load_state_dict(merge_state_dicts(base, [s.state_dict() for s in specialists], name,
                                                 seed=train_seed, **c.merges.options.get(name, {})))
        records.append(evaluate(merged, "merge", name))
    return records


def seed_records(run: Run, point: Point, seed: int) -> list[dict]:
    """Seed ``seed``'s records of ``point``: the reference's, each specialist's, then each method's and
    merge's, in order."""
    return specialist_records(run, point, seed) + method_records(run, point, seed)


def compare(run: Run, point: Point) -> list[dict]:
    """Every record of ``point``, in this process: each seed's (:func:`seed_records`)."""
    return [r for seed in range(point.seeds) for r in seed_records(run, point, seed)]


# The jobs of amalab.control.diagnose: module-level functions of the config (the runner pickles them to its
# workers), each on this process's workspace.

def data_job(config: DiagnoseConfig, task_index: int, seed: int) -> None:
    """Train (or find on disk) task ``task_index``'s behaviour policies for training seed ``seed``, and simulate
    their segments."""
    workspace(config).pool(task_index, seed)


def reference_job(config: DiagnoseConfig, point: Point, seed: int) -> None:
    """Train (or find on disk) training seed ``seed``'s reference of ``point``'s dataset."""
    run = workspace(config)
    run.reference(point, seed, run.datasets(point, seed))


def specialist_job(config: DiagnoseConfig, point: Point, seed: int) -> list[dict]:
    return specialist_records(workspace(config), point, seed)


def method_job(config: DiagnoseConfig, point: Point, seed: int) -> list[dict]:
    return method_records(workspace(config), point, seed)

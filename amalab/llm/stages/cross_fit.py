"""Cross-fitted specialist losses (docs/maths.md section 12).

A specialist scores the pairs it trained on lower than pairs it never saw, so an in-sample s(z) makes every
training excess l(theta; z) - s(z) look larger on the tasks whose specialists memorized most, and the mixers
chase that. Cross-fitting removes it: task i's training pairs are cut into K folds; specialist f trains on
every fold but f and scores fold f; a held-out pair is scored by the mean of the K specialists, none of
which saw it.

Folds are a seeded shuffle of the task's pair ids in sorted order, dealt out in turn, so they depend on the
pairs and the seed, never on the order of the source file, and their sizes differ by at most one. The fold
specialists are trained and scored by the specialists stage (:mod:`amalab.llm.stages.specialists`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amalab.errors import ConfigError
from amalab.llm.experiment import Experiment
from amalab.training.cache import ValueCache


def fold_indices(ids: Sequence[str], k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of each id, in the order given: a seeded shuffle of the sorted ids dealt in turn (53)."""
    if k < 2:
        raise ValueError(f"cross-fitting needs k >= 2 folds, got {k}")
    if len(set(ids)) != len(ids):
        raise ValueError("cross-fitting: pair ids are not unique")
    if len(ids) < k:
        raise ValueError(f"cross-fitting: {len(ids)} pairs cannot fill {k} folds")
    order = sorted(ids)
    shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    fold_of = {pair_id: position % k for position, pair_id in enumerate(shuffled)}
    return [fold_of[pair_id] for pair_id in ids]


def folds(pairs: Sequence, k: int, seed: int) -> list[tuple[list, list]]:
    """Per fold f: (the pairs specialist f trains on: every fold but f, the pairs it scores: fold f)."""
    where = fold_indices([p.id for p in pairs], k, seed)
    return [([p for p, g in zip(pairs, where) if g != f], [p for p, g in zip(pairs, where) if g == f])
            for f in range(k)]


def cross_fitted_losses(fold_caches: Sequence[ValueCache], scored: Sequence[Sequence], held_out: Sequence) -> ValueCache:
    """s(z) of a task: a training pair's from the fold specialist that scored it (54), a held-out pair's the mean
    over every fold specialist (55). ``fold_caches[f]`` holds specialist f's losses on ``scored[f]`` and on
    every pair of ``held_out``."""
    ids = [p.id for pairs in scored for p in pairs]
    values = [cache.get("loss", [p.id for p in pairs]) for cache, pairs in zip(fold_caches, scored)]
    scored_ids = set(ids)
    held_out_ids = list(dict.fromkeys(p.id for p in held_out if p.id not in scored_ids))
    mean = np.mean([cache.get("loss", held_out_ids) for cache in fold_caches], axis=0) if held_out_ids else []
    return ValueCache(ids + held_out_ids, {"loss": np.concatenate([*values, np.asarray(mean, dtype=float)])})


def task_folds(experiment: Experiment, task: int) -> list[tuple[list, list]]:
    """Task ``task``'s training pairs cut into [specialists] cross_fit folds: (trained on, scored) per fold."""
    config = experiment.config
    try:
        return folds(experiment.train_sets[task], config.specialists.cross_fit, config.seed)
    except ValueError as e:
        raise ConfigError(f"task {experiment.task_names[task]!r} ({len(experiment.train_sets[task])} training "
                          f"pairs), [specialists] cross_fit = {config.specialists.cross_fit}: {e}") from None

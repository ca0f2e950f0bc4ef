"""Scoring pairs without gradients, and the per-task held-out evaluation (docs/maths.md section 11).

:func:`pair_logps` computes sequence log-probs of many pairs in length-sorted batches (what the reference
cache stores); :func:`pair_losses` turns policy log-probs and cached reference log-probs into per-example
losses and margins (what the baseline caches store, and what evaluation averages). Both shard their pairs
over the ranks of a distributed run and gather the results, so every rank ends with all of them.

Per task, on its held-out pairs:
    loss      mean l(theta; z)
    excess    mean max(l(theta; z) - s(z), 0), s the specialists' cached loss, (46) or (55)  (E_i, (49))
    accuracy  share of pairs with implicit reward margin h > 0
    margin    mean h
and the worst-task excess max_i E_i, the number AMA minimizes.
"""

from __future__ import annotations

import numpy as np
import torch

from amalab.training.cache import ValueCache
from amalab.llm.collate import collate_pairs, length_sorted_batches
from amalab.training.distributed import World, is_sharded
from amalab.llm.logprobs import policy_logps
from amalab.objectives.preference import PreferenceLoss
from amalab.llm.precision import autocast_context
from amalab.llm.tokenize import TokenizedPair


def _gather(values: dict[str, np.ndarray], world: World) -> dict[str, np.ndarray]:
    if not world.distributed:
        return values
    import torch.distributed as dist

    parts = [None] * world.size
    dist.all_gather_object(parts, values)
    return {key: np.concatenate([p[key] for p in parts]) for key in values}


@torch.no_grad()
def pair_logps(model, pairs: list[TokenizedPair], pad_token_id: int, batch_size: int, device: torch.device,
               world: World = World(), progress=None, autocast=None) -> ValueCache:
    """Summed completion log-probs of every pair (columns chosen, rejected, chosen_tokens, rejected_tokens).

    ``autocast``: a context factory for the forward passes (default :func:`autocast_context` of ``device``).

    Length-sorted batches keep padding small; rank r scores pairs r, r + W, ... and the results are gathered
    (each result travels with its pair id, so the order of the gathered pairs does not matter).
    """
    autocast = autocast or (lambda: autocast_context(device))
    was_training = model.training
    model.eval()
    mine = pairs[world.rank::world.size]
    ids, columns = [], {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
    for group in length_sorted_batches(mine, batch_size) if mine else []:
        batch = collate_pairs(group, pad_token_id).to(device)
        with autocast():
            logps = policy_logps(model, batch)
        ids.extend(batch.ids)
        columns["chosen"].append(logps.chosen.double().cpu().numpy())
        columns["rejected"].append(logps.rejected.double().cpu().numpy())
        columns["chosen_tokens"].append(batch.chosen_token_counts.double().cpu().numpy())
        columns["rejected_tokens"].append(batch.rejected_token_counts.double().cpu().numpy())
        if progress is not None:
            progress(len(group))
    if is_sharded(model) and pairs:
        # a sharded model's forward is a collective: a rank with fewer batches than rank 0 (which holds the most
        # pairs) runs the missing forwards on a pair whose result it discards
        most = -(-len(pairs[0::world.size]) // batch_size)
        for _ in range(most - (-(-len(mine) // batch_size))):
            with autocast():
                policy_logps(model, collate_pairs(pairs[:1], pad_token_id).to(device))
    model.train(was_training)
    local = {key: np.concatenate(value) if value else np.zeros(0) for key, value in columns.items()}
    gathered = _gather({"ids": np.array(ids, dtype=object), **local}, world)
    return ValueCache(list(gathered.pop("ids")), gathered)


def pair_losses(logps: ValueCache, reference: ValueCache, ids: list[str], loss: PreferenceLoss
                ) -> tuple[np.ndarray, np.ndarray]:
    """(per-example losses, margins h) of the pairs ``ids`` from policy and reference log-probs."""
    def column(cache, name):
        return torch.from_numpy(cache.get(name, ids))

    losses, margins = loss(
        column(logps, "chosen"), column(logps, "rejected"), column(reference, "chosen"),
        column(reference, "rejected"), chosen_token_counts=column(logps, "chosen_tokens"),
        rejected_token_counts=column(logps, "rejected_tokens"))
    return losses.numpy(), margins.numpy()


def evaluate(model, eval_sets: list[list[TokenizedPair]], task_names: list[str], reference: ValueCache,
             specialist_caches: list[ValueCache | None], loss: PreferenceLoss, pad_token_id: int,
             batch_size: int, device: torch.device, world: World = World(), autocast=None) -> dict:
    """Held-out metrics per task and the worst-task excess (module docstring); ``autocast`` as in
    :func:`pair_logps`."""
    everything = [pair for pairs in eval_sets for pair in pairs]
    logps = pair_logps(model, everything, pad_token_id, batch_size, device, world, autocast=autocast)
    tasks = {}
    for name, pairs, specialist in zip(task_names, eval_sets, specialist_caches):
        if not pairs:
            continue
        ids = [p.id for p in pairs]
        losses, margins = pair_losses(logps, reference, ids, loss)
        entry = dict(n=len(ids), loss=float(losses.mean()), accuracy=float((margins > 0).mean()),
                     margin=float(margins.mean()))
        if specialist is not None:
            entry["excess"] = float(np.maximum(losses - specialist.get("loss", ids), 0.0).mean())
        tasks[name] = entry
    result = {"tasks": tasks}
    excess = {name: t["excess"] for name, t in tasks.items() if "excess" in t}
    if excess:
        worst = max(excess, key=excess.get)
        result.update(worst_excess=excess[worst], worst_task=worst)
    return result

"""The generalists of an LLM experiment: every method of ``[methods]`` with its seeds, trained on every task
against its baseline losses (``OUT/generalists/<method>/seed<s>/``), and the base model evaluated like one
(``OUT/base/``), where every method starts. Export: :mod:`amalab.llm.export`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from amalab.atomic_write import write_json_atomic
from amalab.llm.config import LLMConfig
from amalab.llm.experiment import Experiment
from amalab.llm.fingerprint import policy_fingerprint
from amalab.llm.generation_scores import add_generation
from amalab.llm.stages.policies import described, train_policy, trained_policy
from amalab.llm.stages.scoring import SpecialistLosses, loss_cache, scored
from amalab.llm.train import TrainingRun
from amalab.mixers import make_mixer
from amalab.mixers.methods import baseline_losses, make_method, method_mixer_and_loss
from amalab.training.cache import ValueCache
from amalab.training.distributed import World, decide_on_rank0
from amalab.training.run import check_run_dir, training_tokens
from amalab.training.step import check_sequential_update


def generalist_runs(config: LLMConfig, out: Path) -> Iterator[tuple[str, str, bool, int, Path]]:
    """(label, method, in-sample?, seed index, run folder) of every generalist of the config, in order."""
    for label, method, in_sample in config.methods.runs():
        for s in range(config.methods.seeds_of(method)):
            yield label, method, in_sample, s, out / "generalists" / label / f"seed{s}"


def check_generalist_batches(config: LLMConfig, world: World) -> None:
    """Refuse (ConfigError, one line) a method that cannot train in ``[train] micro_batch_size`` on ``world``.

    Sequential AMA-R updates its weights from the whole batch before any backward pass, so each rank's share
    of the batch must go through one forward pass: micro_batch_size 0, or at least the largest share,
    ceil(batch_size / world size) (:func:`~amalab.training.distributed.rank_slots`). micro_batch_size =
    batch_size / world size is one micro-batch a rank, not accumulation. The world size is known only here,
    not when the config loads. Decided on the largest share, not this rank's, so that every rank refuses
    together (a rank refusing alone would leave the others waiting in a collective).
    """
    micro, batch = config.train.micro_batch_size, config.train.batch_size
    per_rank = math.ceil(batch / world.size)
    if not 0 < micro < per_rank:
        return
    k = len(config.tasks)
    for name in config.methods.names:
        mixer = make_mixer(method_mixer_and_loss(name, config.loss.loss_type)[0], k, sizes=[1] * k,
                           **config.methods.options.get(name, {}))
        processes = f"{world.size} process{'es' if world.size > 1 else ''}"
        check_sequential_update(mixer, micro, per_rank,
                                f"{config.source_path or 'config'}: [train] micro_batch_size = {micro} is "
                                f"under the {per_rank} examples a rank (batch_size {batch} over {processes}): "
                                f"[methods] {name}")


def generalist_run(experiment: Experiment, label: str, method: str, s: int, run_dir: Path, losses: SpecialistLosses,
                   standard_cache: ValueCache | None, in_sample: bool = False) -> TrainingRun:
    """Method ``method``'s generalist of seed index ``s`` (reported as ``label``): every task, its mixer
    against its baseline losses (the specialists', in-sample if ``in_sample``; the standard generalist's; or
    none), evaluated in the config's loss against the experiment's specialist losses."""
    config, k = experiment.config, len(experiment.tasks)
    options = dict(config.methods.options.get(method, {}))
    mixer, loss = make_method(method, k, [len(pairs) for pairs in experiment.train_sets], options,
                              config.loss.loss_type)
    specialist = losses.in_sample if in_sample else losses.evaluation
    # load_llm_config puts a method measured against the standard generalist after "standard"
    baseline = baseline_losses(mixer, lambda: specialist, lambda: [standard_cache] * k)
    run = TrainingRun(name=f"{label} seed {s}", run_dir=run_dir, mixer=mixer, task_names=experiment.task_names,
                      train_sets=experiment.train_sets, eval_sets=experiment.eval_sets,
                      reference=experiment.reference, baseline_losses=baseline,
                      specialist_caches=losses.evaluation, optim=config.train,
                      loss=replace(config.loss, loss_type=loss), seed=config.seed + s,
                      pad_token_id=experiment.pad_token_id, eval_loss=config.loss)
    description = {"name": method_mixer_and_loss(method, config.loss.loss_type)[0], "options": options}
    if mixer.baseline == "specialist":  # the s(z) it trains against: other values make another run
        description["specialist_losses"] = losses.stamp(in_sample)
    return described(run, description, experiment.reference_manifest)


def _standard_cache(experiment: Experiment, model, run_dir: Path) -> ValueCache:
    """The standard generalist's losses on every pair: the baseline losses of the methods measured against it."""
    every = [p for pairs in experiment.train_sets + experiment.eval_sets for p in pairs]
    manifest = {"kind": "standard generalist losses", "model": policy_fingerprint(model), "run": str(run_dir)}
    return loss_cache(experiment, model, every, experiment.out / "caches" / "standard", manifest,
                      "standard generalist losses")


def generalists(experiment: Experiment, losses: SpecialistLosses) -> list[dict]:
    """Train every method of the config with its seeds; return one record per run. A run finished earlier
    whose held-out metrics were scored against other specialist losses is evaluated again. Whether it finished
    earlier is rank 0's to say (docs/distributed.md, "Decisions every rank shares")."""
    check_generalist_batches(experiment.config, experiment.world)
    records, standard_cache = [], None
    for label, method, in_sample, s, run_dir in generalist_runs(experiment.config, experiment.out):
        run = generalist_run(experiment, label, method, s, run_dir, losses, standard_cache, in_sample)
        # one answer for every rank: a rank that saw a final.json alone would score while the others stamp
        fresh = not decide_on_rank0(experiment.world, (run_dir / "final.json").is_file)
        model, final = train_policy(experiment, run)
        if method == "standard" and standard_cache is None:
            standard_cache = _standard_cache(experiment, model, run_dir)
        if final.get("specialist_losses") != losses.stamp():
            # a run trained now was evaluated against these losses already: it only needs the stamp
            final = ({**final, "specialist_losses": losses.stamp()} if fresh
                     else scored(experiment, model, losses, run_dir, final))
            _write(experiment, run_dir / "final.json", final)
        final = add_generation(experiment, model, run_dir, final)
        records.append(_record(experiment, label, s, run_dir, final))
        experiment.progress.say(f"{label} seed {s}: worst-task excess {final.get('worst_excess', float('nan')):.4f} "
                                f"({final.get('worst_task')})")
        del model
    return records


def _write(experiment: Experiment, path: Path, final: dict) -> None:
    """Rank 0 writes ``final``; its failure stops every rank rather than one."""
    decide_on_rank0(experiment.world, lambda: write_json_atomic(path, final, indent=1))


def _record(experiment: Experiment, label: str, s: int, run_dir: Path, final: dict) -> dict:
    """A summary record: the run's final metrics, its folder, and its optimizer steps and training tokens (as
    rank 0's metrics.jsonl counts them: every rank's record is the same)."""
    tokens = decide_on_rank0(experiment.world, lambda: training_tokens(run_dir))
    return {"method": label, "seed": s, "run_dir": run_dir.relative_to(experiment.out).as_posix(), **final,
            "steps": final.get("steps", 0), "tokens": tokens}


def _final(path: Path) -> dict | None:
    """A run's final.json, None where there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def reevaluated_generalists(experiment: Experiment, losses: SpecialistLosses) -> list[dict]:
    """Every finished generalist evaluated again from its last checkpoint (final.json rewritten); a run
    trained with other settings (other baseline losses among them) is refused, as training refuses it.
    Rank 0's final.json says which runs finished, and a refusal on any rank stops every rank."""
    config, records, world = experiment.config, [], experiment.world
    for label, method, in_sample, s, run_dir in generalist_runs(config, experiment.out):
        # rank 0's files decide for every rank: a rank skipping alone would leave the others in a collective
        final = decide_on_rank0(world, lambda: _final(run_dir / "final.json"))
        if final is None:
            experiment.progress.say(f"{label} seed {s}: not finished ({run_dir}); skipped")
            continue
        run = generalist_run(experiment, label, method, s, run_dir, losses, None, in_sample)
        check_run_dir(run.run_dir, run.description, world)
        model = trained_policy(experiment, run_dir, config.seed + s)
        final = scored(experiment, model, losses, run_dir, final)
        _write(experiment, run_dir / "final.json", final)
        records.append(_record(experiment, label, s, run_dir, final))
    return records


def base_record(experiment: Experiment, losses: SpecialistLosses, fresh: bool = False) -> dict:
    """The base model (pi_ref, no training) evaluated like a generalist, into ``OUT/base/final.json``: its
    generation success is where every method starts. Kept unless ``fresh`` or scored against other losses."""
    run_dir = experiment.out / "base"
    path = run_dir / "final.json"
    # rank 0's final.json decides for every rank whether to score again (docs/distributed.md)
    final = {} if fresh else decide_on_rank0(experiment.world, lambda: _final(path)) or {}
    if final.get("specialist_losses") != losses.stamp():
        run_dir.mkdir(parents=True, exist_ok=True)
        final = scored(experiment, experiment.on_device(), losses, run_dir, {})
        for metrics in final["tasks"].values():  # pi_ref against itself: every margin is 0 up to rounding
            metrics.pop("accuracy", None), metrics.pop("margin", None)
        _write(experiment, path, final)
    return {"method": "base", "seed": 0, "run_dir": "base", **final, "steps": 0, "tokens": 0}

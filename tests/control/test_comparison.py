"""One point of the diagnostic run (amalab.control.comparison), checked against numbers computed here: each
method trains with its mixer, loss and baseline s(z) (the specialists' DPO losses, the standard
generalist's, or none), a record's held-out loss is the DPO loss of its policy, and the linear merge is the
specialists' mean. Sequence log-densities and DPO losses are recomputed in float64 numpy from the weights."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from amalab.control import comparison  # noqa: E402
from amalab.control.config import load_diagnose_config  # noqa: E402
from amalab.control.run import Run, run_points  # noqa: E402


def _small(text: str) -> str:
    """The tiny config with one seed, the methods that differ in baseline or loss, one merge, no sweeps, and
    the DPO loss (the oracle below)."""
    text = text[:text.index("[sweeps]")].replace('loss_type = "apo_zero"', 'loss_type = "dpo"')
    text = text.replace('names = ["standard", "uniform", "doremi", "odm", "ama-r", "ama-r-sim", "ama-s", "sft"]\n'
                        'seeds = 6', 'names = ["standard", "uniform", "doremi", "ama-r", "sft"]\nseeds = 1')
    return text.replace('names = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]',
                        'names = ["linear"]')


def _log_density(policy, segment) -> float:
    """log pi(segment) by hand: the tanh MLP's mean and the diagonal Gaussian, in float64."""
    x = np.asarray(segment.observations, float)
    if policy.standardized:  # [policy] normalize: the MLP reads (o - mean) / scale
        x = (x - policy.input_mean.double().numpy()) / policy.input_scale.double().numpy()
    layers = [m for m in policy.mean if isinstance(m, torch.nn.Linear)]
    for j, layer in enumerate(layers):
        x = x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        if j < len(layers) - 1:
            x = np.tanh(x)
    log_std = policy.log_std.detach().double().numpy()
    z = (np.asarray(segment.actions, float) - x) / np.exp(log_std)
    return float(np.sum(-0.5 * z ** 2 - log_std - 0.5 * np.log(2 * np.pi)))


def _dpo(policy, reference, pairs, beta) -> np.ndarray:
    """-log sigmoid(beta ((log pi_c - log ref_c) - (log pi_r - log ref_r))) per pair."""
    margin = np.array([(_log_density(policy, p.chosen) - _log_density(reference, p.chosen))
                       - (_log_density(policy, p.rejected) - _log_density(reference, p.rejected)) for p in pairs])
    return np.logaddexp(0.0, -beta * margin)


@pytest.fixture
def point_run(make_tiny_config, monkeypatch):
    """The small config's main point compared, with every train_policy call recorded."""
    config = load_diagnose_config(make_tiny_config(_small))
    calls, loss_names = {}, []
    real_train, real_losses = comparison.train_policy, comparison.segment_pair_example_losses

    def spy_train(policy, train_sets, losses, mixer, baselines, optim, seed, name, **kwargs):
        calls[name] = {"mixer": mixer, "baselines": baselines, "train_sets": train_sets, "loss": loss_names[-1]}
        return real_train(policy, train_sets, losses, mixer, baselines, optim, seed, name, **kwargs)

    def spy_losses(loss, *args):
        loss_names.append(loss)
        return real_losses(loss, *args)

    monkeypatch.setattr(comparison, "train_policy", spy_train)
    monkeypatch.setattr(comparison, "segment_pair_example_losses", spy_losses)
    run = Run(config, show_progress=False)
    point = run_points(config)[0]
    records = comparison.compare(run, point)
    return config, run, point, records, calls


def _policy(run, point, name, data):
    policy = run.new_policy(0, data)
    policy.load_state_dict(torch.load(run.models / point.folder / "models" / f"{name}-0.pt", weights_only=True))
    return policy


def _assert_linear_merge_loss(record, config, run, point, data, reference):
    """The record's held-out loss is the DPO loss of the mean of the specialists' state dicts."""
    specialists = [_policy(run, point, f"specialist-{t.name}", data) for t in config.tasks]
    merged = run.new_policy(0, data)
    merged.load_state_dict({key: sum(s.state_dict()[key] for s in specialists) / len(specialists)
                            for key in merged.state_dict()})
    expected = [float(_dpo(merged, reference, d.held_out, config.loss.beta).mean()) for d in data]
    np.testing.assert_allclose(record["held_out_loss"], expected, rtol=2e-4, atol=2e-5)


def test_each_method_trains_against_its_baseline(point_run):
    config, run, point, records, calls = point_run
    data = run.datasets(point, 0)
    reference = run.reference(point, 0, data)
    beta = config.loss.beta
    # sft: the standard mixture trained on the chosen segments' NLL; every other method in the config's loss
    assert {name: c["loss"] for name, c in calls.items()} == {
        **{f"specialist-{t.name}": "dpo" for t in config.tasks},
        "standard": "dpo", "uniform": "dpo", "doremi": "dpo", "ama-r": "dpo", "sft": "sft"}
    sizes = np.array([len(d.train) for d in data])
    for name in ("standard", "sft"):  # the size-proportional mixture, sampled
        np.testing.assert_allclose(calls[name]["mixer"].weights, sizes / sizes.sum())
        assert calls[name]["mixer"].sampling
    assert not calls["uniform"]["mixer"].sampling  # the uniform mixture weighs every task's losses, unsampled
    assert calls["ama-r"]["mixer"].baseline == "specialist" and calls["doremi"]["mixer"].baseline == "standard"
    for name in ("standard", "uniform", "sft"):
        assert calls[name]["baselines"] is None
    specialists = [_policy(run, point, f"specialist-{t.name}", data) for t in config.tasks]
    standard = _policy(run, point, "standard", data)
    for name, source in (("ama-r", specialists), ("doremi", [standard] * len(config.tasks))):
        baselines = calls[name]["baselines"]
        assert len(baselines) == len(config.tasks)
        for i, d in enumerate(data):
            got = baselines[i].get("loss", [p.id for p in d.train])
            np.testing.assert_allclose(got, _dpo(source[i], reference, d.train, beta), rtol=2e-4, atol=2e-5)
    # a specialist trains on its own task's pairs only, a generalist on every task's
    assert [len(s) for s in calls["specialist-forward"]["train_sets"]] == [len(data[0].train)]
    assert [len(s) for s in calls["ama-r"]["train_sets"]] == [len(d.train) for d in data]


def test_records_hold_the_held_out_dpo_loss_and_the_merge_is_the_mean(point_run):
    config, run, point, records, _ = point_run
    data = run.datasets(point, 0)
    reference = run.reference(point, 0, data)
    by_name = {r["method"]: r for r in records}
    assert [r["kind"] for r in records].count("specialist") == len(config.tasks)
    assert {r["method"] for r in records if r["kind"] == "method"} == set(point.methods)
    assert by_name["reference"]["held_out_loss"] == pytest.approx([np.log(2)] * len(data), abs=1e-6)  # margin 0
    for name in ("ama-r", "sft", "specialist-still"):
        policy = _policy(run, point, name, data)
        expected = [float(_dpo(policy, reference, d.held_out, config.loss.beta).mean()) for d in data]
        np.testing.assert_allclose(by_name[name]["held_out_loss"], expected, rtol=2e-4, atol=2e-5)
    # the record on disk is what compare returned
    on_disk = json.loads((run.models / point.folder / "records" / "ama-r-0.json").read_text())
    assert on_disk == json.loads(json.dumps(by_name["ama-r"]))

    # linear merge: the mean of the specialists' parameters, evaluated like any policy
    _assert_linear_merge_loss(by_name["linear"], config, run, point, data, reference)


def test_each_training_seed_draws_its_own_data(point_run):
    """Seeds are independent draws of the whole experiment: each has its own behaviour policies, segments,
    labels and reference; a seed's data does not depend on which other seeds the run has."""
    config, run, point, _, _ = point_run
    pools = [run.pool(0, seed) for seed in (0, 1)]  # seed 1's drawn here if the run had one seed
    policies = [np.load(run.out / "behaviour" / "forward" / f"seed-{seed}" / "arrays.npz")["policies"]
                for seed in (0, 1)]
    assert not np.allclose(policies[0][-1], policies[1][-1])  # CEM's best level differs between seeds
    assert not np.allclose(pools[0]["observations"], pools[1]["observations"])
    data = [run.datasets(point, seed) for seed in (0, 1)]
    assert [p.chosen.actions.tolist() for p in data[0][0].train] != [p.chosen.actions.tolist() for p in data[1][0].train]
    references = [run.reference(point, seed, d) for seed, d in zip((0, 1), data)]
    assert not torch.equal(references[0].state_dict()["mean.0.weight"], references[1].state_dict()["mean.0.weight"])
    # a fresh workspace (a worker's) draws seed 1's data alone and gets the same arrays
    alone = Run(config, show_progress=False)
    alone._pools.clear()
    for name, array in run.pool(1, 1).items():
        np.testing.assert_array_equal(alone.pool(1, 1)[name], array)


def test_a_normalized_policy_reads_observations_standardized_by_its_seeds_training_segments(make_tiny_config):
    """[policy] normalize: every model of a seed (reference, specialists, generalists, merges) carries the
    mean and standard deviation (+0.01) of the observations of that seed's training pairs, computed here in
    numpy, and a record's held-out DPO loss is the hand-computed one of the standardized MLP."""
    config = load_diagnose_config(make_tiny_config(
        lambda text: _small(text).replace("hidden = [16]", "hidden = [16]\nnormalize = true")))
    run = Run(config, show_progress=False)
    point = run_points(config)[0]
    records = {r["method"]: r for r in comparison.compare(run, point)}
    data = run.datasets(point, 0)
    seen = np.concatenate([np.asarray(s.observations[:s.length], float)
                           for d in data for p in d.train for s in (p.chosen, p.rejected)])
    saved = [*(run.models / point.folder / "models").glob("*.pt"), *(run.models / "references").glob("*.pt")]
    assert len(saved) >= len(config.tasks) + len(point.methods) + 1
    for path in saved:
        state = torch.load(path, weights_only=True)
        np.testing.assert_allclose(state["input_mean"].double().numpy(), seen.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state["input_scale"].double().numpy(), seen.std(axis=0) + 0.01, rtol=1e-5)
    reference = run.reference(point, 0, data)
    for name in ("ama-r", "specialist-forward"):
        policy = _policy(run, point, name, data)
        expected = [float(_dpo(policy, reference, d.held_out, config.loss.beta).mean()) for d in data]
        np.testing.assert_allclose(records[name]["held_out_loss"], expected, rtol=2e-4, atol=2e-5)
    # the linear merge averages weights and keeps the (shared) standardization
    _assert_linear_merge_loss(records["linear"], config, run, point, data, reference)

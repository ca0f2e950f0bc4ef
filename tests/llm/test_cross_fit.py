"""Cross-fitted specialist losses (docs/maths.md section 12): the folds partition each task's pairs, no pair is
scored by a specialist that trained on it, held-out pairs get the mean of the fold specialists, and every
fold resumes on its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from amalab.cli import main
from amalab.training.cache import ValueCache
from amalab.llm.stages import generalists, specialists
from amalab.llm.stages.cross_fit import cross_fitted_losses, fold_indices, folds
from amalab.llm.tokenize import TokenizedPair

ids_strategy = st.lists(st.text(alphabet="0123456789abcdef", min_size=4, max_size=8), min_size=2, max_size=40,
                        unique=True)


@settings(max_examples=60, deadline=None)
@given(ids=ids_strategy, k=st.integers(2, 5), seed=st.integers(0, 3), data=st.data())
def test_folds_partition_the_pairs_evenly_whatever_their_order(ids, k, seed, data):
    if len(ids) < k:
        with pytest.raises(ValueError):
            fold_indices(ids, k, seed)
        return
    where = fold_indices(ids, k, seed)
    sizes = np.bincount(where, minlength=k)
    assert sizes.sum() == len(ids) and sizes.max() - sizes.min() <= 1 and set(where) == set(range(k))
    shuffled = data.draw(st.permutations(ids))
    assert dict(zip(shuffled, fold_indices(shuffled, k, seed))) == dict(zip(ids, where))
    pairs = [TokenizedPair(i, "t", (1,), (2,), (3,)) for i in ids]
    for f, (trained, scored) in enumerate(folds(pairs, k, seed)):
        assert {p.id for p in scored} == {i for i, g in zip(ids, where) if g == f}
        assert {p.id for p in trained} == set(ids) - {p.id for p in scored}


def test_training_pairs_take_their_fold_specialist_and_held_out_pairs_the_mean():
    pairs = [TokenizedPair(f"p{i}", "t", (1,), (2,), (3,)) for i in range(7)]
    held_out = [TokenizedPair(f"h{i}", "t", (1,), (2,), (3,)) for i in range(3)]
    split = folds(pairs, 3, seed=0)
    rng = np.random.default_rng(0)
    fold_caches = []
    for _, scored in split:
        ids = [p.id for p in scored + held_out]
        fold_caches.append(ValueCache(ids, {"loss": rng.random(len(ids))}))
    combined = cross_fitted_losses(fold_caches, [scored for _, scored in split], held_out)
    assert sorted(combined.ids) == sorted(p.id for p in pairs + held_out)
    for f, (_, scored) in enumerate(split):
        for p in scored:
            assert combined.get("loss", [p.id])[0] == fold_caches[f].get("loss", [p.id])[0]
    for h in held_out:
        expected = np.mean([c.get("loss", [h.id])[0] for c in fold_caches])
        assert combined.get("loss", [h.id])[0] == pytest.approx(expected, rel=1e-15)


def _watch(monkeypatch) -> tuple[dict, list]:
    """Record what each specialist trained on (by run folder) and which pairs each loss cache scored, by model."""
    trained, scored, alive = {}, [], []
    train, loss_cache = specialists.train_policy, specialists.loss_cache

    def watched_train(experiment, run):
        model, final = train(experiment, run)
        trained[id(model)] = (run.run_dir, {p.id for s in run.train_sets for p in s})
        alive.append(model)  # an id is unique only while its object lives
        return model, final

    def watched_cache(experiment, model, pairs, folder, manifest, what):
        scored.append((id(model), folder.name, {p.id for p in pairs}))
        return loss_cache(experiment, model, pairs, folder, manifest, what)

    monkeypatch.setattr(specialists, "train_policy", watched_train)
    monkeypatch.setattr(specialists, "loss_cache", watched_cache)
    return trained, scored


def test_no_training_pair_is_scored_by_a_specialist_that_trained_on_it(tmp_path, monkeypatch, experiment):
    config = experiment(tmp_path, names='["standard"]')
    trained, scored = _watch(monkeypatch)
    assert main(["llm", "specialists", str(config), "--quiet"]) == 0
    out = tmp_path / "run"
    data = json.loads((out / "data.json").read_text())
    for task in ("alpha", "beta"):
        folds_scored = [(trained[model], ids) for model, name, ids in scored if name.startswith(f"specialist-{task}-")]
        assert len(folds_scored) == 2  # cross_fit = 2 by default
        held_out = set.intersection(*(ids for _, ids in folds_scored))
        assert len(held_out) == data[task]["eval"]  # every fold specialist scores every held-out pair
        training = [ids - held_out for _, ids in folds_scored]
        assert sum(map(len, training)) == data[task]["train"] and not training[0] & training[1]
        for ((run_dir, seen), ids), train_ids in zip(folds_scored, training):
            assert run_dir.parent == out / "cross_fit" / task
            assert not seen & ids  # scored only what it never trained on
            assert seen | train_ids == {i for ids_ in training for i in ids_}  # trained on the other fold
    for task in ("alpha", "beta"):  # the specialist trained on all pairs scores them all (in-sample)
        (run_dir, seen), = [trained[m] for m, name, _ in scored if name == f"specialist-{task}"]
        assert run_dir == out / "specialists" / task and len(seen) == data[task]["train"]


def test_each_fold_resumes_on_its_own(tmp_path, monkeypatch, capsys, experiment):
    config = experiment(tmp_path, names='["standard"]')
    assert main(["llm", "specialists", str(config), "--quiet"]) == 0
    out = tmp_path / "run"
    fold0, fold1 = (out / "cross_fit" / "alpha" / f"fold{f}of2" for f in (0, 1))
    stamp = (fold0 / "final.json").stat().st_mtime_ns
    cache0 = (out / "caches" / "specialist-alpha-fold0of2" / "values.npz").read_bytes()
    cache1 = (out / "caches" / "specialist-alpha-fold1of2" / "values.npz").read_bytes()
    import shutil

    shutil.rmtree(fold1)  # fold 1 lost (its run and cache), fold 0 kept
    shutil.rmtree(out / "caches" / "specialist-alpha-fold1of2")
    trained, _ = _watch(monkeypatch)
    assert main(["llm", "specialists", str(config)]) == 0
    retrained = [run_dir for run_dir, _ in trained.values()]
    assert fold1 in retrained and (fold0 / "final.json").stat().st_mtime_ns == stamp
    assert (out / "caches" / "specialist-alpha-fold0of2" / "values.npz").read_bytes() == cache0
    # retraining fold 1 from scratch gives the very same losses
    assert (out / "caches" / "specialist-alpha-fold1of2" / "values.npz").read_bytes() == cache1


def test_in_sample_variants_train_against_the_in_sample_losses(tmp_path, monkeypatch, experiment):
    config = experiment(tmp_path, names='["standard", "ama-r"]',
                        extra='\n[specialists]\ncross_fit = 2\n', **{"seeds = 1": 'seeds = 1\nin_sample = ["ama-r"]'})
    runs, train = {}, generalists.train_policy

    def watched_train(experiment, run):
        runs[run.run_dir.parent.name] = run
        return train(experiment, run)

    monkeypatch.setattr(generalists, "train_policy", watched_train)
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    on_disk = {name: dict(zip(json.loads((out / "caches" / name / "ids.json").read_text()),
                              np.load(out / "caches" / name / "values.npz")["loss"]))
               for name in ("specialist-alpha", "specialist-alpha-fold0of2", "specialist-alpha-fold1of2")}
    both = set(on_disk["specialist-alpha-fold0of2"]) & set(on_disk["specialist-alpha-fold1of2"])
    train_ids = [i for i in on_disk["specialist-alpha"] if i not in both]
    fold_of = {i: v for f in (0, 1) for i, v in on_disk[f"specialist-alpha-fold{f}of2"].items() if i not in both}
    # what each trained against (baseline) and what each is evaluated against (held-out), from the caches
    np.testing.assert_array_equal(runs["ama-r-in-sample"].baseline_losses[0].get("loss", train_ids),
                                  [on_disk["specialist-alpha"][i] for i in train_ids])
    np.testing.assert_array_equal(runs["ama-r"].baseline_losses[0].get("loss", train_ids),
                                  [fold_of[i] for i in train_ids])
    held = sorted(both)
    mean = [(on_disk["specialist-alpha-fold0of2"][i] + on_disk["specialist-alpha-fold1of2"][i]) / 2 for i in held]
    for name in ("ama-r", "ama-r-in-sample", "standard"):
        np.testing.assert_allclose(runs[name].specialist_caches[0].get("loss", held), mean, rtol=1e-15)
    assert {"ama-r", "ama-r-in-sample", "standard", "base"} <= set(summary["methods"])
    described = {m: json.loads((out / "generalists" / m / "seed0" / "run.json").read_text())["mixer"]
                 for m in ("ama-r", "ama-r-in-sample", "standard")}
    assert described["ama-r"]["specialist_losses"]["definition"] == "cross-fit 2"
    assert described["ama-r-in-sample"]["specialist_losses"]["definition"] == "in-sample"
    assert "specialist_losses" not in described["standard"]  # standard trains against no s(z)
    assert (out / "caches" / "specialist-alpha").is_dir() and (out / "specialists" / "alpha").is_dir()
    # the summary's mean s(z) per task, recomputed from the caches on disk
    def cache(name):
        folder = out / "caches" / name
        return dict(zip(json.loads((folder / "ids.json").read_text()), np.load(folder / "values.npz")["loss"]))

    folds_ = [cache(f"specialist-alpha-fold{f}of2") for f in (0, 1)]
    held_out = set(folds_[0]) & set(folds_[1])
    train = {i: v for fold in folds_ for i, v in fold.items() if i not in held_out}
    in_sample = cache("specialist-alpha")
    means = summary["specialist_losses"]["means"]["alpha"]
    assert summary["specialist_losses"]["definition"] == "cross-fit 2"
    assert means["train"] == pytest.approx(np.mean(list(train.values())), rel=1e-12)
    assert means["held_out"] == pytest.approx(np.mean([(folds_[0][i] + folds_[1][i]) / 2 for i in held_out]))
    assert means["in_sample_train"] == pytest.approx(np.mean([in_sample[i] for i in train]), rel=1e-12)
    weights = summary["methods"]["ama-r-in-sample"]["average_weights"]
    assert sum(weights[t]["mean"] for t in ("alpha", "beta")) == pytest.approx(1.0)


@pytest.mark.parametrize("change, words", [
    ("[specialists.optim]", ("[specialists]\ncross_fit = 0\n\n[specialists.optim]", "cross_fit")),
    ("seeds = 1", ('seeds = 1\nin_sample = ["standard"]', "does not measure excess over the specialists")),
    ("seeds = 1", ('seeds = 1\nin_sample = ["ama-s"]', "is not one of names")),
    ("seeds = 1", ('seeds = 1\nin_sample = "ama-r"', "in_sample: expected a list")),
    ("[specialists.optim]", ("[specialists]\ncross_fit = 9\n\n[specialists.optim]", "6 pairs cannot fill 9 folds")),
])
def test_bad_cross_fit_settings_are_one_line(tmp_path, capsys, change, words, experiment):
    text, expected = words
    config = experiment(tmp_path, names='["standard", "ama-r"]', **{change: text})
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_in_sample_variants_need_cross_fitting(tmp_path, capsys, experiment):
    config = experiment(tmp_path, names='["standard", "ama-r"]',
                        **{"[specialists.optim]": "[specialists]\ncross_fit = 1\n\n[specialists.optim]",
                           "seeds = 1": 'seeds = 1\nin_sample = ["ama-r"]'})
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    assert "in-sample already" in capsys.readouterr().err


def test_results_scored_against_other_specialist_losses_are_not_reused(tmp_path, capsys, experiment):
    """New specialists (here: another specialist learning rate) give new s(z): every finished result scored
    against the old values is scored again, and a run trained against them is refused, never reused."""
    import shutil

    merges = '\n[merges]\nnames = ["linear"]\n'
    config = experiment(tmp_path, names='["standard", "ama-r"]', extra=merges)
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    out = tmp_path / "run"

    def stamp(path):
        return json.loads((out / path / "final.json").read_text())["specialist_losses"]

    before = {p: stamp(p) for p in ("base", "generalists/standard/seed0", "merges/linear/seed0")}
    for folder in ("specialists", "cross_fit"):
        shutil.rmtree(out / folder)
    for cache in (out / "caches").glob("specialist-*"):
        shutil.rmtree(cache)
    config.write_text(config.read_text().replace("learning_rate = 1e-2\n\n[train]", "learning_rate = 5e-3\n\n[train]"))
    assert main(["llm", "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "generalists/ama-r/seed0" in err and "mixer" in err and len(err.strip().splitlines()) == 1
    shutil.rmtree(out / "generalists" / "ama-r")  # trained again against the new losses
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    for path, old in before.items():  # scored again: the new losses' fingerprint
        new = stamp(path)
        assert new["definition"] == old["definition"] == "cross-fit 2" and new["fingerprint"] != old["fingerprint"]


def test_eval_refuses_a_run_trained_against_other_specialist_losses(tmp_path, capsys, experiment):
    config = experiment(tmp_path, names='["standard", "ama-r"]')
    assert main(["llm", "run", str(config), "--quiet"]) == 0
    described = tmp_path / "run" / "generalists" / "ama-r" / "seed0" / "run.json"
    run = json.loads(described.read_text())
    run["mixer"]["specialist_losses"] = {"definition": "in-sample", "fingerprint": "0" * 16}  # as an older run
    described.write_text(json.dumps(run))
    capsys.readouterr()
    assert main(["llm", "eval", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "generalists/ama-r/seed0" in err and "mixer" in err and len(err.strip().splitlines()) == 1

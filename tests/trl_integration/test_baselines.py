"""Baseline losses s(z) for AMATrainer (amalab/trl/baselines.py): equal to AMATrainer's own losses when the
policy is the specialist; cross-fitted folds; doremi's standard generalist; the record and its check."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset, load_from_disk
from trl import DPOConfig, DPOTrainer

from amalab.llm.tiny import tiny_llama
from amalab.trl import AMAConfig, AMATrainer
from amalab.trl.baselines import add_baseline_losses, baseline_folds, check_baseline_record, read_baseline_record

BETA = 0.2


def rows() -> list[dict]:
    data = [{"task": "sums", "prompt": f"Human: what is {i} plus {i + 3}? Assistant:", "chosen": f" It is {2 * i + 3}.",
             "rejected": f" No idea{', sorry' * (i % 2)}."} for i in range(6)]
    data += [{"task": "greetings", "prompt": f"Human: greet friend {i}. Assistant:", "chosen": " Hello, friend!",
              "rejected": " Go" + " away" * (i + 1) + "."} for i in range(4)]
    return data


def model(tokenizer, seed: int):
    return tiny_llama(len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)


def ama_args(tmp_path, **settings) -> AMAConfig:
    return AMAConfig(**{"output_dir": str(tmp_path / "ama"), "beta": BETA, "mixer": "ama-r-sim",
                        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "max_steps": 1,
                        "report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no", **settings})


def train_dpo(tokenizer, data: Dataset, seed: int, folder, steps: int = 3):
    """A specialist: plain TRL DPOTrainer on one task's rows, a few steps from a seeded tiny Llama."""
    args = DPOConfig(output_dir=str(folder), beta=BETA, per_device_train_batch_size=2, max_steps=steps,
                     learning_rate=2e-2, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     logging_strategy="no", seed=0)
    trainer = DPOTrainer(model=model(tokenizer, seed), ref_model=model(tokenizer, 0), args=args,
                         train_dataset=data.remove_columns(["task"]), processing_class=tokenizer)
    trainer.train()
    return trainer.model


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """The two tasks' specialists (trained on their whole task), the reference, the scored dataset."""
    tmp = tmp_path_factory.mktemp("baselines")
    data = Dataset.from_list(rows())
    specialists = {name: train_dpo(tokenizer, data.filter(lambda r: r["task"] == name), 1 + i, tmp / name)
                   for i, name in enumerate(["greetings", "sums"])}
    specialists["sums"].save_pretrained(tmp / "sums-model")  # scored from its folder
    reference = model(tokenizer, 0)
    scored = add_baseline_losses(data, {"greetings": specialists["greetings"], "sums": str(tmp / "sums-model")},
                                 ama_args(tmp), ref_model=reference, processing_class=tokenizer)
    return dict(data=data, specialists=specialists, reference=reference, scored=scored, tmp=tmp)


def amatrainer_losses(trainer: AMATrainer, rows_: list[int]) -> np.ndarray:
    """Per-example losses of these rows from AMATrainer.compute_loss itself (training mode)."""
    recorded, loss = [], trainer.preference_loss

    def recording(*args, **kwargs):
        out = loss(*args, **kwargs)
        recorded.append(out[0].detach().double().numpy().copy())
        return out

    trainer.preference_loss = recording
    task_ids = np.array([trainer.tasks.names.index(trainer.train_dataset[r]["task"]) for r in rows_])
    trainer._counts = np.bincount(task_ids, minlength=trainer.tasks.k).astype(float)
    trainer._micro_batches.append((task_ids, np.array([trainer.tasks.baseline[r] for r in rows_])))
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[r] for r in rows_]))
    trainer.model.train()
    trainer.compute_loss(trainer.model, inputs)
    trainer.preference_loss = loss
    return recorded[0]


def test_baselines_are_amatrainers_losses_with_the_specialist_as_policy(trained, tokenizer, tmp_path):
    scored, data = trained["scored"], trained["data"]
    assert scored.column_names == [*data.column_names, "baseline_loss"]
    assert data.info.description in ("", None)  # the input dataset is left as it was
    scored.save_to_disk(str(tmp_path / "scored"))
    reloaded = load_from_disk(str(tmp_path / "scored"))
    record = read_baseline_record(reloaded)
    assert record == read_baseline_record(scored) and record["kind"] == "specialists"
    assert record["settings"]["beta"] == BETA and record["settings"]["loss_type"] == "sigmoid"
    for name in ("greetings", "sums"):
        # the specialist as the generalist's policy: AMATrainer's own forward gives the baseline values
        trainer = AMATrainer(model=trained["specialists"][name], ref_model=trained["reference"],
                             args=ama_args(tmp_path), train_dataset=reloaded, processing_class=tokenizer)
        where = [r for r in range(len(reloaded)) if reloaded[r]["task"] == name]
        np.testing.assert_allclose(amatrainer_losses(trainer, where), np.array(reloaded["baseline_loss"])[where],
                                   rtol=1e-6, atol=1e-6)
    values = np.array(scored["baseline_loss"])
    assert np.all(np.isfinite(values)) and np.ptp(values) > 1e-3  # trained specialists: not all log 2


def test_cross_fitted_baselines_come_from_the_fold_that_never_saw_the_pair(trained, tokenizer, tmp_path):
    data, args, seen, models = trained["data"], ama_args(tmp_path), {}, {}

    def train_fold(task, fold, rows_):
        seen[task, fold] = set(rows_["prompt"])
        models[task, fold] = train_dpo(tokenizer, rows_, 10 + fold, tmp_path / f"{task}{fold}", steps=1)
        return models[task, fold]

    scored = add_baseline_losses(data, train_fold, args, ref_model=trained["reference"], processing_class=tokenizer,
                                 folds=2)
    where = baseline_folds(data, args, 2)
    assert where == baseline_folds(data, args, 2) and set(where) == {0, 1}
    for task in ("greetings", "sums"):
        prompts = {r["prompt"] for r in rows() if r["task"] == task}
        fold_sets = [{data[r]["prompt"] for r in range(len(data)) if data[r]["task"] == task and where[r] == f}
                     for f in (0, 1)]
        assert not fold_sets[0] & fold_sets[1] and fold_sets[0] | fold_sets[1] == prompts  # disjoint, covering
        for f in (0, 1):
            assert seen[task, f] == prompts - fold_sets[f]  # trained on every fold but its own
    record = read_baseline_record(scored)
    assert record["kind"] == "cross-fit" and record["folds"]["k"] == 2 and len(record["models"]["sums"]) == 2
    # each row's value is its own fold specialist's score, not the other fold's
    for task in ("greetings", "sums"):
        task_rows = [r for r in range(len(data)) if data[r]["task"] == task]
        alone = data.select(task_rows)
        by_fold = [np.array(add_baseline_losses(alone, models[task, f], args, ref_model=trained["reference"],
                                                processing_class=tokenizer)["baseline_loss"]) for f in (0, 1)]
        for i, r in enumerate(task_rows):
            f = where[r]
            assert scored[r]["baseline_loss"] == pytest.approx(by_fold[f][i], abs=1e-6)
            assert abs(scored[r]["baseline_loss"] - by_fold[1 - f][i]) > 1e-5


def test_a_standard_generalist_scores_every_task_for_doremi(trained, tokenizer, tmp_path):
    generalist = trained["specialists"]["sums"]
    scored = add_baseline_losses(trained["data"], generalist, ama_args(tmp_path), ref_model=trained["reference"],
                                 processing_class=tokenizer)
    assert read_baseline_record(scored)["kind"] == "generalist"
    sums = [r for r in range(len(scored)) if scored[r]["task"] == "sums"]
    np.testing.assert_allclose(np.array(scored["baseline_loss"])[sums],
                               np.array(trained["scored"]["baseline_loss"])[sums], rtol=1e-6, atol=1e-6)
    others = [r for r in range(len(scored)) if r not in sums]
    assert np.all(np.abs(np.array(scored["baseline_loss"])[others]
                         - np.array(trained["scored"]["baseline_loss"])[others]) > 1e-5)
    AMATrainer(model=model(tokenizer, 0), ref_model=trained["reference"], args=ama_args(tmp_path, mixer="doremi"),
               train_dataset=scored, processing_class=tokenizer)  # accepted
    with pytest.raises(ValueError, match=r"kind 'generalist', mixer 'ama-s' measures against specialists"):
        AMATrainer(model=model(tokenizer, 0), ref_model=trained["reference"], args=ama_args(tmp_path, mixer="ama-s"),
                   train_dataset=scored, processing_class=tokenizer)


@pytest.mark.parametrize("settings, reference_seed, message", [
    ({"beta": 0.3}, 0, r"beta was 0.2, the trainer's is 0.3 \(DPOConfig.beta\)"),
    ({"loss_type": ["ipo"]}, 0, r"loss_type was 'sigmoid', the trainer's is 'ipo'"),
    ({"label_smoothing": 0.1}, 0, r"label_smoothing was 0.0, the trainer's is 0.1"),
    ({"ld_alpha": 0.5}, 0, r"ld_alpha was None, the trainer's is 0.5"),
    ({"max_length": 200}, 0, r"max_length was 1024, the trainer's is 200"),
    ({}, 5, r"reference fingerprint \w+\.\.\., the trainer's reference is \w+\.\.\. \(another ref_model\)"),
    ({"mixer": "doremi"}, 0, r"kind 'specialists', mixer 'doremi' measures against generalist"),
])
def test_a_record_that_differs_from_the_trainer_is_refused_in_one_line(trained, tokenizer, tmp_path, settings,
                                                                       reference_seed, message):
    with pytest.raises(ValueError, match=message) as error:
        AMATrainer(model=model(tokenizer, 0), ref_model=model(tokenizer, reference_seed),
                   args=ama_args(tmp_path, **settings), train_dataset=trained["scored"], processing_class=tokenizer)
    assert "\n" not in str(error.value)


def test_edited_values_are_refused_and_hand_made_values_without_record_accepted(trained, tokenizer, tmp_path):
    scored = trained["scored"]
    edited = scored.remove_columns(["baseline_loss"]).add_column("baseline_loss", [0.5] * len(scored))
    assert read_baseline_record(edited) is not None  # the record travels with the info, not the column
    with pytest.raises(ValueError, match=r"column 'baseline_loss' holds other values than the record's"):
        AMATrainer(model=model(tokenizer, 0), ref_model=model(tokenizer, 0), args=ama_args(tmp_path),
                   train_dataset=edited, processing_class=tokenizer)
    hand_made = Dataset.from_list([{**r, "baseline_loss": 0.5} for r in rows()])
    trainer = AMATrainer(model=model(tokenizer, 0), ref_model=model(tokenizer, 5), args=ama_args(tmp_path, beta=0.3),
                         train_dataset=hand_made, processing_class=tokenizer)
    check_baseline_record(trainer)  # no record: the values are the user's responsibility


def test_a_full_model_without_ref_model_is_refused(trained, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="give ref_model"):
        add_baseline_losses(trained["data"], trained["specialists"]["sums"], ama_args(tmp_path),
                            processing_class=tokenizer)


def test_a_pair_trl_drops_is_left_out_of_the_values_and_their_record(trained, tokenizer):
    """TRL drops a pair whose completion its truncation leaves empty (a prompt of max_length tokens or more);
    its s(z) is NaN and out of the record's digest, and AMATrainer, which drops the same pair, accepts the
    record and sees only finite values."""
    long_prompt = {"task": "sums", "prompt": "Human: " + "what is one plus one? " * 40 + "Assistant:",
                   "chosen": " Two.", "rejected": " Three."}
    data = Dataset.from_list(rows()[:7] + [long_prompt] + rows()[7:])
    args = ama_args(trained["tmp"], max_length=48)
    scored = add_baseline_losses(data, trained["specialists"], args, ref_model=trained["reference"],
                                 processing_class=tokenizer)
    values = np.array(scored["baseline_loss"])
    assert np.isnan(values[7]) and np.isfinite(np.delete(values, 7)).all()
    assert read_baseline_record(scored)["dropped_by_trl"] == 1
    trainer = AMATrainer(model=model(tokenizer, 0), ref_model=trained["reference"], args=args,
                         train_dataset=scored, processing_class=tokenizer)  # the record check passes
    assert len(trainer.train_dataset) == len(data) - 1
    assert np.isfinite(trainer.tasks.baseline).all()


def test_lora_specialists_are_scored_against_the_base_as_the_generalists_reference(tokenizer, tmp_path):
    """A LoRA specialist without ref_model: TRL would copy its trained adapter into a "ref" adapter and make
    it its own reference (every loss log 2); s(z) is measured against the base with the adapter disabled,
    the reference of a LoRA generalist trained from a fresh adapter, so AMATrainer accepts the record, and
    the values equal the specialist's losses against the plain base model as ref_model."""
    import copy

    from peft import LoraConfig

    lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    data, base = Dataset.from_list(rows()), model(tokenizer, 0)
    specialists = {}
    for name in ("greetings", "sums"):
        args = DPOConfig(output_dir=str(tmp_path / name), beta=BETA, per_device_train_batch_size=2, max_steps=3,
                         learning_rate=5e-2, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                         logging_strategy="no", seed=0)
        trainer = DPOTrainer(model=copy.deepcopy(base), args=args, peft_config=lora, processing_class=tokenizer,
                             train_dataset=data.filter(lambda r, n=name: r["task"] == n).remove_columns(["task"]))
        trainer.train()
        specialists[name] = trainer.model
    scored = add_baseline_losses(data, specialists, ama_args(tmp_path), processing_class=tokenizer)
    values = np.array(scored["baseline_loss"])
    assert np.abs(values - np.log(2)).max() > 1e-3  # not each specialist against itself
    AMATrainer(model=copy.deepcopy(base), args=ama_args(tmp_path), peft_config=lora, train_dataset=scored,
               processing_class=tokenizer)  # the record's reference is the LoRA generalist's
    for name, specialist in specialists.items():
        trainer = AMATrainer(model=specialist, ref_model=copy.deepcopy(base), args=ama_args(tmp_path),
                             train_dataset=data.add_column("baseline_loss", [0.0] * len(data)),
                             processing_class=tokenizer)
        where = [r for r in range(len(data)) if data[r]["task"] == name]
        np.testing.assert_allclose(amatrainer_losses(trainer, where), values[where], rtol=1e-5, atol=1e-6)

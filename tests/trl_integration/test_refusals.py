"""What AMATrainer refuses before any training, each in one error naming the column, row or setting; and the
warning on an untested library version."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from datasets import Dataset

from amalab.trl import AMAConfig, AMATrainer
from amalab.trl.versions import TESTED, untested_versions

ROOT = Path(__file__).resolve().parents[2]


def rows(n: int = 6, baseline=lambda i: 0.5) -> list[dict]:
    return [{"task": "a" if i % 2 else "b", "prompt": f"Human: hi {i}. Assistant:", "chosen": " Hello.",
             "rejected": " No.", "baseline_loss": baseline(i)} for i in range(n)]


def build(make_model, tokenizer, tmp_path, data=None, **settings):
    args = AMAConfig(**{"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "max_steps": 1,
                        "report_to": [], "use_cpu": True, "bf16": False, "save_strategy": "no", **settings})
    return AMATrainer(model=make_model(seed=0), ref_model=make_model(seed=0), args=args,
                      train_dataset=Dataset.from_list(data if data is not None else rows()),
                      processing_class=tokenizer)


@pytest.mark.parametrize("data, settings, message", [
    ([{k: v for k, v in r.items() if k != "task"} for r in rows()], {}, r"no column 'task' \(AMAConfig.task_column\)"),
    (rows(), {"task_column": "domain"}, r"no column 'domain'"),
    ([{k: v for k, v in r.items() if k != "baseline_loss"} for r in rows()], {"mixer": "ama-s"},
     r"no column 'baseline_loss' \(AMAConfig.baseline_column\)"),
    (rows(baseline=lambda i: math.nan if i == 3 else 0.5), {}, r"row 3: baseline_loss is nan \(not finite\)"),
    (rows(), {"task_names": ["a", "b", "c"]}, r"task 'c' has no rows"),
    (rows(), {"task_names": ["a"]}, r"row 0: task 'b' is not one of AMAConfig.task_names"),
    (rows(), {"mixer": "ama-x"}, r"AMAConfig.mixer: unknown mixer 'ama-x'"),
    (rows(), {"mixer": "ama-r-sim", "gamma": 0.2}, r"AMAConfig.gamma: mixer 'ama-r-sim' takes no such option"),
    (rows(), {"mixer": "mixture"}, r"AMAConfig.mixture_weights: mixer 'mixture' needs it"),
    (rows(), {"mixer": "mixture", "mixture_weights": [1.0]}, r"mixer 'mixture' needs option weights: a list of k=2"),
    (rows(), {"mixer": "ama-r", "gradient_accumulation_steps": 2}, r"'ama-r' \(sequential AMA-R\).*use 'ama-r-sim'"),
    (rows(), {"mixer": "ama-r-sim", "per_device_train_batch_size": 3}, r"multiple of the number of tasks k=2"),
    (rows(), {"sync_ref_model": True}, r"sync_ref_model moves pi_ref"),
    (rows(), {"loss_type": ["sigmoid", "ipo"]}, r"a mixture of loss types"),
    (rows(), {"loss_type": ["aot"]}, r"'aot' is a batch-level loss"),
    (rows(), {"loss_type": ["sft"]}, r"'sft' is a batch-level loss"),
    (rows(), {"loss_type": ["aot_unpaired"]}, r"'aot_unpaired' is a batch-level loss"),
    (rows(), {"use_weighting": True}, r"DPOConfig.use_weighting \(WPO\)"),
])
def test_what_the_mixer_cannot_honour_is_refused_in_one_line(make_model, tokenizer, tmp_path, data, settings,
                                                             message):
    with pytest.raises(ValueError, match=message) as error:
        build(make_model, tokenizer, tmp_path, data, **settings)
    assert "\n" not in str(error.value)


def test_a_row_is_named_by_its_number_in_the_dataset_as_given(make_model, tokenizer, tmp_path):
    """TRL's preparation drops a pair whose prompt alone fills max_length, which renumbers the rows after it:
    the refusal still names the row as the user's dataset numbers it."""
    data = rows(baseline=lambda i: math.nan if i == 3 else 0.5)
    data[1]["prompt"] = "Human: " + "very long " * 40 + "Assistant:"
    with pytest.raises(ValueError, match=r"row 3: baseline_loss is nan"):
        build(make_model, tokenizer, tmp_path, data, max_length=32)


def test_the_moe_auxiliary_loss_is_refused_in_one_line(make_model, tokenizer, tmp_path):
    """A model whose config returns router logits with a nonzero coefficient adds TRL's batch-level
    load-balancing loss to every step: the mixer cannot weight it."""
    model = make_model(seed=0)
    model.config.output_router_logits, model.config.router_aux_loss_coef = False, 0.01
    args = AMAConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no")
    with pytest.raises(ValueError, match=r"MoE router auxiliary loss") as error:
        AMATrainer(model=model, ref_model=make_model(seed=0), args=args, train_dataset=Dataset.from_list(rows()),
                   processing_class=tokenizer)
    assert "\n" not in str(error.value)


def test_a_mixer_setting_is_refused_where_it_is_parsed(tmp_path):
    """TRL's parser builds the AMAConfig: an unknown mixer or a missing option stops there, before any model
    or dataset is loaded."""
    from trl import TrlParser

    parser = TrlParser((AMAConfig,))
    on_cpu = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"]
    for flags, message in ((["--mixer", "ama-x"], "unknown mixer 'ama-x'"),
                           (["--mixer", "mixture"], "AMAConfig.mixture_weights"),
                           (["--mixer", "ama-r-sim", "--gamma", "0.2"], "AMAConfig.gamma")):
        with pytest.raises(ValueError, match=message):
            parser.parse_args_and_config([*on_cpu, *flags])
    (args,) = parser.parse_args_and_config([*on_cpu, "--mixer", "mixture", "--mixture_weights", "3", "1"])
    assert args.mixer_options() == {"weights": [3.0, 1.0]}


def test_a_mixer_without_baseline_needs_no_baseline_column(make_model, tokenizer, tmp_path):
    data = [{k: v for k, v in r.items() if k != "baseline_loss"} for r in rows()]
    trainer = build(make_model, tokenizer, tmp_path, data, mixer="uniform")
    assert trainer.tasks.names == ["a", "b"] and trainer.tasks.sizes == [3, 3]


def test_the_mixer_options_reach_the_mixer(make_model, tokenizer, tmp_path):
    trainer = build(make_model, tokenizer, tmp_path, mixer="mixture", mixture_weights=[3.0, 1.0],
                    task_names=["b", "a"])
    assert list(trainer.mixer.weights) == pytest.approx([0.75, 0.25])
    assert build(make_model, tokenizer, tmp_path, mixer="ama-s").mixer.exp3.gamma == 0.3  # amalab's default


def test_untested_versions_are_named_with_their_range():
    assert untested_versions({"trl": "1.16.0", "transformers": "5.25.0", "accelerate": "1.16.0",
                              "datasets": "5.2.0"}) == []
    assert untested_versions({"trl": "1.20.1"}) == ["trl 1.20.1 (tested: >=1.16,<1.17)"]


def test_the_tested_ranges_are_the_trl_extras():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["trl"]
    for package, tested in TESTED.items():
        assert f"{package}{tested}" in extra

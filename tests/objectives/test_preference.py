"""Per-example preference losses: closed forms by hand, the shared margin-to-loss maps, and TRL's DPOTrainer.

Every loss is checked per example against TRL's own ``DPOTrainer._compute_loss`` (values and gradients),
called on one pair at a time (it returns the batch mean), and as a batch mean against a real DPOTrainer step
on tiny models.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from amalab.config import load_section
from amalab.errors import ConfigError
from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import sequence_logps
from amalab.objectives.preference import (BATCH_LOSSES, F_DIVERGENCE_LOSSES, F_DIVERGENCES, PREFERENCE_LOSSES,
                               PreferenceLoss, preference_losses)
from amalab.objectives.margin import MARGIN_LOSS_NAMES, MARGIN_LOSSES, margin_loss, margin_loss_slope

# one pair by hand: log-ratios +1 (chosen) and -1 (rejected), beta 0.5, so h = 0.5 * (1 - (-1)) = 1
POLICY_W, POLICY_L, REF_W, REF_L, BETA = -3.0, -5.0, -4.0, -4.0, 0.5
TOKENS_W, TOKENS_L = 2, 4


def hand_case(name, **kwargs):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    losses, margins = preference_losses(
        name, t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L), BETA,
        chosen_token_counts=torch.tensor([TOKENS_W]), rejected_token_counts=torch.tensor([TOKENS_L]),
        **kwargs,
    )
    assert margins.item() == pytest.approx(1.0)
    return losses.item()


def test_closed_forms_by_hand():
    assert hand_case("dpo") == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(1)
    assert hand_case("sigmoid") == hand_case("dpo")
    assert hand_case("hinge") == pytest.approx(0.0)  # max(0, 1 - 1)
    # the margin map of ipo at h: (h/beta - 1/(2 beta))^2
    assert margin_loss("ipo", 1.0, BETA) == pytest.approx((1.0 / 0.5 - 1.0) ** 2)
    # the LLM's ipo is length-normalized: h' = 0.5 * (1/2 - (-1)/4) = 0.375, loss = (0.375/0.5 - 1)^2
    assert hand_case("ipo") == pytest.approx((0.75 - 1.0) ** 2)
    assert hand_case("sft") == pytest.approx(3.0 / 2)  # -log pi(y_w|x) / |y_w|
    # sppo_hard: (1 - 1)^2 + (-1 + 1)^2 = 0 at log-ratios +1, -1 and beta 1/2
    assert hand_case("sppo_hard") == pytest.approx(0.0)
    # robust without flips is DPO
    assert hand_case("robust") == pytest.approx(hand_case("dpo"))


def test_hinge_is_linear_below_the_margin():
    z = torch.zeros(2, dtype=torch.float64)
    losses, margins = preference_losses("hinge", torch.tensor([0.2, -1.0]).double(), z, z, z, 2.0)
    assert margins.tolist() == pytest.approx([0.4, -2.0]) and losses.tolist() == pytest.approx([0.6, 3.0])


#: options every margin-only loss accepts (exo_pair needs eps > 0; the others ignore what they do not use)
MARGIN_OPTIONS = {"label_smoothing": 0.1, "discopop_tau": 0.05}


@pytest.mark.parametrize("name", MARGIN_LOSS_NAMES)
def test_margin_losses_agree_on_numpy_and_torch_and_stay_finite(name):
    h = np.array([-1e4, -30.0, -1.0, 0.0, 0.3, 0.999, 1.001, 2.5, 30.0, 1e4])
    numpy_values = margin_loss(name, h, 0.1, **MARGIN_OPTIONS)
    tensor = torch.tensor(h, requires_grad=True)
    torch_values = margin_loss(name, tensor, 0.1, **MARGIN_OPTIONS)
    assert isinstance(numpy_values, np.ndarray) and isinstance(torch_values, torch.Tensor)
    np.testing.assert_allclose(torch_values.detach().numpy(), numpy_values, rtol=1e-12, atol=1e-12)
    assert np.all(np.isfinite(numpy_values))
    # autograd's slope equals the closed-form slope (the hinge's kink h = 1 is avoided)
    torch_values.sum().backward()
    # exo_pair's autograd adds terms of opposite sign to slopes of ~1e-12 at |h| = 30: 2e-16 apart
    np.testing.assert_allclose(tensor.grad.numpy(), margin_loss_slope(name, h, 0.1, **MARGIN_OPTIONS),
                               rtol=1e-12, atol=1e-15 if name == "exo_pair" else 1e-300)


@pytest.mark.parametrize("name", MARGIN_LOSS_NAMES)
def test_a_margin_loss_is_marked_convex_exactly_when_its_slope_never_decreases(name):
    h = np.linspace(-20, 20, 4001)
    slopes = margin_loss_slope(name, h, 0.5, **MARGIN_OPTIONS)
    assert bool(np.all(np.diff(slopes) >= -1e-12)) == MARGIN_LOSSES[name].convex


def test_the_margin_losses_import_no_torch():
    """The convex lab uses them without torch."""
    root = Path(__file__).resolve().parents[2]
    code = "import sys, amalab.objectives.margin; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.parametrize("name", ("dpo", "ipo", "hinge"))
def test_the_convex_lab_losses_are_these_maps_at_h_equal_beta_m(name):
    convex = pytest.importorskip("amalab.convex.losses")
    m, beta = np.linspace(-40, 40, 81), 0.3
    loss = convex.get_loss(name)
    np.testing.assert_allclose(margin_loss(name, beta * m, beta), loss.value(m, None, beta),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(beta * margin_loss_slope(name, beta * m, beta), loss.slope(m, None, beta),
                               rtol=1e-12, atol=1e-15)


def test_bad_loss_input_is_one_clear_error():
    x = torch.zeros(3)
    with pytest.raises(ConfigError, match="unknown 'kto'"):
        preference_losses("kto", x, x, x, x, 0.1)
    with pytest.raises(ConfigError, match="beta must be > 0"):
        preference_losses("dpo", x, x, x, x, 0.0)
    with pytest.raises(ConfigError, match="sft needs the completion token counts"):
        preference_losses("sft", x, x, x, x, 0.1)
    with pytest.raises(ConfigError, match="sigmoid_norm needs the completion token counts"):
        preference_losses("sigmoid_norm", x, x, x, x, 0.1)
    with pytest.raises(ConfigError, match="one shape"):
        preference_losses("dpo", x, x, x, torch.zeros(2), 0.1)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'ipo_length_normalized'"):
        preference_losses("ipo", x, x, x, x, 0.1, ipo_length_normalized=False)
    with pytest.raises(ValueError, match="unknown margin loss"):
        margin_loss("kto", x, 0.1)


@pytest.mark.parametrize("table, message", [
    ({"loss_type": "aot"}, "loss_type: aot sorts the log-ratios over the batch"),
    ({"loss_type": "aot_unpaired"}, "loss_type: aot_unpaired sorts the log-ratios over the batch"),
    ({"loss_type": "kto"}, "loss_type: unknown 'kto'"),
    ({"loss_type": "exo_pair"}, "label_smoothing: exo_pair needs 0 < label_smoothing < 1"),
    ({"loss_type": "robust", "label_smoothing": 0.5},
     "label_smoothing: robust needs 0 <= label_smoothing < 0.5"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau: must be > 0"),
    ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"},
     "f_divergence_type: forward_kl applies to"),
    ({"f_divergence_type": "kl"}, "f_divergence_type: unknown 'kl'"),
    ({"beta": -1.0}, "beta must be > 0"),
    ({"label_smoothing": "0.1"}, "label_smoothing: expected float"),
])
def test_a_bad_loss_table_is_refused_in_one_line_naming_the_field(table, message):
    with pytest.raises(ConfigError) as error:
        load_section(PreferenceLoss, table, "config.toml", "loss")
    text = str(error.value)
    assert text.startswith("config.toml: [loss]") and message in text and "\n" not in text


def test_the_batch_losses_are_the_ones_trl_sorts():
    # TRL's own list of loss types, minus the per-example ones: exactly aot and aot_unpaired
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    trl_names = set(name.strip("`'") for name in help_text.split("Possible values are: ")[1].split(". If")[0]
                    .split(", "))
    assert trl_names == set(PREFERENCE_LOSSES) - {"dpo"} | set(BATCH_LOSSES)


# --- TRL's _compute_loss, one pair at a time -------------------------------------------------------------

def trl_pair_loss(loss: PreferenceLoss, logps, tokens, dtype):
    """TRL's ``DPOTrainer._compute_loss`` on one pair, with its gradient in the two policy log-probs.

    ``self`` is a stub carrying the config fields ``_compute_loss`` reads, and the model returns the policy's
    per-token log-probs (the whole sequence log-prob on the first completion token, zeros elsewhere, so TRL's
    sum over positions is exact); the reference log-probs come precomputed, as TRL's
    ``precompute_ref_log_probs`` feeds them. The loss code, f-divergence scores and token counts (from the
    completion mask) are TRL's own.
    """
    from trl import DPOTrainer

    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
    chosen_tokens, rejected_tokens = tokens
    length = 1 + max(chosen_tokens, rejected_tokens)
    completion_mask = torch.zeros(2, length, dtype=torch.long)
    completion_mask[0, 1 : 1 + chosen_tokens] = 1
    completion_mask[1, 1 : 1 + rejected_tokens] = 1
    per_token = torch.zeros(2, length - 1, dtype=dtype)
    per_token[0, 0], per_token[1, 0] = policy_chosen, policy_rejected
    per_token.requires_grad_(True)
    zeros = torch.zeros(2, length - 1, dtype=dtype)
    model = lambda **kwargs: SimpleNamespace(  # noqa: E731
        log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        loss_types=[{"dpo": "sigmoid"}.get(loss.loss_type, loss.loss_type)], loss_weights=[1.0],
        beta=loss.beta,
        label_smoothing=loss.label_smoothing, f_divergence_type=loss.f_divergence_type,
        f_alpha_divergence_coef=loss.f_alpha_divergence_coef, use_weighting=False,
        args=SimpleNamespace(discopop_tau=loss.discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2, length, dtype=torch.long),
              "attention_mask": torch.ones(2, length, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": torch.tensor([ref_chosen], dtype=dtype),
              "ref_rejected_logps": torch.tensor([ref_rejected], dtype=dtype)}
    value = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    value.backward()
    return value.item(), per_token.grad[:, 0].tolist()


def loss_cases():
    cases = [PreferenceLoss(name, beta=0.3) for name in PREFERENCE_LOSSES if name not in ("exo_pair",)]
    cases += [PreferenceLoss("exo_pair", beta=0.3, label_smoothing=1e-3),
              PreferenceLoss("exo_pair", beta=0.3, label_smoothing=0.2),
              PreferenceLoss("robust", beta=0.3, label_smoothing=0.2),
              PreferenceLoss("discopop", beta=0.3, discopop_tau=0.5),
              PreferenceLoss("sigmoid", beta=0.05)]
    for name in F_DIVERGENCE_LOSSES:
        options = {"exo_pair": {"label_smoothing": 0.01}, "robust": {"label_smoothing": 0.1}}.get(name, {})
        cases += [PreferenceLoss(name, 0.3, f_divergence_type="forward_kl", **options),
                  PreferenceLoss(name, 0.3, f_divergence_type="js_divergence", **options)]
        cases += [PreferenceLoss(name, 0.3, f_divergence_type="alpha_divergence",
                                 f_alpha_divergence_coef=alpha, **options) for alpha in (0.5, 1.0, 1.7)]
    return cases


@pytest.mark.parametrize("loss", loss_cases(), ids=lambda c: f"{c.loss_type}-{c.f_divergence_type}-"
                         f"{c.f_alpha_divergence_coef}-{c.label_smoothing}-{c.discopop_tau}-{c.beta}")
def test_each_loss_equals_trls_per_example_with_its_gradient(loss):
    pytest.importorskip("trl")
    # TRL's alpha-divergence clamps in a table of float16/bfloat16/float32 only: that case runs in float32
    dtype = torch.float32 if loss.f_divergence_type == "alpha_divergence" else torch.float64
    tolerance = {"rtol": 2e-5, "atol": 2e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    if loss.loss_type == "exo_pair":  # TRL makes eps a float32 tensor: its log(eps), log(1 - eps) carry ~1e-8
        tolerance = {"rtol": 1e-6, "atol": 1e-8}
    generator = torch.Generator().manual_seed(0)
    pairs = 6
    ref = -torch.empty(2, pairs, dtype=torch.float64).uniform_(5.0, 60.0, generator=generator)
    policy = ref + 3.0 * torch.randn(2, pairs, dtype=torch.float64, generator=generator)
    tokens = torch.randint(1, 9, (2, pairs), generator=generator)
    policy, ref = policy.to(dtype), ref.to(dtype)
    leaves = [policy[0].clone().requires_grad_(True), policy[1].clone().requires_grad_(True)]
    ours, _ = loss(leaves[0], leaves[1], ref[0], ref[1], chosen_token_counts=tokens[0],
                   rejected_token_counts=tokens[1])
    chosen_grads, rejected_grads = torch.autograd.grad(ours.sum(), leaves, materialize_grads=True)
    for i in range(pairs):
        value, grads = trl_pair_loss(loss, (policy[0, i].item(), policy[1, i].item(), ref[0, i].item(),
                                            ref[1, i].item()), (int(tokens[0, i]), int(tokens[1, i])), dtype)
        assert ours[i].item() == pytest.approx(value, rel=tolerance["rtol"], abs=tolerance["atol"]), i
        assert [chosen_grads[i].item(), rejected_grads[i].item()] == pytest.approx(
            grads, rel=tolerance["rtol"] * 10, abs=tolerance["atol"] * 10), i


def test_discopop_stays_finite_where_trls_exponential_overflows():
    """TRL's exp(-h) * sigmoid(h / tau) is inf * 0 = nan in float32 at h = -100; ours is the limit, 0."""
    h = torch.tensor([-100.0, -30.0], requires_grad=True)
    value = margin_loss("discopop", h, 0.1)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(h.grad).all()
    assert value.tolist() == pytest.approx([100.0, 30.0], rel=1e-6)  # the logistic part, softplus(-h)


# --- a real DPOTrainer on tiny models -------------------------------------------------------------------

def test_every_loss_matches_trls_dpo_trainer(make_model, tokenized_pairs, preference_pairs, tokenizer,
                                             tmp_path):
    """TRL's DPOTrainer loss (its collator, fused head and loss code) on the same tiny models and batch."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    beta = 0.3
    policy, reference = make_model(seed=0), make_model(seed=1)
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        pi = sequence_logps(policy, batch)
        ref = sequence_logps(reference, batch)
    counts = {"chosen_token_counts": batch.chosen_token_counts,
              "rejected_token_counts": batch.rejected_token_counts}
    raw = datasets.Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                      for p in preference_pairs])
    # bf16=False: TRL defaults to bf16, which accelerate applies as CPU autocast to the reference model
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=3, logging_strategy="no", save_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=raw,
                         processing_class=tokenizer)
    inputs = trainer.data_collator(
        [
            {"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids),
             "rejected_ids": list(p.rejected_ids)}
            for p in tokenized_pairs
        ]
    )
    # TRL's sft is one token mean over the batch, ours a mean per example: they agree per pair (tested above)
    cases = [PreferenceLoss(name, beta, label_smoothing=0.1 if name in ("exo_pair", "robust") else 0.0)
             for name in PREFERENCE_LOSSES if name != "sft"]
    cases += [PreferenceLoss("sigmoid", beta, f_divergence_type=kind) for kind in F_DIVERGENCES[1:]]
    for loss in cases:
        ours = loss(pi.chosen, pi.rejected, ref.chosen, ref.rejected, **counts)[0].mean()
        trainer.loss_types = [{"dpo": "sigmoid"}.get(loss.loss_type, loss.loss_type)]
        trainer.loss_weights = [1.0]
        trainer.label_smoothing, trainer.f_divergence_type = loss.label_smoothing, loss.f_divergence_type
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        torch.testing.assert_close(ours, trl_loss.double(), atol=1e-5, rtol=1e-5,
                                   msg=f"{loss.loss_type} {loss.f_divergence_type}")

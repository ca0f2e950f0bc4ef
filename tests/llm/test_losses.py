"""Per-example preference losses: closed forms by hand, the shared margin-to-loss maps, and TRL's DPO loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amalab.errors import ConfigError
from amalab.llm.collate import collate_pairs
from amalab.llm.logprobs import sequence_logps
from amalab.llm.losses import preference_losses
from amalab.margin_losses import MARGIN_LOSS_NAMES, margin_loss, margin_loss_slope

# one pair by hand: log-ratios +1 (chosen) and -1 (rejected), beta 0.5, so h = 0.5 * (1 - (-1)) = 1
POLICY_W, POLICY_L, REF_W, REF_L, BETA = -3.0, -5.0, -4.0, -4.0, 0.5
TOKENS_W, TOKENS_L = 2, 4


def hand_case(name, **kwargs):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    losses, margins = preference_losses(
        name, t(POLICY_W), t(POLICY_L), t(REF_W), t(REF_L), BETA,
        chosen_token_counts=torch.tensor([TOKENS_W]), rejected_token_counts=torch.tensor([TOKENS_L]), **kwargs,
    )
    assert margins.item() == pytest.approx(1.0)
    return losses.item()


def test_closed_forms_by_hand():
    assert hand_case("dpo") == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(1)
    assert hand_case("hinge") == pytest.approx(0.0)  # max(0, 1 - 1)
    assert hand_case("ipo", ipo_length_normalized=False) == pytest.approx((1.0 / 0.5 - 1.0) ** 2)  # (h/b - 1/2b)^2
    # normalized: h' = 0.5 * (1/2 - (-1)/4) = 0.375, loss = (0.375/0.5 - 1)^2
    assert hand_case("ipo") == pytest.approx((0.75 - 1.0) ** 2)
    assert hand_case("sft") == pytest.approx(3.0 / 2)  # -log pi(y_w|x) / |y_w|


def test_hinge_is_linear_below_the_margin():
    z = torch.zeros(2, dtype=torch.float64)
    losses, margins = preference_losses("hinge", torch.tensor([0.2, -1.0]).double(), z, z, z, 2.0)
    assert margins.tolist() == pytest.approx([0.4, -2.0]) and losses.tolist() == pytest.approx([0.6, 3.0])


@pytest.mark.parametrize("name", MARGIN_LOSS_NAMES)
def test_margin_losses_agree_on_numpy_and_torch_and_stay_finite(name):
    h = np.array([-1e4, -30.0, -1.0, 0.0, 0.3, 0.999, 1.001, 2.5, 30.0, 1e4])
    numpy_values = margin_loss(name, h, 0.1)
    tensor = torch.tensor(h, requires_grad=True)
    torch_values = margin_loss(name, tensor, 0.1)
    assert isinstance(numpy_values, np.ndarray) and isinstance(torch_values, torch.Tensor)
    np.testing.assert_allclose(torch_values.detach().numpy(), numpy_values, rtol=1e-12, atol=1e-12)
    assert np.all(np.isfinite(numpy_values))
    torch_values.sum().backward()  # autograd's slope equals the closed-form slope (hinge kink avoided: h != 1)
    np.testing.assert_allclose(tensor.grad.numpy(), margin_loss_slope(name, h, 0.1), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", MARGIN_LOSS_NAMES)
def test_the_convex_lab_losses_are_these_maps_at_h_equal_beta_m(name):
    convex = pytest.importorskip("amalab.convex.losses")
    m, beta = np.linspace(-40, 40, 81), 0.3
    loss = convex.get_loss(name)
    np.testing.assert_allclose(margin_loss(name, beta * m, beta), loss.value(m, None, beta), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(beta * margin_loss_slope(name, beta * m, beta), loss.slope(m, None, beta),
                               rtol=1e-12, atol=1e-15)


def test_bad_loss_input_is_one_clear_error():
    x = torch.zeros(3)
    with pytest.raises(ConfigError, match="unknown 'kto'"):
        preference_losses("kto", x, x, x, x, 0.1)
    with pytest.raises(ConfigError, match="beta must be a positive number"):
        preference_losses("dpo", x, x, x, x, 0.0)
    with pytest.raises(ConfigError, match="sft needs the completion token counts"):
        preference_losses("sft", x, x, x, x, 0.1)
    with pytest.raises(ConfigError, match="one shape"):
        preference_losses("dpo", x, x, x, torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="unknown margin loss"):
        margin_loss("kto", x, 0.1)


def test_dpo_ipo_and_hinge_match_trls_dpo_trainer(make_model, tokenized_pairs, preference_pairs, tokenizer, tmp_path):
    """TRL's DPOTrainer loss (its own collator, fused head and loss code) on the same tiny models and batch."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    beta = 0.3
    policy, reference = make_model(seed=0), make_model(seed=1)
    batch = collate_pairs(tokenized_pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        pi = sequence_logps(policy, batch)
        ref = sequence_logps(reference, batch)
    counts = {"chosen_token_counts": batch.chosen_token_counts, "rejected_token_counts": batch.rejected_token_counts}
    ours = {
        name: preference_losses(name, pi.chosen, pi.rejected, ref.chosen, ref.rejected, beta, **counts)[0].mean()
        for name in ("dpo", "ipo", "hinge")
    }

    raw = datasets.Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                      for p in preference_pairs])
    # bf16=False: TRL defaults to bf16, which accelerate applies as CPU autocast to the reference model
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=3, logging_strategy="no", save_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=raw,
                         processing_class=tokenizer)
    inputs = trainer.data_collator(
        [{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids), "rejected_ids": list(p.rejected_ids)}
         for p in tokenized_pairs]
    )
    for ours_name, trl_name in (("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")):
        trainer.loss_types, trainer.loss_weights = [trl_name], [1.0]
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        torch.testing.assert_close(ours[ours_name], trl_loss, atol=1e-5, rtol=1e-5, msg=ours_name)

"""DPO losses: hand-derived values, and parity with TRL's DPOTrainer loss code as an oracle."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import trl
from trl import DPOTrainer

from dpo.losses import pairwise_loss, plackett_luce_loss, sigmoid_loss

F64 = torch.float64


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sigmoid_by_hand():
    # ρ_w = -1 - (-2) = 1, ρ_l = -3 - (-2.5) = -0.5, Δ = 1.5, β = 0.1
    out = pairwise_loss("sigmoid", *(torch.tensor([v], dtype=F64) for v in (-1.0, -3.0, -2.0, -2.5)), beta=0.1)
    assert out.losses.item() == pytest.approx(-math.log(sig(0.15)), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.05)


def test_cdpo_label_smoothing_by_hand():
    delta = torch.tensor([2.0], dtype=F64)
    expected = -0.9 * math.log(sig(1.0)) - 0.1 * math.log(sig(-1.0))
    assert sigmoid_loss(delta, 0.5, label_smoothing=0.1).item() == pytest.approx(expected, abs=1e-12)


def test_ipo_forms_by_hand():
    # ipo_sum (Azar et al. 2023, eq. 17, β as τ): (Δ − 1/(2β))². Δ = 5, β = 0.25: (5 − 2)² = 9, where the
    # plausible slips differ: (βΔ − ½)² = 0.5625, (Δ − 1/β)² = 1, (βΔ − 1/(2β))² = 0.5625, (Δ + 1/(2β))² = 49,
    # (Δ − 2β)² = 20.25, (Δ − β/2)² = 23.77.
    wide = [torch.tensor([v], dtype=F64) for v in (-2.0, -7.0, -5.0, -5.0)]  # ρ_w = 3, ρ_l = -2
    assert pairwise_loss("ipo_sum", *wide, beta=0.25).losses.item() == pytest.approx(9.0, abs=1e-12)
    args = [torch.tensor([v], dtype=F64) for v in (-4.0, -6.0, -5.0, -5.0)]  # ρ_w = 1, ρ_l = -1
    tokens = dict(chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([4]))
    per_token = pairwise_loss("ipo", *args, beta=0.25, **tokens).losses.item()
    assert per_token == pytest.approx((0.5 + 0.25 - 2) ** 2)
    normed = pairwise_loss("sigmoid_norm", *args, beta=0.25, **tokens).losses.item()
    assert normed == pytest.approx(-math.log(sig(0.25 * 0.75)))


def test_plackett_luce_by_hand():
    rho = torch.tensor([[1.0, 0.0, -1.0]], dtype=F64)
    beta = 0.5
    s = [0.5, 0.0, -0.5]
    expected = -(s[0] - math.log(sum(math.exp(v) for v in s))) - (s[1] - math.log(math.exp(s[1]) + math.exp(s[2])))
    assert plackett_luce_loss(rho, beta).item() == pytest.approx(expected, abs=1e-12)


def test_plackett_luce_with_two_responses_is_sigmoid():
    rho = torch.randn(6, 2, dtype=F64)
    torch.testing.assert_close(plackett_luce_loss(rho, 0.3), sigmoid_loss(rho[:, 0] - rho[:, 1], 0.3))


def test_plackett_luce_padding_and_gradients():
    rho = torch.tensor([[2.0, 1.0, 0.0, 9.0], [0.5, -0.5, 7.0, 7.0]], dtype=F64, requires_grad=True)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss = plackett_luce_loss(rho, 0.1, valid)
    torch.testing.assert_close(loss[0], plackett_luce_loss(rho[:1, :3], 0.1)[0])
    torch.testing.assert_close(loss[1], sigmoid_loss(rho[1, 0] - rho[1, 1], 0.1))
    loss.sum().backward()
    assert torch.isfinite(rho.grad).all() and (rho.grad[~valid] == 0).all()


def test_unknown_loss_and_missing_counts():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown loss"):
        pairwise_loss("kto", x, x, x, x, beta=0.1)
    with pytest.raises(ValueError, match="token counts"):
        pairwise_loss("ipo", x, x, x, x, beta=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        pairwise_loss("robust", x, x, x, x, beta=0.1, label_smoothing=0.5)


# --- TRL parity ---------------------------------------------------------------------------------


def trl_loss(loss_type, per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, label_smoothing=0.0):
    """TRL's own loss code (DPOTrainer._compute_loss) driven with given per-token log-probs.

    The model is a stub returning ``log_probs`` (TRL's fused-LM-head output); reference log-probs
    come in precomputed, so only TRL's loss and reward arithmetic runs.
    """
    metrics = defaultdict(lambda: defaultdict(list))
    n = per_token_logps.shape[0]
    zeros = torch.zeros_like(per_token_logps)
    model = SimpleNamespace(training=True)
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip

    def stub_model(**kwargs):
        return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(per_token_logps.shape, dtype=torch.bool))  # fmt: skip

    mask = torch.cat([torch.zeros(n, 1, dtype=torch.long), completion_mask], dim=1)  # prompt token + completion
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}  # fmt: skip
    loss = DPOTrainer._compute_loss(trainer, stub_model, inputs, False)
    return loss, metrics["train"]


TRL_LOSSES = [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2), ("sigmoid_norm", 0.0)]


@pytest.mark.parametrize("loss_type,label_smoothing", TRL_LOSSES)
def test_parity_with_trl(loss_type, label_smoothing):
    """Same log-probs in float64 → same loss and rewards as TRL (version printed on failure)."""
    torch.manual_seed(0)
    pairs, width, beta = 5, 7, 0.1
    lengths = torch.randint(1, width + 1, (2 * pairs,))
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    per_token = -torch.rand(2 * pairs, width, dtype=F64) * 3 * completion_mask
    ref_chosen, ref_rejected = -torch.rand(pairs, dtype=F64) * 10, -torch.rand(pairs, dtype=F64) * 10
    expected_loss, metrics = trl_loss(loss_type, per_token, completion_mask, ref_chosen, ref_rejected, beta,
                                      label_smoothing)  # fmt: skip
    logps, tokens = per_token.sum(1), completion_mask.sum(1)
    ours = pairwise_loss(loss_type, logps[:pairs], logps[pairs:], ref_chosen, ref_rejected, beta, label_smoothing,
                         tokens[:pairs], tokens[pairs:])  # fmt: skip
    where = f"TRL {trl.__version__}"
    assert ours.losses.mean().item() == pytest.approx(expected_loss.item(), abs=1e-6), where
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-6), where
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-6), where
    accuracy = (ours.chosen_rewards > ours.rejected_rewards).double().mean().item()
    assert accuracy == pytest.approx(metrics["rewards/accuracies"][0]), where

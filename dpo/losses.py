"""DPO-family losses as pure functions of sequence log-probs.

Notation (Rafailov et al. 2023): for a pair (y_w, y_l) of chosen and rejected responses,

    ρ_w = log π(y_w|x) − log π_ref(y_w|x),   ρ_l = log π(y_l|x) − log π_ref(y_l|x),   Δ = ρ_w − ρ_l

and the implicit rewards are r_w = β ρ_w, r_l = β ρ_l. Log-probs are sums over response
tokens. Every function returns the per-pair loss (callers take the mean); rewards come
from :func:`implicit_rewards` whatever the loss, so the reward logged in training is the
reward served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo.train_config import PAIRWISE


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = β (log π(y|x) − log π_ref(y|x)), detached (a metric, never a gradient path)."""
    return beta * (logps - ref_logps).detach()


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(βΔ).

    With ``label_smoothing`` ε > 0 this is conservative DPO (cDPO; Mitchell 2023, the
    original DPO code and legacy TRL): labels flipped with probability ε,
    −(1 − ε) log σ(βΔ) − ε log σ(−βΔ).
    """
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), an unbiased loss under label-flip rate ε ∈ [0, 0.5):

    [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge loss (Zhao et al. 2023) on the log-ratio margin: max(0, 1 − βΔ)."""
    return torch.relu(1 - beta * delta)


def ipo_sum_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO as written in the paper (Azar et al. 2023, eq. 17), on summed log-ratios: (Δ − 1/(2β))²,
    β playing the paper's τ."""
    return (delta - 1 / (2 * beta)) ** 2


def per_token_delta(
    rho_chosen: torch.Tensor, rho_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor
) -> torch.Tensor:
    """Length-normalised margin ρ_w/|y_w| − ρ_l/|y_l| (a count of 0 counts as 1)."""
    return rho_chosen / chosen_tokens.clamp(min=1) - rho_rejected / rejected_tokens.clamp(min=1)


def ipo_loss(
    rho_chosen: torch.Tensor,
    rho_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO in TRL v1's per-token-normalised form: (ρ_w/|y_w| − ρ_l/|y_l| − 1/(2β))²."""
    return ipo_sum_loss(per_token_delta(rho_chosen, rho_rejected, chosen_tokens, rejected_tokens), beta)


def sigmoid_norm_loss(
    rho_chosen: torch.Tensor,
    rho_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Length-normalised DPO: −log σ(β (ρ_w/|y_w| − ρ_l/|y_l|))."""
    return sigmoid_loss(per_token_delta(rho_chosen, rho_rejected, chosen_tokens, rejected_tokens), beta)


def plackett_luce_loss(rho: torch.Tensor, beta: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Listwise DPO for rankings (Rafailov et al. 2023, appendix A.3, Plackett–Luce model).

    ``rho`` is ``[B, K]`` log-ratios ordered best first; ``valid`` ``[B, K]`` marks real
    responses (rows may rank fewer than K). With s_k = β ρ_k:

        L = −Σ_{k=1}^{K−1} log( exp(s_k) / Σ_{j=k}^{K} exp(s_j) )

    For K = 2 this is −log σ(β(ρ_1 − ρ_2)), the pairwise DPO loss.
    """
    scores = beta * rho
    if valid is None:
        valid = torch.ones_like(rho, dtype=torch.bool)
    # A huge finite stand-in for −inf: padded slots add exp(−huge) = 0 and keep gradients free of NaN.
    scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min / 4)
    # log Σ_{j≥k} exp(s_j): a log-cumsum-exp from the end of each ranking.
    tail_lse = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    terms = (tail_lse - scores).masked_fill(~valid, 0.0)
    return terms.sum(-1)


@dataclass
class PairLoss:
    losses: torch.Tensor  # [B] per pair
    chosen_rewards: torch.Tensor  # [B] β ρ_w, detached
    rejected_rewards: torch.Tensor  # [B] β ρ_l, detached


def pairwise_loss(
    loss_type: str,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PairLoss:
    """One of :data:`PAIRWISE` on summed log-probs; reference-free training passes zeros as reference."""
    rho_w, rho_l = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = rho_w - rho_l
    simple: dict[str, Callable[[], torch.Tensor]] = {
        "sigmoid": lambda: sigmoid_loss(delta, beta, label_smoothing),
        "robust": lambda: robust_loss(delta, beta, label_smoothing),
        "hinge": lambda: hinge_loss(delta, beta),
        "ipo_sum": lambda: ipo_sum_loss(delta, beta),
    }
    if loss_type in simple:
        losses = simple[loss_type]()
    elif loss_type in ("ipo", "sigmoid_norm"):
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError(f"the {loss_type} loss needs response token counts")
        fn = ipo_loss if loss_type == "ipo" else sigmoid_norm_loss
        losses = fn(rho_w, rho_l, chosen_tokens.to(rho_w.dtype), rejected_tokens.to(rho_w.dtype), beta)
    else:
        raise ValueError(f"unknown loss {loss_type!r}; choose one of {', '.join(PAIRWISE)} (or plackett_luce)")
    return PairLoss(
        losses,
        implicit_rewards(chosen_logps, ref_chosen_logps, beta),
        implicit_rewards(rejected_logps, ref_rejected_logps, beta),
    )

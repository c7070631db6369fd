"""Fused token log-prob ops. Knows nothing of models: tensors in, tensors out."""

from __future__ import annotations

import torch

from kernels.token_logprobs_torch import torch_token_logprobs

__all__ = ["token_logprobs"]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each target token under ``softmax(logits)``, never materialising log-softmax.

        logp[i] = logits[i, t_i] - logsumexp_j logits[i, j]

    Args:
        logits: ``[..., V]`` scores in any float dtype (fp32, bf16, fp16); any strides.
        targets: ``[...]`` integer token ids, ``ignore_index`` where nothing is scored.

    Returns:
        float32 tensor shaped like ``targets`` (float64 for float64 logits), 0 at ignored
        positions. Differentiable in ``logits``: d logp[i] / d logits[i] = onehot(t_i) - softmax.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    out = torch_token_logprobs(flat_logits, targets.reshape(-1).long(), ignore_index)
    return out.view(targets.shape)

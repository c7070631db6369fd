"""The token log-prob op: ``log softmax(logits)[target]`` without materialising log-softmax."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.backend import backend


class TokenLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper over a backend's forward (``logp``, ``lse``) and backward kernels."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        impl = backend(logits)
        logp, lse = impl.forward(logits, targets, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.impl, ctx.ignore_index = impl, ignore_index
        return logp

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable: create_graph=True is an error, not silence
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        return ctx.impl.backward(logits, targets, lse, grad_out, ctx.ignore_index), None, None


def flatten(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V]`` logits with unit vocab stride and ``[N]`` int64 targets, after checks."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits {tuple(logits.shape)} have no vocabulary dimension to normalise over")
    if targets.device != logits.device:  # a kernel reads both through raw pointers on the logits' device
        raise ValueError(f"logits on {logits.device} and targets on {targets.device}: put them on one device")
    flat = logits.reshape(-1, logits.shape[-1])
    return (flat if flat.stride(-1) == 1 else flat.contiguous()), targets.reshape(-1).long().contiguous()


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is a token id in ``[0, vocab)`` or ``ignore_index`` (a kernel must not read outside a row)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"target {value} is outside the vocabulary [0, {vocab}) and not ignore_index={ignore_index}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of each target token under ``softmax(logits)``.

        logp[i] = logits[i, t_i] - logsumexp_j logits[i, j]
        d logp[i] / d logits[i] = onehot(t_i) - softmax(logits[i])

    Args:
        logits: ``[..., V]`` scores, fp32/bf16/fp16 (fp64 for references), any strides.
        targets: ``[...]`` integer token ids; ``ignore_index`` where nothing is scored.

    Returns:
        float32 tensor shaped like ``targets`` (float64 for float64 logits), computed in
        float32 whatever the input dtype, 0 at ignored positions; differentiable in ``logits``.
        Triton on CUDA, a chunked torch path elsewhere (see :mod:`kernels.backend`).
    """
    flat_logits, flat_targets = flatten(logits, targets)
    check_targets(flat_targets, flat_logits.shape[-1], ignore_index)
    return TokenLogprobsFunction.apply(flat_logits, flat_targets, ignore_index).view(targets.shape)

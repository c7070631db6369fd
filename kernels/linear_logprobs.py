"""Token log-probs straight from last hidden states and the LM head, never holding [N, V] logits.

    logits_c = h_c W^T + b            (one chunk of tokens at a time)
    logp_c   = token_logprobs(logits_c, t_c)

Backward recomputes each chunk's logits, turns them into
``G_c = g_c (onehot(t_c) - softmax(logits_c))`` with the backend's kernel, and accumulates

    grad_h_c = G_c W        grad_W += G_c^T h_c        grad_b += Σ_rows G_c

so peak memory is one chunk of logits (and its gradient) instead of [N, V].
The matmuls run in the input dtype (as the model's own LM head does); the
softmax math is float32.
"""

from __future__ import annotations

import torch

from kernels.backend import backend
from kernels.logprobs import flatten
from kernels.torch_backend import accumulation_dtype

# Tokens per chunk: about this many logits per chunk (a 256-row chunk at V = 49152 in float32 is 48 MiB).
CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _logits_into(buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``hidden @ weight.T + bias`` written into the front rows of a reused buffer (no fresh pages per chunk)."""
    out = buffer[: hidden.shape[0]]
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int) -> torch.Tensor:
        impl = backend(hidden)
        n, vocab = hidden.shape[0], weight.shape[0]
        step = _chunk_rows(vocab)
        buffer = hidden.new_empty(min(step, n), vocab)
        logp = torch.empty(n, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
        lse = torch.empty_like(logp)
        for s in range(0, n, step):
            logits = _logits_into(buffer, hidden[s : s + step], weight, bias)
            logp[s : s + step], lse[s : s + step] = impl.forward(logits, targets[s : s + step], ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.impl, ctx.ignore_index, ctx.step = impl, ignore_index, step
        return logp

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, step = hidden.shape[0], ctx.step
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        logits_buffer = hidden.new_empty(min(step, n), weight.shape[0])
        grad_buffer = torch.empty_like(logits_buffer)
        for s in range(0, n, step):
            rows = slice(s, s + step)
            h = hidden[rows]
            logits = _logits_into(logits_buffer, h, weight, bias)
            g = ctx.impl.backward(logits, targets[rows], lse[rows], grad_out[rows], ctx.ignore_index,
                                  out=grad_buffer[: h.shape[0]])  # fmt: skip
            if need_h:
                torch.mm(g, weight, out=grad_h[rows])
            if need_w:
                grad_w.addmm_(g.t().to(acc), h.to(acc))
            if need_b:
                grad_b += g.sum(0, dtype=acc)
        return (
            grad_h,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None,
            None,
        )


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``token_logprobs(hidden @ weight.T + bias, targets)`` computed in token chunks.

    Args:
        hidden: ``[..., H]`` last hidden states (after the final norm).
        weight: ``[V, H]`` LM-head weight; ``bias``: optional ``[V]``.
        targets: ``[...]`` token ids, ``ignore_index`` where nothing is scored.

    Returns:
        float32 ``[...]`` log-probs, 0 at ignored positions; differentiable in
        ``hidden``, ``weight`` and ``bias``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not map hidden size {hidden.shape[-1]} to a vocabulary")
    flat_hidden, flat_targets = flatten(hidden, targets)
    out = LinearTokenLogprobsFunction.apply(flat_hidden.contiguous(), weight, bias, flat_targets, ignore_index)
    return out.view(targets.shape)

"""Torch path of the token log-prob op, for CPUs (and GPUs without Triton).

    logp[i] = z[i, t_i] - logsumexp_j z[i, j]
    d logp[i] / d z[i, j] = onehot(t_i)_j - exp(z[i, j] - lse[i])

Rows are processed in chunks so the only [rows, V] float32 temporaries are one
chunk's; the full [N, V] log-softmax never exists. Backward recomputes softmax
per chunk from the stored per-row logsumexp.
"""

from __future__ import annotations

import torch

# One chunk of rows holds at most this many float32 logits (64 MiB) at a time.
CHUNK_ELEMENTS = 1 << 24


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs; float64 inputs keep float64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_step(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` for ``[N, V]`` logits with unit vocab stride and ``[N]`` int64 targets."""
    n, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    ignored = targets == ignore_index
    lse = torch.empty(n, dtype=acc, device=logits.device)
    step = _row_step(vocab)
    for start in range(0, n, step):
        lse[start : start + step] = torch.logsumexp(logits[start : start + step].to(acc), dim=-1)
    picked = logits.gather(1, targets.masked_fill(ignored, 0)[:, None]).squeeze(1).to(acc)
    return (picked - lse).masked_fill_(ignored, 0.0), lse


def backward(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """``grad_out[i] * (onehot(t_i) - softmax(z[i]))`` in the dtype of ``logits``; 0 on ignored rows."""
    n, vocab = logits.shape
    ignored = targets == ignore_index
    grad_rows = grad_out.to(lse.dtype).masked_fill(ignored, 0.0)
    safe_targets = targets.masked_fill(ignored, 0)
    grad_logits = torch.empty_like(logits)
    same_dtype = logits.dtype == lse.dtype
    step = _row_step(vocab)
    for start in range(0, n, step):
        stop = start + step
        g = grad_rows[start:stop, None]
        # For float32 logits the chunk is computed in place in the output: no temporary at all.
        chunk = grad_logits[start:stop] if same_dtype else torch.empty_like(logits[start:stop], dtype=lse.dtype)
        torch.sub(logits[start:stop], lse[start:stop, None], out=chunk)
        chunk.exp_().mul_(-g).scatter_add_(1, safe_targets[start:stop, None], g)
        if not same_dtype:
            grad_logits[start:stop] = chunk
    return grad_logits

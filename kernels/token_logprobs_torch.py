"""log p(target) per token without materialising the full [N, V] log-softmax.

    logp[i] = z[i, t_i] - logsumexp_j z[i, j]
    d logp[i] / d z[i, j] = onehot(t_i)_j - softmax(z[i])_j

This is the torch path: rows are processed in chunks, so the only [rows, V]
float32 temporaries are one chunk's. Backward recomputes softmax per chunk from
the stored per-row logsumexp instead of saving it.
"""

from __future__ import annotations

import torch

# A chunk of rows holds at most this many logits in float32 (64 MiB) at a time.
_CHUNK_ELEMENTS = 1 << 24


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for fp32/bf16/fp16 inputs; float64 inputs keep float64 (gradcheck, references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(vocab, 1))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        n, vocab = logits.shape
        ignored = targets == ignore_index
        safe_targets = targets.masked_fill(ignored, 0)
        acc = _accumulation_dtype(logits.dtype)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        step = _chunk_rows(vocab)
        for start in range(0, n, step):
            lse[start : start + step] = torch.logsumexp(logits[start : start + step].to(acc), dim=-1)
        picked = logits.gather(1, safe_targets[:, None]).squeeze(1).to(acc)
        out = (picked - lse).masked_fill(ignored, 0.0)
        ctx.save_for_backward(logits, safe_targets, ignored, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe_targets, ignored, lse = ctx.saved_tensors
        n, vocab = logits.shape
        grad_rows = grad_out.to(lse.dtype).masked_fill(ignored, 0.0)
        grad_logits = torch.empty_like(logits)
        step = _chunk_rows(vocab)
        for start in range(0, n, step):
            stop = start + step
            g = grad_rows[start:stop, None]
            chunk = torch.exp(logits[start:stop].to(lse.dtype) - lse[start:stop, None]).mul_(-g)
            chunk.scatter_add_(1, safe_targets[start:stop, None], g)
            grad_logits[start:stop] = chunk.to(logits.dtype)
        return grad_logits, None, None


def torch_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[N]`` log-probs (float32; float64 for float64 input) of ``[N]`` int64 targets in ``[N, V]`` logits."""
    return _TokenLogprobs.apply(logits, targets, ignore_index)

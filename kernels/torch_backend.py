"""Torch path of the token log-prob op, for CPUs (and GPUs without Triton).

    logp[i] = z[i, t_i] - logsumexp_j z[i, j]
    d logp[i] / d z[i, j] = onehot(t_i)_j - exp(z[i, j] - lse[i])

Rows are processed in chunks of about 1M logits (4 MiB in float32), small enough
to stay in cache, so the full [N, V] log-softmax never exists and each chunk is
read from memory once per pass. Forward takes torch's fused log-softmax of a chunk
(the fastest CPU kernel for it) and keeps only the target's value and the row's
logsumexp, read off as ``z[t] - logp[t]`` (exact to float32 rounding of both; computed
directly for a row whose target logit is -inf).
Backward recomputes softmax per chunk from the stored logsumexp.
"""

from __future__ import annotations

import torch

# Logits per chunk of rows: larger chunks fall out of cache and cost fresh page faults per chunk.
CHUNK_ELEMENTS = 1 << 20


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
    safe_targets = targets.masked_fill(ignored, 0)[:, None]
    logp = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    step = _row_step(vocab)
    # Buffers reused across chunks: a fresh allocation per chunk can cost fresh page faults every time.
    work = logits.new_empty(min(step, n), vocab, dtype=acc)
    upcast = None if logits.dtype == acc else torch.empty_like(work)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        chunk = logits[rows]
        k = chunk.shape[0]
        source = chunk if upcast is None else upcast[:k].copy_(chunk)
        picked_logp = torch.log_softmax(source, dim=-1, out=work[:k]).gather(1, safe_targets[rows])
        logp[rows] = picked_logp.squeeze(1)
        row_lse = (chunk.gather(1, safe_targets[rows]).to(acc) - picked_logp).squeeze(1)
        impossible = row_lse.isnan()  # a target logit of -inf: logp is -inf, and -inf - -inf gives no lse
        if impossible.any():
            row_lse[impossible] = torch.logsumexp(source[impossible], dim=-1)
        lse[rows] = row_lse
    return logp.masked_fill_(ignored, 0.0), lse


def backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    ignore_index: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad_out[i] * (onehot(t_i) - softmax(z[i]))`` in the dtype of ``logits`` (into ``out`` if given)."""
    n, vocab = logits.shape
    ignored = targets == ignore_index
    grad_rows = grad_out.to(lse.dtype).masked_fill(ignored, 0.0)[:, None]
    safe_targets = targets.masked_fill(ignored, 0)[:, None]
    # The target's own entry, g * (1 - p_t) = -g * expm1(z_t - lse), computed apart so it is rounded once.
    at_target = -grad_rows * torch.expm1(logits.gather(1, safe_targets).to(lse.dtype) - lse[:, None])
    grad_logits = torch.empty_like(logits) if out is None else out
    step = _row_step(vocab)
    buffer = None if logits.dtype == lse.dtype else logits.new_empty(min(step, n), vocab, dtype=lse.dtype)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        # float32 logits: computed in place in the output; others: in a float32 buffer, cast once on the final write.
        work = grad_logits[rows] if buffer is None else buffer[: grad_logits[rows].shape[0]]
        torch.sub(logits[rows], lse[rows, None], out=work).exp_()
        torch.mul(work, -grad_rows[rows], out=grad_logits[rows])
        # Per chunk: a whole-tensor scatter_ on bf16 allocates a float32 copy of the tensor on CPU.
        grad_logits[rows].scatter_(1, safe_targets[rows], at_target[rows].to(grad_logits.dtype))
        if ignored[rows].any():  # 0, even where an ignored (padding) row's logits are not finite: 0·NaN is NaN
            grad_logits[rows].masked_fill_(ignored[rows, None], 0.0)
    return grad_logits

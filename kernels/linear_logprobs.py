"""Token log-probs straight from last hidden states and the LM head, never holding [N, V] logits.

    logits_c = h_c W^T + b            (one chunk of tokens at a time)
    logp_c   = token_logprobs(logits_c, t_c)

Backward recomputes each chunk's logits, turns them into
``G_c = g_c (onehot(t_c) - softmax(logits_c))`` with the backend's kernel, and accumulates

    grad_h_c = G_c W        grad_W += G_c^T h_c        grad_b += Σ_rows G_c

so peak memory is one chunk of logits (and its gradient) instead of [N, V].
The logits and ``grad_h`` matmuls run in the input dtype (as the model's own LM head does);
``grad_W`` and ``grad_b`` accumulate over chunks in float32 (a float32 matmul), and the softmax
math is float32.

On a CPU (torch backend) the forward instead walks the vocabulary in tiles of
``VOCAB_BLOCK`` columns, folding each tile into a running logsumexp while it is
still in cache (the online softmax of Milakov & Gimelshein 2018):

    m' = max(m, max_j z_j)       s' = s·exp(m − m') + Σ_j exp(z_j − m')       lse = m + log s

A GEMM with a narrow N runs nearer the CPU's peak than one with N = V (measured:
186 vs 143 GFLOP/s at 330×576×49152 fp32), and the tile is never written out and read back.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels import torch_backend
from kernels.backend import backend
from kernels.logprobs import check_targets, flatten
from kernels.torch_backend import accumulation_dtype

# Tokens per chunk: about this many logits per chunk (a 256-row chunk at V = 49152 in float32 is 48 MiB).
CHUNK_ELEMENTS = 1 << 24


# CPU forward tiles: VOCAB_BLOCK columns by CPU_ROWS rows (4 MiB in float32).
VOCAB_BLOCK = 2048
CPU_ROWS = 512


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _logits_into(buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """``hidden @ weight.T + bias`` written into the front rows of a reused buffer (no fresh pages per chunk)."""
    out = buffer[: hidden.shape[0]]
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _tiled_forward(hidden, weight, bias, targets, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` with a running logsumexp over vocabulary tiles (the CPU forward)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0)
    logp = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty_like(logp)
    size = min(CPU_ROWS, n) * min(VOCAB_BLOCK, vocab)
    tile_buffer = hidden.new_empty(size)
    work_buffer = tile_buffer if hidden.dtype == acc else torch.empty(size, dtype=acc, device=hidden.device)
    for s in range(0, n, CPU_ROWS):
        h, t = hidden[s : s + CPU_ROWS], safe_targets[s : s + CPU_ROWS]
        rows = h.shape[0]
        run_max = torch.full((rows,), float("-inf"), dtype=acc, device=hidden.device)
        run_sum, picked = torch.zeros_like(run_max), torch.zeros_like(run_max)
        for j in range(0, vocab, VOCAB_BLOCK):
            w = weight[j : j + VOCAB_BLOCK]
            cols = w.shape[0]
            tile = tile_buffer[: rows * cols].view(rows, cols)
            if bias is None:
                torch.mm(h, w.t(), out=tile)
            else:
                torch.addmm(bias[j : j + cols], h, w.t(), out=tile)
            z = tile if tile.dtype == acc else work_buffer[: rows * cols].view(rows, cols).copy_(tile)
            inside = (t >= j) & (t < j + cols)
            picked = torch.where(inside, z.gather(1, (t - j).clamp(0, cols - 1)[:, None]).squeeze(1), picked)
            new_max = torch.maximum(run_max, z.amax(1))
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # all -inf so far: exp(-inf - -inf) is NaN
            run_sum.mul_(torch.exp(run_max - shift))  # 0 on the first tile: exp(-inf)
            run_sum += torch.sub(z, shift[:, None], out=z).exp_().sum(1)  # z is spent: reuse it
            run_max = new_max
        lse[s : s + rows] = run_max + run_sum.log()
        logp[s : s + rows] = picked - lse[s : s + rows]
    return logp.masked_fill_(ignored, 0.0), lse


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int) -> torch.Tensor:
        impl = backend(hidden)
        n, vocab = hidden.shape[0], weight.shape[0]
        step = _chunk_rows(vocab)
        if impl is torch_backend and hidden.device.type == "cpu":
            logp, lse = _tiled_forward(hidden, weight, bias, targets, ignore_index)
        else:
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
    @once_differentiable  # the backward kernels are not differentiable: create_graph=True is an error, not silence
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
                ignored = targets[rows] == ctx.ignore_index
                if ignored.any():  # an ignored row's G is 0, but 0·NaN is NaN: garbage in padding rows stays out
                    h = h.masked_fill(ignored[:, None], 0)
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
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                        f"{'' if bias is None else ', ' + str(bias.dtype)}")  # fmt: skip
    flat_hidden, flat_targets = flatten(hidden, targets)
    check_targets(flat_targets, weight.shape[0], ignore_index)
    out = LinearTokenLogprobsFunction.apply(flat_hidden.contiguous(), weight, bias, flat_targets, ignore_index)
    return out.view(targets.shape)

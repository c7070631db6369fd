"""Triton path of the token log-prob op: one pass over each row, fp32 math whatever the input dtype.

Forward (one program per row): an online max / sum-of-exp over vocabulary blocks
gives the row's logsumexp; the target logit is gathered; ``logp`` and ``lse`` are
stored. Backward (one program per row) writes ``g * (onehot(t) - exp(z - lse))``
from the stored ``lse``, so log-softmax is never materialised. Values are upcast
to float32 at load: besides being right, this is required under
``TRITON_INTERPRET=1``, which computes bf16 arithmetic wrongly.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from kernels.torch_backend import accumulation_dtype

MAX_BLOCK_V = 4096


@triton.jit
def _forward_kernel(
    logits_ptr, row_stride, targets_ptr, logp_ptr, lse_ptr, n_vocab, ignore_index, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # While every logit so far is -inf, shift by 0: exp(-inf - -inf) would be NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_vocab)  # checked by the caller; never read outside the row
    picked = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, tl.where(valid, picked - lse, float("nan"))))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward_kernel(
    logits_ptr, row_stride, grad_ptr, grad_row_stride, targets_ptr, lse_ptr, grad_out_ptr,
    n_vocab, ignore_index, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    grad_row_ptr = grad_ptr + row * grad_row_stride
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    g = tl.where(ignored, 0.0, tl.load(grad_out_ptr + row).to(tl.float32))
    lse = tl.load(lse_ptr + row).to(tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_vocab
        x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        # An ignored row's gradient is 0 even where its logits are not finite (padding rows).
        grad = tl.where(ignored, 0.0, tl.where(cols == target, g, 0.0) - g * tl.exp(x - lse))
        tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _on(device: torch.device):
    """Triton launches on the current CUDA device, not the tensors': make the tensors' device current."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _block(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, lse)`` for ``[N, V]`` logits with unit vocab stride and ``[N]`` int64 targets."""
    n, vocab = logits.shape
    acc = accumulation_dtype(logits.dtype)
    logp = torch.empty(n, dtype=acc, device=logits.device)
    lse = torch.empty(n, dtype=acc, device=logits.device)
    if n:
        block = _block(vocab)
        with _on(logits.device):
            _forward_kernel[(n,)](logits, logits.stride(0), targets, logp, lse, vocab, ignore_index,
                                  BLOCK_V=block, num_warps=_num_warps(block))  # fmt: skip
    return logp, lse


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
    grad_logits = torch.empty_like(logits) if out is None else out
    if n:
        block = _block(vocab)
        with _on(logits.device):
            _backward_kernel[(n,)](logits, logits.stride(0), grad_logits, grad_logits.stride(0), targets, lse,
                                   grad_out.contiguous(), vocab, ignore_index, BLOCK_V=block,
                                   num_warps=_num_warps(block))  # fmt: skip
    return grad_logits

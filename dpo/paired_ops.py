"""The elementwise steps between :mod:`dpo.paired`'s GEMMs, each one fused kernel under ``torch.compile``.

Every paired linear map reads its input twice over, ``x_ref`` and ``[x_π − x_ref, x_π]`` in bf16,
and writes two bf16 products. Run op by op in eager torch, the norms, differences, casts and
SiLU gates between the GEMMs cost more than the GEMMs' own savings (about a third of a paired
forward on a 2-core CPU, half of it in the MLP's 3·intermediate-wide tensors). Each function
here is one such step, written as plain torch, and :func:`fused` compiles it with inductor into
one loop over the rows (C++ on a CPU, Triton on a GPU); the row count is dynamic, so two
compilations (the first shape, then any) serve every pack. The compiled kernels compute what the
eager code computes, in float32; only the order of float32 sums may differ.

``DPORM_COMPILE=0`` runs them eagerly; so does a machine where compiling fails (no C++ compiler),
after one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

COMPILE_VARIABLE = "DPORM_COMPILE"


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, float32."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def gemm_inputs(x_ref: torch.Tensor, x_pol: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_ref, [x_π − x_ref, x_π])`` in the GEMM dtype, for ``y_ref = x_ref W_refᵀ`` and ``Δy = [.] [W_ref, ΔW]ᵀ``."""
    return x_ref.to(dtype), torch.cat([x_pol - x_ref, x_pol], dim=-1).to(dtype)


def norm_inputs(h, d, w_ref, w_pol, eps: float, dtype: torch.dtype):
    """GEMM inputs after each model's RMSNorm: the reference's state is ``h``, the policy's ``h + d``."""
    return gemm_inputs(rms(h, w_ref, eps), rms(h + d, w_pol, eps), dtype)


def residual_norm_inputs(h, d, y_ref, dy, w_ref, w_pol, eps: float, dtype: torch.dtype):
    """Add a sublayer's outputs to the residual streams, then :func:`norm_inputs` of the new streams."""
    h, d = h + y_ref.float(), d + dy.float()
    return (h, d, *norm_inputs(h, d, w_ref, w_pol, eps, dtype))


def residual(h, d, y_ref, dy):
    return h + y_ref.float(), d + dy.float()


def final_states(h, d, w_ref, w_pol, eps: float):
    """Both models' final-norm hidden states, ``(policy, reference)``, float32."""
    return rms(h + d, w_pol, eps), rms(h, w_ref, eps)


def with_bias(y_ref, dy, bias, bias_delta):
    """float32 outputs of a paired linear map with biases (q/k/v in Qwen2)."""
    return y_ref.float() + bias, dy.float() + bias_delta


def swiglu_inputs(gate_up_ref, d_gate_up, dtype: torch.dtype):
    """Down-projection inputs from both models' SiLU gates: ``silu(g)·u``, the policy's at ``g + Δg``, ``u + Δu``."""
    g, u = gate_up_ref.float().chunk(2, dim=-1)
    dg, du = d_gate_up.float().chunk(2, dim=-1)
    return gemm_inputs(F.silu(g) * u, F.silu(g + dg) * (u + du), dtype)


def rotary(qkv_ref, dqkv, cos, sin, q_size: int, kv_size: int, head_dim: int):
    """Both models' rotated queries and keys and their values, ``[2, heads, M, head_dim]`` float32 (reference first)."""
    qkv = torch.stack([qkv_ref.float(), qkv_ref.float() + dqkv.float()])
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    m = qkv.shape[1]
    q = _rotate(q.view(2, m, -1, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(k.view(2, m, -1, head_dim).transpose(1, 2), cos, sin)
    return q, k, v.view(2, m, -1, head_dim).transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attention_inputs(out: torch.Tensor, dtype: torch.dtype):
    """o-projection inputs from both models' attention outputs ``[2, M, heads·head_dim]``."""
    return gemm_inputs(out[0], out[1], dtype)


class Fused:
    """``fn`` compiled on first use (dynamic shapes); eager when compiling is off or fails on this machine."""

    broken = False  # set once compiling failed: every function runs eagerly from then on

    def __init__(self, fn: Callable):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if not Fused.broken and os.environ.get(COMPILE_VARIABLE, "1") != "0":
            if self.compiled is None:
                # Automatic dynamic shapes: the first call compiles for its shapes, the next for varying ones
                # only (rows); widths stay static, which gives inductor's CPU loops ~2x on rotary positions.
                self.compiled = torch.compile(self.fn)
            try:
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler: the eager function computes the same
                Fused.broken = True
                warnings.warn(f"torch.compile failed ({type(e).__name__}); paired elementwise steps run eagerly",
                              stacklevel=2)  # fmt: skip
        return self.fn(*args)


def fused(fn: Callable) -> Fused:
    return Fused(fn)


def logsumexp_step(z_ref, dz, shift, max_ref, sum_ref, max_pol, sum_pol):
    """Fold one vocabulary tile of both models' logits into running logsumexps (online softmax).

    The reference's logits are ``z_ref + shift`` (per row), the policy's those plus ``dz``, as the
    GEMMs wrote them: the rounding of ``z_ref`` is the same in both sums.
    """
    z_ref = z_ref.float() + shift.float()[:, None]
    z_pol = z_ref + dz.float()
    new_ref, new_pol = torch.maximum(max_ref, z_ref.amax(1)), torch.maximum(max_pol, z_pol.amax(1))
    sum_ref = sum_ref * torch.exp(max_ref - new_ref) + torch.exp(z_ref - new_ref[:, None]).sum(1)
    sum_pol = sum_pol * torch.exp(max_pol - new_pol) + torch.exp(z_pol - new_pol[:, None]).sum(1)
    return new_ref, sum_ref, new_pol, sum_pol

"""bf16 matmuls with fp32-grade DPO decisions: π and π_ref run together, π as π_ref plus a difference.

The reward β·(log π − log π_ref) is a small difference of two large sums. Run apart in bf16, each
model rounds its own activations at every matmul and the errors do not cancel (bf16-mixed: median
log-ratio error ~0.4-0.6 nats on RewardBench pairs). Here both models run in one pass over the same
tokens: the reference's hidden state h in fp32, the policy's as h + d with d = h_π − h_ref carried in
fp32. Every linear map is

    y_ref = x_ref W_refᵀ                                         one bf16 GEMM
    y_π   = y_ref + [x_π − x_ref, x_π] [W_ref, W_π − W_ref]ᵀ     one bf16 GEMM of differences

since x_π W_πᵀ = x_ref W_refᵀ + (x_π − x_ref) W_refᵀ + x_π (W_π − W_ref)ᵀ. The rounding of the large
product y_ref is the same in both models and cancels in the log-ratio to first order; the second
GEMM rounds only differences, which are small. Norms, rotary positions, attention, the SiLU gate,
the LM head and log-softmax run in fp32. Identical models give a reward of exactly 0. Cost: 1.5x the
bf16 matmul FLOPs of scoring the two models apart, no padding (sequences are packed, as
:mod:`dpo.packing`).

Llama-style decoders only (Llama, Mistral without sliding windows, Qwen2, SmolLM): RMSNorm, q/k/v/o
projections with optional biases, rotary positions, SiLU-gated MLP, a plain linear LM head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo.encoding import Encoded
from dpo.errors import DpormError
from dpo.logprobs import (
    PACK_TOKENS,
    SequenceLogprobs,
    _separable_head,
    collect,
    group_work,
    in_input_order,
    pack_targets,
    prompt_groups,
)
from dpo.models import PAIRED
from dpo.packing import PLAN_KEYWORD, pack_groups, packable, packed_attention
from kernels import linear_token_logprobs

MODEL_TYPES = ("llama", "mistral", "qwen2")


def paired_support(model) -> str | None:
    """Why ``model`` cannot run paired, or None when it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"{PAIRED} supports {', '.join(MODEL_TYPES)} decoders, not {kind or type(model).__name__}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"{PAIRED} needs a SiLU-gated MLP, not {getattr(config, 'hidden_act', None)!r}"
    if not packable(config):
        return f"{PAIRED} needs full attention in every layer (no sliding windows)"
    head = _separable_head(model)
    if head is None or head.lora:
        return f"{PAIRED} needs a plain linear LM head"
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        names = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(type(m) is not torch.nn.Linear for m in names) or hasattr(attn, "q_norm"):
            return f"{PAIRED}: {type(layer).__name__} is not a Llama-style layer (plain q/k/v/o and gate/up/down)"
    return None


class _Linear:
    """One paired linear map: ``y_ref`` and ``y_π − y_ref`` from ``x_ref`` and ``x_π`` (fp32 in and out)."""

    def __init__(self, refs: Sequence[torch.nn.Linear], pols: Sequence[torch.nn.Linear], dtype: torch.dtype):
        # Several maps of the same input (q, k, v; gate, up) are one GEMM: weights concatenated along N.
        w_ref = torch.cat([m.weight.detach() for m in refs]).float()
        w_pol = torch.cat([m.weight.detach() for m in pols]).float()
        self.k = w_ref.shape[1]
        self.weight = torch.cat([w_ref, w_pol - w_ref], dim=1).to(dtype)  # [N, 2K]: [W_ref, ΔW]
        if refs[0].bias is not None:
            b_ref = torch.cat([m.bias.detach() for m in refs]).float()
            self.bias, self.bias_delta = b_ref, torch.cat([m.bias.detach() for m in pols]).float() - b_ref
        else:
            self.bias = self.bias_delta = None

    def __call__(self, x_ref: torch.Tensor, x_pol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.weight.dtype
        y_ref = (x_ref.to(dtype) @ self.weight[:, : self.k].t()).float()
        delta = (torch.cat([x_pol - x_ref, x_pol], dim=-1).to(dtype) @ self.weight.t()).float()
        if self.bias is not None:
            y_ref, delta = y_ref + self.bias, delta + self.bias_delta
        return y_ref, delta


@dataclass
class _Layer:
    norms: tuple  # (input, post-attention) RMSNorms of the reference, then of the policy
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    split: tuple[int, int, int]  # q, k, v widths
    heads: tuple[int, int, int]  # query heads, key/value heads, head dim
    scaling: float


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm in fp32."""
    return norm.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class PairedModel:
    """A policy and its reference scored together: :func:`logprobs` gives both models' log-probs.

    Holds bf16 copies of the decoder's linear weights ([W_ref, W_π − W_ref] per map); embeddings,
    norms and the LM heads are the fp32 models' own tensors.
    """

    def __init__(self, policy, reference, dtype: torch.dtype = torch.bfloat16):
        for name, model in (("policy", policy), ("reference", reference)):
            reason = paired_support(model)
            if reason:
                raise DpormError(f"{name}: {reason}")
        keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rope_theta", "rope_scaling", "rope_parameters")  # fmt: skip
        if any(getattr(policy.config, k, None) != getattr(reference.config, k, None) for k in keys):
            raise DpormError(f"{PAIRED}: policy and reference have different architectures")
        self.policy, self.reference = policy, reference
        self.layers = [self._layer(lr, lp, dtype) for lr, lp in zip(_layers(reference), _layers(policy), strict=True)]

    @staticmethod
    def _layer(ref, pol, dtype) -> _Layer:
        ar, ap, mr, mp = ref.self_attn, pol.self_attn, ref.mlp, pol.mlp
        proj = ("q_proj", "k_proj", "v_proj")
        split = tuple(getattr(ar, n).out_features for n in proj)
        head_dim = ar.head_dim
        return _Layer(
            norms=(
                ref.input_layernorm,
                ref.post_attention_layernorm,
                pol.input_layernorm,
                pol.post_attention_layernorm,
            ),  # fmt: skip
            qkv=_Linear([getattr(ar, n) for n in proj], [getattr(ap, n) for n in proj], dtype),
            o=_Linear([ar.o_proj], [ap.o_proj], dtype),
            gate_up=_Linear([mr.gate_proj, mr.up_proj], [mp.gate_proj, mp.up_proj], dtype),
            down=_Linear([mr.down_proj], [mp.down_proj], dtype),
            split=split,
            heads=(split[0] // head_dim, split[1] // head_dim, head_dim),
            scaling=ar.scaling,
        )

    @property
    def device(self) -> torch.device:
        return next(self.reference.parameters()).device

    @torch.inference_mode()
    def logprobs(self, seqs: Sequence[Encoded]) -> tuple[SequenceLogprobs, SequenceLogprobs]:
        """``(policy, reference)`` response log-probs of each sequence, prompts shared, sequences packed."""
        if not seqs:
            raise ValueError("PairedModel.logprobs needs at least one sequence")
        groups = prompt_groups(seqs)
        work = group_work(seqs, groups)
        responses = [r for _, rs in work for r in rs]
        heads = (_separable_head(self.policy), _separable_head(self.reference))
        parts: tuple[list, list] = ([], [])
        for pack in pack_groups(work, PACK_TOKENS):
            states = self._forward(pack)
            rows, targets, sizes = pack_targets(pack, responses[len(parts[0]) : len(parts[0]) + len(pack.rows)],
                                                self.device)  # fmt: skip
            for out, head, h in zip(parts, heads, states, strict=True):
                out += linear_token_logprobs(h[rows], head.weight.float(), targets, -100, head.bias).split(sizes)
        return tuple(collect(in_input_order(p, groups), seqs, self.device) for p in parts)

    def _forward(self, pack) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm hidden states ``(policy, reference)``, ``[M, H]`` fp32, of one packed forward."""
        device = self.device
        ids = torch.tensor(pack.input_ids, dtype=torch.long, device=device)
        positions = torch.tensor([pack.position_ids], dtype=torch.long, device=device)
        dec_ref, dec_pol = self.reference.get_decoder(), self.policy.get_decoder()
        h = dec_ref.embed_tokens(ids).float()
        d = dec_pol.embed_tokens(ids).float() - h
        cos, sin = (t[0].float() for t in dec_ref.rotary_emb(h[None], positions))  # [M, head_dim]
        for layer in self.layers:
            ref_in, ref_post, pol_in, pol_post = layer.norms
            x_ref, x_pol = _rms(ref_in, h), _rms(pol_in, h + d)
            y, dy = self._attention(layer, pack, x_ref, x_pol, cos, sin)
            h, d = h + y, d + dy
            x_ref, x_pol = _rms(ref_post, h), _rms(pol_post, h + d)
            gu_ref, dgu = layer.gate_up(x_ref, x_pol)
            y, dy = layer.down(_swiglu(gu_ref), _swiglu(gu_ref + dgu))
            h, d = h + y, d + dy
        return _rms(dec_pol.norm, h + d), _rms(dec_ref.norm, h)

    @staticmethod
    def _attention(layer: _Layer, pack, x_ref, x_pol, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        qkv_ref, dqkv = layer.qkv(x_ref, x_pol)
        n_q, n_kv, dim = layer.heads
        qkv = torch.stack([qkv_ref, qkv_ref + dqkv])  # [2, M, q + k + v]: reference, policy
        q, k, v = qkv.split(layer.split, dim=-1)
        m = qkv.shape[1]
        q = _rotate(q.view(2, m, n_q, dim).transpose(1, 2), cos, sin)
        k = _rotate(k.view(2, m, n_kv, dim).transpose(1, 2), cos, sin)
        v = v.view(2, m, n_kv, dim).transpose(1, 2)
        out, _ = packed_attention(None, q, k, v, None, scaling=layer.scaling, **{PLAN_KEYWORD: pack})
        out = out.reshape(2, m, n_q * dim)
        return layer.o(out[0], out[1])


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _layers(model):
    return model.get_decoder().layers

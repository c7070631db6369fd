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
GEMM rounds only differences, which are small. The LM head is paired the same way, over vocabulary
tiles (:class:`_PairedHead`). Norms, rotary positions, attention, the SiLU gate and log-softmax run in
fp32; the elementwise steps between GEMMs are fused kernels (:mod:`dpo.paired_ops`). Identical
models give a reward of exactly 0. Cost: 1.5x the bf16 matmul FLOPs of scoring the two models apart,
no padding (sequences are packed, as :mod:`dpo.packing`). Where W_π − W_ref has a low rank r (a LoRA
policy, merged or not; a ``--delta-rank`` artifact; an untouched layer), the difference GEMM is
``[x_π − x_ref, x_π·Aᵀ] [W_ref, B]ᵀ`` with W_π − W_ref = B·A, K + r wide instead of 2K: about 1.05x.

Llama-style decoders only (Llama, Mistral without sliding windows, Qwen2, SmolLM): RMSNorm, q/k/v/o
projections with optional biases, rotary positions, SiLU-gated MLP, a plain linear LM head without bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpo import paired_ops
from dpo.encoding import Encoded
from dpo.errors import DpormError
from dpo.logprobs import (
    PACK_TOKENS,
    SequenceLogprobs,
    _lora_head,
    _separable_head,
    collect,
    group_work,
    in_input_order,
    pack_targets,
    prompt_groups,
)
from dpo.models import PAIRED
from dpo.packing import PLAN_KEYWORD, pack_groups, packable, packed_attention
from dpo.paired_ops import fused

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
    if head is None or head.lora or head.bias is not None:
        return f"{PAIRED} needs a plain linear LM head without a bias"
    decoder = model.get_decoder()
    if type(decoder.embed_tokens) is not torch.nn.Embedding:
        return f"{PAIRED} needs plain token embeddings (no adapter on them)"
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        names = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(_lora_factors(m) is None for m in names) or hasattr(attn, "q_norm"):
            return (f"{PAIRED}: {type(layer).__name__} is not a Llama-style layer (plain q/k/v/o and gate/up/down, "
                    "or plain LoRA on them)")  # fmt: skip
    return None


def _lora_factors(module) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor] | None:
    """``(base linear, B, A)``: a PEFT LoRA layer computes ``base(x) + x·(B·A)ᵀ``, B with its scalings folded in.

    A plain linear map has rank-0 factors; None for anything else (DoRA, LoRA biases, dropout in training).
    """
    if type(module) is torch.nn.Linear:
        return module, module.weight.new_zeros(module.out_features, 0), module.weight.new_zeros(0, module.in_features)
    head = _lora_head(module) if hasattr(module, "lora_A") and not module.merged else None
    if head is None:
        return None
    k = module.base_layer.in_features
    down = [a for a, _ in head.lora]
    return module.base_layer, head.weight[:, k:], torch.cat(down) if down else head.weight.new_zeros(0, k)


LOW_RANK_TOLERANCE = 2.0**-11  # relative Frobenius error of ΔW ≈ B·A: below ΔW's own bf16 rounding (~2^-9/√3)
MAX_LOW_RANK = 256  # the largest rank looked for (a sketch this wide costs three GEMMs of ΔW's size)


def rank_cap(n: int, k: int) -> int:
    """The largest rank r whose extra GEMM ``x_π·Aᵀ`` pays for itself in an [N, K] map (see :func:`low_rank_delta`)."""
    return min(n * k // (2 * (n + k)), min(n, k) // 2, MAX_LOW_RANK)


def low_rank_delta(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(B, A)`` with ``‖ΔW − B·A‖_F ≤ LOW_RANK_TOLERANCE·‖ΔW‖_F``, when so small a rank makes the GEMM cheaper.

    A LoRA-trained policy (merged or not), a ``--delta-rank`` artifact or a frozen layer has such a
    delta; a full fine-tune's is full-rank and gets None. The rank must pay for the extra GEMM
    ``x_π·Aᵀ``: ``r·(N + K)`` at most about half of the ``N·K`` it saves, and at most MAX_LOW_RANK.
    A zero delta has rank 0. Randomized range finder (Halko et al. 2011, without power iterations:
    the deltas that qualify are low-rank up to rounding): ΔW·Ω with a fixed-seed Ω, its orthonormal
    basis Q, the SVD of QᵀΔW truncated at the tolerance, and the residual measured, never assumed.
    """
    n, k = delta.shape
    norm = torch.linalg.matrix_norm(delta)
    if not torch.isfinite(norm):  # NaN/inf weights, or a norm past float32: the dense path carries them as they are
        return None
    if norm == 0:
        return delta.new_zeros(n, 0), delta.new_zeros(0, k)
    cap = rank_cap(n, k)
    g = torch.Generator(device=delta.device).manual_seed(0)
    omega = torch.randn(k, min(cap + 8, min(n, k)), generator=g, device=delta.device, dtype=delta.dtype)
    basis, _ = torch.linalg.qr(delta @ omega)
    u, s, vh = torch.linalg.svd(basis.t() @ delta, full_matrices=False)
    tail = s.double().square().flip(0).cumsum(0).flip(0)  # tail[i]: energy of directions i, i+1, …
    r = int((tail > (LOW_RANK_TOLERANCE / 2) ** 2 * norm.double().square()).sum())
    if r > cap:
        return None
    b, a = basis @ (u[:, :r] * s[:r]), vh[:r]
    rows = 8192  # the residual in row blocks: no full-size temporaries for a large vocabulary's head
    residual = sum(float((delta[i : i + rows] - b[i : i + rows] @ a).square().sum()) for i in range(0, n, rows))
    if not residual**0.5 <= LOW_RANK_TOLERANCE * float(norm):  # written so that NaN refuses
        return None
    return b, a


def _effective(base: torch.nn.Linear, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The float32 weight a (possibly LoRA-adapted) linear map computes with: ``W + B·A``."""
    weight = base.weight.detach().float()
    return weight + b.detach().float() @ a.detach().float() if b.shape[1] else weight


def _balanced(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product B·A as an SVD factors it (orthogonal columns of B, orthonormal rows of A).

    An adapter's raw factors can cancel between their rank-1 terms, which amplifies the bf16
    rounding of ``x_π·Aᵀ`` and B (measured on a toy adapter: mean reward error 0.009 raw, 0.005 balanced).
    """
    if b.shape[1] == 0:
        return b, a
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    return qb @ (u * s), vh @ qa.t()


class _Linear:
    """One paired linear map: ``y_ref`` and ``y_π − y_ref`` from the GEMM inputs of :func:`paired_ops.gemm_inputs`.

    With a low-rank delta ΔW = B·A (:func:`low_rank_delta`) the difference GEMM is
    ``[x_π − x_ref, x_π·Aᵀ] [W_ref, B]ᵀ``, K + r wide instead of 2K. When ``pols`` are ``refs``
    themselves, the policy is a PEFT adapter over the reference: W_ref is the base weight and B, A
    are the adapter's own factors (rank 0 for a map it leaves alone); no merged copy exists.
    """

    def __init__(self, refs: Sequence, pols: Sequence, dtype: torch.dtype):
        # Several maps of the same input (q, k, v; gate, up) are one GEMM: weights concatenated along N.
        parts = [_lora_factors(m) for m in refs]
        bases = [base for base, _, _ in parts]
        if all(p is r for p, r in zip(pols, refs, strict=True)):  # adapter: stack each map's factors along r
            w_ref = torch.cat([m.weight.detach() for m in bases]).float()
            self.k = w_ref.shape[1]
            b, a = _balanced(torch.block_diag(*[b.detach().float() for _, b, _ in parts]),
                             torch.cat([a.detach().float() for _, _, a in parts]))  # fmt: skip
            n, r = b.shape
            factors = (b, a) if r <= rank_cap(n, self.k) else None
            delta = b @ a if factors is None else None
            pol_bases = bases
        else:  # two models: each map's own weight (an adapted one's base + B·A), then their difference
            pol_parts = [_lora_factors(m) for m in pols]
            pol_bases = [base for base, _, _ in pol_parts]
            w_ref, w_pol = (torch.cat([_effective(*part) for part in ps]) for ps in (parts, pol_parts))
            self.k = w_ref.shape[1]
            delta = w_pol - w_ref
            factors = low_rank_delta(delta)
        # A [r, K], stored as a contiguous Aᵀ: x_π·Aᵀ is then a plain row-major GEMM, whichever way A was found
        self.down = None if factors is None else factors[1].t().to(dtype).contiguous().t()
        right = delta if factors is None else factors[0]
        self.weight = torch.cat([w_ref, right], dim=1).to(dtype)  # [N, 2K]: [W_ref, ΔW], or [N, K + r]: [W_ref, B]
        if bases[0].bias is not None:
            b_ref = torch.cat([m.bias.detach() for m in bases]).float()
            self.bias, self.bias_delta = b_ref, torch.cat([m.bias.detach() for m in pol_bases]).float() - b_ref
        else:
            self.bias = self.bias_delta = None

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[0]

    def delta_input(self, x_diff_pol: torch.Tensor) -> torch.Tensor:
        """The difference GEMM's input from ``[x_π − x_ref, x_π]``: itself, or ``[x_π − x_ref, x_π·Aᵀ]``."""
        if self.down is None:
            return x_diff_pol
        diff, pol = x_diff_pol[:, : self.k], x_diff_pol[:, self.k :]
        return diff if self.down.shape[0] == 0 else torch.cat([diff, pol @ self.down.t()], dim=1)

    def __call__(self, x_ref: torch.Tensor, x_diff_pol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_ref`` [M, K], ``[x_π − x_ref, x_π]`` [M, 2K], in the GEMM dtype; outputs in it (float32 with a bias)."""
        y_ref = x_ref @ self.weight[:, : self.k].t()
        delta = self.delta_input(x_diff_pol) @ self.weight.t()
        if self.bias is not None:
            return _WITH_BIAS(y_ref, delta, self.bias, self.bias_delta)
        return y_ref, delta


def _as_seen(norm, reference: bool):
    """A norm as the reference or the policy sees it. PEFT keeps a norm an adapter changes (``dporm extract
    --delta-rank`` stores norms so) as ``modules_to_save``: the base's own copy is the reference's."""
    if not hasattr(norm, "modules_to_save"):
        return norm
    if reference or norm.disable_adapters or not norm.active_adapters:
        return norm.original_module
    return norm.modules_to_save[norm.active_adapters[0]]


@dataclass
class _Norms:
    """One RMSNorm of each model: float32 weights and the epsilon."""

    ref: torch.Tensor
    pol: torch.Tensor
    eps: float

    @classmethod
    def of(cls, ref, pol) -> _Norms:
        ref, pol = _as_seen(ref, reference=True), _as_seen(pol, reference=False)
        if ref.variance_epsilon != pol.variance_epsilon:
            raise DpormError(f"{PAIRED}: policy and reference norms have different epsilons")
        return cls(ref.weight.detach().float(), pol.weight.detach().float(), ref.variance_epsilon)


@dataclass
class _Layer:
    norm_in: _Norms
    norm_post: _Norms
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    sizes: tuple[int, int, int]  # query width, key/value width, head dim
    scaling: float


_NORM = fused(paired_ops.norm_inputs)
_RESIDUAL_NORM = fused(paired_ops.residual_norm_inputs)
_RESIDUAL = fused(paired_ops.residual)
_FINAL = fused(paired_ops.final_states)
_WITH_BIAS = fused(paired_ops.with_bias)
_SWIGLU = fused(paired_ops.swiglu_inputs)
_ROTARY = fused(paired_ops.rotary)
_ATTENTION_INPUTS = fused(paired_ops.attention_inputs)
_GEMM_INPUTS = fused(paired_ops.gemm_inputs)
_LOGSUMEXP_STEP = fused(paired_ops.logsumexp_step)


class _PairedHead:
    """Both LM heads over the vocabulary in tiles: bf16 logits, the policy's as the reference's plus a difference.

    The two logsumexps run over the same rounded reference logits (:func:`paired_ops.logsumexp_step`), so
    their rounding cancels in ``lse_π − lse_ref`` to first order. The reference GEMM writes each row's
    logits minus that row's target logit ``c`` (an extra input column ``c`` against a weight column of
    −1, padded to a multiple of 16): the logits that carry the probability mass lie near ``c``, where
    bf16 is 8–16x finer than at the logits' own magnitude (10–30). Target logits are exact float32
    dot products.
    """

    VOCAB_BLOCK, ROWS = 2048, 512  # a tile is 4 MiB in float32, as kernels.linear_logprobs
    PAD = 16

    def __init__(self, policy, reference, dtype: torch.dtype):
        self.w_pol = policy.get_output_embeddings().weight.detach().float()
        self.w_ref = reference.get_output_embeddings().weight.detach().float()
        self.paired = _Linear([reference.get_output_embeddings()], [policy.get_output_embeddings()], dtype)
        shift = torch.zeros(self.w_ref.shape[0], self.PAD, dtype=dtype, device=self.w_ref.device)
        shift[:, 0] = -1
        self.w_shifted = torch.cat([self.w_ref.to(dtype), shift], dim=1)  # [V, K + PAD]: [W_ref, −1, 0, …]

    def __call__(self, h_pol: torch.Tensor, h_ref: torch.Tensor, targets: torch.Tensor):
        """``(log π, log π_ref)`` of ``targets`` [N] from final hidden states ``[N, H]`` float32."""
        z_pol = (h_pol * self.w_pol[targets]).sum(-1)
        z_ref = (h_ref * self.w_ref[targets]).sum(-1)
        dtype, weight, vocab = self.w_shifted.dtype, self.paired.weight, self.w_ref.shape[0]
        shift = z_ref.to(dtype)
        lse_ref, lse_pol = torch.empty_like(z_ref), torch.empty_like(z_ref)
        for s in range(0, h_ref.shape[0], self.ROWS):
            rows = slice(s, s + self.ROWS)
            x_ref, x_in = _GEMM_INPUTS(h_ref[rows], h_pol[rows], dtype)
            x_in = self.paired.delta_input(x_in)
            c = shift[rows]
            x_ref = torch.cat([x_ref, c[:, None], x_ref.new_zeros(len(c), self.PAD - 1)], dim=1)
            lows = [torch.full_like(z_ref[rows], float("-inf")) for _ in range(2)]
            run = [lows[0], torch.zeros_like(lows[0]), lows[1], torch.zeros_like(lows[1])]  # max, sum: ref, policy
            for j in range(0, vocab, self.VOCAB_BLOCK):
                tile = slice(j, j + self.VOCAB_BLOCK)
                run = _LOGSUMEXP_STEP(x_ref @ self.w_shifted[tile].t(), x_in @ weight[tile].t(), c, *run)
            lse_ref[rows] = run[0] + run[1].log()
            lse_pol[rows] = run[2] + run[3].log()
        return z_pol - lse_pol, z_ref - lse_ref


class PairedModel:
    """A policy and its reference scored together: :func:`logprobs` gives both models' log-probs.

    Holds bf16 copies of the linear weights ([W_ref, W_π − W_ref] per map, the LM head's too);
    embeddings and norms are the fp32 models' own tensors.
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
        self.dtype = dtype
        self.layers = [self._layer(lr, lp, dtype) for lr, lp in zip(_layers(reference), _layers(policy), strict=True)]
        self.head = _PairedHead(policy, reference, dtype)
        self.final_norm = _Norms.of(reference.get_decoder().norm, policy.get_decoder().norm)

    @staticmethod
    def _layer(ref, pol, dtype) -> _Layer:
        ar, ap, mr, mp = ref.self_attn, pol.self_attn, ref.mlp, pol.mlp
        proj = ("q_proj", "k_proj", "v_proj")
        return _Layer(
            norm_in=_Norms.of(ref.input_layernorm, pol.input_layernorm),
            norm_post=_Norms.of(ref.post_attention_layernorm, pol.post_attention_layernorm),
            qkv=_Linear([getattr(ar, n) for n in proj], [getattr(ap, n) for n in proj], dtype),
            o=_Linear([ar.o_proj], [ap.o_proj], dtype),
            gate_up=_Linear([mr.gate_proj, mr.up_proj], [mp.gate_proj, mp.up_proj], dtype),
            down=_Linear([mr.down_proj], [mp.down_proj], dtype),
            sizes=(ar.q_proj.out_features, ar.k_proj.out_features, ar.head_dim),
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
        parts: tuple[list, list] = ([], [])
        for pack in pack_groups(work, PACK_TOKENS):
            h_pol, h_ref = self._forward(pack)
            rows, targets, sizes = pack_targets(pack, responses[len(parts[0]) : len(parts[0]) + len(pack.rows)],
                                                self.device)  # fmt: skip
            for out, logps in zip(parts, self.head(h_pol[rows], h_ref[rows], targets), strict=True):
                out += logps.split(sizes)
        return tuple(collect(in_input_order(p, groups), seqs, self.device) for p in parts)

    def _forward(self, pack) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-norm hidden states ``(policy, reference)``, ``[M, H]`` fp32, of one packed forward."""
        device, dtype = self.device, self.dtype
        ids = torch.tensor(pack.input_ids, dtype=torch.long, device=device)
        positions = torch.tensor([pack.position_ids], dtype=torch.long, device=device)
        dec_ref, dec_pol = self.reference.get_decoder(), self.policy.get_decoder()
        h = dec_ref.embed_tokens(ids).float()
        d = dec_pol.embed_tokens(ids).float() - h
        cos, sin = (t[0].float() for t in dec_ref.rotary_emb(h[None], positions))  # [M, head_dim]
        first = self.layers[0].norm_in
        x_ref, x_in = _NORM(h, d, first.ref, first.pol, first.eps, dtype)
        for i, layer in enumerate(self.layers):
            q, k, v = _ROTARY(*layer.qkv(x_ref, x_in), cos, sin, *layer.sizes)
            out, _ = packed_attention(None, q, k, v, None, scaling=layer.scaling, **{PLAN_KEYWORD: pack})
            y, dy = layer.o(*_ATTENTION_INPUTS(out.flatten(2), dtype))
            post = layer.norm_post
            h, d, x_ref, x_in = _RESIDUAL_NORM(h, d, y, dy, post.ref, post.pol, post.eps, dtype)
            y, dy = layer.down(*_SWIGLU(*layer.gate_up(x_ref, x_in), dtype))
            if i + 1 < len(self.layers):
                nxt = self.layers[i + 1].norm_in
                h, d, x_ref, x_in = _RESIDUAL_NORM(h, d, y, dy, nxt.ref, nxt.pol, nxt.eps, dtype)
            else:
                h, d = _RESIDUAL(h, d, y, dy)
        return _FINAL(h, d, *dataclasses.astuple(self.final_norm))


def _layers(model):
    return model.get_decoder().layers

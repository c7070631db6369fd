"""Sequence log-probs over response tokens: the one log-prob path of trainer, scorer and server.

For a sequence ``prompt_ids + response_ids`` the result is, per sequence,

    logp = Σ_{t in response} log π(x_t | x_<t)      (float32, whatever the model dtype)

with the token count and the per-token values. Responses that share a prompt (chosen/rejected,
N samples to rerank) compute the prompt once. On an accelerator, sequences run as right-padded
batches and a shared prompt's KV cache serves all its responses at once. On a CPU, where padding
costs real FLOPs and a matmul needs many rows to reach its peak, sequences are packed
(:mod:`dpo.packing`): the rows of many sequences go through one forward, attention kept per
sequence, each further response attending to its prompt's keys as it would over a KV cache.
Models whose attention cannot be packed (sliding windows) run each sequence alone over a
cropped prompt cache instead. The LM head is applied only at positions that predict a response
token, through :func:`kernels.linear_token_logprobs`, so no [B, T, V] logits ever exist; a
LoRA-wrapped head is folded into one augmented linear map, ``[h, h Aᵀ] [W, s B]ᵀ``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dpo.encoding import Encoded
from dpo.models import AUTOCAST_ATTRIBUTE
from dpo.packing import PLAN_KEYWORD, pack_groups, packable, use_packed_attention
from kernels import linear_token_logprobs, token_logprobs

IGNORE_INDEX = -100
PACK_TOKENS = 1024  # rows per packed CPU forward: CPU matmuls plateau near 1000 rows, elementwise ops leave cache


@dataclass
class SequenceLogprobs:
    """Per-sequence log-probs. ``token_logps[i, :tokens[i]]`` are sequence i's response tokens."""

    logp: torch.Tensor  # [B] float32, sum over response tokens
    tokens: torch.Tensor  # [B] int64, response token count
    token_logps: torch.Tensor  # [B, R] float32, aligned at the response start, 0-padded

    def per_token(self, i: int) -> torch.Tensor:
        return self.token_logps[i, : int(self.tokens[i])]

    @property
    def mean(self) -> torch.Tensor:
        """Mean log-prob per response token (0 for an empty response)."""
        return self.logp / self.tokens.clamp(min=1)


@dataclass
class _Head:
    """The LM head as one linear map of (possibly augmented) states: ``logits = prepare(h) @ weight.T + bias``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora: list = field(default_factory=list)  # (A weight, scaling) per active LoRA adapter

    def prepare(self, states: torch.Tensor) -> torch.Tensor:
        """``[h, h A_1ᵀ, …]``: with the weight ``[W, s_1 B_1, …]`` this is ``h Wᵀ + Σ s_i B_i A_i h``."""
        if not self.lora:
            return states
        return torch.cat([states] + [states @ a.t().to(states.dtype) for a, _ in self.lora], dim=-1)


def _lora_head(module) -> _Head | None:
    """A PEFT LoRA-wrapped linear head as a :class:`_Head`, or None when it is not plain LoRA."""
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear:
        return None
    if module.disable_adapters or module.merged:
        return _Head(base.weight, base.bias)
    active = [name for name in module.active_adapters if name in module.lora_A]
    if any(name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None for name in active):
        return None  # DoRA and other variants, LoRA biases: not one linear map
    if module.training and any(not isinstance(module.lora_dropout[name], torch.nn.Identity) for name in active):
        return None  # dropout between A and B
    lora = [(module.lora_A[name].weight, module.scaling[name]) for name in active]
    if not lora:
        return _Head(base.weight, base.bias)
    weight = torch.cat([base.weight] + [s * module.lora_B[name].weight.to(base.weight.dtype)
                                        for name, (_, s) in zip(active, lora, strict=True)], dim=1)  # fmt: skip
    return _Head(weight, base.bias, lora)


def _separable_head(model) -> _Head | None:
    """The LM head when logits are exactly ``head(decoder(x))``, else None (softcapping, logit scales)."""
    config = getattr(model, "config", None)
    # Gemma-2 soft-caps logits, Cohere multiplies them, Granite divides them: not a plain head.
    if any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or decoder is None or decoder is model:
        return None
    if type(head) is torch.nn.Linear:
        return _Head(head.weight, head.bias)
    return _lora_head(head) if hasattr(head, "lora_A") else None


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    """The KV-cache keyword of a model class: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(forward_owner.forward).parameters else "past_key_values"


def _forward(model, head, cache=None, **kwargs) -> tuple[torch.Tensor, object]:
    """``(states, kv_cache)``: final hidden states when ``head`` is set, else logits.

    A model loaded as ``bf16-mixed`` (:func:`dpo.models.mix_precision`) runs under autocast.
    """
    decoder = _decoder(model)
    name = _cache_argument(type(decoder))
    if cache is not None:
        kwargs[name] = cache
    autocast_dtype = getattr(model, AUTOCAST_ATTRIBUTE, None)
    # No autocast of our own otherwise: an enclosing one (the trainer's --mixed-precision) must stay in force.
    mixed = torch.autocast(_device(model).type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with mixed:
        out = decoder(**kwargs) if head is not None else model(**kwargs)
    kv = out.get(name)
    return (out.last_hidden_state if head is not None else out.logits), kv


def _token_logps(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32 log-probs of ``targets [N]`` from the ``[N, H]`` states (or logits) that predict them."""
    if head is not None:  # chunked: the [N, V] logits never exist at once
        return linear_token_logprobs(head.prepare(states), head.weight, targets, IGNORE_INDEX, head.bias)
    return token_logprobs(states, targets)


def _score_states(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` float32 log-probs of ``targets`` from the states that predict them."""
    keep = targets != IGNORE_INDEX
    out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    if keep.any():
        out = out.masked_scatter(keep, _token_logps(head, states[keep], targets[keep]))
    return out


def _pad(rows: Sequence[Sequence[int]], width: int, value: int, device) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _response_targets(seqs: Sequence[Encoded], width: int, device) -> torch.Tensor:
    return _pad([s.response_ids for s in seqs], width, IGNORE_INDEX, device)


def batch_logprobs(model, seqs: Sequence[Encoded]) -> torch.Tensor:
    """``[B, R]`` response-token log-probs of independent sequences, one right-padded forward."""
    device, head = _device(model), _separable_head(model)
    width = max(len(s) for s in seqs) - 1  # the last token is only ever a target
    inputs = [s.input_ids[:-1] for s in seqs]
    input_ids = _pad(inputs, width, 0, device)
    attention_mask = _pad([[1] * len(x) for x in inputs], width, 0, device)
    states, _ = _forward(model, head, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    # State at position p predicts token p + 1; response token j sits at len(prompt) + j.
    targets = _pad(
        [[IGNORE_INDEX] * (len(s.prompt_ids) - 1) + list(s.response_ids) for s in seqs], width, IGNORE_INDEX, device
    )
    full = _score_states(head, states, targets)
    r_width = max(len(s.response_ids) for s in seqs)
    out = torch.zeros(len(seqs), r_width, dtype=torch.float32, device=device)
    for i, s in enumerate(seqs):
        start = len(s.prompt_ids) - 1
        out[i, : len(s.response_ids)] = full[i, start : start + len(s.response_ids)]
    return out


def shared_prompt_logprobs(model, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[K, R]`` response-token log-probs of K responses to one prompt, the prompt computed once."""
    device, head = _device(model), _separable_head(model)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    states, cache = _forward(model, head, input_ids=prompt, use_cache=True)
    k, r_width = len(responses), max(len(r) for r in responses)
    first = states[:, -1:].expand(k, 1, states.shape[-1])  # predicts every response's first token
    seqs = [Encoded(tuple(prompt_ids), tuple(r)) for r in responses]
    targets = _response_targets(seqs, r_width, device)
    if r_width > 1:
        cache.batch_repeat_interleave(k)
        inputs = [list(r[:-1]) for r in responses]
        n_prompt = len(prompt_ids)
        input_ids = _pad(inputs, r_width - 1, 0, device)
        response_mask = _pad([[1] * len(x) for x in inputs], r_width - 1, 0, device)
        attention_mask = torch.cat([torch.ones(k, n_prompt, dtype=torch.long, device=device), response_mask], 1)
        position_ids = torch.arange(n_prompt, n_prompt + r_width - 1, device=device).expand(k, -1)
        rest, _ = _forward(
            model,
            head,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        states = torch.cat([first, rest], dim=1)
    else:
        states = first
    return _score_states(head, states, targets)


def unpadded_logprobs(model, prompt_ids: Sequence[int], responses: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per-response ``[R_k]`` log-probs, every forward a batch of one: the CPU path of unpackable models.

    The first forward runs the prompt and the first response together; each further response
    runs over the prompt's KV cache, which is then cropped back to the prompt. One LM-head call
    scores all response tokens.
    """
    device, head, n = _device(model), _separable_head(model), len(prompt_ids)
    first = torch.tensor([list(prompt_ids) + list(responses[0][:-1])], dtype=torch.long, device=device)
    states, cache = _forward(model, head, input_ids=first, use_cache=len(responses) > 1)
    decoder = _decoder(model)
    # Sliding-window layers keep no past beyond their window: such a cache cannot be cropped back.
    croppable = packable(decoder.config) and getattr(cache, "is_croppable", True)
    prompt_last = states[0, n - 1 : n]  # predicts every response's first token
    picked = [states[0, n - 1 : n - 1 + len(responses[0])]]
    for response in responses[1:]:
        if len(response) > 1 and not croppable:  # recompute the prompt
            ids = torch.tensor([list(prompt_ids) + list(response[:-1])], dtype=torch.long, device=device)
            again, _ = _forward(model, head, input_ids=ids, use_cache=False)
            picked.append(again[0, n - 1 :])
        elif len(response) > 1:
            if cache.get_seq_length() > n:  # crop(-k) drops k tokens; crop(0) would empty older caches
                cache.crop(n - cache.get_seq_length())
            ids = torch.tensor([list(response[:-1])], dtype=torch.long, device=device)
            positions = torch.arange(n, n + len(response) - 1, device=device).unsqueeze(0)
            rest, cache = _forward(model, head, input_ids=ids, position_ids=positions, cache=cache, use_cache=True)
            picked.append(torch.cat([prompt_last, rest[0]]))
        else:
            picked.append(prompt_last[: len(response)])
    targets = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)
    return list(_token_logps(head, torch.cat(picked), targets).split([len(r) for r in responses]))


def packed_logprobs(model, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]) -> list | None:
    """Per-response ``[R_k]`` log-probs of ``(prompt, responses)`` groups, packed into few forwards.

    See :mod:`dpo.packing`: all sequences' rows share the matmuls, attention stays per sequence,
    each prompt is computed once. None when the model's attention cannot be packed.
    """
    if not use_packed_attention(_decoder(model).config):
        return None
    device, head, out = _device(model), _separable_head(model), []
    responses = [r for _, rs in groups for r in rs]
    for pack in pack_groups(groups, PACK_TOKENS):
        ids = torch.tensor([pack.input_ids], dtype=torch.long, device=device)
        positions = torch.tensor([pack.position_ids], dtype=torch.long, device=device)
        states, _ = _forward(model, head, input_ids=ids, position_ids=positions, use_cache=False,
                             **{PLAN_KEYWORD: pack})  # fmt: skip
        if pack.calls == 0:  # the model's layers bypass transformers' attention interface
            return None
        rows, targets, sizes = pack_targets(pack, responses[len(out) : len(out) + len(pack.rows)], device)
        out += list(_token_logps(head, states[0, rows], targets).split(sizes))
    return out


def pack_targets(pack, responses: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(rows, targets, sizes)`` of a pack's ``responses``: the state rows that predict each target token."""
    rows = torch.tensor([r for rows in pack.rows for r in rows], dtype=torch.long, device=device)
    targets = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)
    return rows, targets, [len(r) for r in responses]


def pads_batches(model) -> bool:
    """Right-padded batches on accelerators, where width is nearly free; batches of one on CPUs."""
    return _device(model).type != "cpu"


def sequence_logprobs(
    model, seqs: Sequence[Encoded], share_prompts: bool = True, padded: bool | None = None
) -> SequenceLogprobs:
    """Response log-probs of each sequence, in input order.

    Sequences with identical ``prompt_ids`` are computed with the prompt once
    (:func:`shared_prompt_logprobs`) when ``share_prompts``; the rest go through one
    right-padded forward (:func:`batch_logprobs`). With ``padded=False`` (the default on a
    CPU) nothing is padded: sequences are packed (:func:`packed_logprobs`), or run one by one
    (:func:`unpadded_logprobs`) when the model cannot be packed; all ways give the same values
    up to float rounding. Callers choose the batch; gradients flow when the model
    requires them (training).
    """
    if not seqs:
        raise ValueError("sequence_logprobs needs at least one sequence")
    device = _device(model)
    groups = prompt_groups(seqs, share_prompts)
    rows: list[torch.Tensor | None] = [None] * len(seqs)
    if not (pads_batches(model) if padded is None else padded):
        work = group_work(seqs, groups)
        parts = packed_logprobs(model, work)
        if parts is None:
            parts = [row for prompt, responses in work for row in unpadded_logprobs(model, prompt, responses)]
        return collect(in_input_order(parts, groups), seqs, device)
    singles = [ix[0] for ix in groups if len(ix) == 1]
    if singles:
        part = batch_logprobs(model, [seqs[i] for i in singles])
        for row, i in zip(part, singles, strict=True):
            rows[i] = row
    for ix in groups:
        if len(ix) > 1:
            part = shared_prompt_logprobs(model, seqs[ix[0]].prompt_ids, [seqs[i].response_ids for i in ix])
            for row, i in zip(part, ix, strict=True):
                rows[i] = row
    return collect(rows, seqs, device)


def prompt_groups(seqs: Sequence[Encoded], share_prompts: bool = True) -> list[list[int]]:
    """Indices of ``seqs`` grouped by identical prompt (each alone unless ``share_prompts``), first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(s.prompt_ids if share_prompts else (i,), []).append(i)
    return list(groups.values())


def group_work(seqs: Sequence[Encoded], groups: list[list[int]]) -> list[tuple[tuple[int, ...], list]]:
    """``(prompt_ids, [response_ids, …])`` per group, the input of :func:`dpo.packing.pack_groups`."""
    return [(seqs[ix[0]].prompt_ids, [seqs[i].response_ids for i in ix]) for ix in groups]


def in_input_order(parts: Sequence[torch.Tensor], groups: list[list[int]]) -> list[torch.Tensor]:
    """Per-sequence rows, from group order (``parts``) back to input order."""
    rows: list = [None] * len(parts)
    for row, i in zip(parts, [i for ix in groups for i in ix], strict=True):
        rows[i] = row
    return rows


def collect(rows: list, seqs: Sequence[Encoded], device) -> SequenceLogprobs:
    """Per-sequence ``[R_i]`` rows, in input order, as :class:`SequenceLogprobs`."""
    r_width = max(len(s.response_ids) for s in seqs)
    token_logps = torch.stack([torch.nn.functional.pad(r, (0, r_width - r.shape[0])) for r in rows])
    tokens = torch.tensor([len(s.response_ids) for s in seqs], dtype=torch.long, device=device)
    # Each sum over exactly the row's own tokens: the scorer's per_token(i).sum() then gives the same float.
    logp = torch.stack([r[: len(s.response_ids)].sum() for r, s in zip(rows, seqs, strict=True)])
    return SequenceLogprobs(logp, tokens, token_logps)

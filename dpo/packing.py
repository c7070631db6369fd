"""Many sequences in one forward, each attending only to its own tokens.

A CPU runs the decoder's ``[M, K] x [K, N]`` matmuls at about 55% of its peak for M = 32 rows
and about 100% for M = 1000 (``bench/gemm_rows.py``). A batch of one sequence gives
every matmul only that sequence's tokens; a padded batch wastes FLOPs on padding. Packing
concatenates the token rows of many sequences into one ``[1, M]`` forward: every linear layer
sees all M rows, and only attention is split, per block:

- a *head block* (a prompt followed by its first response) is causal on itself;
- a *continuation block* (a further response to the same prompt) attends to the prompt's keys
  and causally to its own, with positions continuing after the prompt (as over a KV cache).

Nothing else in the model mixes rows, so each sequence's result is what it would be alone, up
to float rounding. The attention runs through transformers' attention interface: an SDPA
model gets :data:`ATTENTION` as its implementation (SDPA itself when no plan is passed), and
a packed forward passes its plan as a keyword that reaches every attention layer. A model
whose layers do not call the interface (plan ``calls`` stays 0) is not packable; the caller
falls back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "dporm_packed"
PLAN_KEYWORD = "dporm_pack"


@dataclass
class Block:
    """Query rows ``[start, start + length)``; a continuation also sees ``prompt_length`` rows at ``prompt_start``."""

    start: int
    length: int
    prompt_start: int = 0
    prompt_length: int = 0
    mask: torch.Tensor | None = None  # continuation: [length, prompt_length + length], True = attend


@dataclass
class Packed:
    """One packed forward: its inputs, its attention plan and, per response, the rows that predict its tokens."""

    input_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)  # per response in input order
    calls: int = 0  # attention layers that used the plan

    def add_group(self, prompt: Sequence[int], responses: Sequence[Sequence[int]]) -> None:
        """A prompt and its responses: one head block, then one continuation block per further response."""
        n, s = len(prompt), len(self.input_ids)
        head = list(prompt) + list(responses[0][:-1])
        self._append(head, range(len(head)), Block(s, len(head)))
        last = s + n - 1  # the prompt's last row predicts every response's first token
        self.rows.append(list(range(last, last + len(responses[0]))))
        for response in responses[1:]:
            rest = list(response[:-1])
            start = len(self.input_ids)
            if rest:
                causal = torch.ones(len(rest), len(rest), dtype=torch.bool).tril()
                mask = torch.cat([torch.ones(len(rest), n, dtype=torch.bool), causal], dim=1)
                self._append(rest, range(n, n + len(rest)), Block(start, len(rest), s, n, mask))
            self.rows.append(([last] + list(range(start, start + len(rest))))[: len(response)])

    def _append(self, ids: list[int], positions: range, block: Block) -> None:
        self.input_ids += ids
        self.position_ids += list(positions)
        self.blocks.append(block)


def pack_groups(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], max_tokens: int) -> list[Packed]:
    """Greedy packs of whole groups, each at most ``max_tokens`` rows unless one group alone is longer."""
    packs: list[Packed] = []
    for prompt, responses in groups:
        size = len(prompt) + sum(max(len(r) - 1, 0) for r in responses)
        if not packs or (packs[-1].input_ids and len(packs[-1].input_ids) + size > max_tokens):
            packs.append(Packed())
        packs[-1].add_group(prompt, responses)
    return packs


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention of a :class:`Packed` forward: ``query`` [1, H, M, D], ``key``/``value`` [1, H_kv, M, D].

    Without a plan (any other forward of the model) this is transformers' own SDPA attention.
    """
    plan: Packed | None = kwargs.pop(PLAN_KEYWORD, None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    plan.calls += 1
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for b in plan.blocks:
        rows = slice(b.start, b.start + b.length)
        q, k, v = query[:, :, rows], key[:, :, rows], value[:, :, rows]
        if b.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling,
                                                 enable_gqa=gqa)  # fmt: skip
        else:
            prompt = slice(b.prompt_start, b.prompt_start + b.prompt_length)
            k = torch.cat([key[:, :, prompt], k], dim=2)
            v = torch.cat([value[:, :, prompt], v], dim=2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask.to(q.device), dropout_p=dropout,
                                                 scale=scaling, enable_gqa=gqa)  # fmt: skip
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def packable(config) -> bool:
    """Full causal attention in every layer: no sliding windows, no recurrent or chunked layers."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return getattr(config, "sliding_window", None) is None and getattr(config, "attention_chunk_size", None) is None


def use_packed_attention(config) -> bool:
    """Make :func:`packed_attention` the model's attention, once; False when the model cannot use it.

    Only SDPA models qualify (the default on CPUs): the packed attention is SDPA per block and
    plain SDPA without a plan, so every other forward of the model is unchanged. Set once and
    never restored: a per-forward switch would race with other threads using the same model.
    """
    if config._attn_implementation == ATTENTION:
        return True
    if config._attn_implementation != "sdpa" or not packable(config):
        return False
    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # ignored by a packed forward, needed by others
    config._attn_implementation = ATTENTION
    return True

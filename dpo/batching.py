"""From preference examples to training batches: unique completions plus pair indices.

A batch holds each distinct (prompt, response) sequence once, and the pairs refer to them
by index (``chosen_index``/``rejected_index``, the ``yw_ids``/``yl_ids`` of the DPO paper's
notes). A prompt with N ranked responses therefore costs N sequences, not N(N−1), and
:func:`dpo.logprobs.sequence_logprobs` computes each prompt once for all its responses.
Batches are length-grouped to limit padding.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dpo.encoding import Encoded, encode_responses
from dpo.errors import EncodingError
from dpo.preference_data import PreferenceExample


@dataclass(frozen=True)
class EncodedExample:
    completions: tuple[Encoded, ...]  # best first, one per response
    pairs: tuple[tuple[int, int], ...]  # (winner, loser) indices into completions
    row: int

    @property
    def tokens(self) -> int:
        """Tokens this example costs with prompt sharing: the prompt once, then every response."""
        return len(self.completions[0].prompt_ids) + sum(len(c.response_ids) for c in self.completions)


@dataclass
class PreferenceBatch:
    seqs: list[Encoded]  # unique sequences, each scored once
    chosen_index: torch.Tensor  # [P] index into seqs of each pair's winner
    rejected_index: torch.Tensor  # [P] index into seqs of each pair's loser
    rankings: list[list[int]]  # per example, indices into seqs, best first (listwise losses)
    rows: list[int]

    @property
    def pairs(self) -> int:
        return int(self.chosen_index.numel())


def encode_examples(
    tokenizer,
    examples: Sequence[PreferenceExample],
    max_length: int | None = None,
    allow_response_truncation: bool = False,
    report: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    limit: int | None = None,
) -> list[EncodedExample]:
    """Tokenize every response of every example by the shared rule; rows that cannot be encoded are skipped.

    With ``limit``, encoding stops at the first ``limit`` examples that encode.
    """
    out, failed = [], []
    for ex in examples:
        if limit is not None and len(out) >= limit:
            break
        try:
            seqs = tuple(encode_responses(tokenizer, ex.prompt, ex.responses, max_length, allow_response_truncation))
        except EncodingError as e:
            failed.append(f"{ex.row} ({e})")
            continue
        out.append(EncodedExample(seqs, ex.pairs, ex.row))
    if failed:
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        report(f"skipped {len(failed)} row(s) that cannot be encoded: {'; '.join(failed[:3])}{more}")
    return out


def collate(examples: Sequence[EncodedExample]) -> PreferenceBatch:
    """Unique sequences of the examples and, per pair, the indices of its two sequences."""
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    seqs: list[Encoded] = []
    chosen, rejected, rankings = [], [], []
    for ex in examples:
        ids = []
        for c in ex.completions:
            key = (c.prompt_ids, c.response_ids)
            if key not in index:
                index[key] = len(seqs)
                seqs.append(c)
            ids.append(index[key])
        rankings.append(ids)
        for win, lose in ex.pairs:
            chosen.append(ids[win])
            rejected.append(ids[lose])
    return PreferenceBatch(seqs, torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long),
                           rankings, [ex.row for ex in examples])  # fmt: skip


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0, group: int = 50
) -> list[list[int]]:
    """Batches of example indices: shuffled, then sorted by length within windows of
    ``batch_size * group`` examples, then the batch order shuffled (as in HF's
    LengthGroupedSampler). Deterministic in (seed, epoch); every index appears once."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches

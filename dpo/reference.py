"""Reference log-probs for DPO, four ways: a frozen copy, the LoRA base with the adapter off,
precomputed and cached on disk, or none (reference-free: log π_ref = 0).

Every way returns the same thing for a list of sequences: summed response log-probs ``[U]``
(float32), computed by :func:`dpo.logprobs.sequence_logprobs` like the policy's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from dpo.batching import EncodedExample
from dpo.encoding import Encoded
from dpo.errors import DpormError
from dpo.logprobs import sequence_logprobs

Reference = Callable[[Sequence[Encoded]], torch.Tensor]
CACHE_FORMAT = 2  # 2: computed in eval mode (1 ran a model with dropout in train mode)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for one pass, each module's mode restored after: a reference is a function of its weights,
    the same whether computed during training (the policy in train mode), precomputed, or served."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def model_reference(model) -> Reference:
    """Log-probs under ``model`` without gradients (a frozen copy, another model, or the policy before training),
    in eval mode."""

    def logps(seqs: Sequence[Encoded]) -> torch.Tensor:
        with torch.no_grad(), eval_mode(model):
            return sequence_logprobs(model, seqs).logp

    return logps


def adapter_off_reference(scorer: Callable[..., torch.Tensor]) -> Reference:
    """The LoRA policy with its adapter disabled: the base weights, held once in memory (the scorer's
    ``adapter=False`` pass runs in eval mode)."""

    def logps(seqs: Sequence[Encoded]) -> torch.Tensor:
        with torch.no_grad():
            return scorer(seqs, adapter=False)

    return logps


def no_reference(seqs: Sequence[Encoded]) -> torch.Tensor:
    return torch.zeros(len(seqs), dtype=torch.float32)


def _key(seq: Encoded) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return seq.prompt_ids, seq.response_ids


def unique_sequences(examples: Sequence[EncodedExample]) -> list[Encoded]:
    seen: dict = {}
    for ex in examples:
        for c in ex.completions:
            seen.setdefault(_key(c), c)
    return list(seen.values())


def cache_key(data_fingerprint: str, reference_hash: str, tokenization: dict) -> str:
    """The cache entry name: what the log-probs depend on, and nothing else."""
    blob = json.dumps([CACHE_FORMAT, data_fingerprint, reference_hash, tokenization], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _ids_digest(seqs: Sequence[Encoded]) -> str:
    digest = hashlib.sha256()
    for s in seqs:
        digest.update(json.dumps([s.prompt_ids, s.response_ids]).encode())
    return digest.hexdigest()


def precomputed_reference(
    reference: Reference,
    examples: Sequence[EncodedExample],
    cache_file: Path,
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[Reference, bool]:
    """Reference log-probs of every unique sequence of ``examples``, loaded from ``cache_file`` when it
    holds them (same key, same token ids) or computed once and written there atomically.
    Returns a lookup and whether the cache was hit. A sequence not in the table is an error."""
    from safetensors.torch import load_file, save_file

    seqs = unique_sequences(examples)
    digest = _ids_digest(seqs)
    hit = False
    if cache_file.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_file), "pt") as f:
            hit = (f.metadata() or {}).get("ids_digest") == digest
        if hit:
            values = load_file(str(cache_file))["logp"]
    if not hit:
        order = sorted(range(len(seqs)), key=lambda i: (seqs[i].prompt_ids, -len(seqs[i].response_ids)))
        values = torch.zeros(len(seqs), dtype=torch.float32)
        bar = tqdm(total=len(seqs), desc="reference log-probs", unit="seq", disable=not show_progress)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            values[chunk] = reference([seqs[i] for i in chunk]).float().cpu()
            bar.update(len(chunk))
        bar.close()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp")
        save_file({"logp": values.contiguous()}, str(tmp), metadata={"ids_digest": digest, "sequences": str(len(seqs))})
        tmp.replace(cache_file)
    table = {_key(s): float(v) for s, v in zip(seqs, values.tolist(), strict=True)}

    def logps(batch: Sequence[Encoded]) -> torch.Tensor:
        try:
            return torch.tensor([table[_key(s)] for s in batch], dtype=torch.float32)
        except KeyError:
            raise DpormError("a sequence is missing from the precomputed reference table") from None

    return logps, hit

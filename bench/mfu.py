"""Model-FLOP utilisation for the benchmarks: FLOP counts of scoring, and a GEMM peak to judge them by.

Counts are the matmul FLOPs a task needs (see :func:`task_flops`); a side that does more work is
not credited for it. This VM's GEMM rate drifts 1.5-3x within minutes, so :class:`TimedSide` samples
the peak between a side's timed batches and judges each batch by the sample nearest its minutes.
"""

from __future__ import annotations

import time

import torch

PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_peak(dtype: torch.dtype, device: str = "cpu", seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of back-to-back n×n×n matmuls (n = 2048 on a CPU, 8192 on a GPU), median over ``seconds``.

    A median, not a best-of-few: a shared VM's short bursts run well above what it sustains.
    """
    n = 8192 if device != "cpu" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up
    times: list[float] = []
    while sum(times) < seconds or len(times) < 5:
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


class TimedSide:
    """One side's timed batches, with the GEMM peak sampled between them (untimed) every ``every`` seconds.

    This VM's GEMM rate drifts by 1.5x within minutes (fp32 189-303, bf16 600-1900 GFLOP/s seen in one
    run), so a peak read once before a 4-minute side misjudges its MFU either way. Each sample
    stands for the batches timed since the previous one: MFU = FLOPs / Σ seconds_i · peak_i.
    """

    def __init__(self, peak: str, device: str, every: float = 5.0):
        self.peak, self.device, self.every = peak, device, every
        self.seconds, self.pending, self.peak_seconds, self.samples = 0.0, 0.0, 0.0, []

    def run(self, fn, *args):
        _sync(self.device)
        start = time.perf_counter()
        out = fn(*args)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self.pending += elapsed
        if self.pending >= self.every:
            self._sample()
        return out

    def _sample(self) -> None:
        rate = gemm_peak(PEAK_DTYPES[self.peak], self.device, seconds=0.3)
        self.samples.append(rate)
        self.peak_seconds += self.pending * rate
        self.pending = 0.0

    def finish(self) -> dict:
        if self.pending:
            self._sample()
        return {"seconds": self.seconds, "peak_gflop_s": self.peak_seconds / self.seconds,
                "peak_samples": [round(x, 1) for x in self.samples]}  # fmt: skip


def set_mfu(entry: dict) -> None:
    peak = entry["peak_gflop_s"]
    entry["mfu"] = entry["gflop"] / entry["seconds"] / peak
    entry["mfu_with_attention"] = (entry["gflop"] + entry["attention_gflop"]) / entry["seconds"] / peak


def matmul_flops(model, body_tokens: int, head_tokens: int) -> float:
    """One model: its linear layers (not the LM head, not LoRA factors) over ``body_tokens``, the head over
    ``head_tokens``."""
    head = model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    body = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name and name.split(".")[-1] != "lm_head"
    )
    return 2 * body * body_tokens + 2 * vocab * hidden * head_tokens


def attention_flops(model, lengths_and_prefixes) -> float:
    """Score and value matmul FLOPs: for each (sequence length L, cached prefix C), the queries C..L-1."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    pairs = sum((n * (n + 1) - p * (p + 1)) // 2 for n, p in lengths_and_prefixes)
    return 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * pairs


def task_flops(model, pairs) -> tuple[float, float]:
    """(matmul, attention) FLOPs of both models that scoring ``pairs`` needs: a pair's prompt fed once, each
    response but its last token (only a target), the LM head at the positions that predict response tokens."""
    body = head = 0
    spans = []
    for a, b in pairs:
        shared = a.prompt_ids == b.prompt_ids
        body += len(a.input_ids) - 1 + (len(b.response_ids) - 1 if shared else len(b.input_ids) - 1)
        head += len(a.response_ids) + len(b.response_ids)
        spans += [(len(a.input_ids) - 1, 0), (len(b.input_ids) - 1, len(b.prompt_ids) if shared else 0)]
    return 2 * matmul_flops(model, body, head), 2 * attention_flops(model, spans)


def rewardbench_executed_flops(model, features, batch_size: int) -> float:
    """The matmul FLOPs DPOInference runs: every sequence of a batch padded to its longest, chosen and rejected
    alike, the prompt in both, and full-vocabulary logits at every position."""
    total = 0.0
    for i in range(0, len(features), batch_size):
        batch = features[i : i + batch_size]
        width = max(len(f[f"{side}_input_ids"]) for f in batch for side in ("chosen", "rejected"))
        total += 2 * len(batch) * matmul_flops(model, width, width)
    return 2 * total

"""Benchmark of the shared log-prob core on the default model (SmolLM2-135M-Instruct).

Scores chosen/rejected pairs of a preference file three ways and reports time,
tokens/s and achieved matmul FLOP/s against a GEMM peak measured in the same run:

    naive     one padded forward, full [B, T, V] logits, log_softmax + gather (TRL/RewardBench style)
    unshared  dporm core, LM head only where a response token is predicted
    shared    dporm core, each pair's prompt computed once (KV cache expanded)

    .venv/bin/python bench/logprobs_core.py --pairs 32 --batch-pairs 4 [--dtype bf16] [--device cuda]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from mfu import gemm_peak, matmul_flops  # bench/ is on sys.path

from dpo.allocator import keep_freed_memory
from dpo.data import read_records
from dpo.default_model import pull_default_model
from dpo.encoding import encode
from dpo.logprobs import sequence_logprobs
from dpo.models import load_model, load_tokenizer, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]


def naive_logprobs(model, seqs) -> torch.Tensor:
    """The usual recipe: right-padded full forward, full-vocab log_softmax, gather, mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s.input_ids)
        mask[i, : len(s)] = 1
        labels[i, len(s.prompt_ids) : len(s)] = torch.tensor(s.response_ids)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    labels = labels[:, 1:].to(device)
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (labels != -100)).sum(-1)


def needed_flops(model, seqs, shared: bool, lm_head_everywhere: bool) -> float:
    """Matmul FLOPs of one model over ``seqs``: each prompt once when ``shared``, the head where it is applied."""
    prompts = {s.prompt_ids for s in seqs} if shared else [s.prompt_ids for s in seqs]
    body_tokens = sum(len(p) for p in prompts) + sum(len(s.response_ids) for s in seqs)
    head_tokens = body_tokens if lm_head_everywhere else sum(len(s.response_ids) for s in seqs)
    return matmul_flops(model, body_tokens, head_tokens)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype)
    path = str(pull_default_model())
    tokenizer, model = load_tokenizer(path), load_model(path, args.dtype, args.device)
    rows = list(itertools.islice(read_records(args.data), args.pairs))
    batches = []
    for start in range(0, len(rows), args.batch_pairs):
        batch = rows[start : start + args.batch_pairs]
        batches.append(
            [encode(tokenizer, r["prompt"], r[k], args.max_length) for r in batch for k in ("chosen", "rejected")]
        )
    peak = gemm_peak(dtype, args.device)
    methods = {
        "naive": (lambda b: naive_logprobs(model, b), False, True),
        "unshared": (lambda b: sequence_logprobs(model, b, share_prompts=False).logp, False, False),
        "shared": (lambda b: sequence_logprobs(model, b, share_prompts=True).logp, True, False),
    }
    results, reference = {}, None
    for name, (fn, shared, head_everywhere) in methods.items():
        times, outs = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                outs = [fn(b) for b in batches]
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        logp = torch.cat(outs).float().cpu()
        reference = logp if reference is None else reference
        seconds = statistics.median(times)
        flops = sum(needed_flops(model, b, shared, head_everywhere) for b in batches)
        tokens = sum(len(s) for b in batches for s in b)
        results[name] = {
            "seconds": seconds,
            "pairs_per_s": len(rows) / seconds,
            "tokens_per_s": tokens / seconds,
            "gflops": flops / 1e9,
            "achieved_gflop_s": flops / seconds / 1e9,
            "mfu": flops / seconds / 1e9 / peak,
            "max_abs_diff_vs_naive": float((logp - reference).abs().max()),
        }
    return {
        "device": str(device),
        "dtype": args.dtype,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "pairs": len(rows),
        "batch_pairs": args.batch_pairs,
        "gemm_peak_gflop_s": peak,
        "results": results,
    }


def main() -> None:
    keep_freed_memory()  # as the dporm command does (dpo.allocator); every side of the comparison gets it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/rewardbench/filtered-sample.jsonl"))
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-pairs", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "bench/results/logprobs_core.json"))
    report = run(parser.parse_args())
    Path(parser.parse_args().output).parent.mkdir(parents=True, exist_ok=True)
    Path(parser.parse_args().output).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['pairs']} pairs, {report['dtype']} on {report['device']} ({report['threads']} threads), "
        f"GEMM peak {report['gemm_peak_gflop_s']:.0f} GFLOP/s"
    )
    print(f"{'method':<9} {'seconds':>8} {'pairs/s':>8} {'tok/s':>8} {'GFLOP/s':>8} {'MFU':>6} {'max|Δ|':>9}")
    for name, r in report["results"].items():
        print(
            f"{name:<9} {r['seconds']:>8.2f} {r['pairs_per_s']:>8.2f} {r['tokens_per_s']:>8.0f} "
            f"{r['achieved_gflop_s']:>8.1f} {r['mfu']:>6.1%} {r['max_abs_diff_vs_naive']:>9.2e}"
        )


if __name__ == "__main__":
    main()

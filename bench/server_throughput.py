"""The reward server under load, against the offline scorer, and rerank's prompt sharing.

(c) Offline vs HTTP: the offline scorer (``RewardModel.score_encoded``, what ``dporm score`` runs)
    scores every chosen/rejected pair of a RewardBench-schema file; then ``dporm serve`` (a separate
    process, same models, reference cache off) gets the same pairs as one-pair ``/v1/preference``
    requests from N concurrent clients. Reported: pairs/s of both, their ratio, p50/p99 latency.
(d) Rerank: for prompts whose token count is at least their 8 responses' together, one ``/v1/rerank`` with 8
    documents (the prompt computed once) vs 8 independent ``/v1/rewards`` requests of one item
    (sent one after another, so nothing can share the prompt), and one ``/v1/rewards`` with 8 items.

    .venv/bin/python bench/server_throughput.py --policy runs/uf-full/policy --clients 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from dpo.allocator import keep_freed_memory
from dpo.data import read_records
from dpo.default_model import pull_default_model
from dpo.preference_data import load_preferences

ROOT = Path(__file__).resolve().parents[1]


def offline(args: argparse.Namespace, reference: str, rows: list[dict]) -> float:
    from dpo.models import load_model, load_tokenizer
    from dpo.scorer import RewardModel

    model = RewardModel(load_model(args.policy), load_model(reference), load_tokenizer(reference), args.beta,
                        ref_cache_size=0)  # fmt: skip
    seqs = [model.encode(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    start = time.perf_counter()
    for i in range(0, len(seqs), 2 * args.batch_pairs):
        model.score_encoded(seqs[i : i + 2 * args.batch_pairs])
    return time.perf_counter() - start


def start_server(args: argparse.Namespace, reference: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dpo.cli", "serve", "--policy", args.policy, "--reference", reference, "--beta",
           str(args.beta), "--port", str(args.port), "--ref-cache-size", "0", "--request-timeout", "3600",
           "--max-batch-tokens", str(args.max_batch_tokens), "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"{args.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(1)
    server.kill()
    raise SystemExit("the server did not become ready")


async def load_test(args: argparse.Namespace, rows: list[dict]) -> tuple[float, list[float]]:
    queue: asyncio.Queue = asyncio.Queue()
    for r in rows:
        queue.put_nowait(r)
    latencies: list[float] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            r = queue.get_nowait()
            body = {"pairs": [{"prompt": r["prompt"], "response_a": r["chosen"], "response_b": r["rejected"]}]}
            start = time.perf_counter()
            answer = await client.post(f"{args.url}/v1/preference", json=body)
            answer.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=args.clients)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(args.clients)))
        return time.perf_counter() - start, latencies


def rerank_cases(args: argparse.Namespace, tokenizer) -> list[tuple[list[dict], list[str]]]:
    """HH-RLHF conversations with 8 candidate replies each, the prompt's tokens >= all 8 replies' tokens together."""
    data = load_preferences(args.rerank_data, report=lambda msg: None)
    replies = [r for ex in data.examples[:400] for r in ex.responses if r.strip()]
    cases = []
    for ex in data.examples:
        if isinstance(ex.prompt, str):
            continue
        text = tokenizer.apply_chat_template(list(ex.prompt), add_generation_prompt=True, tokenize=False)
        prompt_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
        if prompt_tokens < 240:
            continue
        docs = [r for r in replies if len(tokenizer(r, add_special_tokens=False).input_ids) <= prompt_tokens // 8]
        offset = len(cases) * 8 % max(len(docs) - 8, 1)
        cases.append((ex.prompt, docs[offset : offset + 8]))
        if len(cases) == args.rerank_prompts:
            break
    return cases


def rerank_bench(args: argparse.Namespace, cases) -> dict:
    timings = {"rerank_8_docs": 0.0, "rewards_8_requests": 0.0, "rewards_1_request_8_items": 0.0}
    prompt_tokens = total_tokens = 0
    with httpx.Client(timeout=3600) as client:

        def post(path: str, body: dict) -> dict:
            answer = client.post(f"{args.url}{path}", json=body)
            answer.raise_for_status()
            return answer.json()

        for messages, docs in cases:
            start = time.perf_counter()
            usage = post("/v1/rerank", {"messages": messages, "documents": docs})["usage"]
            timings["rerank_8_docs"] += time.perf_counter() - start
            prompt_tokens += usage["prompt_tokens"]
            total_tokens += usage["total_tokens"]
            start = time.perf_counter()
            for d in docs:
                post("/v1/rewards", {"items": [{"messages": messages, "response": d}]})
            timings["rewards_8_requests"] += time.perf_counter() - start
            start = time.perf_counter()
            post("/v1/rewards", {"items": [{"messages": messages, "response": d} for d in docs]})
            timings["rewards_1_request_8_items"] += time.perf_counter() - start
    if not cases:
        raise SystemExit("no rerank case: no prompt is long enough")
    ratio = timings["rerank_8_docs"] / timings["rewards_8_requests"]
    return {"prompts": len(cases), "prompt_tokens": prompt_tokens, "response_tokens": total_tokens - prompt_tokens,
            "seconds": timings, "rerank_vs_independent": ratio}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", required=True, help="DPO policy checkpoint dir")
    p.add_argument("--reference", default="default")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/rewardbench/filtered-sample.jsonl"))
    p.add_argument("--limit", type=int)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--batch-pairs", type=int, default=4, help="pairs per offline scoring call")
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--rerank-data", default=str(ROOT.parent / "shared/data/hh-rlhf/helpful-base/test.jsonl.gz"))
    p.add_argument("--rerank-prompts", type=int, default=8)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: offline,load,rerank")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--output", default=str(ROOT / "bench/results/server_throughput.json"))
    args = p.parse_args()
    keep_freed_memory()  # as the dporm command does (dpo.allocator); every side of the comparison gets it
    args.url = f"http://127.0.0.1:{args.port}"
    skip = set(filter(None, args.skip.split(",")))
    reference = str(pull_default_model()) if args.reference == "default" else args.reference
    rows = list(read_records(args.data))[: args.limit]
    report: dict = {"pairs": len(rows), "clients": args.clients}
    if "offline" not in skip:
        seconds = offline(args, reference, rows)
        report["offline"] = {"seconds": seconds, "pairs_per_s": len(rows) / seconds}
        print(f"offline scorer: {seconds:.1f} s, {len(rows) / seconds:.3f} pairs/s")
    server = start_server(args, reference)
    try:
        if "load" not in skip:
            seconds, latencies = asyncio.run(load_test(args, rows))
            q = statistics.quantiles(latencies, n=100)
            report["server"] = {"seconds": seconds, "pairs_per_s": len(rows) / seconds, "p50_s": q[49], "p99_s": q[98]}
            print(f"server, {args.clients} clients: {seconds:.1f} s, {len(rows) / seconds:.3f} pairs/s, "
                  f"p50 {q[49]:.1f} s, p99 {q[98]:.1f} s")  # fmt: skip
            if "offline" in report:
                report["server_vs_offline"] = report["offline"]["seconds"] / seconds
                print(f"server throughput / offline: {report['server_vs_offline']:.2f}")
        if "rerank" not in skip:
            from dpo.models import load_tokenizer

            report["rerank"] = rerank_bench(args, rerank_cases(args, load_tokenizer(reference)))
            r = report["rerank"]
            print(f"rerank: {r['prompts']} prompts x 8 docs, prompt tokens {r['prompt_tokens']}, response tokens "
                  f"{r['response_tokens']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items())
                  + f"; rerank / independent = {r['rerank_vs_independent']:.2f}")  # fmt: skip
        metrics = httpx.get(f"{args.url}/metrics").text
        report["batch_sequences"] = [line for line in metrics.splitlines() if "batch_sequences_" in line]
    finally:
        server.terminate()
        server.wait(60)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark of kernels.token_logprobs and kernels.linear_token_logprobs against their peers.

    token_logprobs          dporm (Triton on CUDA, chunked torch elsewhere)
    log_softmax+gather      torch.log_softmax(logits, -1, dtype=float32).gather(...)
    trl_selective           trl.trainer.utils.selective_log_softmax (TRL's own Triton kernel on CUDA)
    linear_token_logprobs   dporm, from hidden states + LM head in token chunks
    logits+log_softmax      hidden @ W.T, then log_softmax + gather

Each case runs in a fresh process (peak memory is per case): median time over
``--repeats`` after a warm-up, and the peak memory beyond the inputs (CPU: peak RSS
growth; CUDA: max_memory_allocated growth, gradients included). On CUDA the achieved
bandwidth is reported against a copy bandwidth measured in the same process.

    .venv/bin/python bench/token_logprobs.py                 # full grid, table + bench/results/token_logprobs.json
    .venv/bin/python bench/token_logprobs.py --rows 1024 --dtypes fp32 --repeats 2   # a quick subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKEN_METHODS = ("token_logprobs", "log_softmax+gather", "trl_selective")
LINEAR_METHODS = ("linear_token_logprobs", "logits+log_softmax")


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak(device: torch.device) -> int:
    """Reset the peak-memory mark and return the memory in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    return _proc_status_bytes("VmRSS")


def _peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status_bytes("VmHWM")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _copy_bandwidth(device: torch.device) -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        y.copy_(x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * x.numel() / min(times) / 1e9  # read + write


def _build(case: dict, device: torch.device):
    """Inputs and the callable under test for one case."""
    from kernels import linear_token_logprobs, token_logprobs

    dtype, n, vocab = DTYPES[case["dtype"]], case["rows"], case["vocab"]
    backward = case["mode"] == "fwd+bwd"
    torch.manual_seed(0)
    targets = torch.randint(0, vocab, (n,), device=device)
    if case["op"] == "linear":
        hidden = torch.randn(n, case["hidden"], device=device).to(dtype).requires_grad_(backward)
        weight = (torch.randn(vocab, case["hidden"], device=device) * 0.05).to(dtype).requires_grad_(backward)
        if case["method"] == "linear_token_logprobs":
            return (lambda: linear_token_logprobs(hidden, weight, targets)), [hidden, weight]

        def logits_then_log_softmax():
            logits = hidden @ weight.t()
            return torch.log_softmax(logits, -1, dtype=torch.float32).gather(1, targets[:, None]).squeeze(1)

        return logits_then_log_softmax, [hidden, weight]

    logits = (torch.randn(n, vocab, device=device) * 2).to(dtype).requires_grad_(backward)
    if case["method"] == "token_logprobs":
        return (lambda: token_logprobs(logits, targets)), [logits]
    if case["method"] == "trl_selective":
        from trl.trainer.utils import selective_log_softmax

        return (lambda: selective_log_softmax(logits, targets)), [logits]
    return (lambda: torch.log_softmax(logits, -1, dtype=torch.float32).gather(1, targets[:, None]).squeeze(1)), [logits]


def run_case(case: dict) -> dict:
    device = torch.device(case["device"])
    fn, leaves = _build(case, device)
    backward = case["mode"] == "fwd+bwd"

    def step():
        out = fn()
        if backward:
            out.float().sum().backward()
            for leaf in leaves:
                leaf.grad = None
        _sync(device)

    _sync(device)
    base = _reset_peak(device)
    step()  # warm-up; its peak is the case's peak memory
    peak_extra = max(0, _peak_bytes(device) - base)
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = dict(case, seconds=seconds, peak_extra_mib=peak_extra / 2**20)
    if case["op"] == "token":
        elt = DTYPES[case["dtype"]].itemsize
        moved = case["rows"] * case["vocab"] * elt * (3 if backward else 1)  # fwd reads; bwd reads + writes
        result["gb_per_s"] = moved / seconds / 1e9
        if device.type == "cuda":
            result["copy_gb_per_s"] = _copy_bandwidth(device)
            result["bandwidth_fraction"] = result["gb_per_s"] / result["copy_gb_per_s"]
    return result


def _cases(args: argparse.Namespace) -> list[dict]:
    base = {"device": args.device, "vocab": args.vocab, "repeats": args.repeats}
    cases = []
    for dtype in args.dtypes:
        for mode in args.modes:
            for n in args.rows if "token" in args.ops else []:
                for method in TOKEN_METHODS:
                    cases.append(dict(base, op="token", dtype=dtype, mode=mode, rows=n, method=method))
            for method in LINEAR_METHODS if "linear" in args.ops else []:
                cases.append(dict(base, op="linear", dtype=dtype, mode=mode, rows=args.linear_rows,
                                  hidden=args.hidden, method=method))  # fmt: skip
    return cases


def _summary(results: list[dict]) -> list[str]:
    """Check the targets: memory vs log_softmax+gather (fwd <= 1/4, fwd+bwd <= 1/2), time <= 1.1x fastest peer."""
    lines, groups = [], {}
    for r in results:
        groups.setdefault((r["op"], r["dtype"], r["mode"], r["rows"]), {})[r["method"]] = r
    for (op, dtype, mode, rows), g in groups.items():
        ours = g.get("token_logprobs" if op == "token" else "linear_token_logprobs")
        naive = g.get("log_softmax+gather" if op == "token" else "logits+log_softmax")
        if not ours or not naive:
            continue
        peers = [g[m] for m in g if m not in ("token_logprobs", "linear_token_logprobs")]
        fastest = min(p["seconds"] for p in peers)
        limit = (1 / 8) if op == "linear" else (1 / 4 if mode == "fwd" else 1 / 2)
        mem_ratio = ours["peak_extra_mib"] / max(naive["peak_extra_mib"], 1e-9)
        time_ratio = ours["seconds"] / fastest
        ok = mem_ratio <= limit and (op == "linear" or time_ratio <= 1.1)
        lines.append(f"{op:<6} {dtype} {mode:<7} N={rows:<6} memory {mem_ratio:.3f}x naive (target <= {limit:.3f}), "
                     f"time {time_ratio:.2f}x fastest peer{'' if op == 'token' else ' (info)'}: "
                     f"{'PASS' if ok else 'MISS'}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--ops", nargs="+", default=["token", "linear"], choices=["token", "linear"])
    parser.add_argument("--linear-rows", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=576, help="hidden size for the linear op (SmolLM2: 576)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(ROOT / "bench/results/token_logprobs.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
        return

    results = []
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(summary: list[str]) -> None:  # after every case: a run cut short by a timeout keeps what it measured
        output.write_text(json.dumps({"results": results, "summary": summary}, indent=2) + "\n")

    header = f"{'op':<6} {'dtype':<5} {'mode':<7} {'N':>6} {'method':<22} {'ms':>9} {'peak MiB':>9} {'GB/s':>7}"
    print(header)
    for case in _cases(args):
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"case failed: {case}\n{proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        bandwidth = f"{r['gb_per_s']:>7.1f}" if "gb_per_s" in r else f"{'':>7}"
        print(f"{r['op']:<6} {r['dtype']:<5} {r['mode']:<7} {r['rows']:>6} {r['method']:<22} "
              f"{r['seconds'] * 1e3:>9.1f} {r['peak_extra_mib']:>9.1f} {bandwidth}", flush=True)  # fmt: skip
        save(["(partial: the run is still going)"])
    summary = _summary(results)
    print("\n".join(summary))
    save(summary)


if __name__ == "__main__":
    main()

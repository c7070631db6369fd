"""CPU matmul GFLOP/s against the row count M, at SmolLM2-135M's decoder shapes.

Why :mod:`dpo.packing` exists: a forward of one short sequence gives each matmul few rows.
Run: ``.venv/bin/python bench/gemm_rows.py`` (writes ``bench/results/gemm_rows.txt``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # (K, N): q/o, k/v, gate/up, down projections
ROWS = [16, 32, 64, 128, 256, 512, 1024, 2048]


def gflops(m: int, k: int, n: int, reps: int = 40, weights: int = 16) -> float:
    """Best-effort steady state: a rotation of distinct weights, as successive layers would use."""
    a, ws = torch.randn(m, k), [torch.randn(n, k) for _ in range(weights)]
    for w in ws:
        a @ w.t()
    start = time.perf_counter()
    for i in range(reps):
        a @ ws[i % weights].t()
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=str(Path(__file__).parent / "results/gemm_rows.txt"), help="result file")
    args = p.parse_args()
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    a @ b
    peak = 2 * n**3 / (time.perf_counter() - start) / 1e9
    lines = [f"{torch.get_num_threads()} threads, fp32, {n}^3 matmul: {peak:.0f} GFLOP/s",
             "rows M | " + " | ".join(f"K={k} N={n_}" for k, n_ in SHAPES)]  # fmt: skip
    for m in ROWS:
        lines.append(f"{m:6d} | " + " | ".join(f"{gflops(m, k, n_):8.0f}" for k, n_ in SHAPES))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()

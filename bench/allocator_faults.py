"""Minor page faults of freed-and-reallocated activations, with and without dpo.allocator's malloc settings.

A forward's worth of multi-MiB tensors is allocated, touched and freed ``--rounds`` times in a fresh
process; the faults of every round after the first are counted. Untuned glibc returns the freed blocks
(munmap, heap trim) and faults them in again; with the settings the heap keeps them. Measured on this
project's CPU: untuned 26-100% of the pages re-faulted (glibc's dynamic thresholds), tuned 0.6-3.9%.
Run: ``.venv/bin/python bench/allocator_faults.py`` (prints one line per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dpo import allocator

ROUNDS = """
import json, resource, sys, torch
from dpo.allocator import keep_freed_memory
rounds, tensors = int(sys.argv[1]), int(sys.argv[2])
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes = [1 << 20 + (j % 3) for j in range(tensors)]  # 4, 8 and 16 MiB fp32 tensors in turn
for i in range(rounds):
    if i == 1:
        start = faults()
    xs = [torch.ones(n) for n in sizes]
    del xs
print(json.dumps({"applied": applied, "faults": faults() - start, "bytes": 4 * sum(sizes) * (rounds - 1)}))
"""


def measure(rounds: int, tensors: int, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (*allocator.USER_SETTINGS, allocator.TUNING_VARIABLE)}
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-c", ROUNDS, str(rounds), str(tensors)], env={**clean, **env},
                          capture_output=True, text=True, cwd=root)  # fmt: skip
    if done.returncode != 0:
        sys.exit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="allocate-touch-free rounds (the first is not counted)")
    p.add_argument("--tensors", type=int, default=40, help="tensors per round (4-16 MiB each)")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2")
    page = os.sysconf("SC_PAGE_SIZE")
    for label, env in (("tuned", {}), ("untuned", {allocator.TUNING_VARIABLE: "0"})):
        out = measure(args.rounds, args.tensors, **env)
        pages = out["bytes"] // page
        print(f"{label:8s} applied={out['applied']!s:5s} minor faults {out['faults']:>9d} "
              f"of {pages} pages touched ({100 * out['faults'] / pages:.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()

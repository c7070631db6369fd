"""dpo.allocator: freed activation memory is reused, not faulted in afresh each forward."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpo import allocator

# A forward's worth of multi-MiB activations, allocated, touched and freed five times; minor page
# faults counted over the last four rounds. Untuned glibc trims the freed heap and faults them again.
ROUNDS = """
import json, resource, torch
from dpo.allocator import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(5):
    if i == 1:
        start = faults()
    xs = [torch.ones(1 << 20 + (j % 3)) for j in range(40)]  # 4-16 MiB each, ~360 MiB in all
    del xs
print(json.dumps({"applied": applied, "faults": faults() - start}))
"""


def _rounds(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.USER_SETTINGS}
    done = subprocess.run([sys.executable, "-c", ROUNDS], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not allocator._glibc(), reason="glibc malloc only")
def test_tuned_malloc_reuses_freed_activations_instead_of_faulting_them_in_again():
    tuned, untuned = _rounds(), _rounds(**{allocator.TUNING_VARIABLE: "0"})
    assert tuned["applied"] and not untuned["applied"]
    pages = 4 * 360 * 2**20 // 4096  # what re-faulting every round would cost
    assert untuned["faults"] > 0.15 * pages  # measured 26-100%, by glibc's dynamic thresholds
    assert tuned["faults"] < 0.1 * pages  # measured 0.6-3.9%


def test_malloc_settings_of_the_user_win(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert allocator._apply() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv(allocator.TUNING_VARIABLE, "0")
    assert allocator._apply() is False

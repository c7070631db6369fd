"""dpo.allocator: which mallopt settings it applies, when it stands aside, and what glibc does with them.

The page faults the settings save are a measurement, in bench/allocator_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpo import allocator

# mallopt(3) parameters as <malloc.h> numbers them, and the values the module documents.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
EXPECTED_CALLS = [(M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 2**30), (M_TOP_PAD, 64 * 2**20)]
USER_VARIABLES = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"]


class FakeLibc:
    def __init__(self, accepts: bool = True):
        self.calls, self.accepts = [], accepts

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1 if self.accepts else 0  # glibc: 1 on success, 0 on error


@pytest.fixture
def libc(monkeypatch):
    """A glibc system whose libc records mallopt calls; the environment holds no malloc settings."""
    fake, loaded = FakeLibc(), []
    for name in [*USER_VARIABLES, allocator.TUNING_VARIABLE]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "_glibc", lambda: True)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: loaded.append(name) or fake)
    fake.loaded = loaded
    return fake


def test_applies_the_three_settings_through_mallopt(libc):
    assert allocator._apply() is True
    assert libc.calls == EXPECTED_CALLS and len(libc.loaded) == 1


@pytest.mark.parametrize("name", USER_VARIABLES)
def test_malloc_settings_of_the_user_win(libc, monkeypatch, name):
    monkeypatch.setenv(name, "131072" if name != "GLIBC_TUNABLES" else "glibc.malloc.tcache_count=7")
    assert allocator._apply() is False and libc.calls == []


@pytest.mark.parametrize(("value", "applied"), [("0", False), ("1", True)])
def test_dporm_malloc_tuning_0_turns_it_off(libc, monkeypatch, value, applied):
    monkeypatch.setenv(allocator.TUNING_VARIABLE, value)
    assert allocator._apply() is applied
    assert libc.calls == (EXPECTED_CALLS if applied else [])


def test_refused_or_missing_mallopt_reports_not_applied(libc, monkeypatch):
    libc.accepts = False
    assert allocator._apply() is False
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("no libc")))
    assert allocator._apply() is False
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: object())  # a libc without mallopt
    assert allocator._apply() is False


def test_does_nothing_elsewhere_than_glibc(libc, monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: False)
    assert allocator._apply() is False and libc.calls == [] and libc.loaded == []


def test_applied_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_apply", lambda: calls.append(1) or True)
    assert allocator.keep_freed_memory() is True and allocator.keep_freed_memory() is True
    assert calls == [1]


def test_the_dporm_command_applies_it_before_running(monkeypatch, capsys):
    import dpo.cli

    order = []
    monkeypatch.setattr(dpo.cli, "keep_freed_memory", lambda: order.append("allocator"))
    monkeypatch.setattr(dpo.cli, "_run_model_pull", lambda args: order.append("command"))
    assert dpo.cli.main(["model", "pull"]) == 0
    assert order == ["allocator", "command"]


# In a fresh process (mallopt is process-wide): malloc a 24 MiB block and free it, reading glibc's own
# accounting (mallinfo2). Untuned, 24 MiB is above glibc's 128 KiB mmap threshold: an mmap of its own,
# unmapped on free. Tuned (threshold 32 MiB), it comes from the heap, which grows by the block plus the
# 64 MiB top pad and keeps it all after the free (trim threshold 1 GiB).
PROBE = """
import ctypes, json
from dpo.allocator import keep_freed_memory
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in fields]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = Info, ctypes.c_void_p, [ctypes.c_void_p]
applied = keep_freed_memory()
before = libc.mallinfo2()
block = libc.malloc(24 << 20)
held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped": held.hblkhd - before.hblkhd, "heap_grew": held.arena - before.arena,
                  "heap_kept": after.arena - before.arena}))
"""


def _has_mallinfo2() -> bool:
    import ctypes

    return allocator._glibc() and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc 2.33+


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc malloc with mallinfo2 only")
@pytest.mark.parametrize(
    "env",
    [{}, {allocator.TUNING_VARIABLE: "0"}, {"MALLOC_TOP_PAD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}],
)
def test_glibc_serves_large_blocks_from_the_heap_and_keeps_them_once_tuned(env):
    clean = {k: v for k, v in os.environ.items() if k not in [*USER_VARIABLES, allocator.TUNING_VARIABLE]}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    size = 24 << 20
    if not env:
        assert out["applied"] is True and out["mmapped"] == 0
        assert out["heap_grew"] >= size + (32 << 20) and out["heap_kept"] == out["heap_grew"]
    else:  # not tuned: glibc's own thresholds
        assert out["applied"] is False and out["mmapped"] >= size and out["heap_kept"] < size

"""glibc malloc settings for CPU forwards: reuse freed activation memory instead of faulting in fresh pages.

A CPU forward allocates and frees the same few-MiB activations in every layer (a 1024-row pack of
SmolLM2's MLP is 6 MiB per tensor). glibc serves blocks above its mmap threshold with a fresh
``mmap`` and returns them on ``free``; it also trims the heap top past its trim threshold. Either
way the next allocation touches new pages, each a page fault plus zeroing: 4.3 million minor faults
(17 GB) and 14-16% of the fp32 scoring time of 24 RewardBench pairs on this project's 2-core CPU.
Raising the mmap threshold to glibc's maximum and keeping freed memory in the heap removes them
(131 thousand faults). The cost: the process keeps its peak heap size instead of returning it.

The ``dporm`` command applies this at start. Environment variables the user set for malloc win
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or any ``GLIBC_TUNABLES``),
and ``DPORM_MALLOC_TUNING=0`` turns it off. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

TUNING_VARIABLE = "DPORM_MALLOC_TUNING"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

# mallopt(3) parameters and values
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: blocks above it are still mmapped
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap top before it is returned
TOP_PAD = 64 << 20  # grow the heap in steps this large: fewer brk calls

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc accepted them."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _apply() -> bool:
    if os.environ.get(TUNING_VARIABLE, "1") == "0" or any(name in os.environ for name in USER_SETTINGS):
        return False
    if not _glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD))
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):
        return False

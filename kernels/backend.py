"""Choosing the implementation of the log-prob ops.

``DPORM_KERNEL=auto`` (default) runs Triton on CUDA tensors when Triton is installed
and the torch path otherwise; ``DPORM_KERNEL=triton`` or ``torch`` forces one. With
``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors (slowly), which is how
CI tests the kernels themselves. float64 tensors always take the torch path (the
Triton kernels compute in float32).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

ENV = "DPORM_KERNEL"
CHOICES = ("auto", "triton", "torch")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_name(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op on ``tensor``, following ``DPORM_KERNEL``."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "torch":
        return "torch"
    if tensor.dtype == torch.float64:
        return "torch"  # the Triton kernels compute in float32; float64 (gradcheck, references) keeps float64
    runnable = triton_installed() and (tensor.is_cuda or interpreting())
    if choice == "triton" and not runnable:
        why = "Triton is not installed" if not triton_installed() else "tensors are not on CUDA"
        raise RuntimeError(f"{ENV}=triton but {why} (set TRITON_INTERPRET=1 to run Triton on CPU)")
    return "triton" if runnable and (choice == "triton" or tensor.is_cuda) else "torch"


def backend(tensor: torch.Tensor) -> ModuleType:
    """The module (``forward``/``backward``) implementing the ops for ``tensor``."""
    if backend_name(tensor) == "triton":
        from kernels import triton_backend

        return triton_backend
    from kernels import torch_backend

    return torch_backend

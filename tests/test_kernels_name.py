"""Our top-level ``kernels`` package must not be mistaken for Hugging Face's ``kernels`` by transformers.

transformers asks ``is_kernels_available()`` before building a model: it finds the import name ``kernels``,
maps it to a distribution (``packages_distributions()``: ours is ``dporm``) and accepts the version only
inside HF's window [KERNELS_MIN_VERSION, KERNELS_MAX_VERSION). Were it to accept ours, every model load
would fail importing HF's API from our package. These tests pin each link of that chain, so a version
bump into the window (or a transformers that reads versions otherwise) fails here, not in users' hands.
"""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_transformers_does_not_see_hub_kernels():
    code = (
        "import importlib.util, kernels\n"
        "from transformers.utils import import_utils\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "assert hasattr(kernels, 'token_logprobs')\n"
        "print(import_utils.is_kernels_available())\n"
        "print(import_utils._is_package_available('kernels', return_version=True)[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    available, version = out.stdout.split()
    assert available == "False"
    assert version in (importlib.metadata.version("dporm"), "N/A")  # ours, never a hub kernels' version


def test_our_version_lies_outside_the_window_transformers_accepts():
    from transformers.utils import import_utils

    ours = Version(importlib.metadata.version("dporm"))
    low = Version(import_utils.KERNELS_MIN_VERSION)
    high = getattr(import_utils, "KERNELS_MAX_VERSION", None)  # transformers < 5.13 has only the floor
    window = low <= ours and (high is None or ours < Version(high))
    assert not window, f"dporm {ours} would pass as Hugging Face kernels [{low}, {high or 'any'})"
    import kernels

    assert not hasattr(kernels, "__version__")  # transformers' last resort reads it when metadata is missing


def test_our_kernels_is_the_one_installed():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).resolve() == ROOT / "kernels" / "__init__.py"
    import kernels

    assert not hasattr(kernels, "get_kernel")  # the hub package's entry point

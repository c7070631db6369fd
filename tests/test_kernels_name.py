"""Our top-level ``kernels`` package must not be mistaken for Hugging Face's ``kernels`` by transformers."""

import importlib.util
import subprocess
import sys


def test_transformers_does_not_see_hub_kernels():
    code = (
        "import importlib.util, kernels\n"
        "from transformers.utils import import_utils\n"
        "assert importlib.util.find_spec('kernels') is not None\n"
        "assert hasattr(kernels, 'token_logprobs')\n"
        "print(import_utils.is_kernels_available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_our_kernels_is_the_one_installed():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin.endswith("kernels/__init__.py")
    import kernels

    assert not hasattr(kernels, "get_kernel")  # the hub package's entry point

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton decides at kernel definition time whether to interpret: set it before any kernel module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def kernel_backend(request, monkeypatch):
    """Runs a test once per implementation, forcing it with DPORM_KERNEL.

    With a GPU, the Triton case makes CUDA the default device, so the compiled kernels are tested;
    without one, the kernels run interpreted on CPU tensors.
    """
    monkeypatch.setenv("DPORM_KERNEL", request.param)
    if request.param == "triton":
        on_triton_device(request)
    return request.param


def on_triton_device(request) -> None:
    """CUDA as the default device for the rest of a test when there is a GPU (Triton's compiled kernels)."""
    if torch.cuda.is_available():
        torch.set_default_device("cuda")
        request.addfinalizer(lambda: torch.set_default_device(None))


def make_tiny_llama(seed: int = 0, vocab_size: int = 97, dtype: torch.dtype = torch.float32, **overrides):
    """A small random Llama built in-process (no files, no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model checkpoint (pulled once; instant afterwards)."""
    from dpo.default_model import pull_default_model

    return pull_default_model()


@pytest.fixture(scope="session")
def smollm_tokenizer(default_model_dir):
    from dpo.models import load_tokenizer

    return load_tokenizer(str(default_model_dir))


def save_tiny_artifact(root, tokenizer, max_length: int = 128, max_position_embeddings: int = 512):
    """A reward-model artifact at ``root``: tiny Llamas (policy seed 1, reference seed 0) with ``tokenizer``, β 0.5."""
    from dpo.manifest import Manifest

    for name, seed in (("policy", 1), ("reference", 0)):
        model = make_tiny_llama(seed=seed, vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tokenization = {"chat_template": tokenizer.chat_template, "max_length": max_length}
    Manifest("policy", "reference", beta=0.5, tokenization=tokenization).save(root)
    return root


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm_tokenizer):
    return save_tiny_artifact(tmp_path_factory.mktemp("artifact"), smollm_tokenizer)


@pytest.fixture(scope="module")
def reward_model(artifact):
    from dpo.scorer import load_reward_model

    return load_reward_model(str(artifact), device="cpu")


def make_client(reward_model, **limits):
    """A TestClient of the reward server over ``reward_model``; ``limits`` are :class:`server.app.Limits` fields."""
    from fastapi.testclient import TestClient

    from server.app import Limits, State, create_app

    api_key, recheck = limits.pop("api_key", None), limits.pop("recheck", 0.0)
    state = State(Limits(**limits), api_key, recheck)
    state.attach(reward_model)
    return TestClient(create_app(state))

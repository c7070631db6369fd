"""Integration tests on the real default model (SmolLM2-135M-Instruct, pulled once)."""

import subprocess
import sys
import time

import pytest
import torch

from dpo.default_model import MARKER, pull_default_model
from dpo.encoding import encode
from dpo.logprobs import sequence_logprobs
from dpo.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(default_model_dir):
    return load_model(str(default_model_dir))


def test_pull_is_idempotent_and_prints_the_path_last(default_model_dir):
    assert (default_model_dir / "model.safetensors").is_file() and (default_model_dir / MARKER).is_file()
    assert not list(default_model_dir.glob("*.bin")) and not list(default_model_dir.glob("*.gguf"))
    start = time.perf_counter()
    assert pull_default_model() == default_model_dir
    assert time.perf_counter() - start < 0.5
    cmd = [sys.executable, "-m", "dpo.cli", "model", "pull"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(default_model_dir)


def test_checkpoint_is_plain_and_has_a_chat_template(default_model_dir, smollm_tokenizer, model):
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.vocab_size == len(smollm_tokenizer) == 49152
    assert "<|im_start|>assistant" in smollm_tokenizer.chat_template


def test_greedy_answer_knows_paris(model, smollm_tokenizer):
    inputs = smollm_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = smollm_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_shared_prompt_equals_unshared_on_the_real_model(model, smollm_tokenizer):
    prompt = "Write a Python function that adds two numbers."
    responses = ["    def add(a, b):\n        return a + b", "def add(a, b): return a+b", "I can't help."]
    seqs = [encode(smollm_tokenizer, prompt, r) for r in responses]
    with torch.no_grad():
        shared = sequence_logprobs(model, seqs, share_prompts=True)
        plain = sequence_logprobs(model, seqs, share_prompts=False)
    # 30 layers of GEMMs with other shapes (batch 1 prompt vs padded batch) differ in the last fp32 bits.
    torch.testing.assert_close(shared.token_logps, plain.token_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.logp, plain.logp, atol=1e-4, rtol=1e-5)
    assert torch.isfinite(shared.logp).all() and (shared.logp < 0).all()

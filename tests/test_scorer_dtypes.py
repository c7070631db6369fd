"""Reduced-precision scoring: bf16/fp16 weights, float32 log-softmax, rewards close to fp32."""

import pytest
import torch

from dpo.encoding import encode
from dpo.logprobs import sequence_logprobs
from dpo.scorer import RewardModel

try:
    from tests.conftest import make_tiny_llama
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import make_tiny_llama

PROMPT = "Tell me one fact about the moon."
RESPONSES = ["The moon orbits the Earth.", "No.", "It is made of rock and dust, and it has no air."]
# bf16 keeps 8 mantissa bits, fp16 11: measured reward errors here are ~5e-3 and ~2e-4 (rewards ~0.1-0.4).
TOLERANCE = {torch.bfloat16: 0.02, torch.float16: 0.002}


def _reward_model(tokenizer, dtype: torch.dtype) -> RewardModel:
    policy = make_tiny_llama(seed=1, vocab_size=len(tokenizer), dtype=dtype, max_position_embeddings=512)
    reference = make_tiny_llama(seed=0, vocab_size=len(tokenizer), dtype=dtype, max_position_embeddings=512)
    return RewardModel(policy, reference, tokenizer, beta=1.0, max_length=128)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reduced_precision_logprobs_are_float32_and_close(smollm_tokenizer, dtype):
    seqs = [encode(smollm_tokenizer, PROMPT, r, 128) for r in RESPONSES]
    low, full = _reward_model(smollm_tokenizer, dtype), _reward_model(smollm_tokenizer, torch.float32)
    assert next(low.policy.parameters()).dtype == dtype
    with torch.no_grad():
        out = sequence_logprobs(low.policy, seqs)
    assert out.logp.dtype == torch.float32 and out.token_logps.dtype == torch.float32
    assert bool(torch.isfinite(out.logp).all())
    got, want = low.score_encoded(seqs), full.score_encoded(seqs)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g.reward, float) and g.response_tokens == w.response_tokens
        assert g.logp_policy == pytest.approx(w.logp_policy, abs=TOLERANCE[dtype])
        assert g.reward == pytest.approx(w.reward, abs=TOLERANCE[dtype])
    order = sorted(range(len(seqs)), key=lambda i: got[i].reward)
    assert order == sorted(range(len(seqs)), key=lambda i: want[i].reward)


def test_bf16_mixed_keeps_the_residual_stream_fp32(smollm_tokenizer, tmp_path):
    from dpo.models import AUTOCAST_ATTRIBUTE, load_model, mix_precision

    seqs = [encode(smollm_tokenizer, PROMPT, r, 128) for r in RESPONSES]
    full = _reward_model(smollm_tokenizer, torch.float32)
    plain = _reward_model(smollm_tokenizer, torch.bfloat16)
    mixed = _reward_model(smollm_tokenizer, torch.float32)
    for model in (mixed.policy, mixed.reference):
        mix_precision(model)
        assert getattr(model, AUTOCAST_ATTRIBUTE) == torch.bfloat16
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert model.model.embed_tokens.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float32
        assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert (full.precision, plain.precision, mixed.precision) == ("float32", "bfloat16", "bf16-mixed")
    want, got, rounded = full.score_encoded(seqs), mixed.score_encoded(seqs), plain.score_encoded(seqs)
    err_mixed = sum(abs(g.logp_policy - w.logp_policy) for g, w in zip(got, want, strict=True))
    err_plain = sum(abs(g.logp_policy - w.logp_policy) for g, w in zip(rounded, want, strict=True))
    assert 0 < err_mixed < err_plain  # bf16 matmuls ran, and fp32 activations round less than bf16 ones
    for g, w in zip(got, want, strict=True):
        assert g.reward == pytest.approx(w.reward, abs=TOLERANCE[torch.bfloat16])

    full.policy.save_pretrained(tmp_path / "m", safe_serialization=True)
    loaded = load_model(str(tmp_path / "m"), dtype="bf16-mixed")
    assert loaded.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(loaded, seqs).logp, sequence_logprobs(mixed.policy, seqs).logp)


def test_bf16_mixed_is_refused_for_training(capsys):
    from dpo.cli import main

    assert main(["train", "--dtype", "bf16-mixed", "--data", "x.jsonl", "--output", "/tmp/unused-run"]) == 1
    assert "train with --mixed-precision bf16" in capsys.readouterr().err

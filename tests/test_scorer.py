"""RewardModel limits and bookkeeping: the effective max_length, reference-cache copies, paired results on CPU."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo.cli import main
from dpo.errors import ResponseTooLongError
from dpo.lora import apply_lora
from dpo.scorer import RewardModel, load_reward_model

try:
    from tests.conftest import make_tiny_llama
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import make_tiny_llama

PROMPT = "Tell me one fact about the moon."


def _gpt2(seed: int, vocab: int, positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=32, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory, smollm_tokenizer):
    """Tiny GPT-2s (learned positions: 64) saved with the default tokenizer, and a record too long for them."""
    root = tmp_path_factory.mktemp("gpt2")
    paths = {}
    for name, seed in (("policy", 1), ("reference", 0)):
        _gpt2(seed, len(smollm_tokenizer)).save_pretrained(root / name)
        smollm_tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    data = root / "long.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "chosen": "word " * 100, "rejected": "no"}) + "\n")
    return paths, str(data)


def test_direct_mode_max_length_is_the_context(gpt2_pair):
    paths, _ = gpt2_pair
    model = load_reward_model(policy=paths["policy"], reference=paths["reference"], beta=0.1, device="cpu")
    assert model.max_length == model.context_length == 64
    with pytest.raises(ResponseTooLongError, match="max_length=64"):
        model.score([PROMPT], ["word " * 100])
    seq = model.encode(PROMPT, "word " * 100, allow_response_truncation=True)
    (result,) = model.score_encoded([seq])
    assert seq.truncated and len(seq.prompt_ids) + len(seq.response_ids) == 64 and result.response_tokens == 63


def test_score_cli_direct_mode_refuses_or_truncates_over_long_records(gpt2_pair, tmp_path, capsys):
    paths, data = gpt2_pair
    argv = ["score", "--policy", paths["policy"], "--reference", paths["reference"], "--beta", "0.1", "--data", data,
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "max_length=64" in err and "no record could be encoded" in err
    out = tmp_path / "scores.jsonl"
    assert main([*argv, "--truncate", "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["truncated_chosen"] and row["tokens_chosen"] == 63


def test_max_length_is_at_most_the_smaller_context():
    policy = make_tiny_llama(max_position_embeddings=128)
    reference = make_tiny_llama(max_position_embeddings=96)
    assert RewardModel(policy, reference, None, 0.5).max_length == 96
    assert RewardModel(policy, reference, None, 0.5, max_length=2048).max_length == 96  # capped
    assert RewardModel(policy, reference, None, 0.5, max_length=50).max_length == 50
    assert RewardModel(policy, None, None, 0.5).max_length == 128  # reference-free
    adapter = apply_lora(make_tiny_llama(max_position_embeddings=80), r=2)
    assert RewardModel(adapter, "adapter", None, 0.5).max_length == 80

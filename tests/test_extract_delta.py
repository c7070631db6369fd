"""``dporm extract --delta-rank`` edge cases: tied embeddings merged for bf16-paired, configs that change the
forward, pickle references, and ``--max-length`` against the models' context."""

import pytest
import torch

from dpo.cli import main
from dpo.manifest import Manifest
from dpo.paired_ops import COMPILE_VARIABLE
from dpo.scorer import load_reward_model

try:
    from tests.conftest import make_tiny_llama
    from tests.test_extract import PREFS, _save, _with_vocab_delta, extract, one_line_error, rewards
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import make_tiny_llama
    from test_extract import PREFS, _save, _with_vocab_delta, extract, one_line_error, rewards


@pytest.fixture(scope="module")
def tied(tmp_path_factory, smollm_tokenizer):
    """A tied-embedding reference, a policy that moved the shared matrix, and the rank-2 delta artifact."""
    root = tmp_path_factory.mktemp("tied")
    tok = smollm_tokenizer
    reference = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=True)
    policy = _with_vocab_delta(reference, 2, 7, tie_word_embeddings=True)
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.add_(0.01)
    ref_path, pol_path = _save(reference, tok, root / "ref"), _save(policy, tok, root / "pol")
    assert extract(pol_path, ref_path, root / "delta", "--delta-rank", "2") == 0
    return {"reference": ref_path, "policy": pol_path, "delta": str(root / "delta"), "model": policy}


@pytest.mark.parametrize("dtype", ["fp32", "bf16-paired"])
def test_tied_delta_artifact_scores_like_the_exact_policy(tied, dtype, monkeypatch):
    monkeypatch.setenv(COMPILE_VARIABLE, "0")  # eager steps: the same arithmetic, no compile time
    exact = load_reward_model(policy=tied["policy"], reference=tied["reference"], beta=0.5, device="cpu", dtype=dtype)
    delta = load_reward_model(tied["delta"], device="cpu", dtype=dtype)
    want = rewards(exact)
    assert max(abs(r) for r in want) > 10  # the tied delta matters
    assert rewards(delta) == pytest.approx(want, rel=1e-4, abs=1e-3)  # merged twice, they were ~2x


def test_loading_a_tied_delta_artifact_does_not_warn_about_merging(tied):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_reward_model(tied["delta"], device="cpu")
    assert not [w for w in caught if "tie_word_embeddings" in str(w.message)]


def test_merged_tied_policy_has_the_policy_weights(tied, monkeypatch):
    monkeypatch.setenv(COMPILE_VARIABLE, "0")
    merged = load_reward_model(tied["delta"], device="cpu", dtype="bf16-paired").policy
    want = tied["model"]
    for got, expected in ((merged.model.embed_tokens, want.model.embed_tokens), (merged.lm_head, want.lm_head)):
        assert (got.weight - expected.weight).abs().max() < 1e-3  # the delta is ~1, SVD-rounded


def test_delta_refuses_configs_that_change_the_forward(smollm_tokenizer, tmp_path, capsys):
    tok = smollm_tokenizer
    reference = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512)
    policy = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-2)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.add_(0.01)
    ref_path, pol_path = _save(reference, tok, tmp_path / "ref"), _save(policy, tok, tmp_path / "pol")
    assert extract(pol_path, ref_path, tmp_path / "x", "--delta-rank", "32") == 1
    one_line_error(capsys, "configs differ", "rms_norm_eps 0.01 vs 1e-06", "rope_parameters", "without --delta-rank")
    assert not (tmp_path / "x").exists()
    assert extract(pol_path, ref_path, tmp_path / "exact") == 0  # each model runs on its own config: fine


def test_delta_ignores_bookkeeping_config_fields(smollm_tokenizer, tmp_path):
    tok = smollm_tokenizer
    reference = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512)
    policy = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512, use_cache=False, attention_dropout=0.1)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        policy.model.layers[0].mlp.down_proj.weight.add_(0.01)
    ref_path, pol_path = _save(reference, tok, tmp_path / "ref"), _save(policy, tok, tmp_path / "pol")
    assert extract(pol_path, ref_path, tmp_path / "d", "--delta-rank", "2") == 0


def test_delta_fidelity_with_a_pickle_reference(smollm_tokenizer, tmp_path, capsys):
    tok = smollm_tokenizer
    reference = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512)
    ref_path = _save(reference, tok, tmp_path / "ref", safe=False)
    pol_path = _save(_with_vocab_delta(reference, 2, 7), tok, tmp_path / "pol")
    assert extract(pol_path, ref_path, tmp_path / "d", "--delta-rank", "2", "--allow-pickle", "--fidelity-data",
                   str(PREFS), "--fidelity-limit", "2") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "the reference has pickle weights only" in err and "--allow-pickle" in err
    assert Manifest.load(tmp_path / "d").metrics["fidelity"]["pairs"] == 2


def test_max_length_defaults_to_the_context_and_is_checked(smollm_tokenizer, tmp_path, capsys):
    tok = smollm_tokenizer
    short = _save(make_tiny_llama(seed=4, vocab_size=len(tok), max_position_embeddings=64), tok, tmp_path / "p")
    ref = _save(make_tiny_llama(vocab_size=len(tok), max_position_embeddings=64), tok, tmp_path / "r")
    argv = ["extract", "--policy", short, "--reference", ref, "--beta", "0.5", "--device", "cpu", "--output"]
    assert main([*argv, str(tmp_path / "a")]) == 0
    assert Manifest.load(tmp_path / "a").tokenization["max_length"] == 64  # not the default 2048
    assert main([*argv, str(tmp_path / "b"), "--max-length", "65"]) == 1
    one_line_error(capsys, "--max-length 65 exceeds the models' context of 64 positions")
    assert main([*argv, str(tmp_path / "c"), "--max-length", "32"]) == 0
    assert Manifest.load(tmp_path / "c").tokenization["max_length"] == 32


def test_a_rank_past_break_even_is_capped_per_layer_and_warned(tied, tmp_path, capsys):
    capsys.readouterr()
    assert extract(tied["policy"], tied["reference"], tmp_path / "big", "--delta-rank", "100000") == 0
    err = capsys.readouterr().err
    assert "warning: --delta-rank 100000 is past the break-even rank of" in err
    assert "delta rank 100000 (per layer at most its smaller side: ranks" in err
    ranks = Manifest.load(tmp_path / "big").metrics["delta"]["ranks"]
    assert ranks["max"] < 100000


def test_a_delta_that_stores_norms_runs_paired_with_the_reference_norms(smollm_tokenizer, tmp_path, monkeypatch):
    """Norms an adapter changes are PEFT ``modules_to_save``: bf16-paired must give the base's copy to π_ref."""
    monkeypatch.setenv(COMPILE_VARIABLE, "0")
    reference = make_tiny_llama(vocab_size=len(smollm_tokenizer), max_position_embeddings=512)
    policy = make_tiny_llama(vocab_size=len(smollm_tokenizer), max_position_embeddings=512)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        policy.model.layers[0].input_layernorm.weight.mul_(1.5)
        policy.model.norm.weight.mul_(0.7)
        policy.model.layers[1].mlp.down_proj.weight.add_(0.05)
    ref_path = _save(reference, smollm_tokenizer, tmp_path / "ref")
    pol_path = _save(policy, smollm_tokenizer, tmp_path / "pol")
    assert extract(pol_path, ref_path, tmp_path / "delta", "--delta-rank", "2") == 0
    want = rewards(load_reward_model(policy=pol_path, reference=ref_path, beta=0.5, device="cpu"))
    assert rewards(load_reward_model(str(tmp_path / "delta"), device="cpu")) == pytest.approx(want, abs=1e-5)
    paired = rewards(load_reward_model(str(tmp_path / "delta"), device="cpu", dtype="bf16-paired"))
    assert max(abs(r) for r in want) > 0.05  # with the policy's norms for π_ref too, they were 0.02-0.08 off
    assert paired == pytest.approx(want, abs=2e-3)


def test_a_delta_of_norms_only_is_stored_whole_and_said_so(smollm_tokenizer, tmp_path, capsys):
    reference = make_tiny_llama(vocab_size=len(smollm_tokenizer), max_position_embeddings=512)
    policy = make_tiny_llama(vocab_size=len(smollm_tokenizer), max_position_embeddings=512)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        policy.model.norm.weight.mul_(0.5)
    ref_path = _save(reference, smollm_tokenizer, tmp_path / "ref")
    pol_path = _save(policy, smollm_tokenizer, tmp_path / "pol")
    assert extract(pol_path, ref_path, tmp_path / "delta", "--delta-rank", "2") == 0
    assert "delta rank 2 (no linear layer differs): 0 linear layers" in capsys.readouterr().err
    want = rewards(load_reward_model(policy=pol_path, reference=ref_path, beta=0.5, device="cpu"))
    assert max(abs(r) for r in want) > 0.01
    assert rewards(load_reward_model(str(tmp_path / "delta"), device="cpu")) == pytest.approx(want, abs=1e-5)

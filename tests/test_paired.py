"""``bf16-paired``: policy and reference in one pass, the policy as the reference plus an fp32 difference."""

import copy
import random

import pytest
import torch

from dpo import paired
from dpo.cli import main
from dpo.encoding import Encoded
from dpo.errors import DpormError
from dpo.logprobs import sequence_logprobs
from dpo.models import load_model, mix_precision
from dpo.paired import LOW_RANK_TOLERANCE, PairedModel, _PairedHead, low_rank_delta, paired_support
from dpo.paired_ops import COMPILE_VARIABLE, Fused
from dpo.scorer import RewardModel, load_reward_model

try:
    from tests.conftest import make_tiny_llama
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import make_tiny_llama

SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def _fine_tuned(reference, scale: float = 0.02, seed: int = 1):
    """reference + a small dense change of every weight, as a DPO fine-tune leaves it."""
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p += scale * p.abs().mean() * torch.randn(p.shape, generator=g)
    return policy


def _seqs(n: int = 10, vocab: int = 97, seed: int = 0) -> list[Encoded]:
    """Pairs of responses sharing a prompt, plus a lone sequence and a one-token response."""
    rng = random.Random(seed)
    words = lambda k: tuple(rng.randrange(3, vocab) for _ in range(k))  # noqa: E731
    out = []
    for _ in range(n // 2):
        prompt = words(rng.randrange(2, 30))
        out += [Encoded(prompt, words(rng.randrange(1, 40))), Encoded(prompt, words(rng.randrange(1, 40)))]
    return out + [Encoded(words(5), words(1)), Encoded(words(1), words(7))]


@pytest.fixture(scope="module")
def pair():
    reference = make_tiny_llama(**SIZE)
    return _fine_tuned(reference), reference


def _log_ratios(policy, reference, seqs) -> torch.Tensor:
    with torch.inference_mode():
        return sequence_logprobs(policy, seqs).logp - sequence_logprobs(reference, seqs).logp


def test_both_models_match_fp32(pair):
    policy, reference = pair
    seqs = _seqs()
    got_policy, got_reference = PairedModel(policy, reference).logprobs(seqs)
    with torch.inference_mode():
        want_policy, want_reference = sequence_logprobs(policy, seqs), sequence_logprobs(reference, seqs)
    # bf16 matmuls: each model's log-probs are bf16-accurate, their difference much better (next test).
    torch.testing.assert_close(got_reference.token_logps, want_reference.token_logps, atol=0.05, rtol=0)
    torch.testing.assert_close(got_policy.token_logps, want_policy.token_logps, atol=0.05, rtol=0)
    # The policy is its own model, not the reference again: the per-token gap is kept (max ~0.022, error ~2e-3).
    want_gap = want_policy.token_logps - want_reference.token_logps
    assert want_gap.abs().max() > 3 * 5e-3
    torch.testing.assert_close(got_policy.token_logps - got_reference.token_logps, want_gap, atol=5e-3, rtol=0)
    assert torch.equal(got_policy.tokens, want_policy.tokens)
    assert got_policy.logp.dtype == torch.float32


def test_log_ratio_error_is_far_below_bf16_mixed(pair):
    policy, reference = pair
    seqs = _seqs(16)
    exact = _log_ratios(policy, reference, seqs)
    a, b = PairedModel(policy, reference).logprobs(seqs)
    paired_error = (a.logp - b.logp - exact).abs().mean()
    mixed = [mix_precision(copy.deepcopy(m)) for m in (policy, reference)]
    mixed_error = (_log_ratios(*mixed, seqs) - exact).abs().mean()
    # Measured here: paired ~35x below bf16-mixed (the rounding of the large products is shared).
    assert paired_error < mixed_error / 3, (paired_error, mixed_error)


def _lora_tuned(reference, rank: int = 2, scale: float = 0.05, seed: int = 2):
    """reference + a rank-``rank`` change B·A of every decoder linear map, as a merged LoRA leaves it."""
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in policy.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                n, k = m.weight.shape
                b, a = torch.randn(n, rank, generator=g), torch.randn(rank, k, generator=g)
                m.weight += scale * m.weight.abs().mean() * (b @ a) / rank**0.5
    return policy


def test_low_rank_deltas_are_found_and_full_rank_ones_refused():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(300, 3, generator=g) @ torch.randn(3, 200, generator=g)
    b, a = low_rank_delta(exact)
    assert b.shape == (300, 3) and a.shape == (3, 200)
    torch.testing.assert_close(b @ a, exact, atol=1e-4, rtol=0)
    # Rank 3 plus float32-merge-sized noise is still rank 3; the noise is far below the tolerance.
    noisy = exact + 1e-7 * torch.randn(300, 200, generator=g)
    assert low_rank_delta(noisy)[0].shape[1] == 3
    # A dense change (a full fine-tune) is refused: no small rank reaches the tolerance.
    assert low_rank_delta(torch.randn(300, 200, generator=g)) is None
    # A truncation error above the tolerance is refused even when the leading directions are few.
    tail = exact + 10 * LOW_RANK_TOLERANCE * exact.norm() / 245 * torch.randn(300, 200, generator=g)
    assert low_rank_delta(tail) is None
    b, a = low_rank_delta(torch.zeros(30, 20))
    assert b.shape == (30, 0) and a.shape == (0, 20)
    # Non-finite deltas (and norms past float32) keep the dense path, which carries them as they are.
    for bad in (float("nan"), float("inf")):
        broken = exact.clone()
        broken[3, 4] = bad
        assert low_rank_delta(broken) is None
    assert low_rank_delta(exact * 1e30) is None


def test_low_rank_policy_runs_narrow_difference_gemms_as_accurately(pair, monkeypatch):
    _, reference = pair
    policy, seqs = _lora_tuned(reference), _seqs(16)
    model = PairedModel(policy, reference)
    ranks = {layer.qkv.rank for layer in model.layers} | {layer.down.rank for layer in model.layers}
    assert ranks == {6, 2}  # q, k and v each rank 2, concatenated; down alone
    assert model.head.paired.rank == 0  # the LM head is unchanged
    exact = _log_ratios(policy, reference, seqs)
    a, b = model.logprobs(seqs)
    low_rank_error = (a.logp - b.logp - exact).abs().mean()
    mixed = [mix_precision(copy.deepcopy(m)) for m in (policy, reference)]
    mixed_error = (_log_ratios(*mixed, seqs) - exact).abs().mean()
    assert low_rank_error < mixed_error / 3, (low_rank_error, mixed_error)
    # The same pass with every delta dense, as a full fine-tune runs.
    monkeypatch.setattr(paired, "low_rank_delta", lambda delta: None)
    c, d = PairedModel(policy, reference).logprobs(seqs)
    dense_error = (c.logp - d.logp - exact).abs().mean()
    # Measured: 2e-4 against 1e-4 (A and x_π·Aᵀ are rounded too), both ~20x below bf16-mixed's 3.4e-3.
    assert low_rank_error < 3 * dense_error, (low_rank_error, dense_error)


def test_identical_models_give_exactly_zero(pair):
    _, reference = pair
    a, b = PairedModel(reference, copy.deepcopy(reference)).logprobs(_seqs())
    assert torch.equal(a.token_logps, b.token_logps)


def test_results_do_not_depend_on_the_batch(pair):
    policy, reference = pair
    model, seqs = PairedModel(policy, reference), _seqs()
    together = model.logprobs(seqs)
    for i in (0, 1, len(seqs) - 1):
        alone = model.logprobs([seqs[i]])
        for got, want in zip(alone, together, strict=True):
            torch.testing.assert_close(got.per_token(0), want.per_token(i), atol=1e-4, rtol=0)


def test_qwen2_biases_and_untied_heads():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, max_position_embeddings=256, tie_word_embeddings=False, **SIZE)
    reference = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    assert reference.model.layers[0].self_attn.q_proj.bias is not None
    policy = _fine_tuned(reference, seed=2)
    seqs = _seqs()
    a, b = PairedModel(policy, reference).logprobs(seqs)
    want = _log_ratios(policy, reference, seqs)
    assert want.abs().max() > 10 * 2e-3  # the tolerance cannot pass a policy scored as the reference
    torch.testing.assert_close(a.logp - b.logp, want, atol=2e-3, rtol=0)


def test_scorer_rewards_and_precision(pair, smollm_tokenizer):
    policy, reference = pair
    seqs = _seqs()
    exact = RewardModel(policy, reference, smollm_tokenizer, beta=0.5).score_encoded(seqs)
    model = RewardModel(policy, reference, smollm_tokenizer, beta=0.5, paired=True)
    assert model.precision == "bf16-paired" and model.ref_cache.capacity == 0
    model.warm_up()  # compiles the fused steps (a server does this before /ready)
    got = model.score_encoded(seqs, normalize="mean", token_rewards=True)
    assert max(abs(w.reward) / len(s.response_ids) for w, s in zip(exact, seqs, strict=True)) > 10 * 1e-4
    for g, w, s in zip(got, exact, seqs, strict=True):
        assert g.reward == pytest.approx(w.reward / len(s.response_ids), abs=1e-4)
        assert g.logp_ref is not None and not g.cached_ref and len(g.token_rewards) == len(s.response_ids)
    free = model.score_encoded(seqs, reference_free=True)
    assert all(f.logp_ref is None and f.reward == pytest.approx(0.5 * f.logp_policy) for f in free)


def test_unsupported_models_and_setups_are_refused(pair, smollm_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    policy, reference = pair
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2))
    assert "llama" in paired_support(gpt2)
    windowed = MistralForCausalLM(MistralConfig(vocab_size=97, sliding_window=8, **SIZE))
    assert "sliding" in paired_support(windowed)
    assert paired_support(reference) is None
    biased = copy.deepcopy(reference)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(biased.config.vocab_size))
    assert "bias" in paired_support(biased)
    with pytest.raises(DpormError, match="architectures"):
        PairedModel(make_tiny_llama(**(SIZE | {"num_hidden_layers": 2})), reference)
    with pytest.raises(DpormError, match="reference-free"):
        RewardModel(policy, None, smollm_tokenizer, beta=0.1, paired=True)
    with pytest.raises(DpormError, match="with its reference"):
        load_model("unused", dtype="bf16-paired")


def test_cli_scores_with_bf16_paired_and_train_refuses_it(smollm_tokenizer, tmp_path, capsys):
    reference = make_tiny_llama(vocab_size=len(smollm_tokenizer), **SIZE)
    for name, model in (("policy", _fine_tuned(reference)), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        smollm_tokenizer.save_pretrained(tmp_path / name)
    loaded = load_reward_model(policy=str(tmp_path / "policy"), reference=str(tmp_path / "reference"), beta=0.1,
                               dtype="bf16-paired")  # fmt: skip
    assert loaded.precision == "bf16-paired" and loaded.paired is not None
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go away."}\n')
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"), "--beta", "0.1"]
    assert main(argv + ["--data", str(data), "--dtype", "bf16-paired", "--output", str(out)]) == 0
    assert out.read_text().count("\n") == 1
    capsys.readouterr()
    assert main(["train", "--dtype", "bf16-paired", "--data", str(data), "--output", str(tmp_path / "run")]) == 1
    assert "for scoring" in capsys.readouterr().err


def test_adapter_artifact_runs_paired_as_base_plus_merged_copy(smollm_tokenizer, tmp_path):
    reference = make_tiny_llama(vocab_size=len(smollm_tokenizer), **SIZE)
    policy = _fine_tuned(reference)
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        smollm_tokenizer.save_pretrained(tmp_path / name)
    argv = ["extract", "--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"), "--beta",
            "0.5", "--delta-rank", "64", "--max-length", "128", "--output", str(tmp_path / "rm")]  # fmt: skip
    assert main(argv) == 0
    exact, paired = (load_reward_model(str(tmp_path / "rm"), dtype=d) for d in ("fp32", "bf16-paired"))
    assert exact.reference == "adapter" and paired.precision == "bf16-paired"
    assert type(paired.policy).__name__ == "LlamaForCausalLM"  # merged: no LoRA layers left
    prompts, responses = ["Tell me one fact about the moon."] * 3, ["It orbits the Earth.", "No.", "Rock and dust."]
    want, got = exact.score(prompts, responses), paired.score(prompts, responses)
    assert max(abs(w.reward) for w in want) > 10 * 5e-4
    assert [g.reward for g in got] == pytest.approx([w.reward for w in want], abs=5e-4)


def test_paired_head_shares_the_rounding_of_the_logits():
    """Both heads' log-probs from bf16 GEMMs: each bf16-accurate, their difference far better than bf16 apart."""
    g = torch.Generator().manual_seed(0)
    vocab, hidden, rows = 5000, 64, 600  # three vocabulary tiles and two row blocks, both with a ragged end
    base = 0.6 * torch.randn(vocab, hidden, generator=g)  # logits of magnitude 10-30, as a real LM's
    heads = []
    for change in (0.0, 0.02):  # the policy's head: the reference's plus a small dense change
        head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
        head.weight.copy_(base * (1 + change * torch.randn(vocab, hidden, generator=g)))
        heads.append(type("Model", (), {"get_output_embeddings": lambda self, h=head: h})())
    reference, policy = heads
    h_ref = torch.randn(rows, hidden, generator=g)
    h_pol = h_ref + 0.02 * torch.randn(rows, hidden, generator=g)
    logits = h_ref @ reference.get_output_embeddings().weight.t()
    targets = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)  # tokens the model finds likely

    def logps(h, model, dtype=torch.float32):
        logits = (h.to(dtype) @ model.get_output_embeddings().weight.to(dtype).t()).float()
        return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    exact = (logps(h_pol, policy), logps(h_ref, reference))
    apart = (logps(h_pol, policy, torch.bfloat16), logps(h_ref, reference, torch.bfloat16))
    got = _PairedHead(policy, reference, torch.bfloat16)(h_pol, h_ref, targets)
    for g_, a, e in zip(got, apart, exact, strict=True):  # each model: as accurate as a bf16 head alone
        assert (g_ - e).abs().mean() <= (a - e).abs().mean() * 1.5
    paired_error = (got[0] - got[1] - (exact[0] - exact[1])).abs().mean()
    assert paired_error < (apart[0] - apart[1] - (exact[0] - exact[1])).abs().mean() / 5


def test_compiled_steps_compute_what_the_eager_code_computes(pair, monkeypatch):
    policy, reference = pair
    model, seqs = PairedModel(policy, reference), _seqs()
    monkeypatch.setenv(COMPILE_VARIABLE, "1")
    compiled = model.logprobs(seqs)
    monkeypatch.setenv(COMPILE_VARIABLE, "0")
    eager = model.logprobs(seqs)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c.token_logps, e.token_logps, atol=1e-3, rtol=0)


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setenv(COMPILE_VARIABLE, "1")
    monkeypatch.setattr(Fused, "broken", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    step = Fused(lambda x: x * 2)
    with pytest.warns(UserWarning, match="run eagerly"):
        assert torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))
    assert Fused.broken and torch.equal(step(torch.ones(3)), torch.full((3,), 2.0))

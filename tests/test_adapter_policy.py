"""A PEFT adapter directory as ``--policy`` (with its base as ``--reference``) for score and extract."""

import pytest
import torch

from dpo.errors import DpormError
from dpo.manifest import Manifest
from dpo.scorer import load_reward_model

try:
    from tests.conftest import make_tiny_llama
    from tests.test_extract import _save, extract, one_line_error, rewards
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import make_tiny_llama
    from test_extract import _save, extract, one_line_error, rewards


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, smollm_tokenizer):
    """A reference, a trained-looking rank-2 LoRA adapter over it, and the same policy merged into full weights."""
    from dpo.lora import apply_lora

    root = tmp_path_factory.mktemp("adapter-policy")
    tok = smollm_tokenizer
    base = lambda: make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512)  # noqa: E731
    peft = apply_lora(base(), r=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    peft.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    merged = peft.merge_and_unload()
    return {
        "adapter": str(root / "adapter"),
        "reference": _save(base(), tok, root / "reference"),
        "merged": _save(merged, tok, root / "merged"),
    }


def _exact(adapter) -> list[float]:
    return rewards(load_reward_model(policy=adapter["merged"], reference=adapter["reference"], beta=0.5, device="cpu"))


def test_score_an_adapter_policy_over_its_reference(adapter):
    model = load_reward_model(policy=adapter["adapter"], reference=adapter["reference"], beta=0.5, device="cpu")
    assert model.reference == "adapter"
    want = _exact(adapter)
    assert max(abs(r) for r in want) > 1e-2
    assert rewards(model) == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_an_adapter_policy_needs_its_reference(adapter):
    with pytest.raises(DpormError, match="is a PEFT adapter: give the model it adapts as --reference"):
        load_reward_model(policy=adapter["adapter"], beta=0.5, device="cpu")


@pytest.mark.parametrize("extra, stored_adapter", [((), True), (("--copy",), False), (("--delta-rank", "2"), True)])
def test_extract_an_adapter_policy(adapter, tmp_path, extra, stored_adapter):
    assert extract(adapter["adapter"], adapter["reference"], tmp_path / "a", *extra) == 0
    m = Manifest.load(tmp_path / "a")
    assert m.adapter == stored_adapter
    assert m.policy == ("policy" if extra else adapter["adapter"])
    got = rewards(load_reward_model(str(tmp_path / "a"), device="cpu"))
    assert got == pytest.approx(_exact(adapter), rel=1e-5, abs=1e-4)


def test_extract_refuses_an_adapter_whose_tokenizer_differs(adapter, tmp_path, capsys, smollm_tokenizer):
    import shutil

    other = tmp_path / "adapter"
    shutil.copytree(adapter["adapter"], other)
    tok = smollm_tokenizer.__class__.from_pretrained(adapter["adapter"])
    tok.chat_template = "{{ messages }}"
    tok.save_pretrained(other)
    assert extract(str(other), adapter["reference"], tmp_path / "x") == 1
    one_line_error(capsys, "chat templates differ")


def _head_adapter(tmp_path, tok, scale: float, seed: int, **config) -> str:
    """A rank-2 LoRA adapter on q_proj and the LM head, saved at ``tmp_path/adapter``; returns the reference dir."""
    from dpo.lora import apply_lora

    base = lambda: make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512, **config)  # noqa: E731
    peft = apply_lora(base(), r=2, targets="q_proj,lm_head")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    peft.save_pretrained(tmp_path / "adapter")
    return _save(base(), tok, tmp_path / "reference")


def test_delta_of_an_adapter_policy_over_tied_embeddings(tmp_path, smollm_tokenizer):
    """The merged policy is untied (its head has its own copy), the reference tied: still one architecture."""
    ref = _head_adapter(tmp_path, smollm_tokenizer, scale=0.5, seed=4, tie_word_embeddings=True)
    assert extract(str(tmp_path / "adapter"), ref, tmp_path / "d", "--delta-rank", "2") == 0
    exact = load_reward_model(policy=str(tmp_path / "adapter"), reference=ref, beta=0.5, device="cpu")
    want = rewards(exact)
    assert max(abs(r) for r in want) > 1e-2
    assert rewards(load_reward_model(str(tmp_path / "d"), device="cpu")) == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_bf16_paired_runs_an_adapter_policy_from_its_factors(adapter, monkeypatch):
    """No merged copy: W_ref is the base weight and B, A the adapter's own; the difference GEMMs are K + r wide.

    As accurate as the merged policy through the same pass, its delta found low-rank or kept dense.
    """
    from dpo import paired
    from dpo.lora import is_peft_model

    words = ["the", "moon", "is", "a", "rock", "that", "orbits", "earth", "and", "has", "no", "air", "at", "all"]
    prompts = ["Tell me one fact about the moon.", "What is the moon?"] * 6
    responses = [" ".join(words[i : i + 2 + i % 5]) for i in range(12)]

    def errors(policy: str, dtype: str):
        model = load_reward_model(policy=policy, reference=adapter["reference"], beta=0.5, device="cpu", dtype=dtype)
        got = [r.reward for r in model.score(prompts, responses)]
        return model, (torch.tensor(got) - torch.tensor(want)).abs()

    exact = load_reward_model(policy=adapter["merged"], reference=adapter["reference"], beta=0.5, device="cpu")
    want = [r.reward for r in exact.score(prompts, responses)]
    model, factored = errors(adapter["adapter"], "bf16-paired")
    assert model.reference == "adapter" and is_peft_model(model.policy)  # one copy of the base weights
    layer = model.paired.layers[0]
    assert (layer.qkv.rank, layer.o.rank, layer.gate_up.rank, layer.down.rank) == (6, 2, 4, 2)  # LoRA r = 2
    assert model.paired.head.paired.rank == 0
    merged, found = errors(adapter["merged"], "bf16-paired")  # the same delta, found by low_rank_delta
    assert merged.paired.layers[0].qkv.rank == 6
    monkeypatch.setattr(paired, "low_rank_delta", lambda delta: None)
    _, dense = errors(adapter["merged"], "bf16-paired")  # the 2K-wide differences of a full fine-tune
    # This toy adapter changes the model a lot (B ~ 0.5): bf16-level errors either way, of like size
    # (measured: mean 0.005 low-rank, 0.008 dense; max 0.015 and 0.049).
    assert torch.allclose(factored, found, atol=1e-3)  # balanced factors: as good as the SVD's (measured: equal)
    for err in (factored, found):
        assert err.mean() < 2 * dense.mean() and err.max() < 0.1, (err, dense)


def test_bf16_paired_merges_an_adapter_it_cannot_run_from_factors(tmp_path, smollm_tokenizer):
    """An adapter on the LM head (or embeddings, DoRA): the pass falls back to a merged copy of the policy."""
    ref = _head_adapter(tmp_path, smollm_tokenizer, scale=0.1, seed=5)
    want = rewards(load_reward_model(policy=str(tmp_path / "adapter"), reference=ref, beta=0.5, device="cpu"))
    model = load_reward_model(policy=str(tmp_path / "adapter"), reference=ref, beta=0.5, dtype="bf16-paired")
    assert isinstance(model.reference, torch.nn.Module) and model.paired.head.paired.rank == 2
    assert rewards(model) == pytest.approx(want, abs=0.05)


def test_bf16_paired_takes_a_peft_policy_beside_a_separate_reference(adapter, smollm_tokenizer):
    """A LoRA-wrapped policy object with its own reference model: the pass uses its adapted weights (base + B·A)."""
    from dpo.lora import load_adapter
    from dpo.models import load_model
    from dpo.scorer import RewardModel

    reference = load_model(adapter["reference"])
    wrapped = load_adapter(load_model(adapter["reference"]), adapter["adapter"])
    got = rewards(RewardModel(wrapped, reference, smollm_tokenizer, beta=0.5, paired=True))
    want = rewards(RewardModel(load_model(adapter["merged"]), reference, smollm_tokenizer, beta=0.5, paired=True))
    assert max(abs(r) for r in want) > 1e-2
    assert got == pytest.approx(want, abs=1e-3)

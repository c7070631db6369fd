"""RewardModel limits and bookkeeping: the effective max_length, reference-cache copies, paired results on CPU."""

import json
import re
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo.cli import main
from dpo.encoding import Encoded
from dpo.errors import DpormError, ResponseTooLongError
from dpo.logprobs import sequence_logprobs
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


def test_weights_that_do_not_fill_the_config_and_unlike_architectures_are_refused(
    gpt2_pair, smollm_tokenizer, tmp_path, capsys
):
    paths, data = gpt2_pair
    for name, layers, kind in (("short", 2, "missing"), ("long", 0, "unexpected")):
        bad = tmp_path / name
        shutil.copytree(paths["policy"], bad)
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(config | {"n_layer": layers}))
        assert main(["score", "--policy", str(bad), "--reference", paths["reference"], "--beta", "0.1",
                     "--data", data, "--output", str(tmp_path / "out.jsonl")]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert re.search(rf"do not match the model its config describes: \d+ {kind} \(e\.g\. transformer\.h\.", err)
        assert "Traceback" not in err
    deeper = tmp_path / "deeper"
    shutil.copytree(paths["policy"], deeper)
    config = GPT2Config(vocab_size=len(smollm_tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(deeper)
    with pytest.raises(DpormError, match="architectures differ: num_hidden_layers 2 vs 1"):
        load_reward_model(policy=str(deeper), reference=paths["reference"], beta=0.1, device="cpu")


def test_an_untied_policy_beside_its_tied_reference_loads(smollm_tokenizer, tmp_path):
    """A merged LoRA policy is untied (dpo.lora) while its reference shares head and embeddings: same computation."""
    reference = make_tiny_llama(vocab_size=len(smollm_tokenizer), tie_word_embeddings=True)
    policy = make_tiny_llama(vocab_size=len(smollm_tokenizer), tie_word_embeddings=False)
    policy.load_state_dict(reference.state_dict(), strict=False)
    with torch.no_grad():
        policy.lm_head.weight.copy_(reference.lm_head.weight)
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        smollm_tokenizer.save_pretrained(tmp_path / name)
    model = load_reward_model(policy=str(tmp_path / "policy"), reference=str(tmp_path / "reference"), beta=0.1)
    assert model.score([PROMPT], ["It has craters."])[0].reward == pytest.approx(0.0, abs=1e-5)


def test_weights_shaped_unlike_the_config_are_one_line(gpt2_pair, tmp_path):
    from dpo.models import load_model

    paths, _ = gpt2_pair
    bad = tmp_path / "wider-vocab"
    shutil.copytree(paths["policy"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(DpormError, match="do not match the model its config describes: some have other shapes"):
        load_model(str(bad))


def test_max_length_is_at_most_the_smaller_context():
    policy = make_tiny_llama(max_position_embeddings=128)
    reference = make_tiny_llama(max_position_embeddings=96)
    assert RewardModel(policy, reference, None, 0.5).max_length == 96
    assert RewardModel(policy, reference, None, 0.5, max_length=2048).max_length == 96  # capped
    assert RewardModel(policy, reference, None, 0.5, max_length=50).max_length == 50
    assert RewardModel(policy, None, None, 0.5).max_length == 128  # reference-free
    adapter = apply_lora(make_tiny_llama(max_position_embeddings=80), r=2)
    assert RewardModel(adapter, "adapter", None, 0.5).max_length == 80


SEQS = [Encoded((1, 2, 3), (4, 5)), Encoded((1, 2, 3), tuple(range(3, 60))), Encoded((7,), (8, 9, 10))]


def test_reference_cache_entries_own_their_storage():
    """A cached row is a copy, not a view keeping the batch's whole [rows, tokens] log-prob matrix alive."""
    model = RewardModel(make_tiny_llama(seed=1), make_tiny_llama(), None, 0.5)
    model.score_encoded(SEQS)
    entries = list(model.ref_cache._items.values())
    assert len(entries) == 3
    for entry in entries:
        assert entry.untyped_storage().nbytes() == entry.numel() * entry.element_size()


def test_reference_cache_evicts_the_least_recently_used():
    from dpo.scorer import ReferenceCache

    a, b, c, d = (Encoded((1,), (i,)) for i in range(4))
    cache = ReferenceCache(2)
    cache.put(a, torch.tensor([1.0]))
    cache.put(b, torch.tensor([2.0]))
    assert cache.get(a).item() == 1.0  # a is now the most recently used
    cache.put(c, torch.tensor([3.0]))  # evicts b
    assert cache.get(b) is None
    assert cache.get(a).item() == 1.0 and cache.get(c).item() == 3.0
    assert len(cache._items) == 2 and (cache.hits, cache.misses) == (3, 1)
    cache.put(a, torch.tensor([4.0]))  # replaced in place, and most recent: d evicts c
    cache.put(d, torch.tensor([5.0]))
    assert cache.get(c) is None and cache.get(a).item() == 4.0 and cache.get(d).item() == 5.0
    off = ReferenceCache(0)
    off.put(a, torch.tensor([1.0]))
    assert off.get(a) is None and len(off._items) == 0


class _OnDevice:
    """A per-token row left on an accelerator: nothing but ``.cpu()`` works on it (device-agnostic stand-in)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def cpu(self) -> torch.Tensor:
        return self.tensor.clone()


class _DeviceLogprobs:
    def __init__(self, out):
        self.out = out

    def per_token(self, i: int) -> _OnDevice:
        return _OnDevice(self.out.per_token(i))


class _FakePaired:
    """What :class:`dpo.paired.PairedModel` returns on CUDA: both models' log-probs on the device."""

    def __init__(self, policy, reference):
        self.policy, self.reference = policy, reference

    def logprobs(self, seqs):
        pol, ref = (sequence_logprobs(m, seqs) for m in (self.policy, self.reference))
        return _DeviceLogprobs(pol), _DeviceLogprobs(ref)


def test_paired_results_come_to_the_cpu_on_both_sides():
    policy, reference = make_tiny_llama(seed=1), make_tiny_llama()
    want = [r.reward for r in RewardModel(policy, reference, None, 0.5).score_encoded(SEQS)]
    model = RewardModel(policy, reference, None, 0.5)
    model.paired = _FakePaired(policy, reference)
    assert [r.reward for r in model.score_encoded(SEQS)] == pytest.approx(want, abs=1e-6)


def test_threads_sharing_an_adapter_model_get_the_rewards_of_one_thread(monkeypatch):
    import threading
    import time

    import dpo.scorer as scorer_module

    adapter = apply_lora(make_tiny_llama(), r=2)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # a trained adapter: the policy differs from its reference
    model = RewardModel(adapter, "adapter", None, 0.5, ref_cache_size=0)
    expected = [r.reward for r in model.score_encoded(SEQS)]
    assert any(abs(r) > 1e-3 for r in expected)

    def slow(m, seqs):  # widens each forward, so one thread's policy pass overlaps the other's reference pass
        time.sleep(0.1)
        return sequence_logprobs(m, seqs)

    monkeypatch.setattr(scorer_module, "sequence_logprobs", slow)
    got: list[list[float]] = []

    def score() -> None:
        got.append([r.reward for r in model.score_encoded(SEQS)])

    threads = [threading.Thread(target=score) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert got == [expected, expected]

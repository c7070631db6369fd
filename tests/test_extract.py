"""``dporm extract`` on tiny Llamas: exact artifacts, tokenizer/architecture checks, low-rank deltas."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo.cli import main
from dpo.delta import energy_rank, lowrank_factors
from dpo.errors import DpormError
from dpo.fidelity import average_ranks, spearman
from dpo.manifest import Manifest
from dpo.scorer import load_reward_model

try:
    from tests.conftest import make_tiny_llama
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import make_tiny_llama

PREFS = Path(__file__).parent / "data" / "prefs.jsonl"
PREFS_FIRST = json.loads(PREFS.read_text().splitlines()[0])
PROMPT = "Tell me one fact about the moon."
RESPONSES = ["The moon orbits the Earth.", "No.", "It is made of rock and dust, and it has no air."]


def _save(model, tokenizer, path: Path, safe: bool = True) -> str:
    if safe:
        model.save_pretrained(path, safe_serialization=True)
    else:  # transformers 5 writes safetensors whatever it is asked: a pickle checkpoint by hand
        path.mkdir(parents=True)
        model.config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    return str(path)


def _perturbed(reference, rank: int | None, scale: float, seed: int, norms: bool = False):
    """reference + a rank-``rank`` (None: full-rank) random delta on every decoder linear weight."""
    policy = make_tiny_llama(vocab_size=reference.config.vocab_size, max_position_embeddings=512)
    policy.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in policy.model.layers.modules():
            if isinstance(m, torch.nn.Linear):
                out, inp = m.weight.shape
                k = rank or min(out, inp)
                m.weight += scale * torch.randn(out, k, generator=g) @ torch.randn(k, inp, generator=g) / k**0.5
        if norms:
            policy.model.layers[0].input_layernorm.weight.mul_(1.5)
    return policy


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm_tokenizer):
    root = tmp_path_factory.mktemp("extract-models")
    reference = make_tiny_llama(vocab_size=len(smollm_tokenizer), max_position_embeddings=512)
    return {
        "tokenizer": smollm_tokenizer,
        "reference": _save(reference, smollm_tokenizer, root / "reference"),
        "rank2": _save(_perturbed(reference, 2, 0.2, 1), smollm_tokenizer, root / "rank2"),
        "full": _save(_perturbed(reference, None, 0.2, 2, norms=True), smollm_tokenizer, root / "full"),
        "other": _save(
            make_tiny_llama(seed=3, vocab_size=len(smollm_tokenizer), max_position_embeddings=512),
            smollm_tokenizer,
            root / "other",
        ),  # fmt: skip
        "root": root,
    }


def extract(policy: str, reference: str, output: Path, *extra: str) -> int:
    argv = ["extract", "--policy", policy, "--reference", reference, "--beta", "0.5", "--output", str(output)]
    return main(argv + ["--max-length", "128", "--device", "cpu", *extra])


def rewards(model) -> list[float]:
    return [r.reward for r in model.score([PROMPT] * len(RESPONSES), RESPONSES)]


def one_line_error(capsys, *fragments: str) -> None:
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("dporm:")]  # not the fixtures' progress bars
    assert len(err) == 1 and err[0].startswith("dporm: error:") and "Traceback" not in text, text
    assert all(f in err[0] for f in fragments), err[0]


def test_extract_artifact_scores_like_the_pair(models, tmp_path, capsys):
    assert extract(models["other"], models["reference"], tmp_path / "a", "--normalize", "mean") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "a")
    m = Manifest.load(tmp_path / "a")
    assert m.policy == models["other"] and m.reference == models["reference"] and not m.adapter
    assert m.beta == 0.5 and m.normalize == "mean" and m.tokenization["max_length"] == 128
    assert m.tokenization["chat_template"] == models["tokenizer"].chat_template
    p = m.provenance
    assert len(p["policy_sha256"]) == 64 and p["policy_sha256"] != p["reference_sha256"] and p["dporm_version"]
    assert p["source_policy"] == models["other"] and "command" in p and "created" in p

    artifact = load_reward_model(str(tmp_path / "a"), device="cpu")
    direct = load_reward_model(policy=models["other"], reference=models["reference"], beta=0.5, device="cpu")
    assert artifact.normalize == "mean" and artifact.info["policy_sha256"] == p["policy_sha256"]
    got, want = rewards(artifact), [r.reward for r in direct.score([PROMPT] * 3, RESPONSES, normalize="mean")]
    assert got == pytest.approx(want, abs=1e-6) and len(set(got)) == 3

    assert extract(models["other"], models["reference"], tmp_path / "c", "--copy") == 0
    copied = Manifest.load(tmp_path / "c")
    assert copied.policy == "policy" and (tmp_path / "c" / "policy" / "model.safetensors").is_file()
    got = rewards(load_reward_model(str(tmp_path / "c"), device="cpu"))
    assert got == pytest.approx([r.reward for r in direct.score([PROMPT] * 3, RESPONSES)], abs=1e-6)


def _variant(models, name: str, change) -> str:
    tok = models["tokenizer"].__class__.from_pretrained(models["reference"])
    change(tok)
    path = models["root"] / name
    if not path.exists():
        _save(make_tiny_llama(vocab_size=len(models["tokenizer"]), max_position_embeddings=512), tok, path)
    return str(path)


def _lowercase(tokenizer) -> None:
    from tokenizers import normalizers

    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("vocab", lambda t: t.add_tokens(["<extra-token>"]), "do not share a vocabulary"),
        ("template", lambda t: setattr(t, "chat_template", "{{ messages }}"), "chat templates differ"),
        ("special", lambda t: setattr(t, "eos_token", "<|endoftext|>"), "special tokens differ"),
        ("lowercase", _lowercase, "without special tokens, from token 0"),
    ],
)
def test_tokenizer_mismatch_is_one_line(models, tmp_path, capsys, name, change, message):
    assert extract(_variant(models, name, change), models["reference"], tmp_path / "x") == 1
    one_line_error(capsys, message)
    assert not (tmp_path / "x").exists()


def test_bos_settings_matter_only_without_a_chat_template(models):
    """With a chat template the template alone places BOS/EOS; without one, the tokenizer adds them."""
    from dpo.pair_checks import check_tokenizers_match

    load = lambda: models["tokenizer"].__class__.from_pretrained(models["reference"])  # noqa: E731
    plain, bos = load(), load()
    bos.add_bos_token = True
    check_tokenizers_match(plain, bos, "a", "b")  # both templated: accepted
    plain.chat_template = bos.chat_template = None
    with pytest.raises(DpormError, match=r"with special tokens, from token 0: \[19556, 28, 2260\] vs \[1, 19556"):
        check_tokenizers_match(plain, bos, "a", "b")

    class Broken:
        def __call__(self, *args, **kwargs):
            raise TypeError("no text\nsecond line")

    other = load()
    for t in (other, plain):
        t.chat_template = None
    other.__class__ = type("Failing", (other.__class__,), {"__call__": Broken.__call__})
    with pytest.raises(DpormError, match="cannot compare tokenizers a and b: TypeError no text$"):
        check_tokenizers_match(plain, other, "a", "b")


def test_a_policy_tokenizer_with_its_own_pad_token_is_accepted(models, tmp_path):
    policy = _variant(models, "pad", lambda t: setattr(t, "pad_token", "<|endoftext|>"))
    assert extract(policy, models["reference"], tmp_path / "x") == 0


def test_architecture_mismatch_and_option_errors_are_one_line(models, tmp_path, capsys):
    deeper = _save(make_tiny_llama(vocab_size=len(models["tokenizer"]), num_hidden_layers=3),
                   models["tokenizer"], tmp_path / "deeper")  # fmt: skip
    assert extract(deeper, models["reference"], tmp_path / "x") == 1
    one_line_error(capsys, "architectures differ", "num_hidden_layers 3 vs 2")
    assert extract(models["full"], models["reference"], tmp_path / "x", "--copy", "--delta-rank", "2") == 1
    one_line_error(capsys, "--copy conflicts with --delta-rank")
    assert extract(models["full"], models["reference"], tmp_path / "x", "--fidelity-data", str(PREFS)) == 1
    one_line_error(capsys, "--fidelity-data needs --delta-rank")
    assert extract(models["full"], str(tmp_path / "missing"), tmp_path / "x") == 1
    one_line_error(capsys, "no such model directory")
    assert extract(models["full"], models["reference"], tmp_path / "ok") == 0
    assert extract(models["full"], models["reference"], tmp_path / "ok") == 1
    one_line_error(capsys, "already exists and is not an empty directory")
    assert not list(tmp_path.glob(".*.partial"))
    assert extract(models["full"], models["reference"], tmp_path / "y", "--device", "gpu") == 1
    one_line_error(capsys, "gpu")


def test_output_in_the_current_directory(models, tmp_path, capsys, monkeypatch):
    """``--output .`` is refused with one line; ``--output ./new`` works and its files are readable by others."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert extract(models["other"], models["reference"], Path(".")) == 1
    one_line_error(capsys, "current directory")
    assert extract(models["other"], models["reference"], Path("./new"), "--copy") == 0
    files = [f for f in (tmp_path / "here" / "new").rglob("*") if f.is_file()]
    modes = {f.name: f.stat().st_mode & 0o777 for f in files}
    assert modes["model.safetensors"] == modes["dporm.json"] and modes["dporm.json"] & 0o044, modes


def test_named_chat_templates_are_recorded(models, tmp_path):
    named = {"default": models["tokenizer"].chat_template, "tool_use": "{{ messages }}"}
    policy = _variant(models, "named-policy", lambda t: setattr(t, "chat_template", named))
    reference = _variant(models, "named-reference", lambda t: setattr(t, "chat_template", named))
    assert extract(policy, reference, tmp_path / "a") == 0
    assert Manifest.load(tmp_path / "a").tokenization["chat_template"] == named
    assert len(rewards(load_reward_model(str(tmp_path / "a"), device="cpu"))) == 3


def test_identical_weights_warn(models, tmp_path, capsys):
    assert extract(models["reference"], models["reference"], tmp_path / "same") == 0
    assert "weights are identical" in capsys.readouterr().err
    assert rewards(load_reward_model(str(tmp_path / "same"), device="cpu")) == [0.0, 0.0, 0.0]


def _delta_rewards(models, tmp_path, policy: str, rank: int | str, *extra: str):
    out = tmp_path / f"delta-{policy}-{rank}"
    assert extract(models[policy], models["reference"], out, "--delta-rank", str(rank), *extra) == 0
    m = Manifest.load(out)
    assert m.adapter and m.policy == "policy" and (out / "policy" / "adapter_model.safetensors").is_file()
    delta = load_reward_model(str(out), device="cpu")
    assert delta.reference == "adapter"
    return m, rewards(delta), exact_rewards(models, policy)


_EXACT: dict[str, list[float]] = {}


def exact_rewards_of(models, policy: str, pair: dict) -> list[float]:
    exact = load_reward_model(policy=models[policy], reference=models["reference"], beta=0.5, device="cpu")
    exact.max_length = 128
    return [r.reward for r in exact.score([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])]


def exact_rewards(models, policy: str) -> list[float]:
    """Rewards of the exact policy/reference pair (computed once per policy)."""
    if policy not in _EXACT:
        pair = load_reward_model(policy=models[policy], reference=models["reference"], beta=0.5, device="cpu")
        _EXACT[policy] = rewards(pair)
    return _EXACT[policy]


def test_full_rank_delta_reproduces_the_rewards_and_norms(models, tmp_path, capsys):
    m, got, want = _delta_rewards(models, tmp_path, "full", 64)
    assert got == pytest.approx(want, abs=1e-4)
    d = m.metrics["delta"]
    assert d["norms_saved"] == ["model.layers.0.input_layernorm"] and d["layers"] == 14
    assert d["relative_frobenius_error"]["max"] < 1e-5 and d["adapter_parameters"] > 0
    mem = d["memory_bytes"]
    assert mem["saved"] == mem["policy_plus_reference"] - mem["reference_plus_adapter"]
    reference_bytes = sum(t.numel() * 4 for t in load_file(f"{models['reference']}/model.safetensors").values())
    assert mem["policy_plus_reference"] == 2 * reference_bytes  # same shapes, untied, float32
    assert mem["reference_plus_adapter"] == reference_bytes + 4 * d["adapter_parameters"]  # factors and norms too
    assert "memory: policy+reference" in capsys.readouterr().err
    saved = load_file(str(tmp_path / "delta-full-64" / "policy" / "adapter_model.safetensors"))
    for name, a in saved.items():  # B = U·√S and A = √S·Vᵀ: the singular values split evenly, ‖B‖ = ‖A‖
        if "lora_A" in name:
            b = saved[name.replace("lora_A", "lora_B")]
            assert b.norm() == pytest.approx(a.norm().item(), rel=1e-3), name


def test_exact_rank2_delta_with_k2_and_fidelity(models, tmp_path):
    m, got, want = _delta_rewards(models, tmp_path, "rank2", 2, "--fidelity-data", str(PREFS),
                                  "--fidelity-limit", "6", "--batch-size", "4")  # fmt: skip
    assert got == pytest.approx(want, abs=1e-4)
    assert m.metrics["delta"]["relative_frobenius_error"]["max"] < 1e-5
    fidelity = json.loads((tmp_path / "delta-rank2-2" / "fidelity.json").read_text())
    assert fidelity == m.metrics["fidelity"]
    assert fidelity["pairs"] == 6 and fidelity["agreement"] == 1.0 and fidelity["spearman"] == pytest.approx(1.0)
    assert fidelity["reward_abs_error_max"] < 1e-4
    scores = tmp_path / "scores.jsonl"  # dporm score needs nothing but the artifact
    assert main(["score", str(tmp_path / "delta-rank2-2"), "--data", str(PREFS), "--limit", "1", "--device", "cpu",
                 "--output", str(scores)]) == 0  # fmt: skip
    row = json.loads(scores.read_text())
    assert [row["reward_chosen"], row["reward_rejected"]] == pytest.approx(
        exact_rewards_of(models, "rank2", PREFS_FIRST), abs=1e-4
    )


def test_low_rank_loses_fidelity_and_reports_it(models, tmp_path):
    m, got, want = _delta_rewards(models, tmp_path, "full", 1, "--fidelity-data", str(PREFS), "--fidelity-limit", "8")
    d, f = m.metrics["delta"], m.metrics["fidelity"]
    assert d["relative_frobenius_error"]["mean"] > 0.3 and len(d["relative_frobenius_error"]["per_layer"]) == 14
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) > 1e-3
    assert f["pairs"] == 8 and 0 <= f["agreement"] <= 1 and -1 <= f["spearman"] < 0.9999
    assert f["reward_abs_error_max"] > 1e-3


def _with_vocab_delta(reference, rank: int, seed: int, **config):
    """reference + rank-``rank`` deltas on the input embeddings and (when untied) the LM head."""
    policy = make_tiny_llama(vocab_size=reference.config.vocab_size, max_position_embeddings=512, **config)
    policy.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in {id(m.weight): m.weight for m in (policy.model.embed_tokens, policy.lm_head)}.values():
            w += 0.5 * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
    return policy


@pytest.mark.parametrize("tied", [False, True])
def test_delta_stores_embedding_and_head_deltas(models, tmp_path, tied):
    tok = models["tokenizer"]
    reference = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512, tie_word_embeddings=tied)
    assert (reference.lm_head.weight is reference.model.embed_tokens.weight) == tied
    ref_path = _save(reference, tok, tmp_path / "ref")
    policy = _save(_with_vocab_delta(reference, 2, 7, tie_word_embeddings=tied), tok, tmp_path / "pol")
    assert extract(policy, ref_path, tmp_path / "delta", "--delta-rank", "2") == 0
    d = Manifest.load(tmp_path / "delta").metrics["delta"]
    assert set(d["relative_frobenius_error"]["per_layer"]) == {"model.embed_tokens", "lm_head"}
    assert d["relative_frobenius_error"]["max"] < 1e-5
    exact = load_reward_model(policy=policy, reference=ref_path, beta=0.5, device="cpu")
    delta = load_reward_model(str(tmp_path / "delta"), device="cpu")
    assert delta.reference == "adapter"
    assert rewards(delta) == pytest.approx(rewards(exact), rel=1e-5, abs=1e-4)  # |r| ~ 100s: fp32 sums
    assert max(abs(r) for r in rewards(exact)) > 1e-2  # the delta matters
    saved = load_file(str(tmp_path / "delta" / "policy" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) < reference.model.embed_tokens.weight.numel()  # factors only


def test_delta_refuses_changed_biases(models, tmp_path, capsys):
    tok = models["tokenizer"]
    reference = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512, attention_bias=True)
    policy = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=512, attention_bias=True)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        policy.model.layers[0].self_attn.q_proj.bias += 1.0
    ref_path, pol_path = _save(reference, tok, tmp_path / "ref"), _save(policy, tok, tmp_path / "pol")
    assert extract(pol_path, ref_path, tmp_path / "x", "--delta-rank", "4") == 1
    one_line_error(capsys, "model.layers.0.self_attn.q_proj.bias", "extract without --delta-rank")


def test_pickle_refused_unless_allowed_and_copy_stores_safetensors(models, tmp_path, capsys):
    policy = make_tiny_llama(seed=5, vocab_size=len(models["tokenizer"]), max_position_embeddings=512)
    path = _save(policy, models["tokenizer"], tmp_path / "pickled", safe=False)
    assert list(Path(path).glob("*.bin")) and not list(Path(path).glob("*.safetensors"))
    assert extract(path, models["reference"], tmp_path / "x") == 1
    one_line_error(capsys, "only safetensors")
    assert extract(path, models["reference"], tmp_path / "c", "--allow-pickle", "--copy") == 0
    stored = tmp_path / "c" / "policy"
    assert (stored / "model.safetensors").is_file() and not list(stored.glob("*.bin"))
    load_reward_model(str(tmp_path / "c"), device="cpu")  # no --allow-pickle needed any more
    assert extract(path, models["reference"], tmp_path / "r", "--allow-pickle") == 0
    assert "pickle weights only" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["extract", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--delta-rank", "--fidelity-data", "--copy", "--normalize", "--svd"))


def test_lowrank_factors_and_spearman():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    for method in ("exact", "lowrank"):
        b, a = lowrank_factors(delta, 2, method)
        assert b.shape == (40, 2) and a.shape == (2, 30)
        assert torch.allclose(b @ a, delta, atol=1e-5)
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_energy_rank_by_hand():
    # σ = 4, 2, 1, 1 (squares 16, 4, 1, 1 of 22): K=1 keeps 16/22 = 0.727, K=2 keeps 20/22 = 0.909, K=3 0.955.
    delta = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    assert [energy_rank(delta, e) for e in (0.5, 0.727, 0.8, 0.909, 0.95, 0.96)] == [1, 1, 2, 2, 3, 4]
    assert energy_rank(delta, 20 / 22) == 2  # exactly on the boundary: that K suffices
    assert energy_rank(delta, 1.0) == 4  # break-even rank of 8×8 is 4, and σ5.. are 0
    wide = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    assert energy_rank(wide, 1.0) == 5  # capped at ⌊6·300 / 306⌋ = 5, below the full rank 6
    assert energy_rank(torch.zeros(4, 4), 0.9) == 1


def test_auto_rank_finds_the_true_rank_and_reports_per_layer(models, tmp_path, capsys):
    m, got, want = _delta_rewards(models, tmp_path, "rank2", "auto", "--delta-energy", "0.999")
    assert got == pytest.approx(want, abs=1e-4)
    d = m.metrics["delta"]
    assert d["rank"] == "auto" and d["energy"] == 0.999
    assert d["ranks"]["min"] == d["ranks"]["max"] == 2 and len(d["ranks"]["per_layer"]) == 14
    assert "delta rank auto (energy 0.999, ranks 2–2" in capsys.readouterr().err
    m, _, _ = _delta_rewards(models, tmp_path, "full", "auto", "--delta-energy", "0.5")
    ranks, errors = m.metrics["delta"]["ranks"], m.metrics["delta"]["relative_frobenius_error"]
    assert ranks["min"] >= 1 and ranks["max"] < 16 and errors["max"] <= 0.5**0.5 + 1e-6


def test_delta_energy_option_errors(models, tmp_path, capsys):
    assert extract(models["full"], models["reference"], tmp_path / "x", "--delta-rank", "2", "--delta-energy",
                   "0.5") == 1  # fmt: skip
    one_line_error(capsys, "--delta-energy needs --delta-rank auto")
    assert extract(models["full"], models["reference"], tmp_path / "x", "--delta-rank", "auto", "--delta-energy",
                   "1.5") == 1  # fmt: skip
    one_line_error(capsys, "--delta-energy must be in (0, 1]")


def test_an_artifact_whose_reference_changed_is_refused(models, tmp_path, capsys):
    import shutil

    reference = tmp_path / "ref"
    shutil.copytree(models["reference"], reference)
    assert extract(models["other"], str(reference), tmp_path / "a") == 0
    shutil.copy(Path(models["other"]) / "model.safetensors", reference / "model.safetensors")  # retrained in place
    with pytest.raises(DpormError, match="reference's weights are not the ones this artifact was made from"):
        load_reward_model(str(tmp_path / "a"), device="cpu")
    loaded = load_reward_model(str(tmp_path / "a"), dtype="bf16", device="cpu")  # bf16 hashes differ: unchecked
    assert loaded.precision == "bfloat16" and loaded.info["reference"] == str(reference)


def test_auto_rank_says_where_break_even_keeps_it_from_the_energy(models, tmp_path, capsys):
    from dpo.delta import _energy_rank

    wide = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    k, kept = _energy_rank(wide, 1.0)
    assert k == 5 and 0.7 < kept < 1.0  # capped at break-even: the 6th direction's energy is not kept
    assert extract(models["full"], models["reference"], tmp_path / "a", "--delta-rank", "auto",
                   "--delta-energy", "0.9999") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "is out of reach in" in err and "break-even rank" in err
    capped = Manifest.load(tmp_path / "a").metrics["delta"]["energy_capped"]
    assert capped and all(0 < v < 0.9999 for v in capped.values())


def test_memory_baseline_counts_an_untied_but_equal_vocabulary_once():
    import copy

    from dpo.delta import _policy_bytes, parameter_bytes

    reference = make_tiny_llama(tie_word_embeddings=True)
    policy = copy.deepcopy(reference)
    policy.lm_head.weight = torch.nn.Parameter(policy.lm_head.weight.detach().clone())  # untied, as merged
    assert parameter_bytes(policy) > parameter_bytes(reference)
    assert _policy_bytes(policy, reference) == parameter_bytes(reference)
    with torch.no_grad():
        policy.lm_head.weight.add_(1.0)  # the head really differs: both matrices count
    assert _policy_bytes(policy, reference) == parameter_bytes(policy)


def test_fidelity_by_hand():
    """Three pairs and one that cannot be encoded, hand-picked rewards; expected values derived below."""
    from types import SimpleNamespace

    from dpo.errors import EncodingError
    from dpo.fidelity import reward_fidelity

    class Fake:  # encodes a response as itself; scores it from a table
        def __init__(self, table):
            self.table = table

        def encode(self, prompt, response):
            if response == "too long":
                raise EncodingError("too long")
            return response

        def score_encoded(self, seqs):
            return [SimpleNamespace(reward=self.table[s]) for s in seqs]

    exact = Fake({"c1": 1.0, "r1": 0.0, "c2": 0.5, "r2": 2.0, "c3": 3.0, "r3": -1.0})
    approx = Fake({"c1": 0.9, "r1": 0.1, "c2": 2.5, "r2": 2.0, "c3": 30.0, "r3": -1.0})
    pairs = [("p", "c1", "r1"), ("p", "c2", "r2"), ("p", "too long", "r1"), ("p", "c3", "r3")]
    got = reward_fidelity(exact, approx, pairs, batch_size=2, show_progress=False)
    # Decisions: exact c1>r1, c2<r2, c3>r3; approx c1>r1, c2>r2, c3>r3 → 2 of 3 agree; accuracies 2/3 and 3/3.
    # Ranks of (1, 0, 0.5, 2, 3, −1) are (4, 2, 3, 5, 6, 1); of (0.9, 0.1, 2.5, 2, 30, −1) (3, 2, 5, 4, 6, 1):
    # Σd² = 1 + 0 + 4 + 1 + 0 + 0 = 6, ρ = 1 − 6·6/(6·35) = 29/35 (Pearson of the raw values is 0.77).
    # |errors| = 0.1, 0.1, 2, 0, 27, 0: max 27, mean 29.2/6.
    assert got["pairs"] == 3 and got["skipped"] == 1
    assert got["agreement"] == pytest.approx(2 / 3) and got["spearman"] == pytest.approx(29 / 35)
    assert got["exact_accuracy"] == pytest.approx(2 / 3) and got["approx_accuracy"] == 1.0
    assert got["reward_abs_error_max"] == pytest.approx(27) and got["reward_abs_error_mean"] == pytest.approx(29.2 / 6)


def test_vocabularies_of_one_size_with_other_tokens_differ():
    from dpo.errors import DpormError
    from dpo.pair_checks import check_tokenizers_match

    class Vocab:  # only the vocabulary is read before the mismatch is found
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    with pytest.raises(DpormError, match=r"do not share a vocabulary \(same size, different tokens\)"):
        check_tokenizers_match(Vocab({"a": 0, "b": 1}), Vocab({"a": 0, "c": 1}), "policy", "reference")

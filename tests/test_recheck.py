"""bf16-paired rescoring of close decisions with the float32 models it keeps (``RewardModel.score_groups``)."""

import copy
import json

import pytest
import torch

from dpo.cli import main
from dpo.encoding import Encoded
from dpo.logprobs import SequenceLogprobs
from dpo.scorer import RewardModel, RewardResult, close_call

try:
    from tests.conftest import make_tiny_llama
except ModuleNotFoundError:  # a site-packages "tests" package (rewardbench ships one) shadows this directory
    from conftest import make_tiny_llama

SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
BETA = 0.5


def _result(reward: float, tokens: int = 1) -> RewardResult:
    return RewardResult(reward, 0.0, 0.0, 1, tokens, False, False)


def test_close_call_compares_each_reward_within_its_tolerance():
    # Summed rewards: each carries the tolerance itself, so a pair is close below twice it.
    assert close_call([_result(1.0), _result(1.25)], 0.15, mean=False)
    assert not close_call([_result(1.0), _result(1.31)], 0.15, mean=False)
    assert close_call([_result(3.0), _result(0.0), _result(3.2)], 0.15, mean=False)  # the adjacent 3.0 and 3.2
    assert not close_call([_result(3.0), _result(0.0), _result(3.4)], 0.15, mean=False)
    assert not close_call([_result(1.0)], 0.15, mean=False)  # nothing to compare
    # Mean rewards: a reward over n tokens carries tolerance/n (0.015 + 0.0075 = 0.0225 here).
    assert close_call([_result(1.0, 10), _result(1.02, 20)], 0.15, mean=True)
    assert not close_call([_result(1.0, 10), _result(1.03, 20)], 0.15, mean=True)


@pytest.fixture(scope="module")
def models():
    reference = make_tiny_llama(seed=3, **SIZE)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in policy.parameters():
            p += 0.05 * p.abs().mean() * torch.randn(p.shape, generator=g)
    return policy, reference


def _groups() -> list[list[Encoded]]:
    prompt = (5, 17, 33, 8, 61)
    same = (40, 41, 42, 43)
    return [
        [Encoded(prompt, same), Encoded(prompt, same)],  # a tie: margin exactly 0 in any precision
        [Encoded(prompt, (9, 12, 77)), Encoded(prompt, (70, 3, 3, 52, 11, 90))],
        [Encoded((7, 7, 2), (30, 31))],  # a group of one has no decision
    ]


def test_close_groups_are_rescored_by_the_float32_models(models, smollm_tokenizer):
    policy, reference = models
    paired = RewardModel(policy, reference, smollm_tokenizer, BETA, paired=True)
    exact = RewardModel(policy, reference, smollm_tokenizer, BETA)
    groups = _groups()
    plain = paired.score_groups(groups)  # recheck 0: the paired pass alone
    assert not any(r.rechecked for g in plain for r in g)
    far_margin = abs(plain[1][0].reward - plain[1][1].reward) / BETA  # log-ratio nats
    recheck = far_margin / 4  # the tie is close, the second pair is not
    got = paired.score_groups(groups, recheck=recheck)
    assert [[r.rechecked for r in g] for g in got] == [[True, True], [False, False], [False]]
    want = exact.score_encoded(groups[0])
    assert [r.reward for r in got[0]] == [w.reward for w in want]  # the float32 path, bit for bit
    assert [r.logp_ref for r in got[0]] == [w.logp_ref for w in want]
    assert [r.reward for r in got[1]] == [r.reward for r in plain[1]]
    # Everything is rechecked with a wide tolerance, so every reward is float32's.
    wide = paired.score_groups(groups, normalize="mean", recheck=10 * far_margin)
    flat = exact.score_encoded([s for g in groups for s in g], normalize="mean")
    assert [r.reward for g in wide[:2] for r in g] == pytest.approx([r.reward for r in flat[:4]], abs=1e-6)
    # Reference-free rewards and float32 models never recheck.
    assert not any(r.rechecked for g in paired.score_groups(groups, reference_free=True, recheck=99) for r in g)
    assert not any(r.rechecked for g in exact.score_groups(groups, recheck=99) for r in g)


def test_a_decision_the_paired_pass_flips_within_the_tolerance_is_float32s(models, smollm_tokenizer, monkeypatch):
    policy, reference = models
    model = RewardModel(policy, reference, smollm_tokenizer, BETA, paired=True)
    groups = _groups()[1:2]
    want = RewardModel(policy, reference, smollm_tokenizer, BETA).score_groups(groups)[0]
    margin = (want[0].reward - want[1].reward) / BETA
    honest = model.paired.logprobs

    def flipped(seqs):  # a rounding error of 1.2x the margin on the first response's log π
        pol, ref = honest(seqs)
        shifted = pol.token_logps.clone()
        shifted[0, 0] -= 1.2 * margin
        return SequenceLogprobs(pol.logp - torch.nn.functional.one_hot(torch.tensor(0), len(seqs)) * 1.2 * margin,
                                pol.tokens, shifted), ref  # fmt: skip

    monkeypatch.setattr(model.paired, "logprobs", flipped)
    wrong = model.score_groups(groups)[0]
    assert (wrong[0].reward > wrong[1].reward) != (want[0].reward > want[1].reward)
    right = model.score_groups(groups, recheck=abs(margin))[0]
    assert [r.reward for r in right] == [w.reward for w in want] and right[0].rechecked


def test_score_command_reports_rechecked_pairs(smollm_tokenizer, tmp_path, capsys):
    reference = make_tiny_llama(seed=3, vocab_size=len(smollm_tokenizer), **SIZE)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.lm_head.weight += 0.01 * torch.randn_like(policy.lm_head.weight)
    for name, model in (("policy", policy), ("reference", reference)):
        model.save_pretrained(tmp_path / name)
        smollm_tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Hi", "chosen": "Hello there.", "rejected": "Hello there."},  # a tie
            {"prompt": "Hi", "chosen": "Hello there, how can I help you today?", "rejected": "No."}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"),
            "--beta", "0.1", "--data", str(data), "--output", str(out)]  # fmt: skip
    assert main(argv + ["--dtype", "bf16-paired", "--recheck", "1e-9"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rechecked"] for r in records] == [True, False] and records[0]["margin"] == 0
    assert "1 close pair(s) rescored in float32 (--recheck 1e-09)" in capsys.readouterr().out
    assert main(argv) == 0 and "rechecked" not in out.read_text()  # float32: nothing to recheck
    assert main(argv + ["--dtype", "bf16-paired", "--recheck", "-1"]) == 1
    assert "--recheck must be a finite number of nats >= 0" in capsys.readouterr().err
    assert main(argv + ["--recheck", "0.5"]) == 1  # float32 has nothing to recheck: not silently ignored
    assert "--recheck applies to --dtype bf16-paired only" in capsys.readouterr().err
    # dporm eval rescores the same way, and records the tolerance with the run's configuration.
    models = argv[1:7]
    run = ["eval", "pairs", *models, "--data", str(data), "--output", str(tmp_path / "eval"), "--dtype", "bf16-paired"]
    assert main(run + ["--recheck", "10"]) == 0  # eval pairs skips the tie; the other pair is within 10 nats
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["config"]["model"]["recheck"] == 10, results["config"]
    assert results["data"]["rechecked"] == 1 and "1 close row(s) rescored in float32" in capsys.readouterr().out
    scores = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert [r.get("rechecked") for r in scores] == [True]


def test_eval_takes_recheck_offline_only(tmp_path, capsys):
    data = tmp_path / "rb.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "subset": "alpacaeval-easy"}) + "\n")
    argv = ["eval", "rewardbench", "--data", str(data), "--output", str(tmp_path / "out")]
    assert main(argv + ["--server", "http://127.0.0.1:9", "--recheck", "0.3"]) == 1
    assert "--recheck: offline only" in capsys.readouterr().err


def test_the_server_rechecks_close_preferences_and_reranks_when_asked(smollm_tokenizer):
    try:
        from tests.conftest import make_client
    except ModuleNotFoundError:
        from conftest import make_client

    reference = make_tiny_llama(seed=3, vocab_size=len(smollm_tokenizer), **SIZE)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.lm_head.weight += 0.01 * torch.randn_like(policy.lm_head.weight)
    paired = RewardModel(policy, reference, smollm_tokenizer, BETA, paired=True)
    exact = RewardModel(policy, reference, smollm_tokenizer, BETA)
    tie = {"prompt": "Hi", "response_a": "Hello there.", "response_b": "Hello there."}
    far = {"prompt": "Hi", "response_a": "Hello there, how can I help you today?", "response_b": "No."}
    want = [r.reward for r in exact.score(["Hi"] * 2, ["Hello there.", "Hello there."])]
    with make_client(paired, recheck=1e-9) as c:
        data = c.post("/v1/preference", json={"pairs": [tie, far]}).json()["data"]
        assert [d["rechecked"] for d in data] == [True, False]
        assert [data[0]["reward_a"], data[0]["reward_b"]] == want  # float32's rewards, bit for bit
        ranked = c.post("/v1/rerank", json={"query": "Hi", "documents": ["Hello there.", "No.", "Hello there."]})
        scores = {r["index"]: r["relevance_score"] for r in ranked.json()["results"]}
        assert [scores[0], scores[2]] == want  # the duplicates tie: the set is rescored in float32
        assert c.get("/info").json()["recheck"] == 1e-9
        assert "dporm_rechecked_groups_total 2.0" in c.get("/metrics").text  # the tie pair, the rerank set
    with make_client(paired) as c:  # off by default: the paired pass alone
        assert not any(d["rechecked"] for d in c.post("/v1/preference", json={"pairs": [tie]}).json()["data"])

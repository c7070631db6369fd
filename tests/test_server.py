"""The reward server on tiny Llamas: every endpoint, every error code, auth, batching, shutdown."""

import asyncio
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from dpo.encoding import encode
from dpo.manifest import Manifest
from dpo.scorer import load_reward_model
from server.app import Limits, State, create_app
from tests.conftest import free_port, make_client, make_tiny_llama

PROMPT = "Tell me one fact about the moon."
RESPONSES = ["The moon orbits the Earth.", "No.", "It is made of rock and dust, and it has no air."]


@pytest.fixture
def client(reward_model):
    with make_client(reward_model) as c:
        yield c


@functools.cache
def artifact_models(artifact: Path) -> tuple:
    """The artifact's policy and reference, loaded by transformers itself (not through dporm's loader)."""
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(artifact / name).eval() for name in ("policy", "reference"))


LOGPS: dict = {}


def expected_logps(artifact, tokenizer, prompt, response) -> tuple[float, float, int]:
    """Σ log π and Σ log π_ref over the response, and its token count: one plain forward of each model
    and a log-softmax, none of dporm's log-prob code."""
    key = (artifact, prompt, response)
    if key not in LOGPS:
        seq = encode(tokenizer, prompt, response, 128)
        ids, start = torch.tensor([seq.input_ids]), len(seq.prompt_ids)
        sums = []
        with torch.no_grad():
            for model in artifact_models(artifact):
                logits = model(ids).logits[0, start - 1 : -1].double()  # position t predicts token t + 1
                sums.append(float(torch.log_softmax(logits, -1).gather(-1, ids[0, start:, None]).sum()))
        LOGPS[key] = (sums[0], sums[1], len(seq.response_ids))
    return LOGPS[key]


def expected_reward(artifact, tokenizer, prompt, response, normalize="sum"):
    pol, ref, tokens = expected_logps(artifact, tokenizer, prompt, response)
    r = 0.5 * (pol - ref)  # the artifact's β is 0.5
    return r / tokens if normalize == "mean" else r


def test_rewards_is_the_definition(client, artifact, smollm_tokenizer):
    items = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    body = client.post("/v1/rewards", json={"items": items, "return_token_rewards": True}).json()
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for d, response in zip(body["data"], RESPONSES, strict=True):
        assert d["reward"] == pytest.approx(expected_reward(artifact, smollm_tokenizer, PROMPT, response), abs=1e-4)
        assert d["reward"] == pytest.approx(0.5 * (d["logp_policy"] - d["logp_ref"]), abs=1e-5)
        assert sum(d["token_rewards"]) == pytest.approx(d["reward"], abs=1e-4)  # fp32 sums in another order
        assert len(d["token_rewards"]) == d["response_tokens"] and not d["truncated"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + sum(d["response_tokens"] for d in body["data"])
    mean = client.post("/v1/rewards", json={"items": items[:1], "normalize": "mean"}).json()["data"][0]
    assert mean["reward"] == pytest.approx(body["data"][0]["reward"] / body["data"][0]["response_tokens"], rel=1e-6)
    free = client.post("/v1/rewards", json={"items": items[:1], "reference_free": True}).json()["data"][0]
    assert free["logp_ref"] is None and free["reward"] == pytest.approx(0.5 * free["logp_policy"], rel=1e-6)
    again = client.post("/v1/rewards", json={"items": items}).json()
    assert again["usage"]["cached_tokens"] == again["usage"]["total_tokens"]  # reference log-probs cached


def test_messages_equal_prompt_for_one_user_turn(client):
    a = client.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": "Yes."}]}).json()
    msgs = [{"role": "user", "content": PROMPT}]
    b = client.post("/v1/rewards", json={"items": [{"messages": msgs, "response": "Yes."}]}).json()
    assert a["data"][0]["reward"] == b["data"][0]["reward"]


def test_preference_is_bradley_terry(client):
    body = client.post(
        "/v1/preference", json={"pairs": [{"prompt": PROMPT, "response_a": RESPONSES[0], "response_b": RESPONSES[1]}]}
    ).json()
    d = body["data"][0]
    assert d["margin"] == pytest.approx(d["reward_a"] - d["reward_b"])
    assert d["prob_a_over_b"] == pytest.approx(1 / (1 + math.exp(-d["margin"])))


def test_rerank_sorts_by_reward_and_shares_the_prompt(client):
    rewards = client.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": r} for r in RESPONSES]})
    by_index = [d["reward"] for d in rewards.json()["data"]]
    docs = [RESPONSES[0], {"text": RESPONSES[1]}, RESPONSES[2]]
    body = client.post("/v1/rerank", json={"query": PROMPT, "documents": docs, "return_documents": True}).json()
    assert [r["index"] for r in body["results"]] == sorted(range(3), key=lambda i: -by_index[i])
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(sorted(by_index, reverse=True), abs=1e-5)
    assert body["results"][0]["document"]["text"] == RESPONSES[body["results"][0]["index"]]
    assert (
        body["id"].startswith("rerank-") and body["usage"]["prompt_tokens"] < rewards.json()["usage"]["prompt_tokens"]
    )
    top = client.post(
        "/v1/rerank", json={"messages": [{"role": "user", "content": PROMPT}], "documents": docs, "top_n": 1}
    ).json()
    assert len(top["results"]) == 1 and "document" not in top["results"][0]  # only when asked for
    tei = client.post(
        "/rerank", json={"query": PROMPT, "texts": RESPONSES, "raw_scores": True, "return_text": True}
    ).json()
    assert [r["index"] for r in tei] == [r["index"] for r in body["results"]]  # best first, as /v1/rerank
    assert [r["score"] for r in tei] == pytest.approx([by_index[r["index"]] for r in tei], abs=1e-5)
    assert [r["text"] for r in tei] == [RESPONSES[r["index"]] for r in tei]
    squashed = client.post("/rerank", json={"query": PROMPT, "texts": RESPONSES}).json()
    assert [r["index"] for r in squashed] == [r["index"] for r in tei]  # σ is monotone: the same order
    sigma = [1 / (1 + math.exp(-r["score"])) for r in tei]  # TEI's squashing of the raw reward
    assert [r["score"] for r in squashed] == pytest.approx(sigma, abs=1e-6)
    assert all(set(r) == {"index", "score"} for r in squashed)  # text only when asked for


def test_probes_info_models_metrics(client, artifact):
    assert client.get("/health").json() == {"status": "ok"} and client.get("/ready").status_code == 200
    info = client.get("/info").json()
    assert info["beta"] == 0.5 and len(info["models"]["reference_sha256"]) == 64 and info["limits"]["max_items"] == 256
    (model,) = client.get("/v1/models").json()["data"]
    assert model["id"] == artifact.name and model["max_model_len"] == info["max_length"] and model["created"] > 0
    spec = client.get("/openapi.json").json()["paths"]
    assert set(spec["/v1/rewards"]["post"]["responses"]) == {"200", "401", "413", "422", "429", "500", "503", "504"}
    assert set(spec["/health"]["get"]["responses"]) == {"200", "503"}  # no key, no body: no 401, 413 or 422
    assert "Retry-After" in spec["/v1/rerank"]["post"]["responses"]["429"]["headers"]
    assert list(spec["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    client.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": "Hi."}]})
    text = client.get("/metrics").text
    for name in (
        "dporm_requests_total",
        'dporm_forward_seconds_bucket{kind="main",le="0.005"}',
        "dporm_batch_tokens",
        "dporm_reference_cache_total",
        "dporm_queue_requests",
    ):
        assert name in text
    client.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": "Hi."}]})  # a cache hit
    cache, text = client.get("/info").json()["reference_cache"], client.get("/metrics").text
    assert cache["hits"] >= 1 and f'dporm_reference_cache_total{{result="hit"}} {float(cache["hits"])}' in text
    assert f'dporm_reference_cache_total{{result="miss"}} {float(cache["misses"])}' in text  # the same counts
    assert client.get("/openapi.json").json()["paths"]["/v1/rerank"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"items": [{"prompt": PROMPT}]}, 422),
        ({"items": [{"prompt": PROMPT, "messages": [], "response": "x"}]}, 422),
        ({"items": []}, 422),
        ({"items": [{"prompt": PROMPT, "response": "x"}], "normalize": "max"}, 422),
        ({"items": [{"prompt": PROMPT, "response": "x"}] * 257}, 413),
        ({"items": [{"prompt": PROMPT, "response": "word " * 300}]}, 413),
        ({"items": [{"prompt": "word " * 300, "response": "x"}]}, 413),
    ],
)
def test_errors_share_one_schema(client, body, code):
    response = client.post("/v1/rewards", json=body)
    assert response.status_code == code
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]


def test_truncate_cuts_the_prompt_instead_of_413(client):
    body = client.post("/v1/rewards", json={"items": [{"prompt": "word " * 300, "response": "x"}], "truncate": True})
    assert body.status_code == 200 and body.json()["data"][0]["truncated"]


def test_body_limit_queue_full_and_timeout(reward_model):
    with make_client(reward_model, max_body_bytes=100) as c:
        big = c.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": "x" * 200}]})
        assert big.status_code == 413 and big.json()["error"]["type"] == "request_too_large"
    with make_client(reward_model, max_queue_requests=0) as c:
        full = c.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": "x"}]})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
    with make_client(reward_model, request_timeout=1e-9) as c:
        late = c.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": "x"}]})
        assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"


def test_api_key(reward_model):
    with make_client(reward_model, api_key="s3cret") as c:
        item = {"items": [{"prompt": PROMPT, "response": "x"}]}
        assert c.post("/v1/rewards", json=item).status_code == 401
        assert c.post("/v1/rewards", json=item, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/rewards", json=item, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 401
        assert c.get("/info").status_code == c.get("/v1/models").status_code == 401  # they name model paths
        assert c.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == c.get("/ready").status_code == c.get("/metrics").status_code == 200
        assert c.head("/health").status_code == c.head("/ready").status_code == 200  # load balancers probe with HEAD


def test_concurrent_requests_are_batched_and_equal_one_by_one(reward_model, monkeypatch):
    gate, calls, real = threading.Event(), [], reward_model.score_encoded

    def forward(seqs, *args, **kwargs):  # each forward waits for the gate: requests queue behind the first
        calls.append(len(seqs))
        gate.wait(20)
        return real(seqs, *args, **kwargs)

    monkeypatch.setattr(reward_model, "score_encoded", forward)
    state = State(Limits(), None)
    state.attach(reward_model)
    app = create_app(state)
    bodies = [{"items": [{"prompt": f"Question {i}?", "response": RESPONSES[i % 3]}]} for i in range(12)]

    async def until(condition, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting"
            await asyncio.sleep(0.01)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            first = asyncio.create_task(c.post("/v1/rewards", json={"items": [{"prompt": PROMPT, "response": "Hi."}]}))
            await until(lambda: calls == [1])  # the worker holds the first request's forward
            tasks = [asyncio.create_task(c.post("/v1/rewards", json=b)) for b in bodies]
            await until(lambda: state.batcher.depth[0] == 12)  # all twelve wait in the queue behind it
            gate.set()
            assert (await first).status_code == 200
            together = await asyncio.gather(*tasks)
            alone = [await c.post("/v1/rewards", json=b) for b in bodies]
        return together, alone

    reward_model.ref_cache._items.clear()
    try:
        together, alone = asyncio.run(go())
    finally:
        gate.set()
        state.batcher.stop()
    for a, b in zip(together, alone, strict=True):
        assert a.status_code == b.status_code == 200
        assert a.json()["data"][0]["reward"] == pytest.approx(b.json()["data"][0]["reward"], abs=1e-5)
    assert calls == [1, 12] + [1] * 12  # the twelve queued requests went to the model as one forward
    batched = {x.name: x.value for x in state.metrics.batch_sequences.collect()[0].samples}
    assert (batched["dporm_batch_sequences_count"], batched["dporm_batch_sequences_sum"]) == (14, 25)


def test_sigterm_drains_and_exits_zero(artifact):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "dpo.cli",
        "serve",
        str(artifact),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--drain-seconds",
        "600",  # ample: the drain does not end by itself during the test; a second SIGTERM ends it
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        item = {"items": [{"prompt": PROMPT, "response": "x"}]}
        assert httpx.post(url + "/v1/rewards", json=item).status_code == 200
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready").status_code != 503:  # draining: load balancers stop sending
            assert time.monotonic() < deadline, "/ready never turned 503 after SIGTERM"
            time.sleep(0.05)
        # An exit without draining closes the port within a few uvicorn ticks (0.1 s); the drain keeps it open.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            assert httpx.get(url + "/ready").status_code == 503 and proc.poll() is None
            time.sleep(0.05)
        assert httpx.post(url + "/v1/rewards", json=item, timeout=60).status_code == 200  # what arrives is served
        proc.send_signal(signal.SIGTERM)  # a second signal ends the drain at once
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_the_drain_ends_after_drain_seconds_as_a_clean_exit(monkeypatch):
    import uvicorn

    import server.serve as serve
    from server.serve import DrainingServer

    timers = []

    class Timer:  # records the drain timer instead of waiting for it
        def __init__(self, interval, function, args):
            self.interval, self.function, self.args, self.daemon = interval, function, args, False
            timers.append(self)

        def start(self):
            self.started = True

    monkeypatch.setattr(serve, "threading", SimpleNamespace(Timer=Timer))
    state = State(Limits(), None)
    server = DrainingServer(uvicorn.Config(create_app(state)), state, 7.5)
    server.handle_exit(signal.SIGTERM, None)
    assert state.draining and not server.should_exit  # /ready is 503, requests are still served
    assert [(t.interval, t.daemon, t.started) for t in timers] == [(7.5, True, True)]
    timers[0].function(*timers[0].args)  # drain_seconds later
    assert server.should_exit and server._captured_signals == []  # SIGTERM is not re-raised: exit code 0
    assert len(timers) == 1


def test_serve_rejects_a_bad_artifact_in_one_line(tmp_path, capsys):
    from dpo.cli import main

    assert main(["serve", str(tmp_path)]) == 1
    assert "not a dporm artifact" in capsys.readouterr().err


def test_score_command_matches_the_server(client, artifact, tmp_path, capsys):
    from dpo.cli import main

    data = tmp_path / "pairs.jsonl"
    long = "word " * 300  # over the artifact's max_length: skipped with a count, not fatal
    data.write_text(
        f'{{"prompt": "{PROMPT}", "chosen": "{RESPONSES[0]}", "rejected": "{RESPONSES[1]}"}}\n'
        f'{{"prompt": "{PROMPT}", "chosen": "{long}", "rejected": "x"}}\n'
    )
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(artifact), "--data", str(data), "--output", str(out), "--device", "cpu"]) == 0
    row = json.loads(out.read_text())
    served = client.post(
        "/v1/preference", json={"pairs": [{"prompt": PROMPT, "response_a": RESPONSES[0], "response_b": RESPONSES[1]}]}
    ).json()["data"][0]
    assert row["reward_chosen"] == pytest.approx(served["reward_a"], abs=1e-6)
    assert row["margin"] == pytest.approx(served["margin"], abs=1e-6)
    captured = capsys.readouterr()
    assert "accuracy" in captured.out
    assert "skipped 1 record(s) that cannot be encoded (1 too long: --truncate cuts them)" in captured.err
    assert "raise max_length" not in captured.err  # score has no such flag: only --truncate is advised
    assert len(out.read_text().splitlines()) == 1


def test_score_refuses_mixed_record_kinds_and_names_skipped_rows(artifact, tmp_path, capsys):
    from dpo.cli import main

    pair = {"prompt": PROMPT, "chosen": RESPONSES[0], "rejected": RESPONSES[1]}
    single = {"prompt": PROMPT, "response": RESPONSES[0]}
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (single, {"prompt": 3}, single, pair)) + "\n")
    assert main(["score", str(artifact), "--data", str(data), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "mixes record kinds: row 1 has response, row 4 chosen/rejected" in err and len(err.splitlines()) == 1
    data.write_text("\n".join(json.dumps(r) for r in (single, {"prompt": 3}, single)) + "\n")
    assert main(["score", str(artifact), "--data", str(data), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 record(s) without a string or messages 'prompt' and response strings: row(s) 2" in captured.err
    assert "scored 2 record(s)" in captured.out


PAIRS = [(RESPONSES[0], RESPONSES[1]), (RESPONSES[2], "Yes.")]


def score_records(artifact, tmp_path, records, *options) -> list[dict]:
    """``dporm score`` on ``records`` (JSONL) with ``options``; the output lines."""
    from dpo.cli import main

    data, out = tmp_path / "records.jsonl", tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    command = ["score", str(artifact), "--data", str(data), "--output", str(out), "--device", "cpu", *options]
    assert main(command) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_score_reference_free_is_beta_times_the_policy_log_prob(artifact, tmp_path, smollm_tokenizer):
    records = [{"prompt": PROMPT, "chosen": c, "rejected": r} for c, r in PAIRS]
    rows = score_records(artifact, tmp_path, records, "--reference-free")
    assert [row["row"] for row in rows] == [1, 2]
    for row, (chosen, rejected) in zip(rows, PAIRS, strict=True):
        for field, response in (("chosen", chosen), ("rejected", rejected)):
            pol, ref, tokens = expected_logps(artifact, smollm_tokenizer, PROMPT, response)
            assert row[f"logp_ref_{field}"] is None and row[f"tokens_{field}"] == tokens
            assert row[f"logp_policy_{field}"] == pytest.approx(pol, abs=1e-4)
            assert row[f"reward_{field}"] == pytest.approx(0.5 * row[f"logp_policy_{field}"], rel=1e-6)
            assert abs(0.5 * (pol - ref)) > 1e-2  # the reference would change the reward
        assert row["margin"] == pytest.approx(row["reward_chosen"] - row["reward_rejected"], rel=1e-6)


def test_score_prompt_response_records_with_normalize_mean(artifact, tmp_path, smollm_tokenizer, capsys):
    records = [{"prompt": PROMPT, "response": r} for r in RESPONSES]
    rows = score_records(artifact, tmp_path, records, "--normalize", "mean")  # the artifact's own is "sum"
    fields = ("reward", "logp_policy", "logp_ref", "tokens", "truncated")
    assert [set(row) for row in rows] == [{"row"} | {f"{f}_response" for f in fields}] * 3  # no pair fields
    for i, (row, response) in enumerate(zip(rows, RESPONSES, strict=True)):
        pol, ref, tokens = expected_logps(artifact, smollm_tokenizer, PROMPT, response)
        assert row["row"] == i + 1 and row["tokens_response"] == tokens > 1 and row["truncated_response"] is False
        assert row["logp_policy_response"] == pytest.approx(pol, abs=1e-4)
        assert row["logp_ref_response"] == pytest.approx(ref, abs=1e-4)
        expected = expected_reward(artifact, smollm_tokenizer, PROMPT, response, normalize="mean")
        assert expected == pytest.approx(0.5 * (pol - ref) / tokens)  # β (Σ log π − Σ log π_ref) per token
        assert row["reward_response"] == pytest.approx(expected, abs=1e-5)
    out = capsys.readouterr().out
    assert "accuracy" not in out and "scored 3 record(s)" in out


def test_served_reward_equals_the_trainers_logged_reward(tmp_path, smollm_tokenizer):
    """Train a tiny artifact, serve it, and recover the trainer's eval rewards from the server."""
    from dpo.cli import main
    from dpo.preference_data import load_preferences

    model_dir = tmp_path / "base"
    make_tiny_llama(vocab_size=len(smollm_tokenizer), max_position_embeddings=512).save_pretrained(model_dir)
    smollm_tokenizer.save_pretrained(model_dir)
    prefs = Path(__file__).parent / "data" / "prefs.jsonl"
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(model_dir),
                "--data",
                str(prefs),
                "--output",
                str(out),
                "--max-steps",
                "2",
                "--eval-size",
                "4",
                "--lr",
                "5e-3",
                "--max-length",
                "128",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    logged = Manifest.load(out).metrics["eval"]
    state = State(Limits(), None)
    state.attach(load_reward_model(str(out), device="cpu"))
    pairs = [
        {"prompt": ex.prompt, "response_a": ex.responses[0], "response_b": ex.responses[1]}
        for ex in load_preferences(str(prefs)).examples[-4:]
    ]
    with TestClient(create_app(state)) as c:
        data = c.post("/v1/preference", json={"pairs": pairs}).json()["data"]
    assert sum(d["reward_a"] for d in data) / 4 == pytest.approx(logged["rewards/chosen"], abs=1e-6)
    assert sum(d["reward_b"] for d in data) / 4 == pytest.approx(logged["rewards/rejected"], abs=1e-6)

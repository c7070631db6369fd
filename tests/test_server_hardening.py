"""What a careless or hostile client, a bad flag or a failing load gets: one-line errors and the error schema."""

import json
import socket
import threading

import pytest

from dpo.encoding import as_messages, encode
from dpo.errors import DpormError, EncodingError
from dpo.preference_data import load_rows
from tests.conftest import free_port, make_client

PROMPT = "Tell me one fact about the moon."
ITEM = {"items": [{"prompt": PROMPT, "response": "It has craters."}]}


def _error(response, code: int) -> str:
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"]
    return error["message"]


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/v1/rerank", {"messages": [], "documents": ["Blue."]}, "must not be empty"),
        ("/v1/rerank", {"query": "q", "messages": [{"role": "user", "content": "q"}], "documents": ["a"]}, "exactly"),
        ("/v1/rewards", {"items": [{"messages": [{"role": "banana", "content": "hi"}], "response": "r"}]}, "role"),
        ("/v1/rewards", {"items": [{"messages": [{"role": "user", "content": "hi", "name": "x"}], "response": "r"}]},
         "name"),
        ("/v1/rewards", {"items": [{"prompt": "a\ud800b", "response": "r"}]},
         "item 0: cannot tokenize: the text holds a lone surrogate U+D800, which is not a character"),
        ("/v1/rewards", {"items": [{"prompt": "a", "response": "r"}, {"prompt": "b", "response": "x\udfff"}]},
         "item 1: cannot tokenize: the text holds a lone surrogate U+DFFF"),
        ("/v1/preference", {"pairs": [{"prompt": "a", "response_a": "r", "response_b": "s"},
                                      {"prompt": "b", "response_a": "r", "response_b": "x\udfff"}]},
         "pair 1 response_b: cannot tokenize"),
        ("/rerank", {"query": "q", "texts": ["a", "b", "x\udfff"]}, "text 2: cannot tokenize"),
    ],
)  # fmt: skip
def test_bad_conversations_are_422_with_their_reason(reward_model, path, body, reason):
    with make_client(reward_model) as c:
        response = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert reason in _error(response, 422)


def test_encode_rejects_empty_conversations_and_unknown_roles(smollm_tokenizer):
    with pytest.raises(EncodingError, match="no messages"):
        encode(smollm_tokenizer, [], "r")
    with pytest.raises(EncodingError, match="role 'User'"):
        as_messages([{"role": "User", "content": "hi"}])


def test_an_unexpected_failure_is_a_500_in_the_schema_and_counted(reward_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(reward_model, "encode_responses", broken)
    with make_client(reward_model) as c:
        assert "RuntimeError" in _error(c.post("/v1/rewards", json=ITEM), 500)
        assert 'code="500"' in c.get("/metrics").text


def test_chunked_bodies_meet_the_body_limit(reward_model):
    with make_client(reward_model, max_body_bytes=100) as c:
        chunks = iter([b'{"items": [{"prompt": "', b"x" * 200, b'", "response": "r"}]}'])
        response = c.post("/v1/rewards", content=chunks, headers={"content-type": "application/json"})
        assert "request body over 100 bytes" in _error(response, 413)
        small = iter([json.dumps(ITEM).encode()])
        assert c.post("/v1/rewards", content=small, headers={"content-type": "application/json"}).status_code == 200


def test_tokenizing_runs_off_the_event_loop(reward_model, monkeypatch):
    threads = []
    encode_lazily = reward_model.encode_responses

    def recording(*args):
        for seq in encode_lazily(*args):
            threads.append(threading.current_thread().name)
            yield seq

    monkeypatch.setattr(reward_model, "encode_responses", recording)
    with make_client(reward_model) as c:
        assert c.post("/v1/rewards", json=ITEM).status_code == 200
    assert threads and all(name.startswith("dporm-tokenize") for name in threads)


def test_a_request_bigger_than_the_queue_is_413_not_429(reward_model):
    with make_client(reward_model, max_queue_tokens=5) as c:
        assert "queue holds at most 5" in _error(c.post("/v1/rewards", json=ITEM), 413)


def test_auth_comes_before_validation(reward_model):
    with make_client(reward_model, api_key="s3cret") as c:
        garbage = c.post("/v1/rewards", content=b"{not json", headers={"content-type": "application/json"})
        assert garbage.status_code == 401 and garbage.headers["www-authenticate"] == "Bearer"


def test_rerank_usage_counts_the_shared_prompt_once(reward_model):
    with make_client(reward_model) as c:
        body = {"query": PROMPT, "documents": ["Craters.", "Dust.", "Rock."]}
        c.post("/v1/rerank", json=body)
        usage = c.post("/v1/rerank", json=body).json()["usage"]  # every reference log-prob now cached
        assert usage["cached_tokens"] == usage["total_tokens"]


def test_models_is_503_while_loading():
    from fastapi.testclient import TestClient

    from server.app import Limits, State, create_app

    with TestClient(create_app(State(Limits(), None))) as c:
        assert _error(c.get("/v1/models"), 503)


def test_a_failed_load_is_a_503_for_good_and_loading_one_to_retry():
    """Loading: ``unavailable`` with a Retry-After; failed (an app whose loader raised): ``server_failed`` without."""
    import time

    from fastapi.testclient import TestClient

    from server.app import Limits, State, create_app

    gate = threading.Event()

    def loader():
        gate.wait(10)
        raise RuntimeError("weights not found")

    with TestClient(create_app(State(Limits(), None), loader)) as c:
        loading = [c.get("/ready"), c.post("/v1/rewards", json=ITEM)]
        gate.set()
        deadline = time.monotonic() + 10
        while c.get("/info").json().get("load_error") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        failed = [c.get("/ready"), c.post("/v1/rewards", json=ITEM)]
    for answer in loading:
        assert answer.json()["error"]["type"] == "unavailable" and answer.headers["retry-after"] == "5"
    for answer in failed:
        assert "weights not found" in _error(answer, 503) and "retry-after" not in answer.headers
        assert answer.json()["error"]["type"] == "server_failed"


def test_serve_exits_1_in_one_line_when_the_model_cannot_load(tmp_path, capsys):
    from dpo.cli import main

    port = str(free_port())
    assert main(["serve", "--policy", str(tmp_path / "missing"), "--beta", "0.1", "--port", port]) == 1
    assert "cannot load the model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--port", "99999"], "--port must be in 0..65535"),
        (["--max-items", "0"], "--max-items must be at least 1"),
        (["--request-timeout", "-1"], "--request-timeout must be positive"),
        (["--recheck", "0.1"], "--recheck applies to --dtype bf16-paired only"),
        (["--dtype", "bf16-paired", "--recheck", "-1"], "--recheck must be a finite number of nats >= 0"),
        (["--beta", "3"], "not both"),
        (["--api-key", ""], "--api-key is empty"),  # `--api-key "$KEY"` with KEY unset must not mean no auth
    ],
)
def test_serve_rejects_bad_flags_before_loading(artifact, capsys, extra, reason):
    import signal

    from dpo.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["serve", str(artifact), *extra]) == 1
    assert reason in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # serve's early SIGTERM handler does not outlive it
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(main(["serve", str(artifact), *extra])))
    worker.start(), worker.join()
    assert outcome == [1] and reason in capsys.readouterr().err  # off the main thread: no handler, same error


def test_serve_says_when_the_port_is_taken(artifact, capsys):
    from dpo.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(artifact), "--port", str(busy.getsockname()[1])]) == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_score_checks_its_output_and_data_before_loading(artifact, tmp_path, capsys):
    from dpo.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(["score", str(artifact), "--data", str(data), "--output", str(tmp_path / "no" / "x.jsonl")]) == 1
    assert "no such directory" in capsys.readouterr().err
    data.write_text("{bad json\n")
    assert main(["score", str(artifact), "--data", str(data)]) == 1
    assert "cannot load" in capsys.readouterr().err


ROW = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize(("text", "reason"), [
    ("{bad json\n", r"line 1, column 2: not valid JSON \(Expecting property name"), ("", "the file is empty"),
    (f"{ROW}\n\n{ROW}\nnot json\n{ROW}\n", r"line 4, column 1: not valid JSON"),  # numbered from 1, blanks too
    (f"{ROW}\n[1, 2]\n", "line 2: not a JSON object"),
    (f"{ROW}\nnot json\n{ROW}\n" + '{"prompt": "caf\xe9"}\n', "line 2, column 1: not valid JSON"),  # byte later
])  # fmt: skip
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_malformed_data_files_are_one_line_errors_naming_the_line(tmp_path, text, reason, suffix):
    import gzip

    path = tmp_path / f"rows{suffix}"
    data = text.encode("latin-1" if "\xe9" in text else "utf-8")  # é as one byte: not UTF-8
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(DpormError, match=reason):
        load_rows(str(path))


def test_the_scan_for_a_bad_line_names_a_byte_that_is_not_utf8(tmp_path):
    from dpo.preference_data import _first_bad_json_line

    path = tmp_path / "rows.jsonl"
    path.write_bytes(ROW.encode() + b'\n{"prompt": "caf\xe9"}\nnot json\n')
    assert _first_bad_json_line(path) == "line 2, column 16: not UTF-8 (byte 0xe9)"
    path.write_bytes(ROW.encode() + b"\n")
    assert _first_bad_json_line(path) is None


def test_a_truncated_gz_is_a_one_line_error(tmp_path):
    import gzip

    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress((ROW + "\n").encode() * 200)[:-30])
    with pytest.raises(DpormError, match="cannot load .*rows.jsonl.gz: "):
        load_rows(str(path))


def test_default_names_the_default_model_in_the_scorer(artifact, monkeypatch):
    import dpo.default_model
    from dpo.scorer import load_reward_model

    monkeypatch.setattr(dpo.default_model, "pull_default_model", lambda cache_dir=None: artifact / "reference")
    model = load_reward_model(policy=str(artifact / "policy"), reference="default", beta=0.5, device="cpu")
    assert model.info["reference"] == str(artifact / "reference")


def test_pickle_adapters_need_allow_pickle(tmp_path):
    from dpo.lora import load_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(DpormError, match="pickle adapters load only with --allow-pickle"):
        load_adapter(None, str(tmp_path))


def test_truncate_cuts_prompts_never_responses(reward_model):
    with make_client(reward_model) as c:
        long_response = {"items": [{"prompt": PROMPT, "response": "word " * 600}], "truncate": True}
        assert "the response alone exceeds" in _error(c.post("/v1/rewards", json=long_response), 413)
        cut = c.post("/v1/rewards", json={**long_response, "truncate": False, "truncate_response": True}).json()
        expected = reward_model.encode(PROMPT, "word " * 600, allow_response_truncation=True)
        assert cut["data"][0]["truncated"] and cut["data"][0]["response_tokens"] == len(expected.response_ids)
        assert cut["data"][0]["reward"] == pytest.approx(reward_model.score_encoded([expected])[0].reward, abs=1e-5)
        docs = ["Craters.", "word " * 40]
        body = {"query": "word " * 600, "documents": docs, "truncate": True}
        usage = c.post("/v1/rerank", json=body).json()["usage"]
    apart = [reward_model.encode(body["query"], d) for d in docs]
    assert len({len(s.prompt_ids) for s in apart}) == 2  # alone, each document would keep another prompt length
    seqs = list(reward_model.encode_responses(body["query"], docs))
    assert all(s.truncated for s in seqs) and len({s.prompt_ids for s in seqs}) == 1  # one cut for all documents
    assert usage["prompt_tokens"] == len(seqs[0].prompt_ids)  # the shared prompt counted once


def test_rerank_takes_top_n_zero_as_all_and_answers_on_v2(reward_model):
    with make_client(reward_model) as c:
        body = {"query": PROMPT, "documents": ["Craters.", "Dust.", "Rock."], "top_n": 0}
        v1, v2 = c.post("/v1/rerank", json=body).json(), c.post("/v2/rerank", json=body).json()
    assert len(v1["results"]) == 3 and v1["results"] == v2["results"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/rewards", {"items": [{"prompt": PROMPT, "response": "r"}], "reference_free": "yes"}),
        ("/v1/rerank", {"query": PROMPT, "documents": ["a"], "top_n": "1"}),
        ("/rerank", {"query": PROMPT, "texts": ["a"], "raw_scores": 1}),
    ],
)
def test_flags_and_counts_are_not_coerced_from_strings(reward_model, path, body):
    with make_client(reward_model) as c:
        assert _error(c.post(path, json=body), 422)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/rerank", {"query": PROMPT, "documents": ["a"], "top_k": 1}, "top_k"),
        ("/v2/rerank", {"query": PROMPT, "documents": ["a"], "return_document": True}, "return_document"),
    ],
)
def test_rerank_refuses_unknown_fields_but_takes_a_model_name(reward_model, path, body, field):
    with make_client(reward_model) as c:
        assert field in _error(c.post(path, json=body), 422)
        peers = {"model": "any", "max_chunks_per_doc": 10, "rank_fields": ["text"]}  # accepted, ignored
        assert c.post("/v1/rerank", json={"query": PROMPT, "documents": ["a"], **peers}).status_code == 200
        tei = {"query": PROMPT, "texts": ["a"], "truncation_direction": "Right"}
        assert c.post("/rerank", json=tei).status_code == 200


def test_json_errors_say_what_is_wrong_with_the_body(reward_model):
    with make_client(reward_model) as c:
        form = c.post("/v1/rewards", content=json.dumps(ITEM), headers={"content-type": "text/plain"})
        assert "Content-Type: application/json" in _error(form, 422)
        broken = c.post("/v1/rewards", content=b'{"items": [', headers={"content-type": "application/json"})
        assert "not valid JSON (at character" in _error(broken, 422)
        for path in ("/v1/rewards", "/rerank"):
            empty = c.post(path, content=b"", headers={"content-type": "application/json"})
            assert _error(empty, 422) == "the request has no body: send a JSON object"
        document = {"query": PROMPT, "documents": [{"text": "a", "title": "kept by Cohere, ignored here"}]}
        assert c.post("/v1/rerank", json=document).status_code == 200


def test_retry_after_is_the_queue_drain_time_at_the_recent_rate(reward_model):
    from server.batcher import Batcher

    batcher = Batcher(reward_model)
    try:
        assert batcher.retry_after(1) == 1  # no forward measured yet: the floor
        batcher._note_rate(1000, 2.0)  # 500 tokens/s
        batcher._queued_tokens = 2600
        assert batcher.retry_after(1) == 6 and batcher.retry_after(10) == 10
        batcher._queued_tokens = 10**6
        assert batcher.retry_after(1) == 60
        batcher._queued_tokens = 0
    finally:
        batcher.stop()


def test_serve_refuses_an_api_key_http_cannot_carry(artifact, capsys):
    from dpo.cli import main

    assert main(["serve", str(artifact), "--api-key", "sékrit", "--port", str(free_port())]) == 1
    assert "printable ASCII" in capsys.readouterr().err


def test_a_shared_prompt_is_rendered_once_and_encodes_as_alone(reward_model, monkeypatch):
    tokenizer, rendered = reward_model.tokenizer, []
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda m, **kw: rendered.append(m) or render(m, **kw))
    docs = ["Craters.", "Dust.", "Rock."]
    seqs = list(reward_model.encode_responses(PROMPT, docs))
    assert len(rendered) == 1 + len(docs)  # the prompt once, each prompt + response once
    assert seqs == [encode(tokenizer, PROMPT, d, reward_model.max_length) for d in docs]
    with make_client(reward_model) as c:
        rendered.clear()
        assert c.post("/v1/rerank", json={"query": PROMPT, "documents": docs}).status_code == 200
        assert len(rendered) == 1 + len(docs)
        bad = {"query": PROMPT, "documents": ["fine", "a\ud800b"]}
        sent = c.post("/v1/rerank", content=json.dumps(bad), headers={"content-type": "application/json"})
        assert _error(sent, 422).startswith("document 1: cannot tokenize")


def test_consecutive_rewards_items_with_one_prompt_share_its_cut(reward_model):
    """As a pair's responses: the prompt is cut once for both, so the short one loses the same context."""
    prompt, responses = "word " * 600, ["Craters.", "word " * 40]
    with make_client(reward_model) as c:
        items = [{"prompt": prompt, "response": r} for r in responses]
        got = c.post("/v1/rewards", json={"items": items, "truncate": True}).json()["data"]
    want = reward_model.score_encoded(list(reward_model.encode_responses(prompt, responses)))
    assert [d["reward"] for d in got] == pytest.approx([r.reward for r in want], abs=1e-5)
    assert all(d["truncated"] for d in got)


def test_openapi_request_examples_are_accepted_as_sent(reward_model):
    """/docs pre-fills each route's body from its schema's example: every example must score as it stands."""
    with make_client(reward_model) as client:
        spec = client.get("/openapi.json").json()
        ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
        assert len(ids) == len(set(ids))  # OpenAPI requires unique operation ids (client generators key on them)
        answers = {}
        for path in ("/v1/rewards", "/v1/preference", "/v1/rerank", "/rerank"):
            body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            for ref in [member["$ref"] for member in body["oneOf"]] if "oneOf" in body else [body["$ref"]]:
                name = ref.rsplit("/", 1)[1]
                (example,) = spec["components"]["schemas"][name]["examples"]
                answer = client.post(path, json=example)
                assert answer.status_code == 200, (path, answer.json())
                answers[path, name] = answer.json()
        tei = answers["/rerank", "TEIRerankRequest"]
        assert len(tei) == 2 and {r["index"] for r in tei} == {0, 1}  # TEI: one rank per text
        assert answers["/rerank", "RerankRequest"]["results"]  # /rerank's other dialect: Cohere's answer


def test_an_interrupted_serve_skips_teardown_while_a_thread_is_in_torch(artifact, monkeypatch, capsys):
    """SIGINT: uvicorn raises KeyboardInterrupt after its shutdown; a forward (or the load) still running must
    not meet interpreter teardown (it aborted, SIGABRT): the process exits at once with 130."""
    import server.serve
    from dpo.cli import main

    exits = []

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(server.serve.DrainingServer, "run", interrupted)
    monkeypatch.setattr(server.serve, "exit_if_busy", lambda state, code, say=None: exits.append((code, say)))
    assert main(["serve", str(artifact), "--port", str(free_port())]) == 130  # idle: the usual interrupt
    assert exits == [(130, "dporm: interrupted")]

    class Busy:
        loader_thread, batcher = None, type("B", (), {"worker_alive": True})()

    monkeypatch.undo()
    monkeypatch.setattr(server.serve.os, "_exit", lambda code: exits.append(("exit", code)))
    server.serve.exit_if_busy(Busy(), 130, "dporm: interrupted")
    assert exits[-1] == ("exit", 130) and "dporm: interrupted" in capsys.readouterr().err
    Busy.batcher.worker_alive = False
    server.serve.exit_if_busy(Busy(), 0)
    assert exits[-1] == ("exit", 130)  # idle: no early exit

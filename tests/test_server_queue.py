"""The server's queue under load: cancelled work leaves, timeouts cover tokenizing, batches fail per request."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from server.app import Limits, State, create_app
from tests.conftest import free_port, make_client

PROMPT = "Tell me one fact about the moon."


def item(i: int, response: str = "It has craters.", **options) -> dict:
    return {"items": [{"prompt": f"{PROMPT} {i}", "response": response}], **options}


@pytest.fixture
def gated(reward_model, monkeypatch):
    """The model waits for ``gate`` before each forward: later requests queue up behind the first one."""
    gate, calls = threading.Event(), []
    real = reward_model.score_encoded

    def forward(seqs, *args, **kwargs):
        calls.append(len(seqs))
        gate.wait(20)
        return real(seqs, *args, **kwargs)

    monkeypatch.setattr(reward_model, "score_encoded", forward)
    yield gate, calls
    gate.set()


def until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def served(reward_model, **limits) -> tuple[State, httpx.AsyncClient]:
    state = State(Limits(**limits), None)
    state.attach(reward_model)
    transport = httpx.ASGITransport(app=create_app(state))
    return state, httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30)


def test_a_client_that_leaves_cancels_its_queued_work(reward_model, gated):
    gate, calls = gated
    state = State(Limits(), None)
    state.attach(reward_model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started)
    url = f"http://127.0.0.1:{port}"
    try:
        first = threading.Thread(
            target=httpx.post, args=(url + "/v1/rewards",), kwargs={"json": item(0), "timeout": 30}
        )
        first.start()
        until(lambda: calls == [1])  # the worker is busy with the first request
        body = json.dumps(item(1)).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/rewards HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            until(lambda: state.batcher.depth[0] == 1)
        until(lambda: state.batcher.depth == (0, 0))  # gone from the queue as soon as its client left
        gate.set()
        first.join(30)
        metrics = httpx.get(url + "/metrics").text
    finally:
        gate.set()
        server.should_exit = True
        thread.join(10)
    assert calls == [1]  # the abandoned request never reached the model
    assert 'dporm_requests_total{code="499",endpoint="/v1/rewards"} 1.0' in metrics


def test_timed_out_requests_give_their_queue_places_back(reward_model, gated):
    gate, _ = gated
    state, client = served(reward_model, max_queue_requests=2, request_timeout=0.5)

    async def go():
        async with client:
            first = asyncio.create_task(client.post("/v1/rewards", json=item(0)))
            await asyncio.sleep(0.2)
            late = await asyncio.gather(*(client.post("/v1/rewards", json=item(i)) for i in (1, 2)))
            depth = state.batcher.depth
            fresh = await client.post("/v1/rewards", json=item(3))  # the queue is empty again: 504, not 429
            gate.set()
            return [r.status_code for r in late], depth, fresh.status_code, (await first).status_code

    assert asyncio.run(go()) == ([504, 504], (0, 0), 504, 504)
    state.batcher.stop()


def test_the_timeout_covers_tokenizing_and_its_backlog_is_bounded(reward_model, monkeypatch):
    real = reward_model.encode_responses

    def slow_encode(*args):
        time.sleep(0.6)
        return real(*args)

    monkeypatch.setattr(reward_model, "encode_responses", slow_encode)
    state, client = served(reward_model, max_queue_requests=2, request_timeout=1.0)

    async def go():
        async with client:
            first = asyncio.create_task(client.post("/v1/rewards", json=item(0)))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(client.post("/v1/rewards", json=item(1)))  # tokenized at ~1.2 s: too late
            await asyncio.sleep(0.1)
            refused = await client.post("/v1/rewards", json=item(2))  # two already wait for the tokenizer
            return (await first).status_code, (await second).status_code, refused

    first, second, refused = asyncio.run(go())
    assert (first, second, refused.status_code) == (200, 504, 429)
    assert "tokenizer queue full" in refused.json()["error"]["message"] and refused.headers["Retry-After"]
    state.batcher.stop()


def test_token_rewards_go_only_to_the_requests_that_ask(reward_model, gated):
    gate, calls = gated
    state, client = served(reward_model)

    async def go():
        async with client:
            first = asyncio.create_task(client.post("/v1/rewards", json=item(0)))
            await asyncio.sleep(0.2)
            rest = [client.post("/v1/rewards", json=item(i, return_token_rewards=i == 1)) for i in (1, 2, 3)]
            tasks = [asyncio.create_task(r) for r in rest]
            await asyncio.sleep(0.3)
            gate.set()
            await first
            return [(await t).json()["data"][0]["token_rewards"] for t in tasks]

    asked, *others = asyncio.run(go())
    assert calls == [1, 3]  # the three queued requests were one batch
    assert len(asked) > 0 and others == [None, None]
    state.batcher.stop()


def test_a_failing_request_does_not_fail_the_requests_batched_with_it(reward_model, gated, monkeypatch):
    gate, calls = gated
    gated_forward = reward_model.score_encoded

    def forward(seqs, *args, **kwargs):
        if any(len(s.response_ids) > 40 for s in seqs):
            calls.append(len(seqs))
            raise RuntimeError("this sequence breaks the model")
        return gated_forward(seqs, *args, **kwargs)

    monkeypatch.setattr(reward_model, "score_encoded", forward)
    state, client = served(reward_model)

    async def go():
        async with client:
            first = asyncio.create_task(client.post("/v1/rewards", json=item(0)))
            await asyncio.sleep(0.2)
            bad = asyncio.create_task(client.post("/v1/rewards", json=item(1, "word " * 60)))
            good = asyncio.create_task(client.post("/v1/rewards", json=item(2)))
            await asyncio.sleep(0.3)
            gate.set()
            return (await first).status_code, (await bad).status_code, (await good).status_code

    assert asyncio.run(go()) == (200, 500, 200)
    assert calls == [1, 2, 1, 1]  # first; bad and good together (fails); then each alone
    state.batcher.stop()


def test_errors_before_routing_are_counted_under_their_endpoint_and_keep_their_headers(reward_model):
    with make_client(reward_model, api_key="k", max_body_bytes=100) as c:
        assert c.post("/v1/rewards", json=item(0)).status_code == 401
        auth = {"Authorization": "Bearer k"}
        assert c.post("/v1/rewards", json=item(0, "x" * 200), headers=auth).status_code == 413
        not_allowed = c.get("/v1/rewards")
        assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "POST"
        bad_utf8 = c.post(
            "/v1/rewards", content=b'{"items": "\xff"}', headers={**auth, "content-type": "application/json"}
        )
        assert bad_utf8.status_code == 422 and bad_utf8.json()["error"]["type"] == "invalid_request_error"
        metrics = c.get("/metrics").text
    for code in ("401", "413", "405", "422"):
        assert f'dporm_requests_total{{code="{code}",endpoint="/v1/rewards"}} 1.0' in metrics


def test_work_arriving_after_the_worker_stopped_is_503(reward_model):
    with make_client(reward_model) as c:
        c.app.state.dporm.batcher.stop()
        response = c.post("/v1/rewards", json=item(0))
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "shutting down" in response.json()["error"]["message"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_client_gone_mid_body_is_counted_499_without_an_error(reward_model, chunked, caplog):
    state = State(Limits(), None)
    state.attach(reward_model)
    app = create_app(state)
    headers = [(b"content-type", b"application/json")] + ([] if chunked else [(b"content-length", b"500")])
    scope = {"type": "http", "method": "POST", "path": "/v1/rewards", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "root_path": ""}  # fmt: skip
    messages = [{"type": "http.request", "body": b'{"items": [', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    counted = {(m.labels["endpoint"], m.labels["code"]) for m in state.metrics.requests.collect()[0].samples}
    assert counted == {("/v1/rewards", "499")}
    state.batcher.stop()

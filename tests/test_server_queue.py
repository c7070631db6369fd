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


async def until_async(condition, seconds: float = 10.0) -> None:
    """``until`` inside the event loop: the requests being waited for keep running meanwhile."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


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
    gate, calls = gated
    state, client = served(reward_model, max_queue_requests=2, request_timeout=0.5)

    async def go():
        async with client:
            first = asyncio.create_task(client.post("/v1/rewards", json=item(0)))
            await until_async(lambda: calls == [1])  # the first holds the model: the queue is empty
            late = await asyncio.gather(*(client.post("/v1/rewards", json=item(i)) for i in (1, 2)))
            depth = state.batcher.depth
            state.limits.request_timeout = 30.0  # read on arrival: the next request can wait out the first
            fresh = asyncio.create_task(client.post("/v1/rewards", json=item(3)))
            await until_async(lambda: state.batcher.depth[0] == 1)  # queued, not refused: the places came back
            gate.set()
            return [r.status_code for r in late], depth, (await fresh).status_code, (await first).status_code

    assert asyncio.run(go()) == ([504, 504], (0, 0), 200, 504)
    state.batcher.stop()


def test_the_timeout_covers_tokenizing_and_its_backlog_is_bounded(reward_model, monkeypatch):
    real, gate, encoded = reward_model.encode_responses, threading.Event(), []

    def gated_encode(prompt, *args):  # tokenizing waits for the gate
        encoded.append(prompt)
        gate.wait(20)
        return real(prompt, *args)

    monkeypatch.setattr(reward_model, "encode_responses", gated_encode)
    state, client = served(reward_model, max_queue_requests=2, request_timeout=30.0)  # ample for the first
    state.tokenize_seconds = 3.0  # as if recent requests took 3 s each to tokenize

    async def go():
        async with client:
            first = asyncio.create_task(client.post("/v1/rewards", json=item(0)))
            await until_async(lambda: len(encoded) == 1)  # the tokenizer thread is busy with the first
            state.limits.request_timeout = 0.3  # read when a request arrives: the next one's deadline is short
            second = asyncio.create_task(client.post("/v1/rewards", json=item(1)))
            await until_async(lambda: state.tokenize_waiting == 2)  # the second waits for the tokenizer
            refused = await client.post("/v1/rewards", json=item(2))  # two already wait for the tokenizer: 429
            model_queue = state.retry_after()  # the model queue's own estimate: empty, so the 1 s floor
            late = await second  # its deadline passes while it waits for the tokenizer
            waiting = state.tokenize_waiting
            gate.set()
            return (await first).status_code, late, refused, model_queue, waiting

    try:
        first, second, refused, model_queue, waiting = asyncio.run(go())
    finally:
        gate.set()
        state.batcher.stop()
    assert (first, second.status_code, refused.status_code) == (200, 504, 429)
    assert second.json()["error"] == {"message": "no result within 0.3 s", "type": "timeout_error", "code": 504}
    assert refused.json()["error"]["message"] == "tokenizer queue full (2 requests)"
    # Retry-After: the tokenizer's backlog, ceil(2 waiting × 3 s), not the model queue's estimate (1 s)
    assert model_queue == 1 and refused.headers["Retry-After"] == "6"
    assert waiting == 1  # the timed-out request gave its tokenizer place back at once
    assert encoded == [f"{PROMPT} 0"]  # and was never tokenized


def test_token_rewards_go_only_to_the_requests_that_ask(reward_model, gated):
    gate, calls = gated
    state, client = served(reward_model)

    async def go():
        async with client:
            first = asyncio.create_task(client.post("/v1/rewards", json=item(0)))
            await until_async(lambda: calls == [1])  # the worker holds the first request's forward
            rest = [client.post("/v1/rewards", json=item(i, return_token_rewards=i == 1)) for i in (1, 2, 3)]
            tasks = [asyncio.create_task(r) for r in rest]
            await until_async(lambda: state.batcher.depth[0] == 3)  # all three queued behind it
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
            await until_async(lambda: calls == [1])  # the worker holds the first request's forward
            bad = asyncio.create_task(client.post("/v1/rewards", json=item(1, "word " * 60)))
            good = asyncio.create_task(client.post("/v1/rewards", json=item(2)))
            await until_async(lambda: state.batcher.depth[0] == 2)  # both queued: they go to the model as one batch
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
        not_allowed = c.get("/v1/rewards", headers=auth)  # without the key: 401, as every path
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


def test_a_chunked_body_is_counted_even_with_a_content_length(reward_model):
    """With both headers the server reads the chunked body: a small Content-Length must not skip the count."""
    state = State(Limits(max_body_bytes=2000), None)
    state.attach(reward_model)
    app = create_app(state)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"3"), (b"transfer-encoding", b"chunked")]
    scope = {"type": "http", "method": "POST", "path": "/v1/rewards", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "root_path": ""}  # fmt: skip
    chunks = [{"type": "http.request", "body": b" " * 1000, "more_body": True} for _ in range(10)]
    sent = []

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    state.batcher.stop()
    assert sent[0]["status"] == 413 and b"request body over 2000 bytes" in sent[1]["body"]
    assert len(chunks) == 7  # refused after the third kilobyte, not read to the end


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_trickled_past_the_request_timeout_is_504(reward_model, chunked):
    state = State(Limits(request_timeout=0.3), None)
    state.attach(reward_model)
    app = create_app(state)
    headers = [(b"content-type", b"application/json")]
    headers += [(b"transfer-encoding", b"chunked")] if chunked else [(b"content-length", b"500")]
    scope = {"type": "http", "method": "POST", "path": "/v1/rewards", "headers": headers, "query_string": b"",
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
             "root_path": ""}  # fmt: skip
    first, sent = [{"type": "http.request", "body": b'{"items": [', "more_body": True}], []

    async def receive():
        if first:
            return first.pop()
        await asyncio.sleep(30)  # the rest of the body never comes in time
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    state.batcher.stop()
    assert sent[0]["status"] == 504 and b"the request body did not arrive within 0.3 s" in sent[1]["body"]


class StubModel:
    """score_encoded records each forward's sizes; ``fail`` raises instead. No torch model behind it."""

    beta, paired = 1.0, None

    def __init__(self, pads_batches=False, fail=None, delay=0.0, gate=None):
        self.pads, self.fail, self.delay, self.forwards, self.gate = pads_batches, fail, delay, [], gate

    def forward_pads(self, float32=False):
        return self.pads

    def score_encoded(self, seqs, normalize=None, reference_free=False, token_rewards=False, float32=False):
        from dpo.scorer import RewardResult

        self.forwards.append([len(s) for s in seqs])
        time.sleep(self.delay)
        if self.gate is not None:
            self.gate.wait(20)
        if self.fail is not None:
            raise self.fail
        return [RewardResult(1.0, 0.0, 0.0, len(s.prompt_ids), len(s.response_ids), False, False) for s in seqs]


def job_of(loop, lengths, **kw):
    from dpo.encoding import Encoded
    from server.batcher import Job

    seqs = [Encoded((1,) * (n - 1), (2,)) for n in lengths]
    return Job(seqs, False, False, loop, loop.create_future(), **kw)


def test_a_cancelled_job_stops_between_forwards():
    from server.batcher import Batcher

    model = StubModel(delay=0.05)
    batcher = Batcher(model, max_batch_tokens=10)
    loop = asyncio.new_event_loop()
    try:
        job = job_of(loop, [10] * 20)  # 20 forwards of one sequence
        batcher.submit(job)
        until(lambda: len(model.forwards) >= 2)
        batcher.cancel(job)
        seen = len(model.forwards)
        other = job_of(loop, [5])
        batcher.submit(other)  # runs after the cancelled job has stopped: one worker, first come first served
        until(lambda: [5] in model.forwards)
        assert model.forwards[-1] == [5]
        # it was not scored to the end: at most the forward already under way when it was cancelled
        assert seen <= len(model.forwards) - 1 <= seen + 1 < 20
    finally:
        batcher.stop()
        loop.close()


def test_the_budget_counts_padding_where_the_model_pads():
    from server.batcher import Batcher

    for pads, expected in ((False, [[40] + [5] * 7, [5]]), (True, [[40], [5] * 8])):
        model = StubModel(pads_batches=pads)
        batcher = Batcher(model, max_batch_tokens=79)
        loop = asyncio.new_event_loop()
        try:
            batcher.submit(job_of(loop, [40] + [5] * 8))
            until(lambda m=model: sum(len(f) for f in m.forwards) == 9)
            assert model.forwards == expected  # padded, [40, 5] computes 2 rows × 40 positions
        finally:
            batcher.stop()
            loop.close()


def test_a_poisoned_device_makes_the_server_unhealthy_and_refuse_work(monkeypatch):
    import torch

    import server.batcher as batcher_module
    from server.batcher import Batcher, ShuttingDown

    gate = threading.Event()
    model = StubModel(fail=torch.AcceleratorError("CUDA error: device-side assert triggered"), gate=gate)
    batcher = Batcher(model, max_batch_tokens=5)
    loop = asyncio.new_event_loop()
    try:
        first, queued = job_of(loop, [5]), job_of(loop, [5])
        batcher.submit(first)
        until(lambda: model.forwards)
        batcher.submit(queued)  # waits while the first one breaks the device
        gate.set()
        until(lambda: batcher.failure is not None)
        assert "device-side assert" in batcher.failure
        with pytest.raises(ShuttingDown, match="restart"):
            batcher.submit(job_of(loop, [5]))
        with pytest.raises(ShuttingDown, match="restart"):  # refused (503), not run on the dead device (500)
            loop.run_until_complete(asyncio.wait_for(queued.future, 5))
        with pytest.raises(torch.AcceleratorError):  # the one that ran: the device's own error (500)
            loop.run_until_complete(asyncio.wait_for(first.future, 5))
        assert len(model.forwards) == 1
    finally:
        gate.set()
        batcher.stop()
        loop.close()
    assert (
        batcher_module._poisons_device(RuntimeError("CUDA error: device-side assert")) is False
    )  # not an accelerator error
    assert batcher_module._poisons_device(torch.AcceleratorError("CUDA error: out of memory")) is False
    monkeypatch.delattr(torch, "AcceleratorError")  # torch < 2.8 has no such type: nothing poisons, nothing raises
    assert batcher_module._poisons_device(ValueError("device-side assert")) is False


def test_health_and_ready_report_a_broken_batcher(reward_model):
    with make_client(reward_model) as c:
        c.app.state.dporm.batcher.broken = "AcceleratorError: CUDA error: an illegal memory access"
        health, ready = c.get("/health"), c.get("/ready")
        refused = c.post("/v1/rewards", json=item(0))
        c.app.state.dporm.batcher.broken = None
    assert health.status_code == 503 and "illegal memory access" in health.json()["error"]["message"]
    assert ready.status_code == 503 and refused.status_code == 503
    for answer in (health, ready, refused):  # for good: a type clients do not retry, and no Retry-After
        assert answer.json()["error"]["type"] == "server_failed" and "retry-after" not in answer.headers

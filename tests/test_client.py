"""server/client.py against a fake reward server (httpx.MockTransport): no real server, no models."""

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server.client import AsyncRewardClient, Preference, RerankResult, Reward, RewardClient, RewardServerError

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def error(status: int, type_: str, code: str, message: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": {"message": message, "type": type_, "code": code}}, headers=headers)


class FakeServer:
    """The reward-server API with reward = len(text). Queued ``script`` entries (responses or exceptions) go first."""

    def __init__(self, *script: httpx.Response | Exception, ready: bool = True):
        self.script, self.ready, self.requests, self.bodies = list(script), ready, [], []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content) if request.content else None
        self.bodies.append(body)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        path = request.url.path
        if path == "/ready" and not self.ready:
            return error(503, "unavailable", "loading", "model is loading", retry_after="1")
        if path in ("/health", "/ready", "/info"):
            return httpx.Response(200, json={"status": "ok", "model": "fake"})
        return httpx.Response(200, json=getattr(self, path.rsplit("/", 1)[1])(body))

    def rewards(self, body: dict) -> dict:
        data = [
            {"index": i, "reward": float(len(it["response"])), "logp_policy": -1.0,
             "logp_ref": None if body.get("reference_free") else -2.0, "response_tokens": len(it["response"].split()),
             "truncated": False, "token_rewards": [0.5] if body["return_token_rewards"] else None}
            for i, it in enumerate(body["items"])
        ]  # fmt: skip
        usage = {"prompt_tokens": 1, "total_tokens": 2, "cached_tokens": 0}
        return {"model": "fake", "data": data[::-1], "usage": usage}  # rows out of order on purpose

    def preference(self, body: dict) -> dict:
        data = []
        for i, pair in enumerate(body["pairs"]):
            a, b = len(pair["response_a"]), len(pair["response_b"])
            data.append(
                {"index": i, "reward_a": a, "reward_b": b, "margin": a - b, "prob_a_over_b": 1 / (1 + math.exp(b - a))}
            )
        return {"model": "fake", "data": data, "usage": {}}

    def rerank(self, body: dict) -> dict:
        texts = [d if isinstance(d, str) else d["text"] for d in body["documents"]]
        results = sorted(({"index": i, "relevance_score": float(len(t))} for i, t in enumerate(texts)),
                         key=lambda r: -r["relevance_score"])  # fmt: skip
        return {"id": "rr-1", "model": "fake", "results": results[: body.get("top_n")], "usage": {}}


def client(server: FakeServer, **kwargs) -> tuple[RewardClient, list[float]]:
    rm = RewardClient("http://rm.test", transport=httpx.MockTransport(server), **kwargs)
    rm.jitter = 0.0  # backoff waits exact, to compare
    sleeps: list[float] = []
    rm.sleep = sleeps.append
    return rm, sleeps


def async_client(server, **kwargs) -> tuple[AsyncRewardClient, list[float]]:
    rm = AsyncRewardClient("http://rm.test", transport=httpx.MockTransport(server), **kwargs)
    rm.jitter = 0.0
    sleeps: list[float] = []

    async def asleep(seconds: float) -> None:
        sleeps.append(seconds)

    rm.asleep = asleep
    return rm, sleeps


def test_rewards_are_batched_and_come_back_in_caller_order():
    server = FakeServer()
    responses = ["x" * n for n in (5, 1, 7, 3, 9, 2, 8, 4)]
    with client(server, batch_size=3)[0] as rm:
        rewards = rm.rewards([("p", r) for r in responses])
    assert [len(b["items"]) for b in server.bodies] == [3, 3, 2]
    assert [r.index for r in rewards] == list(range(8))
    assert [r.reward for r in rewards] == [float(len(r)) for r in responses]
    assert isinstance(rewards[0], Reward) and rewards[0].logp_ref == -2.0 and rewards[0].token_rewards is None


def test_prompt_messages_and_dict_items_and_options():
    server = FakeServer()
    rm, _ = client(server)
    items = [("plain", "a b"), (MESSAGES, "c"), {"prompt": "raw", "response": "dee"}]
    rewards = rm.rewards(items, normalize="mean", reference_free=True, return_token_rewards=True)
    (body,) = server.bodies
    assert body["items"] == [
        {"prompt": "plain", "response": "a b"},
        {"messages": MESSAGES, "response": "c"},
        {"prompt": "raw", "response": "dee"},
    ]
    assert (body["normalize"], body["reference_free"], body["return_token_rewards"]) == ("mean", True, True)
    assert rewards[0].logp_ref is None and rewards[0].token_rewards == [0.5] and rewards[0].response_tokens == 2
    assert rm.rewards([]) == [] and len(server.requests) == 1  # nothing to score, nothing sent
    rm.rewards([("plain", "a")])
    assert "normalize" not in server.bodies[-1]  # left to the served artifact's default


def test_preference_pairs():
    server = FakeServer()
    rm, _ = client(server, batch_size=1)
    prefs = rm.preference([("q", "long answer", "short"), (MESSAGES, "a", "bb")])
    assert server.bodies[1]["pairs"] == [{"messages": MESSAGES, "response_a": "a", "response_b": "bb"}]
    assert prefs[0] == Preference(0, 11.0, 5.0, 6.0, pytest.approx(1 / (1 + math.exp(-6))))
    assert prefs[1].index == 1 and prefs[1].margin == -1.0 and prefs[1].prob_a_over_b < 0.5


def test_auth_header_explicit_and_from_env(monkeypatch):
    monkeypatch.delenv("DPORM_API_KEY", raising=False)
    server = FakeServer()
    client(server)[0].info()
    client(server, api_key="k1")[0].info()
    monkeypatch.setenv("DPORM_API_KEY", "k-env")
    client(server)[0].info()
    client(server, api_key="k2")[0].info()  # an explicit key wins over the environment
    assert [r.headers.get("authorization") for r in server.requests] == [None, "Bearer k1", "Bearer k-env", "Bearer k2"]


def test_429_honours_retry_after_then_succeeds():
    server = FakeServer(error(429, "rate_limit", "too_many_requests", "slow down", retry_after="7"))
    rm, sleeps = client(server)
    assert rm.rewards([("p", "abc")])[0].reward == 3.0
    assert sleeps == [7.0] and len(server.requests) == 2


def test_503_retries_exhausted_with_capped_backoff():
    busy = error(503, "unavailable", "overloaded", "busy", retry_after="soon")  # not a delay or a date: backoff
    server = FakeServer(*[busy] * 10)
    rm, sleeps = client(server, max_retries=4, backoff=10.0)
    with pytest.raises(RewardServerError) as info:
        rm.rewards([("p", "abc")])
    assert info.value.status == 503 and info.value.code == "overloaded"
    assert sleeps == [10.0, 20.0, 30.0, 30.0] and len(server.requests) == 5


def test_retry_after_as_a_date_or_out_of_range_is_bounded():
    import email.utils
    import time

    in_20_s = email.utils.formatdate(time.time() + 20, usegmt=True)
    for header, expected in ((in_20_s, pytest.approx(20, abs=1.5)), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
                             ("1e9", 120.0), ("inf", 120.0), ("-5", 0.0), ("2.5", 2.5), ("nan", 0.5)):  # fmt: skip
        server = FakeServer(error(429, "rate_limit", "too_many_requests", "slow down", retry_after=header))
        rm, sleeps = client(server, backoff=0.5)
        assert rm.rewards([("p", "abc")])[0].reward == 3.0
        assert sleeps == [expected], header


def test_a_bad_url_is_not_retried():
    server = FakeServer(httpx.UnsupportedProtocol("Request URL is missing an 'http://' or 'https://' protocol."))
    rm, sleeps = client(server)
    with pytest.raises(httpx.UnsupportedProtocol):
        rm.info()
    assert sleeps == [] and len(server.requests) == 1


def test_preference_batches_count_sequences_as_the_server_does():
    server = FakeServer()
    client(server, batch_size=4)[0].preference([("q", "a", "b")] * 5)
    assert [len(b["pairs"]) for b in server.bodies] == [2, 2, 1]


def test_connection_errors_are_retried():
    server = FakeServer(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"))
    rm, sleeps = client(server, backoff=0.5)
    assert rm.rewards([("p", "ab")])[0].reward == 2.0 and sleeps == [0.5, 1.0]
    rm, _ = client(FakeServer(*[httpx.ConnectError("refused")] * 3), max_retries=2)
    with pytest.raises(httpx.ConnectError):
        rm.info()


def test_4xx_is_not_retried_and_is_parsed():
    server = FakeServer(error(422, "invalid_request_error", "bad_normalize", "normalize must be sum or mean"))
    rm, sleeps = client(server)
    with pytest.raises(RewardServerError) as info:
        rm.rewards([("p", "a")], normalize="max")
    err = info.value
    assert (err.status, err.type, err.code, err.message) == (
        422,
        "invalid_request_error",
        "bad_normalize",
        "normalize must be sum or mean",
    )
    assert "422" in str(err)
    assert sleeps == [] and len(server.requests) == 1


def test_error_body_outside_the_schema_keeps_raw_text():
    rm, _ = client(FakeServer(httpx.Response(500, text="Internal Server Error")))
    with pytest.raises(RewardServerError) as info:
        rm.info()
    assert (info.value.status, info.value.type, info.value.message) == (500, None, "Internal Server Error")


def test_rerank_orders_best_first_and_best_of_n():
    server = FakeServer()
    rm, _ = client(server, batch_size=2)  # rerank is never split: the prompt is shared
    results = rm.rerank("q", ["aa", {"text": "aaaa"}, "a", "aaa"])
    assert [r.index for r in results] == [1, 3, 0, 2] and results[0] == RerankResult(1, 4.0, "aaaa")
    assert server.bodies[0] == {"query": "q", "documents": ["aa", {"text": "aaaa"}, "a", "aaa"]}
    assert [r.index for r in rm.rerank(MESSAGES, ["a", "bbb"], top_n=1)] == [1]
    assert server.bodies[1]["messages"] == MESSAGES and server.bodies[1]["top_n"] == 1
    candidates = ["drip drop", "rain falls soft on the roof", "wet"]
    assert rm.best_of_n("Write a haiku about rain.", candidates) == (1, candidates[1], float(len(candidates[1])))
    assert server.bodies[2]["top_n"] == 1 and len(server.requests) == 3


def test_rerank_over_max_documents_is_split_and_merged():
    server = FakeServer()
    rm, _ = client(server, max_documents=2)
    docs = ["a", "bbbb", "cc", "dddd", "eee"]
    results = rm.rerank("q", docs, top_n=3)
    assert [(r.index, r.document) for r in results] == [(1, "bbbb"), (3, "dddd"), (4, "eee")]  # tie: input order
    assert [b["documents"] for b in server.bodies] == [["a", "bbbb"], ["cc", "dddd"], ["eee"]]
    assert all("top_n" not in b for b in server.bodies)  # cut after merging, not per request
    assert rm.best_of_n("q", docs) == (1, "bbbb", 4.0)


def test_health_ready_and_wait_until_ready():
    server = FakeServer(
        error(503, "unavailable", "loading", "loading"), error(503, "unavailable", "loading", "loading")
    )
    rm, sleeps = client(server)
    rm.wait_until_ready(timeout=60, interval=0.25)
    assert sleeps == [0.25, 0.25] and rm.ready() and rm.health() and rm.info()["model"] == "fake"
    rm, _ = client(FakeServer(ready=False))
    assert not rm.ready() and rm.health()
    with pytest.raises(TimeoutError):
        rm.wait_until_ready(timeout=0)
    assert not client(FakeServer(httpx.ConnectError("down")))[0].health()


def test_async_client_matches_the_sync_one():
    async def main() -> None:
        server = FakeServer(error(429, "rate_limit", "too_many_requests", "slow down", retry_after="3"))
        rm, sleeps = async_client(server, batch_size=2)
        async with rm:
            responses = ["x" * n for n in (4, 2, 6, 1, 5)]
            rewards = await rm.rewards([("p", r) for r in responses])
            assert [r.index for r in rewards] == list(range(5)) and [r.reward for r in rewards] == [4, 2, 6, 1, 5]
            assert sleeps == [3.0] and len(server.requests) == 4  # 3 chunks, one of them retried once
            prefs = await rm.preference([("q", "aa", "a")] * 3)
            assert [p.index for p in prefs] == [0, 1, 2] and prefs[0].margin == 1.0
            assert (await rm.best_of_n("q", ["a", "ccc", "bb"])) == (1, "ccc", 3.0)
            assert [r.index for r in await rm.rerank(MESSAGES, ["a", "ccc", "bb"])] == [1, 2, 0]
            assert await rm.health() and await rm.ready() and (await rm.info())["status"] == "ok"
            await rm.wait_until_ready(timeout=1)
        failing, _ = async_client(FakeServer(error(422, "invalid_request_error", "empty", "no items")))
        with pytest.raises(RewardServerError) as info:
            await failing.rewards([("p", "")])
        assert info.value.code == "empty" and info.value.status == 422
        busy, sleeps = async_client(FakeServer(*[error(503, "unavailable", "draining", "bye")] * 3), max_retries=2)
        with pytest.raises(RewardServerError):
            await busy.rewards([("p", "a")])
        assert sleeps == [0.5, 1.0]
        await failing.close()
        await busy.close()

    asyncio.run(main())


def test_async_chunks_run_concurrently_but_bounded():
    fake = FakeServer()
    inflight, peak = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.01)
        inflight -= 1
        return fake(request)

    async def main() -> list[Reward]:
        async with async_client(handler, batch_size=1, max_concurrency=3)[0] as rm:
            return await rm.rewards([("p", "y" * n) for n in range(10)])

    rewards = asyncio.run(main())
    assert peak == 3 and len(fake.requests) == 10
    assert [r.reward for r in rewards] == [float(n) for n in range(10)]


def test_client_imports_without_torch_or_fastapi():
    code = "import sys; sys.modules.update(torch=None, fastapi=None); import server.client"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_truncate_is_sent_only_when_asked():
    server = FakeServer()
    rm, _ = client(server)
    rm.rewards([("p", "r")])
    rm.rewards([("p", "r")], truncate=True)
    assert [b.get("truncate") for b in server.bodies] == [None, True]


def test_every_method_sends_the_request_options():
    server = FakeServer()
    rm, _ = client(server)
    rm.preference([("q", "aa", "a")], truncate=True, normalize="mean")
    rm.rerank("q", ["a", "bb"], reference_free=True, truncate=True)
    assert rm.best_of_n("q", ["a", "bb"], truncate=True) == (1, "bb", 2.0)
    options = [{k: b[k] for k in ("normalize", "reference_free", "truncate") if k in b} for b in server.bodies]
    assert options == [
        {"normalize": "mean", "truncate": True},
        {"reference_free": True, "truncate": True},
        {"truncate": True},
    ]


def test_arguments_are_checked_on_this_side():
    rm, _ = client(server := FakeServer(), max_documents=2)
    with pytest.raises(ValueError, match="top_n"):
        rm.rerank("q", ["a", "bb", "ccc"], top_n=-1)  # split: the server would never see it
    with pytest.raises(ValueError, match="at least one candidate"):
        rm.best_of_n("q", [])
    assert rm.rerank("q", []) == [] and rm.rewards([]) == [] and rm.preference([]) == [] and not server.requests
    for kwargs in ({"batch_size": 0}, {"max_documents": 0}, {"max_retries": -1}):
        with pytest.raises(ValueError, match="at least"):
            RewardClient("http://rm.test", **kwargs)
    with pytest.raises(ValueError, match="max_concurrency"):
        AsyncRewardClient("http://rm.test", max_concurrency=0)


def test_preference_carries_rechecked():
    row = {"index": 0, "reward_a": 1.0, "reward_b": 1.0, "margin": 0.0, "prob_a_over_b": 0.5, "rechecked": True}
    answer = {"model": "m", "usage": {}, "data": [row]}
    rm, _ = client(FakeServer(httpx.Response(200, json=answer)))
    assert rm.preference([("q", "a", "b")])[0].rechecked is True


def test_a_bad_url_is_not_waited_for():
    with pytest.raises(httpx.UnsupportedProtocol):
        RewardClient("localhost:8000").wait_until_ready(timeout=30)

    async def main() -> None:
        async with AsyncRewardClient("localhost:8000") as rm:
            with pytest.raises(httpx.UnsupportedProtocol):
                await rm.wait_until_ready(timeout=30)

    asyncio.run(main())


def test_a_failed_async_chunk_cancels_the_others():
    """Chunk 0 is a 400; chunk 1 keeps getting 429s. The call raises, and chunk 1 stops retrying."""
    busy: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["items"][0]["response"] == "bad":
            return error(400, "invalid_request_error", "bad", "bad item")
        busy.append(asyncio.get_running_loop().time())
        return error(429, "rate_limit", "too_many_requests", "slow down", retry_after="0.02")

    async def main() -> None:
        rm = AsyncRewardClient("http://rm.test", transport=httpx.MockTransport(handler), batch_size=1, max_retries=50)
        rm.asleep = asyncio.sleep  # real waits, so that the failing chunk gets its turn
        async with rm:
            with pytest.raises(RewardServerError, match="bad item"):
                await rm.rewards([("p", "ok"), ("p", "bad")])
            sent = len(busy)
            await asyncio.sleep(0.2)
            assert len(busy) == sent <= 2

    asyncio.run(main())

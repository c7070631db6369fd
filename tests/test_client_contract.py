"""server/client.py: how it splits calls, checks answers, retries and probes (a fake server, no models)."""

import asyncio
import json

import httpx
import pytest

from server.client import RewardClient, RewardServerError
from tests.test_client import MESSAGES, FakeServer, async_client, client, error


def _sizes(server: FakeServer, key: str = "items") -> list[int]:
    return [len(b[key]) for b in server.bodies if b and key in b]


def test_runs_of_one_prompt_stay_in_one_request():
    """The server cuts a prompt once per run of its items in a request: a split must not cut a run in two."""
    server = FakeServer()
    rm, _ = client(server, batch_size=3)
    items = [("P", "a"), ("P", "bb"), ("Q", "c"), ("Q", "dd"), ("Q", "e"), ("R", "f"), (MESSAGES, "g")]
    rewards = rm.rewards(items, truncate=True)
    assert _sizes(server) == [2, 3, 2] and [r.reward for r in rewards] == [1, 2, 1, 2, 1, 1, 1]
    server.bodies.clear()
    rm.rewards([("P", "a"), ("Q", "b"), ("R", "c"), ("S", "d")])  # runs of one: packed as before
    assert _sizes(server) == [3, 1]


def test_a_run_longer_than_a_request_is_split_and_refused_only_where_it_was_cut():
    server = FakeServer()
    rm, _ = client(server, batch_size=2)
    assert len(rm.rewards([("P", "x")] * 5, truncate=True)) == 5 and _sizes(server) == [2, 2, 1]  # no cut: exact

    def cut_last(request: httpx.Request) -> httpx.Response:
        answer = server(request)
        if request.url.path == "/v1/rewards" and len(server.bodies) == 3:  # the run's last request was truncated
            body = json.loads(answer.content)
            body["data"][0]["truncated"] = True
            return httpx.Response(200, json=body)
        return answer

    server.bodies.clear()
    rm, _ = client(cut_last, batch_size=2)
    with pytest.raises(ValueError, match="items 0..4 share one prompt.*were truncated"):
        rm.rewards([("P", "x")] * 5, truncate_response=True)
    with pytest.raises(ValueError, match="cut the query once"):
        client(FakeServer(), max_documents=2)[0].rerank("q", ["a", "b", "c"], truncate=True)


def test_a_413_for_too_many_items_reads_the_limit_once_and_splits_again():
    limited = {"limits": {"max_items": 2}, "model": "fake"}
    server = FakeServer(error(413, "request_too_large", 413, "5 sequences; the limit is 2"),
                        httpx.Response(200, json=limited))  # fmt: skip
    rm, _ = client(server)
    assert [r.reward for r in rm.rewards([("p", "x" * n) for n in range(1, 6)])] == [1, 2, 3, 4, 5]
    assert [r.url.path for r in server.requests][:2] == ["/v1/rewards", "/info"] and _sizes(server) == [5, 2, 2, 1]
    assert rm.server_max_items == 2
    server.bodies.clear()
    rm.preference([("q", "a", "b")] * 3)  # one pair (2 sequences) per request from now on
    assert _sizes(server, "pairs") == [1, 1, 1]
    too_long = FakeServer(error(413, "request_too_large", 413, "item 0: 900+ tokens exceed max_length=512"),
                          httpx.Response(200, json={"limits": {"max_items": 256}}))  # fmt: skip
    rm, _ = client(too_long)
    with pytest.raises(RewardServerError, match="exceed max_length"):  # /info's limit is no help: the 413 stands
        rm.rewards([("p", "x")])
    assert rm.server_max_items is None

    async def main() -> None:
        server = FakeServer(error(413, "request_too_large", 413, "3 documents"), httpx.Response(200, json=limited))
        rm, _ = async_client(server)
        async with rm:
            assert [r.index for r in await rm.rerank("q", ["a", "ccc", "bb"])] == [1, 2, 0]
        assert _sizes(server, "documents") == [3, 2, 1]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ({"model": "m", "usage": {}, "data": [{"index": 0, "reward": 1.0, "logp_policy": 0.0}]}, "not 3 distinct"),
        ({"model": "m", "usage": {}, "data": [{"index": i % 2, "reward": 1.0, "logp_policy": 0.0} for i in range(3)]},
         "indices \\[0, 0, 1\\]"),
        ({"model": "m", "usage": {}, "data": [{"index": i, "reward": 1.0, "logp_policy": 0.0} for i in (0, 1, 2, 2)]},
         "indices \\[0, 1, 2, 2\\]"),
    ],
)  # fmt: skip
def test_an_answer_that_does_not_match_the_request_is_an_error(answer, match):
    rm, _ = client(FakeServer(httpx.Response(200, json=answer)))
    with pytest.raises(RewardServerError, match=match) as info:
        rm.rewards([("p", "a"), ("p", "b"), ("p", "c")])
    assert info.value.type == "invalid_response"
    rerank = {"id": "r", "model": "m", "usage": {}, "results": [{"index": 5, "relevance_score": 1.0}]}
    with pytest.raises(RewardServerError, match="not 1 distinct rows of the 2 sent"):
        client(FakeServer(httpx.Response(200, json=rerank)))[0].best_of_n("q", ["a", "b"])


def test_a_success_that_is_not_json_is_a_server_error():
    rm, _ = client(FakeServer(httpx.Response(200, text="<html>Sign in</html>")))
    with pytest.raises(RewardServerError, match="not JSON: <html>Sign in") as info:
        rm.rerank("q", ["a"])
    assert info.value.status == 200
    rm, _ = client(FakeServer(httpx.Response(502, json={"error": "bad gateway"}), httpx.Response(500, json=[1])))
    rm.max_retries = 0
    with pytest.raises(RewardServerError, match='HTTP 502 error: {"error":"bad gateway"}'):
        rm.info()  # an error body off the schema: its raw text
    with pytest.raises(RewardServerError, match=r"HTTP 500 error: \[1\]"):
        rm.info()


def test_which_answers_are_retried():
    gateway = [httpx.Response(502), httpx.Response(504), httpx.RemoteProtocolError("peer closed")]
    server = FakeServer(*gateway)
    rm, sleeps = client(server)
    assert rm.info()["model"] == "fake" and sleeps == [0.5, 1.0, 2.0]
    for answer in (httpx.Response(500, text="bug"), error(503, "server_failed", 503, "the model failed to load")):
        server = FakeServer(answer)
        rm, sleeps = client(server)
        with pytest.raises(RewardServerError):
            rm.rewards([("p", "a")])
        assert sleeps == [] and len(server.requests) == 1
    rm, sleeps = client(FakeServer(*[httpx.Response(503)] * 6), backoff=1.0)
    rm.jitter = 0.25
    with pytest.raises(RewardServerError):
        rm.info()
    assert all(0.75 * min(2**i, 30) <= s <= min(2**i, 30) for i, s in enumerate(sleeps)) and len(sleeps) == 5


def test_the_async_client_retries_connection_errors_and_sends_every_option():
    async def main() -> None:
        server = FakeServer(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"))
        rm, sleeps = async_client(server, timeout=12.5)
        async with rm:
            assert (await rm.rewards([("p", "ab")], truncate_response=True, normalize="mean"))[0].reward == 2
            assert sleeps == [0.5, 1.0] and rm._http.timeout.read == 12.5
            await rm.preference([("q", "a", "b")], reference_free=True)
            await rm.rerank("q", ["a"], truncate=True)
            await rm.best_of_n("q", ["a"], truncate_response=True)
            with pytest.raises(ValueError, match="at least one candidate"):
                await rm.best_of_n("q", [])
        assert rm._http.is_closed
        sent = [{k: b[k] for k in ("normalize", "reference_free", "truncate", "truncate_response") if k in b}
                for b in server.bodies if b]  # fmt: skip
        assert sent == [{"normalize": "mean", "truncate_response": True}] * 3 + [
            {"reference_free": True}, {"truncate": True}, {"truncate_response": True}]  # fmt: skip
        not_ready, _ = async_client(FakeServer(ready=False))
        assert await not_ready.health() and not await not_ready.ready()

    asyncio.run(main())


def test_sync_options_timeout_and_close():
    server = FakeServer()
    with client(server, timeout=9.0)[0] as rm:
        rm.rewards([("p", "a")], truncate_response=True)
        assert server.bodies[-1]["truncate_response"] is True and rm._http.timeout.read == 9.0
    assert rm._http.is_closed


def test_keys_and_prompts_are_checked_on_this_side(monkeypatch):
    monkeypatch.setenv("DPORM_API_KEY", "from-env")
    with pytest.raises(ValueError, match="trailing newline"):
        RewardClient("http://rm.test", api_key="secret\n")
    server = FakeServer()
    client(server, api_key="")[0].info()  # an explicit empty key: no key, not the environment's
    assert "authorization" not in server.requests[0].headers
    rm, _ = client(FakeServer())
    with pytest.raises(TypeError, match="put one message in a list"):
        rm.rewards([({"role": "user", "content": "hi"}, "a")])
    with pytest.raises(ValueError):  # zip(strict=True): a pair's tuple is not a reward item
        rm.rewards([("p", "a", "b")])
    with pytest.raises(ValueError, match="top_n"):
        rm.rerank("q", ["a"], top_n=True)
    split, _ = client(FakeServer(), max_documents=1)
    assert [r.index for r in split.rerank("q", ["a", "ccc", "bb"], top_n=0)] == [1, 2, 0]  # 0: all


def test_probes_a_failed_server_and_a_stranger():
    stranger, _ = client(FakeServer(httpx.Response(404), httpx.Response(401)))
    assert not stranger.health() and not stranger.ready()
    failed = error(503, "server_failed", 503, "not ready (failed: RuntimeError: weights not found)")
    rm, sleeps = client(FakeServer(failed))
    with pytest.raises(RewardServerError, match="weights not found"):  # at once, not after the timeout
        rm.wait_until_ready(timeout=300)
    assert sleeps == []
    rm, _ = client(FakeServer(ready=False))
    with pytest.raises(TimeoutError, match=r"last answer HTTP 503 unavailable: model is loading"):
        rm.wait_until_ready(timeout=0)
    with pytest.raises(TimeoutError, match="unreachable"):
        client(FakeServer(*[httpx.ConnectError("down")] * 3))[0].wait_until_ready(timeout=0)
    assert not client(FakeServer(httpx.ReadTimeout("slow")))[0].ready()


def test_the_error_message_shows_a_code_only_when_it_adds_something():
    assert str(RewardServerError(401, "authentication_error", 401, "bad key")) == (
        "HTTP 401 authentication_error: bad key"
    )
    assert "(overloaded)" in str(RewardServerError(503, "unavailable", "overloaded", "busy"))

"""/metrics values, not only names: known requests move each series by a known amount."""

import asyncio
import threading
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_client
from tests.test_server_queue import StubModel, job_of, until


def scrape(client) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_requests_move_every_series_by_what_they_did(reward_model):
    prompt = f"A prompt no other test sends: {uuid.uuid4().hex}"  # the shared model's cache has never seen it
    items = {"items": [{"prompt": prompt, "response": "Craters."}, {"prompt": prompt, "response": "Dust and rock."}]}
    long = {"items": [{"prompt": "word " * 2000, "response": "Yes."}], "truncate": True}
    with make_client(reward_model) as c:
        before = scrape(c)
        answers = [c.post("/v1/rewards", json=body).json() for body in (items, items, long)]
        assert c.post("/foo/1", json={}).status_code == 404 and c.post("/v1/rewards", json={}).status_code == 422
        after = scrape(c)
    requests = "dporm_requests_total"
    assert delta(after, before, requests, endpoint="/v1/rewards", code="200") == 3
    assert delta(after, before, requests, endpoint="/v1/rewards", code="422") == 1
    assert delta(after, before, requests, endpoint="other", code="404") == 1  # not a label per unknown path
    assert not any("/foo/1" in str(key) for key in after)
    assert delta(after, before, "dporm_reference_cache_total", result="miss") == 3  # 2 new, then the long one
    assert delta(after, before, "dporm_reference_cache_total", result="hit") == 2  # the second request
    assert delta(after, before, "dporm_truncations_total") == 1
    for phase in ("tokenize", "queue"):  # one observation per scored request (the 422 never reached them)
        assert delta(after, before, "dporm_phase_seconds_count", phase=phase) == 3
    forwards = delta(after, before, "dporm_forward_seconds_count", kind="main")
    assert forwards >= 3 and delta(after, before, "dporm_batch_sequences_count") == forwards
    assert delta(after, before, "dporm_batch_sequences_sum") == 5
    tokens = sum(a["usage"]["total_tokens"] for a in answers)  # the queue's count: every sequence whole
    assert delta(after, before, "dporm_batch_tokens_sum") == tokens
    assert delta(after, before, "dporm_request_seconds_count", endpoint="/v1/rewards") == 4  # the 422 too
    assert ("dporm_request_seconds_count", (("endpoint", "/v1/preference"),)) in after  # there before any request
    assert after[("dporm_forward_seconds_count", (("kind", "recheck"),))] == 0
    for gauge in ("dporm_queue_requests", "dporm_queue_tokens", "dporm_tokenize_requests"):
        assert after[(gauge, ())] == 0
    assert ("dporm_build_info", (("version", __import__("dpo").__version__),)) in after
    assert any(name.startswith("process_") for name, _ in after)


def test_the_tokenizer_backlog_is_a_gauge(reward_model):
    with make_client(reward_model) as c:
        c.app.state.dporm.tokenize_waiting = 3  # as while three requests wait for the one tokenizer thread
        assert scrape(c)[("dporm_tokenize_requests", ())] == 3
        c.app.state.dporm.tokenize_waiting = 0


def test_a_request_that_leaves_the_queue_still_counts_its_wait():
    """Timeouts and disconnects leave from the queue: their waits, the longest, must be in the histogram."""
    from server.batcher import Batcher

    seen: list[tuple[str, float]] = []
    gate = threading.Event()
    batcher = Batcher(StubModel(gate=gate), max_batch_tokens=5, observe=lambda name, value: seen.append((name, value)))
    loop = asyncio.new_event_loop()
    try:
        first, waiting = job_of(loop, [5]), job_of(loop, [5])
        batcher.submit(first)
        until(lambda: batcher.model.forwards)
        batcher.submit(waiting)
        batcher.cancel(waiting)
        assert [name for name, _ in seen].count("queue_seconds") == 2  # the first taken, the second given up
        batcher.cancel(waiting)  # already out: not counted twice
        assert [name for name, _ in seen].count("queue_seconds") == 2
    finally:
        gate.set()
        batcher.stop()
        loop.close()


@pytest.mark.parametrize(("name", "series"), [("forward_seconds", "main"), ("recheck_seconds", "recheck")])
def test_forwards_are_timed_by_kind(name, series):
    from server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.observe(name, 0.2)
    assert metrics.forward_seconds.labels(series)._sum.get() == pytest.approx(0.2)

"""Python client for the dporm reward server (needs only httpx and the standard library).

Best-of-N sampling from another app::

    from server.client import RewardClient
    with RewardClient("http://localhost:8000") as rm:
        i, best, reward = rm.best_of_n("Write a haiku about rain.", candidates)

``RewardClient`` and ``AsyncRewardClient`` build requests and parse answers with the same code (a ``_Call``); the
async one sends the requests of a batched call concurrently, at most ``max_concurrency`` at a time. 429, 503,
timeouts and connection errors are retried after ``Retry-After`` (seconds or an HTTP date, at most
``MAX_RETRY_AFTER``), or else with exponential backoff; a bad URL or another error on this side is not retried.
When one request of a batched async call fails, its other requests are cancelled. An empty list of items, pairs
or documents gives an empty list back without a request.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, fields
from functools import partialmethod
from typing import Any

import httpx

Prompt = str | list[dict[str, str]]  # a plain prompt, or chat messages [{"role": ..., "content": ...}]
RewardItem = tuple[Prompt, str] | dict[str, Any]  # (prompt, response), or a dict in the server's item schema
PreferencePair = tuple[Prompt, str, str] | dict[str, Any]  # (prompt, response_a, response_b), or a dict
Doc = str | dict[str, str]  # a rerank document: "text" or {"text": "text"}

RETRY_STATUS = frozenset({429, 503})
# Worth another try: the server was busy, slow or unreachable; not a bad URL (UnsupportedProtocol) or a bad request.
RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
MAX_BACKOFF = 30.0  # seconds, the cap on exponential backoff
MAX_RETRY_AFTER = 120.0  # seconds, the most a server's Retry-After makes the client wait


@dataclass(frozen=True)
class Reward:
    index: int
    reward: float
    logp_policy: float
    logp_ref: float | None = None  # None when scored reference-free
    response_tokens: int = 0
    truncated: bool = False
    token_rewards: list[float] | None = None  # per response token, when asked for


@dataclass(frozen=True)
class Preference:
    index: int
    reward_a: float
    reward_b: float
    margin: float
    prob_a_over_b: float
    rechecked: bool = False  # bf16-paired with --recheck: a close pair rescored in float32


@dataclass(frozen=True)
class RerankResult:
    index: int
    relevance_score: float
    document: str  # the document's text, filled in by the client


class RewardServerError(Exception):
    """An HTTP error answer from the server, parsed from ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, type: str | None, code: str | int | None, message: str):
        super().__init__(f"HTTP {status} {type or 'error'}{f' ({code})' if code is not None else ''}: {message}")
        self.status, self.type, self.code, self.message = status, type, code, message


# --------------------------------------------------------------------------------------------------------------------
# request building and response parsing, shared by both clients
def _prompt_fields(prompt: Prompt, key: str = "prompt") -> dict[str, Any]:
    return {key: prompt} if isinstance(prompt, str) else {"messages": list(prompt)}


def _item(item: tuple | dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A (prompt, *texts) tuple as a request item, ``keys`` naming the texts; dicts pass through as they are."""
    if isinstance(item, dict):
        return dict(item)
    prompt, *texts = item
    return {**_prompt_fields(prompt), **dict(zip(keys, texts, strict=True))}


def _parse(cls: type, d: dict[str, Any], offset: int) -> Any:
    """A result dataclass from one answer row (unknown keys ignored), its index moved to the caller's numbering."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names} | {"index": offset + d["index"]})


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date), capped; None if absent or bad."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if not math.isnan(seconds) else None


def _unwrap(response: httpx.Response) -> Any:
    """The JSON body of a successful response; raises RewardServerError for an error one."""
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        type_, code, message = error.get("type"), error.get("code"), str(error["message"])
    except (ValueError, KeyError, TypeError, AttributeError):  # not the error schema: keep the raw text
        type_, code, message = None, None, response.text or response.reason_phrase
    raise RewardServerError(response.status_code, type_, code, message)


def _scoring_options(normalize: str | None = None, reference_free: bool = False, truncate: bool = False,
                     truncate_response: bool = False) -> dict:  # fmt: skip
    """The request-level options every inference route takes, those that differ from the server's defaults
    (``normalize`` None: the served artifact's own)."""
    options = {"normalize": normalize, "reference_free": reference_free or None, "truncate": truncate or None,
               "truncate_response": truncate_response or None}  # fmt: skip
    return {k: v for k, v in options.items() if v is not None}


def _best(results: list[RerankResult]) -> tuple[int, str, float]:
    return results[0].index, results[0].document, results[0].relevance_score


def _require_candidates(candidates: Sequence[str]) -> None:
    if not candidates:
        raise ValueError("best_of_n needs at least one candidate")


@dataclass
class _Call:
    """One client method, transport-free: the requests (method, path, JSON body) and how to fold their answers."""

    requests: list[tuple[str, str, dict[str, Any] | None]]
    fold: Callable[[list[Any]], Any]


class _BaseClient:
    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 75.0, max_retries: int = 5,
                 backoff: float = 0.5, batch_size: int = 64, max_documents: int = 256,
                 transport: Any = None):  # fmt: skip
        if min(batch_size, max_documents) < 1 or max_retries < 0:
            raise ValueError(f"batch_size and max_documents must be at least 1 and max_retries at least 0, got "
                             f"{batch_size}, {max_documents} and {max_retries}")  # fmt: skip
        self.timeout = timeout
        self.max_documents = max_documents  # per rerank request: the server's --max-items (default 256)
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("DPORM_API_KEY")
        self.max_retries, self.backoff, self.batch_size = max_retries, backoff, batch_size
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = self._http_class(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before the next try, or None to stop. ``response`` is None after a connection error."""
        if attempt >= self.max_retries or (response is not None and response.status_code not in RETRY_STATUS):
            return None
        wait = _retry_after(response.headers.get("Retry-After")) if response is not None else None
        return min(self.backoff * 2**attempt, MAX_BACKOFF) if wait is None else wait

    def _batched(self, path: str, key: str, items: list[dict], options: dict, result: type,
                 size: int | None = None) -> _Call:  # fmt: skip
        """Items split into requests of ``size`` (``batch_size``); the answers re-indexed to the caller's order."""
        size = size or self.batch_size
        starts = range(0, len(items), size)
        requests = [("POST", path, {key: items[s : s + size], **options}) for s in starts]

        def fold(answers: list[Any]) -> list[Any]:
            results = [_parse(result, d, s) for answer, s in zip(answers, starts, strict=True) for d in answer["data"]]
            return sorted(results, key=lambda r: r.index)

        return _Call(requests, fold)

    def _rewards_call(self, items: Sequence[RewardItem], token_rewards: bool, **options: Any) -> _Call:
        options = _scoring_options(**options) | {"return_token_rewards": token_rewards}
        return self._batched("/v1/rewards", "items", [_item(it, ("response",)) for it in items], options, Reward)

    def _preference_call(self, pairs: Sequence[PreferencePair], **options: Any) -> _Call:
        """``batch_size // 2`` pairs per request: ``batch_size`` counts sequences, as the server's ``--max-items``."""
        items = [_item(pair, ("response_a", "response_b")) for pair in pairs]
        return self._batched("/v1/preference", "pairs", items, _scoring_options(**options), Preference,
                             max(1, self.batch_size // 2))  # fmt: skip

    def _rerank_call(self, query: Prompt, documents: Sequence[Doc], top_n: int | None, **options: Any) -> _Call:
        """Requests of ``max_documents`` (each shares its prompt); merged best first, with each document's text."""
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
            raise ValueError(f"top_n must be a non-negative int (0 or None: all), got {top_n!r}")
        texts = [doc if isinstance(doc, str) else doc["text"] for doc in documents]
        prompt, size = _prompt_fields(query, key="query") | _scoring_options(**options), self.max_documents
        starts = range(0, len(documents), size)
        one = len(starts) == 1 and top_n is not None  # a single request can let the server cut to top_n
        requests = [("POST", "/v1/rerank", {**prompt, "documents": list(documents[s : s + size])}
                     | ({"top_n": top_n} if one else {})) for s in starts]  # fmt: skip

        def fold(answers: list[Any]) -> list[RerankResult]:
            results = [RerankResult(s + r["index"], r["relevance_score"], texts[s + r["index"]])
                       for answer, s in zip(answers, starts, strict=True) for r in answer["results"]]  # fmt: skip
            results.sort(key=lambda r: (-r.relevance_score, r.index))  # best first; ties in input order, as the server
            return results[:top_n] if top_n else results

        return _Call(requests, fold)


def _probe_timeout(deadline: float) -> float:
    """A readiness probe's own timeout: what is left before ``deadline`` (at least 0.1 s, at most 10 s)."""
    return min(max(deadline - time.monotonic(), 0.1), 10.0)


# --------------------------------------------------------------------------------------------------------------------
# the two clients: only the transport differs
class RewardClient(_BaseClient, AbstractContextManager):
    """Synchronous client. ``sleep`` waits between retries and polls (replace it on an instance in tests)."""

    _http_class = httpx.Client
    sleep = staticmethod(time.sleep)

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, json=body)
                if (delay := self._retry_delay(attempt, response)) is None:
                    return _unwrap(response)
            except RETRY_ERRORS:
                if (delay := self._retry_delay(attempt, None)) is None:
                    raise
            self.sleep(delay)

    def _run(self, call: _Call) -> Any:
        return call.fold([self._send(*request) for request in call.requests])

    def rewards(
        self, items: Sequence[RewardItem], normalize: str | None = None, reference_free: bool = False,
        return_token_rewards: bool = False, truncate: bool = False, truncate_response: bool = False,
    ) -> list[Reward]:  # fmt: skip
        """One Reward per ``(prompt, response)`` item (``prompt`` a string or chat messages), in the order given.

        ``normalize`` (sum | mean; None: the artifact's default), ``reference_free``, ``truncate`` (cut over-long
        prompts from the left instead of the server's 413) and ``truncate_response`` (also cut a response that alone
        is too long) are the server's request options; every method takes them.
        """
        options = {"normalize": normalize, "reference_free": reference_free, "truncate": truncate,
                   "truncate_response": truncate_response}  # fmt: skip
        return self._run(self._rewards_call(items, return_token_rewards, **options))

    def preference(self, pairs: Sequence[PreferencePair], **options: Any) -> list[Preference]:
        """One Preference per ``(prompt, response_a, response_b)`` pair, in the order given."""
        return self._run(self._preference_call(pairs, **options))

    def rerank(self, query: Prompt, documents: Sequence[Doc], top_n: int | None = None,
               **options: Any) -> list[RerankResult]:  # fmt: skip
        """The documents scored as responses to ``query`` (a string or chat messages), best first."""
        return self._run(self._rerank_call(query, documents, top_n, **options))

    def best_of_n(self, prompt: Prompt, candidates: Sequence[str], **options: Any) -> tuple[int, str, float]:
        """(index, text, reward) of the candidate response with the highest reward."""
        _require_candidates(candidates)
        return _best(self.rerank(prompt, candidates, top_n=1, **options))

    def info(self) -> dict[str, Any]:
        return self._send("GET", "/info", None)

    def _probe(self, path: str, timeout: float | None = None) -> bool:
        try:
            return self._http.get(path, timeout=timeout or self.timeout).status_code == 200
        except httpx.UnsupportedProtocol:  # a bad URL never gets ready
            raise
        except httpx.TransportError:
            return False

    health = partialmethod(_probe, "/health")  # -> bool
    ready = partialmethod(_probe, "/ready")  # -> bool (False while the server loads or drains)

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 1.0) -> None:
        """Polls ``/ready`` every ``interval`` seconds; raises TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._probe("/ready", _probe_timeout(deadline)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout:g}s")
            self.sleep(interval)

    def close(self) -> None:
        self._http.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient(_BaseClient, AbstractAsyncContextManager):
    """Asyncio client: batched calls go out concurrently, at most ``max_concurrency`` requests at a time."""

    _http_class = httpx.AsyncClient
    asleep = staticmethod(asyncio.sleep)

    def __init__(self, base_url: str, *args: Any, max_concurrency: int = 4, **kwargs: Any):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        super().__init__(base_url, *args, **kwargs)
        self._limit = asyncio.Semaphore(max_concurrency)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                async with self._limit:  # held while the request is in flight, not while backing off
                    response = await self._http.request(method, path, json=body)
                if (delay := self._retry_delay(attempt, response)) is None:
                    return _unwrap(response)
            except RETRY_ERRORS:
                if (delay := self._retry_delay(attempt, None)) is None:
                    raise
            await self.asleep(delay)

    async def _run(self, call: _Call) -> Any:
        tasks = [asyncio.ensure_future(self._send(*request)) for request in call.requests]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:  # one request failed (or the caller was cancelled): stop the others, then raise
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return call.fold(answers)

    async def rewards(
        self, items: Sequence[RewardItem], normalize: str | None = None, reference_free: bool = False,
        return_token_rewards: bool = False, truncate: bool = False, truncate_response: bool = False,
    ) -> list[Reward]:  # fmt: skip
        options = {"normalize": normalize, "reference_free": reference_free, "truncate": truncate,
                   "truncate_response": truncate_response}  # fmt: skip
        return await self._run(self._rewards_call(items, return_token_rewards, **options))

    async def preference(self, pairs: Sequence[PreferencePair], **options: Any) -> list[Preference]:
        return await self._run(self._preference_call(pairs, **options))

    async def rerank(self, query: Prompt, documents: Sequence[Doc], top_n: int | None = None,
                     **options: Any) -> list[RerankResult]:  # fmt: skip
        return await self._run(self._rerank_call(query, documents, top_n, **options))

    async def best_of_n(self, prompt: Prompt, candidates: Sequence[str], **options: Any) -> tuple[int, str, float]:
        _require_candidates(candidates)
        return _best(await self.rerank(prompt, candidates, top_n=1, **options))

    async def info(self) -> dict[str, Any]:
        return await self._send("GET", "/info", None)

    async def _probe(self, path: str, timeout: float | None = None) -> bool:
        try:
            return (await self._http.get(path, timeout=timeout or self.timeout)).status_code == 200
        except httpx.UnsupportedProtocol:
            raise
        except httpx.TransportError:
            return False

    health = partialmethod(_probe, "/health")
    ready = partialmethod(_probe, "/ready")

    async def wait_until_ready(self, timeout: float = 300.0, interval: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not await self._probe("/ready", _probe_timeout(deadline)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout:g}s")
            await self.asleep(interval)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

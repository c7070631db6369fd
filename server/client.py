"""Python client for the dporm reward server (needs only httpx and the standard library).

Best-of-N sampling from another app::

    from server.client import RewardClient
    with RewardClient("http://localhost:8000") as rm:
        i, best, reward = rm.best_of_n("Write a haiku about rain.", candidates)

``RewardClient`` and ``AsyncRewardClient`` build requests and parse answers with the same code (a ``_Call``); the
async one sends the requests of a batched call concurrently, at most ``max_concurrency`` at a time. 429, 502, 503,
504, timeouts and connection errors are retried after ``Retry-After`` (seconds or an HTTP date, at most
``MAX_RETRY_AFTER``), or else with jittered exponential backoff; a bad URL, another error on this side, and a
server that reports it can score nothing until restarted (type ``server_failed``) are not. When one request of a
batched async call fails, its other requests are cancelled. An empty list of items, pairs or documents gives an
empty list back without a request. A server that refuses a request as too many items (413) gets its ``/info``
read once, and the call is split again to the server's ``--max-items``.

Items of one prompt in a row are scored on one cut of it (``truncate``), as the server cuts a prompt once for all
its responses in a request: requests are split between such runs; a run longer than a request is split, and
refused (ValueError) where the server then truncated it. Prompts are
strings or chat messages with ``role`` and ``content`` strings only. Use one ``RewardClient`` per thread and one
``AsyncRewardClient`` per event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any

import httpx

from server.client_protocol import (
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    RETRY_ERRORS,
    RETRY_STATUS,
    Doc,
    Preference,
    PreferencePair,
    Prompt,
    RerankResult,
    Reward,
    RewardItem,
    RewardServerError,
    _BaseClient,
    _best,
    _Call,
    _not_ready,
    _probe_timeout,
    _ready_or_failed,
    _require_candidates,
    _unwrap,
    _up,
)

__all__ = [
    "MAX_BACKOFF",
    "MAX_RETRY_AFTER",
    "RETRY_STATUS",
    "AsyncRewardClient",
    "Doc",
    "Preference",
    "PreferencePair",
    "Prompt",
    "RerankResult",
    "Reward",
    "RewardClient",
    "RewardItem",
    "RewardServerError",
]


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

    def _run(self, build: Callable[[], _Call]) -> Any:
        """``build()``'s call; after a 413 for too many items, once more split to the server's --max-items."""
        try:
            call = build()
            return call.fold([self._send(*request) for request in call.requests])
        except RewardServerError as e:
            if e.status != 413 or self.server_max_items is not None or not self._learned_limits(e, self.info()):
                raise
        call = build()
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
        return self._run(lambda: self._rewards_call(items, return_token_rewards, **options))

    def preference(self, pairs: Sequence[PreferencePair], **options: Any) -> list[Preference]:
        """One Preference per ``(prompt, response_a, response_b)`` pair, in the order given."""
        return self._run(lambda: self._preference_call(pairs, **options))

    def rerank(self, query: Prompt, documents: Sequence[Doc], top_n: int | None = None,
               **options: Any) -> list[RerankResult]:  # fmt: skip
        """The documents scored as responses to ``query`` (a string or chat messages), best first."""
        return self._run(lambda: self._rerank_call(query, documents, top_n, **options))

    def best_of_n(self, prompt: Prompt, candidates: Sequence[str], **options: Any) -> tuple[int, str, float]:
        """(index, text, reward) of the candidate response with the highest reward."""
        _require_candidates(candidates)
        return _best(self.rerank(prompt, candidates, top_n=1, **options))

    def info(self) -> dict[str, Any]:
        return self._send("GET", "/info", None)

    def _probe(self, path: str, timeout: float | None = None) -> httpx.Response | None:
        """The probe's answer, None when the server cannot be reached; a bad URL or key raises."""
        try:
            return self._http.get(path, timeout=timeout or self.timeout)
        except RETRY_ERRORS:
            return None

    def health(self) -> bool:
        return _up(self._probe("/health"))

    def ready(self) -> bool:
        """False while the server loads or drains, or once it has failed."""
        return _up(self._probe("/ready"))

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 1.0) -> None:
        """Polls ``/ready`` every ``interval`` seconds; raises TimeoutError after ``timeout`` seconds, and the
        server's error at once when it reports that it failed (its model did not load)."""
        deadline = time.monotonic() + timeout
        while not _ready_or_failed(answer := self._probe("/ready", _probe_timeout(deadline))):
            if time.monotonic() >= deadline:
                raise TimeoutError(_not_ready(self.base_url, timeout, answer))
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

    async def _run(self, build: Callable[[], _Call]) -> Any:
        try:
            return await self._run_call(build())
        except RewardServerError as e:
            if e.status != 413 or self.server_max_items is not None or not self._learned_limits(e, await self.info()):
                raise
        return await self._run_call(build())

    async def _run_call(self, call: _Call) -> Any:
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
        return await self._run(lambda: self._rewards_call(items, return_token_rewards, **options))

    async def preference(self, pairs: Sequence[PreferencePair], **options: Any) -> list[Preference]:
        return await self._run(lambda: self._preference_call(pairs, **options))

    async def rerank(self, query: Prompt, documents: Sequence[Doc], top_n: int | None = None,
                     **options: Any) -> list[RerankResult]:  # fmt: skip
        return await self._run(lambda: self._rerank_call(query, documents, top_n, **options))

    async def best_of_n(self, prompt: Prompt, candidates: Sequence[str], **options: Any) -> tuple[int, str, float]:
        _require_candidates(candidates)
        return _best(await self.rerank(prompt, candidates, top_n=1, **options))

    async def info(self) -> dict[str, Any]:
        return await self._send("GET", "/info", None)

    async def _probe(self, path: str, timeout: float | None = None) -> httpx.Response | None:
        try:
            return await self._http.get(path, timeout=timeout or self.timeout)
        except RETRY_ERRORS:
            return None

    async def health(self) -> bool:
        return _up(await self._probe("/health"))

    async def ready(self) -> bool:
        return _up(await self._probe("/ready"))

    async def wait_until_ready(self, timeout: float = 300.0, interval: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not _ready_or_failed(answer := await self._probe("/ready", _probe_timeout(deadline))):
            if time.monotonic() >= deadline:
                raise TimeoutError(_not_ready(self.base_url, timeout, answer))
            await self.asleep(interval)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

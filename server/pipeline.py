"""The scoring pipeline behind the routes: limits, shared state, and a request's path.

A request's sequences are tokenized on one worker thread off the event loop, queued in the
:class:`~server.batcher.Batcher`, and awaited within one request timeout; every refusal is an
:class:`ApiError` that the app turns into the one error schema.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from dpo import __version__
from dpo.encoding import Encoded
from dpo.errors import EncodingError, ResponseTooLongError
from dpo.scorer import RewardModel, RewardResult
from server import schemas as s
from server.batcher import Batcher, Job, QueueFull, ShuttingDown, TooLarge
from server.metrics import ServerMetrics

Group = tuple[Any, list[str]]  # a prompt (string or messages) and its responses: the prompt is tokenized once
INFERENCE_ROUTES = ("/v1/rewards", "/v1/preference", "/v1/rerank", "/v2/rerank", "/rerank")
ITEM = "item {}".format  # how error messages name sequence i of a request, unless the route names it otherwise


@dataclass
class Limits:
    max_items: int = 256
    max_body_bytes: int = 4 << 20
    max_batch_tokens: int = 8192
    max_queue_requests: int = 256
    max_queue_tokens: int = 1 << 20
    request_timeout: float = 60.0
    retry_after: int = 1


class ApiError(Exception):
    def __init__(self, code: int, message: str, kind: str, headers: dict | None = None):
        self.code, self.message, self.kind, self.headers = code, message, kind, headers


def failed(message: str) -> ApiError:
    """503 for a server that can score nothing until restarted (its load failed, its device is poisoned): no
    ``Retry-After``, and a type of its own (``server_failed``) that clients do not retry."""
    return ApiError(503, message, "server_failed")


def error_response(code: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    body = s.ErrorResponse(error=s.ErrorDetail(message=message, type=kind, code=code))
    return JSONResponse(body.model_dump(), status_code=code, headers=headers)


class State:
    """What the routes share (the model once loaded, the batcher, limits, metrics, drain flag) and a request's path."""

    def __init__(self, limits: Limits, api_key: str | None, recheck: float = 0.0):
        self.limits, self.api_key = limits, api_key
        self.metrics = ServerMetrics(lambda: self.model.ref_cache if self.model is not None else None, __version__,
                                     INFERENCE_ROUTES)  # fmt: skip
        self.recheck = recheck  # bf16-paired: close preference/rerank decisions rescored in float32 (0 = off)
        self.model: RewardModel | None = None
        self.loaded_at = 0
        self.batcher: Batcher | None = None
        self.draining = False
        self.load_error: str | None = None
        self.on_load_error = None  # called with the one-line cause when the background load fails
        self.loader_thread: threading.Thread | None = None
        # Tokenizing runs off the event loop, one request at a time (a fast tokenizer is not re-entrant);
        # requests waiting for it count against max_queue_requests too (429), as the model's queue does.
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="dporm-tokenize")
        self.tokenize_waiting = 0
        self.tokenize_seconds: float | None = None  # moving average of one request's tokenizing, for Retry-After
        self.lock = threading.Lock()

    def attach(self, model: RewardModel) -> None:
        self.loaded_at = int(time.time())  # OpenAI's model list says when a model was created: here, loaded
        self.batcher = Batcher(
            model,
            self.limits.max_batch_tokens,
            self.limits.max_queue_requests,
            self.limits.max_queue_tokens,
            self.metrics.observe,
            self.recheck,
        )
        self.model = model

    def ready_model(self) -> RewardModel:
        """The model; 503 while it loads. Draining only turns /ready to 503: work still arriving is served."""
        if self.load_error is not None:
            raise failed(f"the model failed to load: {self.load_error}")
        if self.model is None:
            raise ApiError(503, "the model is loading", "unavailable", {"Retry-After": "5"})
        return self.model

    async def wait(self, request: Request, future: asyncio.Future, deadline: float, abandon: Callable[[], Any]) -> Any:
        """``future``'s result; 504 past ``deadline``, 499 once the client has gone (``abandon`` runs on both)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(504, f"no result within {self.limits.request_timeout:g} s", "timeout_error")
                done, _ = await asyncio.wait({future}, timeout=min(0.25, remaining))
                if done:
                    return future.result()
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected", "cancelled")
        except BaseException:
            abandon()
            raise

    async def encode_all(self, request: Request, model: RewardModel, make_groups: Callable[[], list[Group]], count: int,
                         options: s.ScoringOptions, deadline: float,
                         name: Callable[[int], str]) -> list[Encoded]:  # fmt: skip
        """Tokenized off the event loop (``make_groups`` too: building conversations of a large body takes time)."""
        if count > self.limits.max_items:
            raise ApiError(413, f"{count} sequences; the limit is {self.limits.max_items}", "request_too_large")
        with self.lock:
            if self.tokenize_waiting >= self.limits.max_queue_requests:
                backlog = math.ceil(self.tokenize_waiting * (self.tokenize_seconds or 0.0))  # one tokenizer thread
                wait_s = min(max(self.retry_after(), backlog), 60)
                raise ApiError(429, f"tokenizer queue full ({self.tokenize_waiting} requests)", "rate_limit_error",
                               {"Retry-After": str(wait_s)})  # fmt: skip
            self.tokenize_waiting += 1
        submitted = time.perf_counter()
        work = self.tokenizing.submit(self.encode_sync, model, make_groups, options, name)

        def release(_) -> None:  # done, failed or cancelled: the phase counts the wait for the tokenizer too
            self.metrics.latency.labels("tokenize").observe(time.perf_counter() - submitted)
            with self.lock:
                self.tokenize_waiting -= 1

        work.add_done_callback(release)
        return await self.wait(request, asyncio.wrap_future(work), deadline, work.cancel)  # cancels it unless started

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's drain time at the recent rate, at least the floor."""
        floor = self.limits.retry_after
        return self.batcher.retry_after(floor) if self.batcher is not None else floor

    def encode_sync(self, model: RewardModel, make_groups: Callable[[], list[Group]], options: s.ScoringOptions,
                    name: Callable[[int], str] = ITEM) -> list[Encoded]:  # fmt: skip
        """``name`` says which part of the request sequence ``i`` is, in error messages.

        ``truncate`` accepts prompts cut from the left; a response is cut only where the artifact was trained so,
        or where the request asks for it (``truncate_response``, as RewardBench's evaluation cuts; a rerank's
        per-document cap)."""
        truncate = options.truncate or options.truncate_response
        cut_responses = True if options.truncate_response else None  # None: the artifact's own setting
        max_length = model.length_limit(options.length_cap())
        start = time.perf_counter()
        seqs: list[Encoded] = []
        for prompt, responses in make_groups():
            encoded = model.encode_responses(prompt, responses, cut_responses, max_length,
                                             options.response_cap())  # the prompt tokenized once  # fmt: skip
            for _ in responses:
                i = len(seqs)
                try:
                    seq = next(encoded)
                except ResponseTooLongError:
                    raise ApiError(
                        413,
                        f"{name(i)}: the response alone exceeds max_length={max_length} tokens "
                        "(a cut response is scored as different text: send truncate_response=true to cut it anyway)",
                        "request_too_large",
                    ) from None
                except EncodingError as e:
                    raise ApiError(422, f"{name(i)}: {e}", "invalid_request_error") from None
                if seq.truncated and not truncate:
                    raise ApiError(
                        413,
                        f"{name(i)}: {len(seq)}+ tokens exceed max_length={max_length}; "
                        "send truncate=true to cut the prompt from the left",
                        "request_too_large",
                    )
                seqs.append(seq)
        seconds = time.perf_counter() - start
        with self.lock:
            old = self.tokenize_seconds
            self.tokenize_seconds = seconds if old is None else 0.8 * old + 0.2 * seconds
        return seqs

    async def score(
        self,
        request: Request,
        make_groups: Callable[[], list[Group]],
        count: int,
        options: s.ScoringOptions,
        token_rewards: bool = False,
        compared: tuple[int, ...] = (),
        name: Callable[[int], str] = ITEM,
    ) -> tuple[RewardModel, list[RewardResult]]:
        """Tokenize, queue and score one request's sequences, all within one request timeout.

        ``name``: the request's own name for sequence ``i`` in error messages (``ITEM``: "item i").
        ``compared``: sizes of the consecutive groups whose rewards the answer compares (``--recheck``).
        """
        model = self.ready_model()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout
        seqs = await self.encode_all(request, model, make_groups, count, options, deadline, name)
        normalize = options.normalize or model.normalize
        job = Job(
            seqs, options.reference_free, token_rewards, loop, loop.create_future(), compared, normalize == "mean"
        )
        try:
            self.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", {"Retry-After": str(self.retry_after())}) from None
        except TooLarge as e:
            raise ApiError(413, str(e), "request_too_large") from None
        except ShuttingDown as e:
            if self.batcher.failure is not None:
                raise failed(str(e)) from None
            raise ApiError(503, str(e), "unavailable", {"Retry-After": "5"}) from None
        self.metrics.truncations.inc(sum(seq.truncated for seq in seqs))  # admitted: counted once
        try:
            results = await self.wait(request, job.future, deadline, lambda: self.batcher.cancel(job))
        except ShuttingDown as e:  # queued when the device failed
            raise failed(str(e)) from None
        if normalize == "mean":
            for r in results:
                r.reward = r.reward / max(r.response_tokens, 1)
        return model, results


def usage(results: list[RewardResult], shared_prompt: bool = False) -> s.Usage:
    """Tokens scored; ``cached_tokens``: those of sequences whose reference log-probs came from the cache."""
    # Prompts cut to different lengths (truncate=true) are different prompts: each counts.
    shared_prompt = shared_prompt and len({r.prompt_tokens for r in results}) == 1
    prompt = results[0].prompt_tokens if shared_prompt else sum(r.prompt_tokens for r in results)
    total = prompt + sum(r.response_tokens for r in results)
    cached = sum(r.prompt_tokens + r.response_tokens for r in results if r.cached_ref)
    if shared_prompt and cached:  # the shared prompt counts once, as in the total
        cached -= (sum(r.cached_ref for r in results) - 1) * results[0].prompt_tokens
    return s.Usage(prompt_tokens=prompt, total_tokens=total, cached_tokens=cached)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))

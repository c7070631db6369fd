"""The reward server: a thin FastAPI layer over :class:`dpo.scorer.RewardModel`.

Routes: POST /v1/rewards, /v1/preference, /v1/rerank and /v2/rerank (Cohere/Jina/vLLM), /rerank (TEI);
GET /health, /ready, /info, /v1/models, /metrics. Every error is ``{"error": {message, type, code}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dpo import __version__
from dpo.encoding import Encoded
from dpo.errors import DpormError, EncodingError, ResponseTooLongError
from dpo.scorer import RewardModel, RewardResult
from server import schemas as s
from server.admission import Admission
from server.batcher import Batcher, Job, QueueFull, ShuttingDown, TooLarge
from server.metrics import ServerMetrics

Group = tuple[Any, list[str]]  # a prompt (string or messages) and its responses: the prompt is tokenized once
INFERENCE_ROUTES = ("/v1/rewards", "/v1/preference", "/v1/rerank", "/v2/rerank", "/rerank")
# With an API key these need it too (they name the models' paths); /health, /ready and /metrics stay open for probes.
PROTECTED_ROUTES = {("POST", path) for path in INFERENCE_ROUTES} | {("GET", "/info"), ("GET", "/v1/models")}
log = logging.getLogger("dporm.server")


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


def _error(code: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    body = s.ErrorResponse(error=s.ErrorDetail(message=message, type=kind, code=code))
    return JSONResponse(body.model_dump(), status_code=code, headers=headers)


class State:
    """What the routes share: the model once loaded, the batcher, limits, metrics, drain flag."""

    def __init__(self, limits: Limits, api_key: str | None, recheck: float = 0.0):
        self.limits, self.api_key = limits, api_key
        self.metrics = ServerMetrics(lambda: self.model.ref_cache if self.model is not None else None)
        self.recheck = recheck  # bf16-paired: close preference/rerank decisions rescored in float32 (0 = off)
        self.model: RewardModel | None = None
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
        self.batcher = Batcher(
            model,
            self.limits.max_batch_tokens,
            self.limits.max_queue_requests,
            self.limits.max_queue_tokens,
            self.metrics.observe,
            self.recheck,
        )
        self.model = model


def create_app(state: State, loader=None) -> FastAPI:
    """``loader`` (optional) builds the RewardModel in a background thread; /ready answers 503 until it is done."""

    async def lifespan(app: FastAPI):
        if loader is not None and state.model is None:

            def load() -> None:
                try:
                    state.attach(loader())
                except Exception as e:  # reported by /ready and /info, and to on_load_error (dporm serve exits)
                    state.load_error = str(e) if isinstance(e, DpormError) else f"{type(e).__name__}: {e}"
                    if state.on_load_error is not None:
                        state.on_load_error(state.load_error)

            state.loader_thread = threading.Thread(target=load, name="dporm-loader", daemon=True)
            state.loader_thread.start()
        yield
        state.draining = True
        if state.batcher is not None:
            await asyncio.to_thread(state.batcher.stop)
        state.tokenizing.shutdown(wait=False)

    app = FastAPI(
        title="dporm reward server",
        version=__version__,
        lifespan=lifespan,
        responses={code: {"model": s.ErrorResponse} for code in (401, 413, 422, 429, 503, 504)},
    )
    app.state.dporm = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _error(e.code, e.message, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":  # loc holds a character offset, not a field
            reason = first.get("ctx", {}).get("error", "JSON decode error")
            message = f"the body is not valid JSON (at character {loc[-1]}: {reason})"
            return _error(422, message, "invalid_request_error")
        if loc == ("body",) and "json" not in request.headers.get("content-type", ""):
            return _error(422, "the body must be a JSON object sent with 'Content-Type: application/json'",
                          "invalid_request_error")  # fmt: skip
        where = ".".join(str(p) for p in loc if p != "body")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return _error(422, f"{where}: {message}" if where else message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400 and isinstance(e.__cause__, ClientDisconnect):  # gone mid-body: nobody to answer
            return _error(499, "client disconnected", "cancelled")
        if e.status_code == 400:  # FastAPI's "error parsing the body" (bad UTF-8, nesting too deep): malformed input
            return _error(422, str(e.detail), "invalid_request_error")
        kind = "not_found_error" if e.status_code == 404 else "http_error"
        return _error(e.status_code, str(e.detail), kind, getattr(e, "headers", None))  # 405 keeps its Allow

    def authorize(headers: dict[str, str]) -> JSONResponse | None:
        """401 unless the API key (if any) is given as ``Authorization: Bearer KEY`` (constant-time comparison)."""
        if state.api_key is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), state.api_key.encode()):
            return None
        message = "missing or invalid API key (Authorization: Bearer <key>)"
        return _error(401, message, "authentication_error", {"WWW-Authenticate": "Bearer"})

    def endpoints() -> set[str]:
        return {route.path for route in app.routes}

    app.add_middleware(Admission, state=state, protected_routes=PROTECTED_ROUTES, authorize=authorize, error=_error,
                       endpoints=endpoints)  # fmt: skip

    def ready_model() -> RewardModel:
        """The model; 503 while it loads. Draining only turns /ready to 503: work still arriving is served."""
        if state.model is None:
            raise ApiError(503, state.load_error or "the model is loading", "unavailable", {"Retry-After": "5"})
        return state.model

    async def wait(request: Request, future: asyncio.Future, deadline: float, abandon: Callable[[], Any]) -> Any:
        """``future``'s result; 504 past ``deadline``, 499 once the client has gone (``abandon`` runs on both)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(504, f"no result within {state.limits.request_timeout:g} s", "timeout_error")
                done, _ = await asyncio.wait({future}, timeout=min(0.25, remaining))
                if done:
                    return future.result()
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected", "cancelled")
        except BaseException:
            abandon()
            raise

    async def encode_all(request: Request, model: RewardModel, make_groups: Callable[[], list[Group]], count: int,
                         options: s.ScoringOptions, deadline: float) -> list[Encoded]:  # fmt: skip
        """Tokenized off the event loop (``make_groups`` too: building conversations of a large body takes time)."""
        if count > state.limits.max_items:
            raise ApiError(413, f"{count} sequences; the limit is {state.limits.max_items}", "request_too_large")
        with state.lock:
            if state.tokenize_waiting >= state.limits.max_queue_requests:
                backlog = math.ceil(state.tokenize_waiting * (state.tokenize_seconds or 0.0))  # one tokenizer thread
                wait_s = min(max(retry_after(), backlog), 60)
                raise ApiError(429, f"tokenizer queue full ({state.tokenize_waiting} requests)", "rate_limit_error",
                               {"Retry-After": str(wait_s)})  # fmt: skip
            state.tokenize_waiting += 1
        work = state.tokenizing.submit(encode_sync, model, make_groups, options.truncate, options.truncate_response)

        def release(_) -> None:
            with state.lock:
                state.tokenize_waiting -= 1

        work.add_done_callback(release)
        return await wait(request, asyncio.wrap_future(work), deadline, work.cancel)  # cancels it unless started

    def retry_after() -> int:
        """Seconds a refused client should wait: the queue's drain time at the recent rate, at least the floor."""
        floor = state.limits.retry_after
        return state.batcher.retry_after(floor) if state.batcher is not None else floor

    def encode_sync(model: RewardModel, make_groups: Callable[[], list[Group]], truncate: bool,
                    truncate_response: bool = False) -> list[Encoded]:  # fmt: skip
        """``truncate`` accepts prompts cut from the left; a response is cut only where the artifact was trained so,
        or where the request asks for it (``truncate_response``, as RewardBench's evaluation cuts)."""
        truncate = truncate or truncate_response
        cut_responses = True if truncate_response else None  # None: the artifact's own setting
        start = time.perf_counter()
        seqs: list[Encoded] = []
        for prompt, responses in make_groups():
            encoded = model.encode_responses(prompt, responses, cut_responses)  # the prompt tokenized once
            for _ in responses:
                i = len(seqs)
                try:
                    seq = next(encoded)
                except ResponseTooLongError:
                    raise ApiError(
                        413,
                        f"item {i}: the response alone exceeds max_length={model.max_length} tokens "
                        "(a cut response is scored as different text: send truncate_response=true to cut it anyway)",
                        "request_too_large",
                    ) from None
                except EncodingError as e:
                    raise ApiError(422, f"item {i}: {e}", "invalid_request_error") from None
                if seq.truncated and not truncate:
                    raise ApiError(
                        413,
                        f"item {i}: {len(seq)}+ tokens exceed max_length={model.max_length}; "
                        "send truncate=true to cut the prompt from the left",
                        "request_too_large",
                    )
                seqs.append(seq)
        seconds = time.perf_counter() - start
        state.metrics.latency.labels("tokenize").observe(seconds)
        with state.lock:
            old = state.tokenize_seconds
            state.tokenize_seconds = seconds if old is None else 0.8 * old + 0.2 * seconds
        return seqs

    async def score(
        request: Request, make_groups: Callable[[], list[Group]], count: int, options: s.ScoringOptions,
        token_rewards: bool = False, compared: tuple[int, ...] = (),
    ) -> tuple[RewardModel, list[RewardResult]]:  # fmt: skip
        """Tokenize, queue and score one request's sequences, all within one request timeout.

        ``compared``: sizes of the consecutive groups whose rewards the answer compares (``--recheck``).
        """
        model = ready_model()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + state.limits.request_timeout
        seqs = await encode_all(request, model, make_groups, count, options, deadline)
        normalize = options.normalize or model.normalize
        job = Job(
            seqs, options.reference_free, token_rewards, loop, loop.create_future(), compared, normalize == "mean"
        )
        try:
            state.batcher.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", {"Retry-After": str(retry_after())}) from None
        except TooLarge as e:
            raise ApiError(413, str(e), "request_too_large") from None
        except ShuttingDown as e:
            raise ApiError(503, str(e), "unavailable", {"Retry-After": "5"}) from None
        state.metrics.truncations.inc(sum(seq.truncated for seq in seqs))  # admitted: counted once
        try:
            results = await wait(request, job.future, deadline, lambda: state.batcher.cancel(job))
        except ShuttingDown as e:  # queued when the device failed
            raise ApiError(503, str(e), "unavailable") from None
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

    @app.post("/v1/rewards", response_model=s.RewardsResponse)
    async def rewards(body: s.RewardsRequest, request: Request) -> s.RewardsResponse:
        items = body.items

        def make_groups() -> list[Group]:
            """Consecutive items with one prompt are its responses: rendered, tokenized and cut once, as a pair."""
            groups: list[Group] = []
            for it in items:
                conversation = it.conversation()
                if groups and groups[-1][0] == conversation:
                    groups[-1][1].append(it.response)
                else:
                    groups.append((conversation, [it.response]))
            return groups

        model, results = await score(request, make_groups, len(items), body, body.return_token_rewards)
        data = [
            s.RewardData(
                index=i,
                reward=r.reward,
                logp_policy=r.logp_policy,
                logp_ref=r.logp_ref,
                response_tokens=r.response_tokens,
                truncated=r.truncated,
                token_rewards=r.token_rewards,
            )
            for i, r in enumerate(results)
        ]
        return s.RewardsResponse(model=model.name, data=data, usage=usage(results))

    @app.post("/v1/preference", response_model=s.PreferenceResponse)
    async def preference(body: s.PreferenceRequest, request: Request) -> s.PreferenceResponse:
        pairs = body.pairs

        def make_groups() -> list[Group]:
            return [(p.conversation(), [p.response_a, p.response_b]) for p in pairs]

        model, results = await score(request, make_groups, 2 * len(pairs), body, compared=(2,) * len(pairs))
        data = []
        for i in range(len(body.pairs)):
            a, b = results[2 * i].reward, results[2 * i + 1].reward
            data.append(s.PreferenceData(index=i, reward_a=a, reward_b=b, margin=a - b, prob_a_over_b=_sigmoid(a - b),
                                         rechecked=results[2 * i].rechecked))  # fmt: skip
        return s.PreferenceResponse(model=model.name, data=data, usage=usage(results))

    async def rank(request: Request, conversation: Callable[[], Any], texts: list[str], options: s.ScoringOptions):
        model, results = await score(request, lambda: [(conversation(), texts)], len(texts), options,
                                     compared=(len(texts),))  # fmt: skip
        order = sorted(range(len(texts)), key=lambda i: -results[i].reward)
        return model, results, order

    @app.post("/v1/rerank", response_model=s.RerankResponse, response_model_exclude_none=True)
    @app.post("/v2/rerank", response_model=s.RerankResponse, response_model_exclude_none=True)
    async def rerank(body: s.RerankRequest, request: Request) -> s.RerankResponse:
        texts = body.texts()
        model, results, order = await rank(request, body.conversation, texts, body)
        top = order[: body.top_n] if body.top_n else order
        out = [
            s.RerankResult(
                index=i,
                relevance_score=results[i].reward,
                document=s.Document(text=texts[i]) if body.return_documents else None,
            )
            for i in top
        ]
        return s.RerankResponse(
            id=f"rerank-{uuid.uuid4().hex}", model=model.name, results=out, usage=usage(results, shared_prompt=True)
        )

    @app.post("/rerank", response_model=list[s.TEIRank], response_model_exclude_none=True)
    async def rerank_tei(body: s.TEIRerankRequest, request: Request) -> list[s.TEIRank]:
        options = s.ScoringOptions(truncate=body.truncate)
        _, results, order = await rank(request, lambda: body.query, body.texts, options)
        return [
            s.TEIRank(
                index=i,
                score=results[i].reward if body.raw_scores else _sigmoid(results[i].reward),
                text=body.texts[i] if body.return_text else None,
            )
            for i in order
        ]

    def failure() -> str | None:
        """Why this server can score nothing more until restarted (a poisoned device, a dead worker)."""
        return state.batcher.failure if state.batcher is not None else None

    @app.get("/health")
    async def health():
        if (why := failure()) is not None:  # liveness fails: an orchestrator restarts the process
            return _error(503, f"unhealthy: {why}", "unavailable")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining or state.model is None or failure() is not None:
            why = "draining" if state.draining else ("failed: " + state.load_error if state.load_error else "loading")
            why = f"failed: {failure()}" if failure() is not None else why
            return _error(503, f"not ready ({why})", "unavailable", {"Retry-After": "5"})
        return {"status": "ready"}

    @app.get("/info")
    async def info() -> dict:
        m = state.model
        limits = {k: v for k, v in vars(state.limits).items()}
        if m is None:
            return {"version": __version__, "ready": False, "load_error": state.load_error, "limits": limits}
        return {
            "version": __version__,
            "ready": not state.draining,
            "model": m.name,
            "beta": m.beta,
            "normalize": m.normalize,
            "max_length": m.max_length,
            "reference_free": not m.has_reference,
            "models": m.info,
            "device": str(m.device),
            "dtype": m.precision,
            "recheck": state.recheck if m.paired is not None else None,
            "reference_cache": {
                "capacity": m.ref_cache.capacity,
                "hits": m.ref_cache.hits,
                "misses": m.ref_cache.misses,
            },
            "limits": limits,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        name = ready_model().name
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "dporm"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if state.batcher is not None:
            requests, tokens = state.batcher.depth
            state.metrics.queue_requests.set(requests)
            state.metrics.queue_tokens.set(tokens)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))

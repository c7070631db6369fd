"""The reward server: a thin FastAPI layer over :class:`dpo.scorer.RewardModel`.

Routes: POST /v1/rewards, /v1/preference, /v1/rerank and /v2/rerank (Cohere/Jina/vLLM), /rerank (TEI);
GET /health, /ready, /info, /v1/models, /metrics. Every error is ``{"error": {message, type, code}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import get_route_path

from dpo import __version__
from dpo.errors import DpormError
from server import schemas as s
from server.admission import Admission
from server.pipeline import INFERENCE_ROUTES, ApiError, Group, Limits, State, error_response, sigmoid, usage

__all__ = ["INFERENCE_ROUTES", "Limits", "State", "create_app"]
# With an API key, every other path needs it (/info and /v1/models name the models' paths); these stay open for
# probes, scrapers and the API's own documentation.
OPEN_ROUTES = {"/health", "/ready", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
log = logging.getLogger("dporm.server")


def _errors(*codes: int) -> dict[int | str, dict]:
    """OpenAPI entries for a route's error answers, all in the one error schema."""
    headers = {429: "Retry-After", 503: "Retry-After", 401: "WWW-Authenticate"}
    return {
        code: {"model": s.ErrorResponse, "description": DESCRIPTIONS[code]}
        | ({"headers": {headers[code]: {"schema": {"type": "string"}}}} if code in headers else {})
        for code in codes
    }


DESCRIPTIONS = {
    401: "missing or invalid API key",
    413: "too many items, body too large, or a sequence over max_length without truncation",
    422: "malformed input",
    429: "queue full (Retry-After says when to retry)",
    500: "server bug (counted in /metrics)",
    503: "loading or draining (Retry-After), or failed for good (type server_failed)",
    504: "no answer within --request-timeout",
}
SCORING_ERRORS = _errors(401, 413, 422, 429, 500, 503, 504)


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
    )
    app.state.dporm = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.code, e.message, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = tuple(first.get("loc", ()))
        if first.get("type") == "json_invalid":  # loc holds a character offset, not a field
            reason = first.get("ctx", {}).get("error", "JSON decode error")
            message = f"the body is not valid JSON (at character {loc[-1]}: {reason})"
            return error_response(422, message, "invalid_request_error")
        if loc == ("body",) and "json" not in request.headers.get("content-type", ""):
            return error_response(422, "the body must be a JSON object sent with 'Content-Type: application/json'",
                          "invalid_request_error")  # fmt: skip
        if loc == ("body",) and first.get("type") == "missing":
            return error_response(422, "the request has no body: send a JSON object", "invalid_request_error")
        if get_route_path(request.scope) == "/rerank" and loc[1:2] and loc[1] in s.RERANK_DIALECTS:
            loc = loc[:1] + loc[2:]  # /rerank's union tag: not a field
        where = ".".join(str(p) for p in loc if p != "body")
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error_response(422, f"{where}: {message}" if where else message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 400 and isinstance(e.__cause__, ClientDisconnect):  # gone mid-body: nobody to answer
            return error_response(499, "client disconnected", "cancelled")
        if e.status_code == 400:  # FastAPI's "error parsing the body" (bad UTF-8, nesting too deep): malformed input
            return error_response(422, str(e.detail), "invalid_request_error")
        kind = "not_found_error" if e.status_code == 404 else "http_error"
        return error_response(e.status_code, str(e.detail), kind, getattr(e, "headers", None))  # 405 keeps its Allow

    def authorize(headers: dict[str, str]) -> JSONResponse | None:
        """401 unless the API key (if any) is given as ``Authorization: Bearer KEY`` (constant-time comparison)."""
        if state.api_key is None:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), state.api_key.encode()):
            return None
        message = "missing or invalid API key (Authorization: Bearer <key>)"
        return error_response(401, message, "authentication_error", {"WWW-Authenticate": "Bearer"})

    def endpoints() -> set[str]:
        return {route.path for route in app.routes}

    app.add_middleware(Admission, state=state, open_routes=OPEN_ROUTES, authorize=authorize,
                       error=error_response, endpoints=endpoints, inference=INFERENCE_ROUTES)  # fmt: skip

    @app.post("/v1/rewards", response_model=s.RewardsResponse, responses=SCORING_ERRORS)
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

        model, results = await state.score(request, make_groups, len(items), body, body.return_token_rewards)
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

    @app.post("/v1/preference", response_model=s.PreferenceResponse, responses=SCORING_ERRORS)
    async def preference(body: s.PreferenceRequest, request: Request) -> s.PreferenceResponse:
        pairs = body.pairs

        def make_groups() -> list[Group]:
            return [(p.conversation(), [p.response_a, p.response_b]) for p in pairs]

        pair = lambda i: f"pair {i // 2} response_{'ab'[i % 2]}"  # noqa: E731
        model, results = await state.score(request, make_groups, 2 * len(pairs), body, compared=(2,) * len(pairs),
                                           name=pair)  # fmt: skip
        data = []
        for i in range(len(body.pairs)):
            a, b = results[2 * i].reward, results[2 * i + 1].reward
            data.append(s.PreferenceData(index=i, reward_a=a, reward_b=b, margin=a - b, prob_a_over_b=sigmoid(a - b),
                                         rechecked=results[2 * i].rechecked))  # fmt: skip
        return s.PreferenceResponse(model=model.name, data=data, usage=usage(results))

    async def rank(request: Request, conversation: Callable[[], Any], texts: list[str], options: s.ScoringOptions,
                   kind: str = "document"):  # fmt: skip
        groups = lambda: [(conversation(), texts)]  # noqa: E731
        model, results = await state.score(request, groups, len(texts), options, compared=(len(texts),),
                                           name=f"{kind} {{}}".format)  # fmt: skip
        order = sorted(range(len(texts)), key=lambda i: -results[i].reward)
        return model, results, order

    @app.post("/v1/rerank", response_model=s.RerankResponse, response_model_exclude_none=True, responses=SCORING_ERRORS)
    @app.post("/v2/rerank", response_model=s.RerankResponse, response_model_exclude_none=True, responses=SCORING_ERRORS)
    async def rerank(body: s.RerankRequest, request: Request) -> s.RerankResponse:
        texts = body.texts()
        model, results, order = await rank(request, body.conversation, texts, body)
        top = order[: body.top_n] if body.top_n else order
        out = [
            s.RerankResult(
                index=i,
                relevance_score=sigmoid(results[i].reward) if body.use_activation else results[i].reward,
                document=s.Document(text=texts[i]) if body.return_documents else None,
            )
            for i in top
        ]
        return s.RerankResponse(
            id=f"rerank-{uuid.uuid4().hex}", model=model.name, results=out, usage=usage(results, shared_prompt=True)
        )

    @app.post("/rerank", response_model=list[s.TEIRank] | s.RerankResponse, response_model_exclude_none=True,
              responses=SCORING_ERRORS)  # fmt: skip
    async def rerank_tei(body: s.AnyRerankRequest, request: Request) -> list[s.TEIRank] | s.RerankResponse:
        """TEI's dialect; a body with ``documents`` is the Cohere/Jina one, as vLLM serves it here too."""
        if isinstance(body, s.RerankRequest):
            return await rerank(body, request)
        options = s.ScoringOptions(truncate=bool(body.truncate), truncate_response=bool(body.truncate))
        _, results, order = await rank(request, lambda: body.query, body.texts, options, kind="text")
        return [
            s.TEIRank(
                index=i,
                score=results[i].reward if body.raw_scores else sigmoid(results[i].reward),
                text=body.texts[i] if body.return_text else None,
            )
            for i in order
        ]

    def failure() -> str | None:
        """Why this server can score nothing more until restarted (a poisoned device, a dead worker)."""
        return state.batcher.failure if state.batcher is not None else None

    @app.get("/health", responses=_errors(503))
    @app.head("/health", include_in_schema=False)  # load balancers' probes
    async def health():
        if (why := failure()) is not None:  # liveness fails: an orchestrator restarts the process
            return error_response(503, f"unhealthy: {why}", "server_failed")
        return {"status": "ok"}

    @app.get("/ready", responses=_errors(503))
    @app.head("/ready", include_in_schema=False)
    async def ready():
        if (why := failure() or state.load_error) is not None:  # for good: no Retry-After
            return error_response(503, f"not ready (failed: {why})", "server_failed")
        if state.draining or state.model is None:
            return error_response(503, f"not ready ({'draining' if state.draining else 'loading'})", "unavailable",
                                  {"Retry-After": "5"})  # fmt: skip
        return {"status": "ready"}

    @app.get("/info", responses=_errors(401))
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

    @app.get("/v1/models", responses=_errors(401, 503))
    async def models() -> dict:
        name = state.ready_model().name
        model = {"id": name, "object": "model", "created": state.loaded_at, "owned_by": "dporm",
                 "max_model_len": state.model.max_length}  # fmt: skip
        return {"object": "list", "data": [model]}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})  # fmt: skip
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if state.batcher is not None:
            requests, tokens = state.batcher.depth
            state.metrics.queue_requests.set(requests)
            state.metrics.queue_tokens.set(tokens)
        state.metrics.tokenize_waiting.set(state.tokenize_waiting)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

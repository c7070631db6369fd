"""What both reward-server clients share, transport-free: result types, request building and splitting, answer
checking and parsing, and the retry policy. ``server.client`` holds the clients themselves."""

from __future__ import annotations

import email.utils
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import httpx

Prompt = str | list[dict[str, str]]  # a plain prompt, or chat messages [{"role": ..., "content": ...}]
RewardItem = tuple[Prompt, str] | dict[str, Any]  # (prompt, response), or a dict in the server's item schema
PreferencePair = tuple[Prompt, str, str] | dict[str, Any]  # (prompt, response_a, response_b), or a dict
Doc = str | dict[str, str]  # a rerank document: "text" or {"text": "text"}

RETRY_STATUS = frozenset({429, 502, 503, 504})  # busy, or a gateway's trouble; 500 is a server bug: not retried
FAILED = "server_failed"  # the error type of a server that can score nothing until restarted: not retried
# Worth another try: the server was busy, slow or unreachable; not a bad URL (UnsupportedProtocol) or a bad request.
# The same errors mean "not up" to a health or readiness probe.
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
        shown = f" ({code})" if code is not None and code != status else ""  # dporm's server sends the status
        super().__init__(f"HTTP {status} {type or 'error'}{shown}: {message}")
        self.status, self.type, self.code, self.message = status, type, code, message


# --------------------------------------------------------------------------------------------------------------------
# request building and response parsing, shared by both clients
def _prompt_fields(prompt: Prompt, key: str = "prompt") -> dict[str, Any]:
    if isinstance(prompt, str):
        return {key: prompt}
    if isinstance(prompt, list | tuple) and all(isinstance(m, dict) for m in prompt):
        return {"messages": list(prompt)}
    raise TypeError(
        f"a prompt is a string or a list of chat messages ({{'role': ..., 'content': ...}} dicts), got "
        f"{type(prompt).__name__}{' (put one message in a list)' if isinstance(prompt, dict) else ''}"
    )


def _item(item: tuple | dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A (prompt, *texts) tuple as a request item, ``keys`` naming the texts; dicts pass through as they are."""
    if isinstance(item, dict):
        return dict(item)
    prompt, *texts = item
    return {**_prompt_fields(prompt), **dict(zip(keys, texts, strict=True))}


def _prompt_of(item: dict[str, Any]) -> Any:
    """What the server compares to group consecutive items of one prompt (a ``prompt`` or ``messages``)."""
    return item.get("prompt", item.get("messages"))


def _chunks(keys: Sequence[Any], size: int) -> tuple[list[range], list[range]]:
    """Spans of at most ``size`` consecutive items, cut between runs of equal ``keys`` where a run fits in one;
    and the runs that had to be split (longer than ``size``)."""
    runs, split, start = [], [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            runs.append(range(start, i))
            start = i
    spans: list[range] = []
    for run in runs:
        if len(run) > size:
            split.append(run)
            spans.extend(range(s, min(s + size, run.stop)) for s in range(run.start, run.stop, size))
        elif spans and spans[-1].stop == run.start and len(spans[-1]) + len(run) <= size:
            spans[-1] = range(spans[-1].start, run.stop)
        else:
            spans.append(run)
    return spans, split


def _check_indices(indices: list[int], rows: int, what: str, count: int | None = None) -> None:
    """An answer holds ``count`` (default all ``rows``) distinct rows of its request, or results would be matched to
    the wrong inputs."""
    count = rows if count is None else count
    if len(indices) != count or len(set(indices)) != count or not all(0 <= i < rows for i in indices):
        raise RewardServerError(200, "invalid_response", None, f"the answer's {what} indices {sorted(indices)[:8]} "
                                f"are not {count} distinct rows of the {rows} sent")  # fmt: skip


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
        try:
            return response.json()
        except ValueError:  # a proxy's page, say
            text = response.text[:200] or "(empty)"
            raise RewardServerError(response.status_code, "invalid_response", None, f"not JSON: {text}") from None
    try:
        error = response.json()["error"]
        type_, code, message = error.get("type"), error.get("code"), str(error["message"])
    except (ValueError, KeyError, TypeError, AttributeError):  # not the error schema: keep the raw text
        type_, code, message = None, None, response.text or response.reason_phrase
    raise RewardServerError(response.status_code, type_, code, message)


def _error_type(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


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
    jitter = 0.25  # backoff waits are cut by up to this fraction at random, so that clients do not retry in step

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
        if self.api_key and not (self.api_key.isascii() and self.api_key.isprintable() and self.api_key.strip() ==
                                 self.api_key and " " not in self.api_key):  # fmt: skip
            raise ValueError("the API key holds whitespace or a character that cannot go in a header "
                             "(a trailing newline, read from a file?)")  # fmt: skip
        self.max_retries, self.backoff, self.batch_size = max_retries, backoff, batch_size
        self.server_max_items: int | None = None  # the server's --max-items, once a 413 made the client read it
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = self._http_class(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def _retry_delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before the next try, or None to stop. ``response`` is None after a connection error."""
        if attempt >= self.max_retries:
            return None
        if response is not None and (response.status_code not in RETRY_STATUS or _error_type(response) == FAILED):
            return None
        wait = _retry_after(response.headers.get("Retry-After")) if response is not None else None
        if wait is not None:
            return wait
        return min(self.backoff * 2**attempt, MAX_BACKOFF) * (1 - self.jitter * random.random())

    def _sizes(self) -> tuple[int, int]:
        """Sequences and documents per request: the client's sizes, within the server's --max-items once known."""
        cap = self.server_max_items or math.inf
        return int(min(self.batch_size, cap)), int(min(self.max_documents, cap))

    def _learned_limits(self, error: RewardServerError, info: dict[str, Any]) -> bool:
        """After a 413, the server's /info: True (retry the call, split anew) when its --max-items is below what
        the client sent; False leaves the 413 as it was (a sequence too long, a body too large)."""
        limit = (info.get("limits") or {}).get("max_items") if isinstance(info, dict) else None
        if error.status != 413 or not isinstance(limit, int) or limit < 1 or limit >= min(self._sizes()):
            return False
        self.server_max_items = limit
        return True

    def _batched(self, path: str, key: str, items: list[dict], options: dict, result: type, spans: list[range],
                 check: Callable[[list[Any]], None] = lambda results: None) -> _Call:  # fmt: skip
        """One request per span of items; the answers checked and re-indexed to the caller's order."""
        requests = [("POST", path, {key: items[span.start : span.stop], **options}) for span in spans]

        def fold(answers: list[Any]) -> list[Any]:
            results = []
            for answer, span in zip(answers, spans, strict=True):
                _check_indices([d["index"] for d in answer["data"]], len(span), key)
                results += [_parse(result, d, span.start) for d in answer["data"]]
            results.sort(key=lambda r: r.index)
            check(results)
            return results

        return _Call(requests, fold)

    def _rewards_call(self, items: Sequence[RewardItem], token_rewards: bool, **options: Any) -> _Call:
        """Runs of items of one prompt stay in one request where they fit (a prompt is cut once per run)."""
        options = _scoring_options(**options) | {"return_token_rewards": token_rewards}
        body = [_item(it, ("response",)) for it in items]
        spans, split = _chunks([_prompt_of(it) for it in body], self._sizes()[0])

        def same_cut(results: list[Reward]) -> None:
            """A run split over requests was cut per request: refused where a cut happened (else it is exact)."""
            for run in split:
                if any(results[i].truncated for i in run):
                    raise ValueError(f"items {run.start}..{run.stop - 1} share one prompt, more than the "
                                     f"{self._sizes()[0]} per request, and were truncated: in one request the server "
                                     "cuts that prompt once for all of them, split over several it was cut apart; "
                                     "raise batch_size (and the server's --max-items) or send fewer")  # fmt: skip

        return self._batched("/v1/rewards", "items", body, options, Reward, spans, same_cut)

    def _preference_call(self, pairs: Sequence[PreferencePair], **options: Any) -> _Call:
        """``batch_size // 2`` pairs per request: ``batch_size`` counts sequences, as the server's ``--max-items``."""
        items = [_item(pair, ("response_a", "response_b")) for pair in pairs]
        size = max(1, self._sizes()[0] // 2)
        spans = [range(s, min(s + size, len(items))) for s in range(0, len(items), size)]
        return self._batched("/v1/preference", "pairs", items, _scoring_options(**options), Preference, spans)

    def _rerank_call(self, query: Prompt, documents: Sequence[Doc], top_n: int | None, **options: Any) -> _Call:
        """Requests of ``max_documents`` (each shares its prompt); merged best first, with each document's text."""
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
            raise ValueError(f"top_n must be a non-negative int (0 or None: all), got {top_n!r}")
        texts = [doc if isinstance(doc, str) else doc["text"] for doc in documents]
        prompt, size = _prompt_fields(query, key="query") | _scoring_options(**options), self._sizes()[1]
        starts = range(0, len(documents), size)
        if len(starts) > 1 and (prompt.get("truncate") or prompt.get("truncate_response")):
            raise ValueError(f"{len(documents)} documents, more than the {size} per request: with truncate the "
                             "server must cut the query once for all of them; raise max_documents (and the "
                             "server's --max-items) or send fewer")  # fmt: skip
        one = len(starts) == 1 and top_n is not None  # a single request can let the server cut to top_n
        requests = [("POST", "/v1/rerank", {**prompt, "documents": list(documents[s : s + size])}
                     | ({"top_n": top_n} if one else {})) for s in starts]  # fmt: skip

        def fold(answers: list[Any]) -> list[RerankResult]:
            results = []
            for answer, s in zip(answers, starts, strict=True):
                n = len(documents[s : s + size])
                _check_indices([r["index"] for r in answer["results"]], n, "documents", min(top_n, n) if one else n)
                results += [RerankResult(s + r["index"], r["relevance_score"], texts[s + r["index"]])
                            for r in answer["results"]]  # fmt: skip
            results.sort(key=lambda r: (-r.relevance_score, r.index))  # best first; ties in input order, as the server
            return results[:top_n] if top_n else results

        return _Call(requests, fold)


def _up(answer: httpx.Response | None) -> bool:
    return answer is not None and answer.status_code == 200


def _ready_or_failed(answer: httpx.Response | None) -> bool:
    """``/ready``'s verdict for a wait: a server that reports it has failed raises its error (no wait can help)."""
    if answer is not None and answer.status_code == 503 and _error_type(answer) == FAILED:
        _unwrap(answer)
    return _up(answer)


def _not_ready(base_url: str, timeout: float, answer: httpx.Response | None) -> str:
    last = "unreachable" if answer is None else f"last answer HTTP {answer.status_code}"
    if answer is not None and (error := _error_type(answer)) is not None:
        last += f" {error}: {answer.json()['error'].get('message')}"
    return f"{base_url} not ready after {timeout:g}s ({last})"


def _probe_timeout(deadline: float) -> float:
    """A readiness probe's own timeout: what is left before ``deadline`` (at least 0.1 s, at most 10 s)."""
    return min(max(deadline - time.monotonic(), 0.1), 10.0)

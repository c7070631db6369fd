"""Dynamic batching: requests from the event loop, model compute on one worker thread.

Jobs (one per HTTP request) wait in a queue bounded in requests and tokens (full: 429). The
worker takes queued jobs up to a token budget, scores all their sequences together
(sequences that share a prompt compute it once, across requests too), and resolves each
job's future on the event loop. A cancelled job (client gone, timed out) leaves the queue at once,
and its place; one already taken is not scored further (it stops between forwards). The token budget
counts what a forward computes: tokens, or rows × the longest row where the model pads batches (on
accelerators). When a batch fails, its jobs are scored again one by one, so a bad request fails alone;
an accelerator error that poisons the device (CUDA errors persist) marks the batcher broken, and every
later job is refused (503) while /health reports it, so that an orchestrator restarts the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dpo.encoding import Encoded
from dpo.scorer import RewardModel, RewardResult, close_call


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    """The worker has stopped: nothing more is scored here (503)."""


class TooLarge(Exception):
    """A job bigger than the whole queue: it can never be admitted (413, not 429)."""


@dataclass
class Job:
    seqs: list[Encoded]
    reference_free: bool
    token_rewards: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    groups: tuple[int, ...] = ()  # sizes of the groups whose rewards are compared (pairs, rerank documents)
    mean: bool = False  # the request compares rewards per response token
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


class Batcher:
    def __init__(
        self,
        model: RewardModel,
        max_batch_tokens: int = 8192,
        max_queue_requests: int = 256,
        max_queue_tokens: int = 1 << 20,
        observe=None,
        recheck: float = 0.0,
    ):
        self.model, self.max_batch_tokens, self.recheck = model, max_batch_tokens, recheck
        self.max_queue_requests, self.max_queue_tokens = max_queue_requests, max_queue_tokens
        self.observe = observe or (lambda name, value: None)  # metrics hook: ("queue_seconds", s), ...
        self._queue: deque[Job] = deque()
        self._queued_tokens = 0
        self._cond = threading.Condition()
        self._stopping = False
        self.broken: str | None = None  # why the device can score nothing more (a sticky accelerator error)
        pads = getattr(model, "forward_pads", None)  # a stub model in tests may not say
        self._padded = {f: bool(pads(f)) if pads is not None else False for f in (False, True)}
        self._tokens_per_second: float | None = None  # moving average of the forwards' throughput
        self._thread = threading.Thread(target=self._run, name="dporm-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> tuple[int, int]:
        with self._cond:
            return len(self._queue), self._queued_tokens

    def retry_after(self, floor: int, ceiling: int = 60) -> int:
        """Seconds until the queued tokens are likely scored, at the recent forward rate; in ``[floor, ceiling]``."""
        with self._cond:
            tokens, rate = self._queued_tokens, self._tokens_per_second
        if not rate:
            return floor
        return max(floor, min(ceiling, math.ceil(tokens / rate)))

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        """Why this batcher can score nothing more (device error, dead worker), or None while it can."""
        if self.broken is not None:
            return self.broken
        return None if self._thread.is_alive() or self._stopping else "the scoring worker thread has stopped"

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self.failure is not None:
                raise ShuttingDown(f"the server cannot score: {self.failure}; restart it")
            if job.tokens > self.max_queue_tokens:
                raise TooLarge(f"{job.tokens} tokens; the queue holds at most {self.max_queue_tokens}")
            if len(self._queue) >= self.max_queue_requests or self._queued_tokens + job.tokens > self.max_queue_tokens:
                raise QueueFull(f"queue full ({len(self._queue)} requests, {self._queued_tokens} tokens)")
            self._queue.append(job)
            self._queued_tokens += job.tokens
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drop ``job``: out of the queue (its requests and tokens free for others) if it is still there."""
        with self._cond:
            job.cancelled = True
            try:
                self._queue.remove(job)
            except ValueError:  # already taken by the worker
                return
            self._queued_tokens -= job.tokens
        self.observe("queue_seconds", time.perf_counter() - job.enqueued)  # its wait counts: timeouts are the long ones

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            batch, tokens = [], 0
            while self._queue and (not batch or tokens + self._queue[0].tokens <= self.max_batch_tokens):
                job = self._queue.popleft()
                self._queued_tokens -= job.tokens
                if not job.cancelled:
                    batch.append(job)
                    tokens += job.tokens
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if self.broken is not None:  # queued before the device failed: refused as later work is (503)
                for job in batch:
                    _resolve(job, None, ShuttingDown(f"the server cannot score: {self.broken}; restart it"))
                continue
            now = time.perf_counter()
            for job in batch:
                self.observe("queue_seconds", now - job.enqueued)
            for reference_free in (False, True):
                jobs = [j for j in batch if j.reference_free == reference_free]
                if jobs:
                    self._score(jobs, reference_free)

    def _cost(self, rows: int, longest: int, tokens: int, float32: bool) -> int:
        """Token positions a forward of these sequences computes: padded to the longest on accelerators."""
        return rows * longest if self._padded[float32] else tokens

    def _forwards(self, seqs: list[Encoded], owners: list[Job], reference_free: bool, want_tokens: bool,
                  float32: bool = False) -> list[RewardResult | None]:  # fmt: skip
        """Scores ``seqs`` in consecutive forwards within the budget (one over-long sequence goes alone),
        leaving out the sequences of jobs cancelled meanwhile (their results stay None)."""
        results: list[RewardResult | None] = [None] * len(seqs)
        i = 0
        while i < len(seqs):
            chunk: list[int] = []
            longest = tokens = 0
            while i < len(seqs):
                if owners[i].cancelled:
                    i += 1
                    continue
                n = len(seqs[i])
                if chunk and self._cost(len(chunk) + 1, max(longest, n), tokens + n, float32) > self.max_batch_tokens:
                    break
                chunk.append(i)
                longest, tokens = max(longest, n), tokens + n
                i += 1
            if not chunk:
                break
            batch = [seqs[j] for j in chunk]
            start = time.perf_counter()
            scored = self.model.score_encoded(batch, "sum", reference_free, want_tokens, float32)
            seconds = time.perf_counter() - start
            self._note_rate(tokens, seconds)  # tokens as the queue counts them, for Retry-After
            self.observe("recheck_seconds" if float32 else "forward_seconds", seconds)
            self.observe("batch_sequences", len(batch))
            self.observe("batch_tokens", tokens)
            for j, r in zip(chunk, scored, strict=True):
                results[j] = r
        return results

    def _score(self, jobs: list[Job], reference_free: bool) -> None:
        seqs = [s for job in jobs for s in job.seqs]
        owners = [job for job in jobs for _ in job.seqs]
        want_tokens = any(job.token_rewards for job in jobs)  # computed for all, returned to those who asked
        try:
            results = self._forwards(seqs, owners, reference_free, want_tokens)
            if self.recheck > 0 and self.model.paired is not None and not reference_free:
                self._recheck(jobs, seqs, owners, results, want_tokens)
        except Exception as e:  # the model failed on some sequence: find whose, scoring each job alone
            if _poisons_device(e):
                self.broken = f"{type(e).__name__}: {e}".splitlines()[0]
            if len(jobs) > 1 and self.broken is None:
                for job in jobs:
                    if not job.cancelled:
                        self._score([job], reference_free)
            else:
                for job in jobs:
                    _resolve(job, None, e)
            return
        offset = 0
        for job in jobs:
            part = results[offset : offset + len(job.seqs)]
            offset += len(job.seqs)
            if job.cancelled:
                continue
            if not job.token_rewards:
                for r in part:
                    r.token_rewards = None
            _resolve(job, part, None)

    def _recheck(
        self, jobs: list[Job], seqs: list[Encoded], owners: list[Job], results: list, want_tokens: bool
    ) -> None:
        """bf16-paired: each compared group whose decision is close (:func:`dpo.scorer.close_call`) is scored
        again by the float32 models, in place and within the token budget, as ``dporm score`` does offline."""
        spans, start = [], 0
        for job in jobs:
            if job.cancelled:
                start += len(job.seqs)
                continue
            for size in job.groups:
                group = results[start : start + size]
                if job.mean:  # the decision compares per-token rewards
                    group = [dataclasses.replace(r, reward=r.reward / max(r.response_tokens, 1)) for r in group]
                if close_call(group, self.model.beta * self.recheck, job.mean):
                    spans.append((start, size))
                start += size
            start += len(job.seqs) - sum(job.groups)  # items not compared (none today)
        if spans:
            picked = [j for a, n in spans for j in range(a, a + n)]
            again = self._forwards([seqs[j] for j in picked], [owners[j] for j in picked], False, want_tokens, True)
            for j, r in zip(picked, again, strict=True):
                results[j] = r if r is not None else results[j]  # None: its job was cancelled meanwhile
            self.observe("rechecked_groups", len(spans))

    def _note_rate(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        rate = tokens / seconds
        with self._cond:
            old = self._tokens_per_second
            self._tokens_per_second = rate if old is None else 0.8 * old + 0.2 * rate


def _poisons_device(error: Exception) -> bool:
    """An accelerator error after which the device fails every call (CUDA's sticky errors), not one bad input."""
    text = str(error)
    sticky = "device-side assert" in text or "illegal memory access" in text or "unspecified launch failure" in text
    return isinstance(error, getattr(torch, "AcceleratorError", ())) and sticky  # torch >= 2.8 names the type


def _resolve(job: Job, result, error: BaseException | None) -> None:
    """Hand a result (or error) to the job's event loop; a loop already closed, or a cancelled job, has nobody
    waiting (an exception set on a future nobody awaits is logged as never retrieved)."""
    if job.cancelled:
        return
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(_set, job.future, result, error)


def _set(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)

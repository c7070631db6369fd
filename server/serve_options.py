"""The options of ``dporm serve``: kept apart from :mod:`server.serve` so building them imports no model code."""

from __future__ import annotations

import argparse

from dpo.manifest import add_reward_model_options


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", nargs="?", help="artifact directory with dporm.json (from dporm train or extract)")
    p.add_argument("--policy", help="policy model (instead of an artifact)")
    p.add_argument("--reference", help="reference model (with --policy; omit for reference-free)")
    p.add_argument("--beta", type=float, help="β (with --policy)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on inference routes (or $DPORM_API_KEY)")
    p.add_argument("--max-items", type=int, default=256, help="sequences per request (413 above; default 256)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="request body limit (413; default 4 MiB)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="token budget of one forward batch")
    p.add_argument("--max-queue-requests", type=int, default=256, help="queued requests before 429")
    p.add_argument("--max-queue-tokens", type=int, default=1 << 20, help="queued tokens before 429")
    p.add_argument(
        "--retry-after",
        type=int,
        default=1,
        help="least Retry-After seconds of a 429 (more when the queue needs longer to drain; default 1)",
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds before 504 (default 60)")
    p.add_argument("--ref-cache-size", type=int, default=4096, help="reference log-prob LRU entries (0 = off)")
    p.add_argument("--drain-seconds", type=float, default=0.0,
                   help="on SIGTERM, answer /ready 503 this long (still serving) before stopping")  # fmt: skip
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    add_reward_model_options(p, recheck=False)
    p.add_argument("--recheck", type=float, default=0.0, metavar="NATS",
                   help="with --dtype bf16-paired: /v1/preference and rerank rescore in float32 each pair (or "
                   "document set) with rewards within NATS of log-ratio each of a tie (default 0: off)")  # fmt: skip

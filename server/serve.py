"""``dporm serve``: uvicorn around the app; SIGTERM drains (/ready → 503, in-flight requests finish, exit 0)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import threading

import uvicorn

from dpo.errors import DpormError, require_at_least
from server.app import Limits, State, create_app


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: State, drain_seconds: float):
        super().__init__(config)
        self.state, self.drain_seconds = state, drain_seconds

    def handle_exit(self, sig, frame) -> None:
        first = not self.state.draining
        self.state.draining = True  # load balancers see /ready 503 and stop sending
        if first and self.drain_seconds > 0:
            timer = threading.Timer(self.drain_seconds, self._exit, (sig, frame))
            timer.daemon = True  # a second signal exits at once, without waiting for the timer
            timer.start()
        else:
            self._exit(sig, frame)

    def fail(self, message: str) -> None:
        """The model failed to load: stop serving; :func:`run_serve` reports ``message`` and exits 1."""
        self.should_exit = True

    def _exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown; a drained SIGTERM is a clean exit (code 0).
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def run_serve(args: argparse.Namespace) -> None:
    from dpo.manifest import Manifest
    from dpo.models import PAIRED, resolve_device, resolve_dtype
    from dpo.scorer import reward_model_from_args

    resolve_dtype(args.dtype), resolve_device(args.device)
    if args.artifact:
        if args.policy or args.reference or args.beta is not None:
            raise DpormError("give an artifact directory or --policy/--reference/--beta, not both")
        Manifest.load(args.artifact)  # a bad directory fails here, in one line, before the server starts
    elif not args.policy or args.beta is None:
        raise DpormError("give an artifact directory, or --policy and --beta (and --reference unless reference-free)")
    require_at_least(args, ("max_items", "max_body_bytes", "max_batch_tokens", "max_queue_requests",
                            "max_queue_tokens", "retry_after"))  # fmt: skip
    require_at_least(args, ("ref_cache_size", "drain_seconds"), 0)
    if args.request_timeout <= 0:
        raise DpormError(f"--request-timeout must be positive, got {args.request_timeout:g}")
    _check_port(args.host, args.port)
    limits = Limits(
        max_items=args.max_items,
        max_body_bytes=args.max_body_bytes,
        max_batch_tokens=args.max_batch_tokens,
        max_queue_requests=args.max_queue_requests,
        max_queue_tokens=args.max_queue_tokens,
        request_timeout=args.request_timeout,
        retry_after=args.retry_after,
    )
    if not (math.isfinite(args.recheck) and args.recheck >= 0):
        raise DpormError(f"--recheck must be a finite number of nats >= 0, got {args.recheck:g}")
    if args.recheck > 0 and args.dtype != PAIRED:
        raise DpormError(f"--recheck applies to --dtype {PAIRED} only (other precisions have nothing to recheck)")
    if args.api_key is not None and not args.api_key:  # `--api-key "$KEY"` with KEY unset: not "no auth"
        raise DpormError("--api-key is empty; give a key, or leave the flag out to serve without one")
    api_key = args.api_key or os.environ.get("DPORM_API_KEY") or None
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and " " not in api_key):
        raise DpormError("the API key must be printable ASCII without spaces (HTTP headers carry ASCII)")
    state = State(limits, api_key, args.recheck)

    def loader():
        model = reward_model_from_args(args, ref_cache_size=args.ref_cache_size)
        model.warm_up()
        return model

    config = uvicorn.Config(
        create_app(state, loader),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.request_timeout + 5,
    )
    server = DrainingServer(config, state, args.drain_seconds)
    state.on_load_error = server.fail
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises SIGINT again once it has shut down
        exit_if_busy(state, 130, "dporm: interrupted")
        raise
    if state.load_error:
        raise DpormError(f"cannot load the model: {state.load_error}")
    exit_if_busy(state, 0)


def exit_if_busy(state: State, code: int, say: str | None = None) -> None:
    """Exit now, skipping interpreter teardown, when stopped while loading or while a forward outlasted the
    shutdown: that thread may be inside torch, where teardown aborts (SIGABRT)."""
    loading = state.loader_thread is not None and state.loader_thread.is_alive()
    scoring = state.batcher is not None and state.batcher.worker_alive
    if loading or scoring:
        if say:
            print(say, file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)


def _check_port(host: str, port: int) -> None:
    """A one-line error now, not uvicorn's after the model starts loading, when the port cannot be bound."""
    if not 0 <= port <= 65535:
        raise DpormError(f"--port must be in 0..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise DpormError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

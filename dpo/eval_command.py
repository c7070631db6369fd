"""``dporm eval rewardbench | rewardbench2 | pairs``: the RewardBench protocols and calibration, offline or
against running servers (``--server``, repeatable). Scores: see :mod:`dpo.eval_backend`; arithmetic:
:mod:`dpo.eval_metrics`; resumable runs: :mod:`dpo.eval_runner`; summaries: :mod:`dpo.eval_reports`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from dpo.errors import DpormError, require_at_least, require_writable
from dpo.eval_backend import REF_FREE_NORMS, Group, ScoreMode
from dpo.eval_runner import SCORES_FILE, Row, digest, is_scored, run_rows
from dpo.manifest import add_reward_model_options, resolve_recheck

DEFAULT_SPLITS = {"rewardbench": "filtered", "rewardbench2": "test", "pairs": "train"}
OFFLINE_ONLY = {
    "dtype": "float32",
    "device": "auto",
    "allow_pickle": False,
    "trust_remote_code": False,
    "recheck": None,
}


def _check_args(args: argparse.Namespace) -> None:
    require_at_least(args, ("batch_size", "limit"))
    require_at_least(args, ("max_retries",), 0)
    if args.timeout <= 0:
        raise DpormError(f"--timeout must be positive, got {args.timeout:g}")
    require_writable(args.output, parents=True, directory=True)
    require_at_least(args, ("max_length",), 2)  # one prompt token and one response token
    if args.ref_free_norm and not args.reference_free:
        raise DpormError("--ref-free-norm applies with --reference-free only")
    compat = getattr(args, "rewardbench_compat", False)
    if args.server:
        if args.artifact or args.policy or args.reference or args.beta is not None:
            raise DpormError(
                "--server scores with the server's model: drop the artifact, --policy, --reference, --beta"
            )
        if compat:
            raise DpormError("--rewardbench-compat is offline only: a server encodes with dporm's rule")
        if args.max_length is not None:
            raise DpormError("--max-length is offline only: a server uses its own artifact's max_length")
        offline = [f"--{k.replace('_', '-')}" for k, default in OFFLINE_ONLY.items() if getattr(args, k) != default]
        if offline:
            raise DpormError(f"{', '.join(offline)}: offline only (the server loaded its own model)")
    if compat and args.max_length is not None:
        raise DpormError("--rewardbench-compat fixes RewardBench's lengths (2048/128): drop --max-length")
    if not args.server:  # bad precision or device names fail before any weights load
        from dpo.models import resolve_device, resolve_dtype

        resolve_dtype(args.dtype), resolve_device(args.device)
        resolve_recheck(args)


def make_backend(args: argparse.Namespace, mode: ScoreMode):
    """The offline backend (an in-process reward model) or the server one (``--server``)."""
    if args.server:
        from server.eval_backend import ServerBackend

        return ServerBackend(args.server, mode, args.api_key, max_retries=args.max_retries, timeout=args.timeout)
    from dpo.eval_backend import OfflineBackend
    from dpo.scorer import reward_model_from_args

    beta = args.beta if args.beta is not None or not (args.reference_free and args.policy) else 1.0
    model = reward_model_from_args(args, beta=beta)
    return OfflineBackend(model, mode, getattr(args, "rewardbench_compat", False), args.max_length, args.recheck)


def _prompt(value: object) -> object:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 for m in value):  # fmt: skip
        return [{"role": m.get("role", "user"), "content": m["content"]} for m in value]
    raise ValueError("'prompt' is not a string or chat messages")


def _rewardbench_row(i: int, row: dict) -> Row:
    if not isinstance(row.get("chosen"), str) or not isinstance(row.get("rejected"), str):
        raise ValueError("'chosen' and 'rejected' must be strings")
    if not isinstance(row.get("subset"), str):
        raise ValueError("no 'subset'")
    return Row(i, Group(_prompt(row.get("prompt")), (row["chosen"], row["rejected"])),
               {"id": row.get("id"), "subset": row["subset"]})  # fmt: skip


def _rewardbench2_row(i: int, row: dict) -> Row:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
            raise ValueError(f"'{name}' must be a non-empty list of strings")
    if not isinstance(row.get("subset"), str):
        raise ValueError("no 'subset'")
    if row["subset"].lower() == "ties" and not re.fullmatch(r"(ref|tied):-?\d+", str(row.get("id"))):
        raise ValueError(f"Ties row id {row.get('id')!r} is not 'ref:N' or 'tied:N'")
    num_correct = row.get("num_correct", len(chosen))
    if num_correct != len(chosen):
        raise ValueError(f"num_correct={num_correct} but {len(chosen)} chosen responses")
    meta = {"id": row.get("id"), "subset": row["subset"], "num_correct": len(chosen)}
    return Row(i, Group(_prompt(row.get("prompt")), (*chosen, *rejected)), meta)


def load_eval_rows(args: argparse.Namespace) -> tuple[list[Row], list[tuple[int, str]], str]:
    """Rows to score (the first ``--limit``), skipped rows (number, reason) and the sha256 of the whole data.

    The hash covers every row, not only the limited ones, so a run can be extended with a larger ``--limit``.
    """
    from dpo.preference_data import require_split_applies

    require_split_applies(args.data, args.split)
    split = args.split or DEFAULT_SPLITS[args.eval_command]
    if args.eval_command == "pairs":
        from dpo.preference_data import load_preferences

        data = load_preferences(args.data, split=split, report=lambda _: None)
        examples = data.examples[: args.limit]
        # Only unusable rows before the last scored one count (and are fatal with --strict): with --limit,
        # a bad row further on is neither scored nor skipped.
        end = examples[-1].row if len(examples) < len(data.examples) else float("inf")
        skipped = [(n, why) for n, why in data.skipped if n < end]
        if skipped and args.strict:
            raise DpormError(f"row {skipped[0][0]}: {skipped[0][1]} (--strict)")
        _report_skipped(skipped)
        rows = [Row(i, Group(ex.prompt, ex.responses), {"source_row": ex.row, "pairs": [list(p) for p in ex.pairs]})
                for i, ex in enumerate(examples)]  # fmt: skip
        return rows, skipped, digest([[ex.prompt, ex.responses, ex.pairs] for ex in data.examples])
    from dpo.preference_data import load_rows

    parse = _rewardbench_row if args.eval_command == "rewardbench" else _rewardbench2_row
    everything = list(load_rows(args.data, split))
    raw = everything[: args.limit]
    rows, skipped = [], []
    for i, row in enumerate(raw):
        try:
            rows.append(parse(i, row))
        except ValueError as e:
            skipped.append((i + 1, str(e)))
    if not rows:
        raise DpormError(f"{args.data}: no usable row for {args.eval_command} ({_shown(skipped) or 'no rows'})")
    _report_skipped(skipped)
    return rows, skipped, digest(everything)


def _shown(skipped: list[tuple[int, str]]) -> str:
    return "; ".join(f"row {n}: {why}" for n, why in skipped[:3]) + (" ..." if len(skipped) > 3 else "")


def _report_skipped(skipped: list[tuple[int, str]]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} row(s): {_shown(skipped)}", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> dict:
    from dpo.eval_reports import REPORTS

    _check_args(args)
    started = time.perf_counter()
    mode = ScoreMode(bool(args.reference_free), args.ref_free_norm or "avg")
    rows, skipped, data_hash = load_eval_rows(args)
    backend = make_backend(args, mode)
    model = backend.describe()
    config = {
        "command": args.eval_command,
        "data_sha256": data_hash,
        "mode": {"reference_free": mode.reference_free, "norm": mode.norm if mode.reference_free else None},
        "rewardbench_compat": bool(getattr(args, "rewardbench_compat", False)),
        "model": {
            k: model.get(k) for k in ("policy_sha256", "reference_sha256", "beta", "max_length", "dtype", "recheck")
        },
    }
    output = Path(args.output)
    load_seconds = time.perf_counter() - started
    chunk = args.batch_size * len(args.server or [None])
    records, score_seconds, todo = run_rows(backend, rows, output, config, args.overwrite, chunk, args.eval_command)
    if hasattr(backend, "close"):
        backend.close()
    results = REPORTS[args.eval_command](rows, records, output)
    scored = sum(is_scored(r) for r in records.values())
    refused = sum("skipped" in r for r in records.values())
    results.update(
        config=config,
        config_hash=digest(config),
        model=model,
        data={"source": args.data, "sha256": data_hash, "rows": len(rows), "scored": scored,
              "failed": len(rows) - scored - refused, "skipped": len(skipped) + refused,
              "rechecked": sum(bool(r.get("rechecked")) for r in records.values())},  # fmt: skip
        timings={"load_seconds": load_seconds, "score_seconds": score_seconds,
                 "total_seconds": time.perf_counter() - started, "rows_scored_now": todo,
                 "rows_per_second": todo / max(score_seconds, 1e-9)},
    )  # fmt: skip
    from dpo.eval_reports import print_table, write_results

    write_results(results, output)
    print_table(results)
    print(output)
    if refused and getattr(args, "strict", False):
        first = next(r for r in records.values() if "skipped" in r)
        raise DpormError(f"row {first['row']}: {first['skipped']} (--strict; {refused} row(s) could not be scored)")
    if refused:  # the rows' own fault (they cannot be encoded as given): a rerun would refuse them again
        print(f"{refused} row(s) skipped: they cannot be scored as given (reasons in {output / SCORES_FILE})",
              file=sys.stderr)  # fmt: skip
    if scored + refused < len(rows):  # the results above leave these rows out; a rerun of the same command retries them
        raise DpormError(f"{len(rows) - scored - refused} row(s) failed (reasons in {output / SCORES_FILE}); "
                         "rerun the same command to retry them")  # fmt: skip
    return results


def _common(p: argparse.ArgumentParser, benchmark: str) -> None:
    p.add_argument("artifact", nargs="?", help="artifact directory with dporm.json")
    p.add_argument("--data", required=True, help="JSONL/JSON/Parquet/CSV file, dataset dir or hub id")
    p.add_argument("--split", help=f"dataset split for dataset dirs and hub ids (default {DEFAULT_SPLITS[benchmark]})")
    p.add_argument("--output", required=True, help="output directory (results.json, scores.jsonl, PNGs)")
    p.add_argument("--policy", help="policy model (instead of an artifact)")
    p.add_argument("--reference", help="reference model (with --policy)")
    p.add_argument("--beta", type=float, help="β (with --policy; not needed reference-free)")
    p.add_argument("--reference-free", action="store_true", help="score with the policy alone (no β)")
    p.add_argument("--ref-free-norm", choices=REF_FREE_NORMS,
                   help="reference-free score: avg = mean log π per token (default, RewardBench's), sum, "
                   "norm = −‖per-token log π‖₂")  # fmt: skip
    p.add_argument("--server", action="append", metavar="URL",
                   help="score on a running dporm serve; repeat to shard rows over several servers")  # fmt: skip
    p.add_argument("--api-key", help="server API key (default $DPORM_API_KEY)")
    p.add_argument("--max-retries", type=int, default=5, help="server retries on 429/503/connection errors")
    p.add_argument("--timeout", type=float, default=300.0, help="server request timeout in seconds")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward batch / per server request")
    p.add_argument("--limit", type=int, help="evaluate only the first N rows")
    p.add_argument("--max-length", type=int, help="offline: max prompt+response tokens (default: the artifact's)")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run in --output and start afresh")
    add_reward_model_options(p)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    benchmarks = p.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    rb = benchmarks.add_parser(
        "rewardbench",
        help="RewardBench v1: accuracy per subset, section and overall",
        description="RewardBench (allenai/reward-bench schema: prompt, chosen, rejected, subset, id): "
        "r_chosen > r_rejected strictly per row, per-subset accuracy, sections weighted by RewardBench's "
        "example counts, overall = mean of sections (with Prior Sets: (2·sections + Prior)/9).",
    )
    _common(rb, "rewardbench")
    rb.add_argument("--rewardbench-compat", action="store_true",
                    help="tokenize exactly as RewardBench's DPOInference (offline only)")  # fmt: skip
    rb2 = benchmarks.add_parser(
        "rewardbench2",
        help="RewardBench 2: best-of-N accuracy, the Ties score, overall",
        description="RewardBench 2 (allenai/reward-bench-2: chosen and rejected are lists): a row scores 1/k "
        "when the chosen ties for the top reward with k−1 others; Ties has RewardBench 2's weighted score; "
        "overall = mean of the subset scores.",
    )
    _common(rb2, "rewardbench2")
    pairs = benchmarks.add_parser(
        "pairs",
        help="any preference pairs: accuracy with 95%% CI and Bradley–Terry calibration",
        description="Accuracy (95% Wilson CI) and calibration of σ(r_chosen − r_rejected) (reliability diagram, "
        "ECE) on any preference data load_preferences reads (prompt/chosen/rejected, chat, HH-RLHF, rankings).",
    )
    _common(pairs, "pairs")
    pairs.add_argument("--strict", action="store_true", help="make unusable rows fatal")

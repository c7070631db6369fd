"""``dporm score``: rewards for a file of records, offline, through the scorer the server uses."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from dpo.errors import DpormError, EncodingError, ResponseTooLongError, require_at_least, require_writable
from dpo.manifest import add_reward_model_options, resolve_recheck


def _fields(row: dict) -> tuple[str, ...] | None:
    if not isinstance(row.get("prompt"), (str, list)):
        return None
    for fields in (("chosen", "rejected"), ("response",)):
        if all(isinstance(row.get(f), str) for f in fields):
            return fields
    return None


def run_score(args: argparse.Namespace) -> None:
    from dpo.models import resolve_device, resolve_dtype
    from dpo.preference_data import load_rows, require_split_applies
    from dpo.scorer import reward_model_from_args
    from dpo.trainer import wilson_interval

    require_at_least(args, ("batch_size", "limit"))
    resolve_dtype(args.dtype), resolve_device(args.device)  # bad names fail before any work
    resolve_recheck(args)
    if args.output:
        require_writable(args.output)
        if _same_file(args.output, args.data):
            raise DpormError(f"--output {args.output} is the --data file: the scores would overwrite the records")
    require_split_applies(args.data, args.split)
    rows = list(itertools.islice(load_rows(args.data, args.split or "train"), args.limit))
    shapes = [_fields(r) for r in rows]
    kind = next((f for f in shapes if f), None)
    if kind is None:
        raise DpormError(f"{args.data}: no record has 'prompt' with 'response' or 'chosen'/'rejected' strings")
    other = next((i for i, f in enumerate(shapes) if f and f != kind), None)
    if other is not None:
        first = shapes.index(kind)
        raise DpormError(f"{args.data} mixes record kinds: row {first + 1} has {'/'.join(kind)}, row {other + 1} "
                         f"{'/'.join(shapes[other])}; score each kind from its own file")  # fmt: skip
    usable = [i for i, f in enumerate(shapes) if f == kind]
    if len(usable) < len(rows):
        bad = [str(i + 1) for i, f in enumerate(shapes) if f is None]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        print(f"skipped {len(bad)} record(s) without a string or messages 'prompt' and {'/'.join(kind)} strings: "
              f"row(s) {', '.join(bad[:3])}{more}", file=sys.stderr)  # fmt: skip
    model = reward_model_from_args(args, normalize=args.normalize)
    encoded, failed, too_long = {}, [], 0
    for i in usable:
        try:
            responses = [rows[i][f] for f in kind]
            encoded[i] = list(model.encode_responses(rows[i]["prompt"], responses, args.truncate or None))
        except EncodingError as e:
            long = isinstance(e, ResponseTooLongError)  # its advice names no flag of this command: the hint below does
            failed.append(f"{i + 1} ({str(e).split(';')[0] if long else e})")
            too_long += long
    if failed:
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        hint = f" ({too_long} too long: --truncate cuts them)" if too_long and not args.truncate else ""
        print(f"skipped {len(failed)} record(s) that cannot be encoded{hint}: "
              f"{'; '.join(failed[:3])}{more}", file=sys.stderr)  # fmt: skip
    usable = [i for i in usable if i in encoded]
    if not usable:
        raise DpormError("no record could be encoded")
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(Path(args.output).open("w")) if args.output else None
        wins = ties = pairs = rechecked = 0
        bar = tqdm(total=len(usable), desc="score", unit="row")
        for start in range(0, len(usable), args.batch_size):
            chunk = usable[start : start + args.batch_size]
            results = model.score_groups([encoded[i] for i in chunk], None, args.reference_free, recheck=args.recheck)
            for j, part in enumerate(results):
                record = {"row": chunk[j] + 1}
                for f, r in zip(kind, part, strict=True):
                    record[f"reward_{f}"] = r.reward
                    record[f"logp_policy_{f}"], record[f"logp_ref_{f}"] = r.logp_policy, r.logp_ref
                    record[f"tokens_{f}"], record[f"truncated_{f}"] = r.response_tokens, r.truncated
                if len(kind) == 2:
                    margin = part[0].reward - part[1].reward
                    record["margin"], pairs = margin, pairs + 1
                    wins, ties = wins + (margin > 0), ties + (margin == 0)
                if model.paired is not None:
                    record["rechecked"] = part[0].rechecked
                    rechecked += part[0].rechecked
                if out:
                    out.write(json.dumps(record) + "\n")
            bar.update(len(chunk))
        bar.close()
    if pairs:
        low, high = wilson_interval(wins, pairs)
        print(f"pairs {pairs}  accuracy {wins / pairs:.4f} (95% CI {low:.4f}-{high:.4f})  ties {ties}")
        if model.paired is not None:
            print(f"{rechecked} close pair(s) rescored in float32 (--recheck {args.recheck:g})")
    print(f"scored {len(usable)} record(s)" + (f" -> {args.output}" if args.output else ""))


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", nargs="?", help="artifact directory with dporm.json")
    p.add_argument("--data", required=True, help="JSONL/JSON/Parquet/CSV, dataset dir or hub id")
    p.add_argument("--split", help="dataset split of a dataset dir or hub id (default train)")
    p.add_argument("--output", help="write one JSON line of rewards per record here")
    p.add_argument("--policy", help="policy model (instead of an artifact)")
    p.add_argument("--reference", help="reference model (with --policy; omit for reference-free)")
    p.add_argument("--beta", type=float, help="β (with --policy)")
    p.add_argument("--normalize", choices=("sum", "mean"), help="reward over response tokens (default: artifact's)")
    p.add_argument("--reference-free", action="store_true", help="r = β·log π, ignoring the reference")
    p.add_argument("--truncate", action="store_true", help="cut over-long responses instead of failing")
    p.add_argument("--batch-size", type=int, default=8, help="records per forward batch (default 8)")
    p.add_argument("--limit", type=int, help="score only the first N records")
    add_reward_model_options(p)


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(b).expanduser().is_file() and os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:  # the output does not exist yet
        return False

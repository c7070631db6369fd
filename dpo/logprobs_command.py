"""``dporm logprobs``: response log-probs of a file of records under one model."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from dpo.data import read_records
from dpo.encoding import encode
from dpo.errors import DpormError, EncodingError, require_at_least, require_writable
from dpo.logprobs import sequence_logprobs
from dpo.models import load_model, load_tokenizer, resolve_device, resolve_dtype


def resolve_model_path(name: str, cache_dir: str | None) -> str:
    if name == "default":
        from dpo.default_model import pull_default_model

        return str(pull_default_model(cache_dir))
    return name


def _responses(record: object) -> tuple[str, ...] | None:
    """The response fields of a record: ('response',) or ('chosen', 'rejected'); None if unusable."""
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), (str, list)):
        return None
    for fields in (("chosen", "rejected"), ("response",)):
        if all(isinstance(record.get(f), str) for f in fields):
            return fields
    return None


def run_logprobs(args: argparse.Namespace) -> None:
    require_at_least(args, ("limit", "batch_size"))
    require_at_least(args, ("max_length",), 2)
    if args.output:
        require_writable(args.output)
    resolve_dtype(args.dtype, paired=False), resolve_device(args.device)  # bad options fail before any model work
    records = list(itertools.islice(read_records(args.data), args.limit))
    shapes = [_responses(r) for r in records]
    kind = next((s for s in shapes if s is not None), None)
    if kind is None:
        raise DpormError(f"{args.data}: no record has a 'prompt' and 'response' or 'chosen'/'rejected' strings")
    usable = [(i, r, kind) for i, (r, s) in enumerate(zip(records, shapes, strict=True)) if s == kind]
    skipped = [i for i, s in enumerate(shapes) if s != kind]  # named by the 0-based index the output uses
    if skipped:
        rows = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        print(f"skipped {len(skipped)} record(s) without string fields {kind} (index {rows})", file=sys.stderr)

    path = resolve_model_path(args.model, args.cache_dir)
    tokenizer = load_tokenizer(path, args.trust_remote_code)
    encoded, failed = {}, []
    for i, r, fields in usable:
        try:
            encoded[i] = [encode(tokenizer, r["prompt"], r[f], args.max_length) for f in fields]
        except EncodingError as e:
            failed.append(f"index {i} ({e})")
    if failed:
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        print(f"skipped {len(failed)} record(s) that cannot be encoded: {'; '.join(failed[:3])}{more}",
              file=sys.stderr)  # fmt: skip
    usable = [u for u in usable if u[0] in encoded]
    if not usable:
        raise DpormError("no record could be encoded")
    model = load_model(path, args.dtype, args.device, args.trust_remote_code, args.allow_pickle)

    results = []
    with torch.inference_mode(), tqdm(total=len(usable), desc="scoring", unit="rec", file=sys.stderr) as bar:
        for start in range(0, len(usable), args.batch_size):
            batch = usable[start : start + args.batch_size]
            seqs = [seq for index, _, _ in batch for seq in encoded[index]]
            out = sequence_logprobs(model, seqs)
            k = 0
            for index, _, fields in batch:
                result: dict = {"index": index}
                for f in fields:
                    suffix = "" if f == "response" else f"_{f}"
                    result[f"logp{suffix}"] = float(out.logp[k])
                    result[f"tokens{suffix}"] = int(out.tokens[k])
                    result[f"mean{suffix}"] = float(out.mean[k])
                    result["truncated"] = result.get("truncated", False) or seqs[k].truncated
                    k += 1
                results.append(result)
            bar.update(len(batch))

    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in results))
    _print_table(results)


def _print_table(results: list[dict]) -> None:
    if "logp_chosen" in results[0]:
        print(f"{'index':>5} {'logp chosen':>12} {'tok':>5} {'logp rejected':>14} {'tok':>5} {'mean c-r':>9}")
        for r in results:
            print(
                f"{r['index']:>5} {r['logp_chosen']:>12.2f} {r['tokens_chosen']:>5} "
                f"{r['logp_rejected']:>14.2f} {r['tokens_rejected']:>5} "
                f"{r['mean_chosen'] - r['mean_rejected']:>+9.3f}"
            )
        agree = sum(r["mean_chosen"] > r["mean_rejected"] for r in results)
        print(f"chosen has the higher mean log-prob in {agree}/{len(results)} pairs")
    else:
        print(f"{'index':>5} {'logp':>12} {'tokens':>7} {'mean':>8}")
        for r in results:
            print(f"{r['index']:>5} {r['logp']:>12.2f} {r['tokens']:>7} {r['mean']:>8.3f}")

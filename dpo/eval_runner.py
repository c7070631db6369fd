"""Resumable scoring for ``dporm eval``: per-row results are appended to ``scores.jsonl`` as they complete.

The output directory also holds ``eval-config.json`` with the sha256 of the run's configuration (command,
model hashes, data hash, mode, tokenization). A rerun with the same configuration skips the rows already in
``scores.jsonl`` (a torn last line from a killed run is dropped); another configuration is an error unless
``overwrite``, which starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from dpo.errors import DpormError
from dpo.eval_backend import Backend, Group, Refused

CONFIG_FILE, SCORES_FILE = "eval-config.json", "scores.jsonl"


@dataclass
class Row:
    key: int  # 0-based position in the loaded data
    group: Group
    meta: dict = field(default_factory=dict)  # written with the scores (id, subset, ...)


def is_scored(record: dict) -> bool:
    """A row with scores: neither failed (``error``, retried by a rerun) nor ``skipped`` (refused for good)."""
    return "scores" in record


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _read_done(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    done, kept = {}, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the torn last line of an interrupted run
                break
            raise DpormError(f"{path}:{i + 1}: corrupt line; rerun with --overwrite") from None
        if not isinstance(record, dict) or not isinstance(record.get("row"), int):
            raise DpormError(f"{path}:{i + 1}: not a score record; rerun with --overwrite")
        if "error" in record:  # failed last time (server refused, timed out): scored again now
            continue
        done[record["row"]] = record
        kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return done


def run_rows(
    backend: Backend,
    rows: Sequence[Row],
    output: Path,
    config: dict,
    overwrite: bool = False,
    chunk: int = 8,
    desc: str = "eval",
) -> tuple[dict[int, dict], float, int]:
    """Scores every row not yet on disk; returns ``{row: record}`` for all rows, seconds spent and rows scored."""
    output.mkdir(parents=True, exist_ok=True)
    config_path, scores_path = output / CONFIG_FILE, output / SCORES_FILE
    config_hash = digest(config)
    if config_path.exists() and not overwrite:
        try:
            old = json.loads(config_path.read_text()).get("config_hash")
        except (json.JSONDecodeError, AttributeError):
            raise DpormError(f"{config_path}: corrupt; rerun with --overwrite") from None
        if old != config_hash:
            raise DpormError(
                f"{output} holds a run with another configuration ({old[:12]} != {config_hash[:12]}); "
                "pass --overwrite or choose another --output"
            )
    if overwrite and scores_path.exists():
        scores_path.unlink()
    config_path.write_text(json.dumps({"config_hash": config_hash, "config": config}, indent=2, default=str) + "\n")
    done = _read_done(scores_path)
    todo = [r for r in rows if r.key not in done]
    start = time.perf_counter()
    with scores_path.open("a", encoding="utf-8") as f, tqdm(total=len(rows), initial=len(rows) - len(todo),
                                                             desc=desc, unit="row") as bar:  # fmt: skip
        for s in range(0, len(todo), chunk):
            part = todo[s : s + chunk]
            results = backend.score_groups([r.group for r in part])
            for row, result in zip(part, results, strict=True):
                record = {"row": row.key, **row.meta}
                if isinstance(result, Refused):
                    record["skipped"] = str(result)
                elif isinstance(result, str):
                    record["error"] = result
                else:
                    record["scores"] = [r.score for r in result]
                    record["tokens"] = [r.tokens for r in result]
                    record["truncated"] = [r.truncated for r in result]
                    if any(r.rechecked for r in result):
                        record["rechecked"] = True
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                done[row.key] = record
            f.flush()
            bar.update(len(part))
    return {r.key: done[r.key] for r in rows}, time.perf_counter() - start, len(todo)

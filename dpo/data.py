"""Reading preference records from local files (JSONL, optionally gzipped, or a JSON list)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from dpo.errors import DpormError


def read_records(path: str | Path) -> Iterator[dict]:
    """Yield the JSON objects of a ``.jsonl``/``.jsonl.gz`` file or a ``.json`` list."""
    path = Path(path)
    if not path.is_file():
        raise DpormError(f"{path}: no such file")
    try:
        yield from _read(path)
    except (OSError, UnicodeDecodeError, EOFError) as e:  # a corrupt .gz, a file that is not UTF-8 text
        raise DpormError(f"{path}: cannot read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _read(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.name.removesuffix(".gz")
    with opener(path, "rt", encoding="utf-8") as f:
        if stem.endswith(".json"):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DpormError(f"{path}: invalid JSON: {e}") from None
            if not isinstance(rows, list):
                raise DpormError(f"{path}: expected a JSON list of objects")
            yield from rows
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DpormError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None

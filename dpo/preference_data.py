"""Preference data: loading any supported format into one shape, with row-numbered validation.

Every row becomes a :class:`PreferenceExample`: a prompt (string or chat messages), its
responses ordered best first, and the ``(winner, loser)`` pairs between them by index,
so a prompt with N ranked responses costs N sequences however many pairs it yields.

Formats (detected from the columns; names remappable with :class:`Columns`):

(a) standard        ``prompt``, ``chosen``, ``rejected`` strings
(b) conversational  ``prompt`` as chat messages, ``chosen``/``rejected`` as assistant message(s);
                    without ``prompt``, the messages shared by chosen and rejected are the prompt
(c) implicit prompt ``chosen``/``rejected`` full dialogues ``"\\n\\nHuman: …\\n\\nAssistant: …"`` (HH-RLHF):
                    the shared prefix through the last ``"\\n\\nAssistant:"`` is the prompt, turned
                    into chat messages so the model's chat template applies
(d) rankings        ``prompt``, ``responses`` and ``scores`` (higher is better) or ``ranking``
                    (1 = best); pairs are all strictly ordered (better, worse) couples
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dpo.encoding import Message, Prompt
from dpo.errors import DpormError

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Columns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    scores: str = "scores"
    ranking: str = "ranking"


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Prompt
    responses: tuple[str, ...]  # best first
    pairs: tuple[tuple[int, int], ...]  # (winner, loser) indices into responses
    row: int  # 1-based row number in the source


@dataclass
class PreferenceData:
    examples: list[PreferenceExample]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)

    def fingerprint(self) -> str:
        """sha256 of the examples' content: a cache key for anything derived from this data."""
        digest = hashlib.sha256()
        for ex in self.examples:
            digest.update(json.dumps([ex.prompt, ex.responses, ex.pairs], ensure_ascii=False).encode())
        return digest.hexdigest()


class RowError(ValueError):
    """A row that cannot be used; the message says why."""


# --- format (c): HH-RLHF style dialogues ---------------------------------------------------------

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ASSISTANT = "\n\nAssistant:"


def dialogue_to_messages(text: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant:"`` → user/assistant messages; the empty last assistant turn (the one
    to generate) is dropped, and any other empty turn makes the row unusable."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise RowError("text before the first 'Human:'/'Assistant:' turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]
    if messages and messages[-1] == {"role": "assistant", "content": ""}:
        messages.pop()
    if any(not m["content"] for m in messages):
        raise RowError("the dialogue has an empty turn")
    return messages


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Prompt messages and the two responses of an implicit-prompt pair."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(_ASSISTANT, 0, common)  # the marker must lie wholly in the shared prefix
    if cut < 0:
        raise RowError("chosen and rejected share no prefix ending in 'Assistant:'")
    end = cut + len(_ASSISTANT)
    messages = dialogue_to_messages(chosen[:end])
    if not messages:
        raise RowError("empty prompt dialogue")
    responses = chosen[end:].strip(), rejected[end:].strip()
    if any(_TURN.search(r) for r in responses):  # the two dialogues part before their last turn
        raise RowError("chosen and rejected differ before their last assistant turn: a response holds further "
                       "'Human:'/'Assistant:' turns")  # fmt: skip
    return messages, *responses


# --- row parsing -----------------------------------------------------------------------------------


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"'{what}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise RowError(f"'{what}' is empty")
    return value


def _messages(value: object, what: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError(f"'{what}' is not a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"'{what}' has a message without string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _assistant_reply(messages: list[Message], what: str) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(f"'{what}' must end in exactly one assistant message after the prompt")
    return _text(messages[0]["content"], what)


def _conversational(prompt: object, chosen: list, rejected: list, cols: Columns) -> tuple[Prompt, str, str]:
    chosen_m, rejected_m = _messages(chosen, cols.chosen), _messages(rejected, cols.rejected)
    if prompt is None:  # implicit: the shared leading messages are the prompt
        shared = 0
        while shared < min(len(chosen_m), len(rejected_m)) - 1 and chosen_m[shared] == rejected_m[shared]:
            shared += 1
        prompt_m = chosen_m[:shared]
    else:
        prompt_m = [{"role": "user", "content": _text(prompt, cols.prompt)}] if isinstance(prompt, str) else (
            _messages(prompt, cols.prompt))  # fmt: skip
    if not prompt_m:
        raise RowError("no prompt messages")
    tail = len(prompt_m)
    chosen_tail = chosen_m[tail:] if chosen_m[:tail] == prompt_m else chosen_m
    rejected_tail = rejected_m[tail:] if rejected_m[:tail] == prompt_m else rejected_m
    prompt_out: Prompt = prompt if isinstance(prompt, str) else prompt_m
    return prompt_out, _assistant_reply(chosen_tail, cols.chosen), _assistant_reply(rejected_tail, cols.rejected)


def _numbers(value: object, what: str) -> list[float]:
    """A list of finite numbers (not a string of digits, not booleans, not NaN)."""
    ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or not all(math.isfinite(v) for v in value):
        raise RowError(f"'{what}' must be a list of finite numbers, got {str(value)[:60]}")
    return [float(v) for v in value]


def _ranking(row: dict, cols: Columns) -> tuple[tuple[str, ...], tuple[tuple[int, int], ...]]:
    responses = row.get(cols.responses)
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError(f"'{cols.responses}' needs at least two responses")
    texts = [_text(r, f"{cols.responses}[{i}]") for i, r in enumerate(responses)]
    if row.get(cols.scores) is not None:
        keys = _numbers(row[cols.scores], cols.scores)
    elif row.get(cols.ranking) is not None:
        keys = [-r for r in _numbers(row[cols.ranking], cols.ranking)]  # each response's rank, 1 is best
    else:
        raise RowError(f"rankings need '{cols.scores}' or '{cols.ranking}'")
    if len(keys) != len(texts):
        raise RowError(f"{len(texts)} responses but {len(keys)} scores/ranks")
    order = sorted(range(len(texts)), key=lambda i: -keys[i])  # stable: ties keep input order
    ranked = tuple(texts[i] for i in order)
    if len(set(ranked)) != len(ranked):
        raise RowError("duplicate responses")
    ranked_keys = [keys[i] for i in order]
    pairs = tuple(
        (win, lose)
        for win in range(len(ranked))
        for lose in range(win + 1, len(ranked))
        if ranked_keys[win] > ranked_keys[lose]
    )
    if not pairs:
        raise RowError("all responses have the same score")
    return ranked, pairs


def parse_row(row: dict, cols: Columns, row_number: int) -> PreferenceExample:
    """One row of any supported format → an example; :class:`RowError` says why a row is unusable."""
    prompt = row.get(cols.prompt)
    if row.get(cols.responses) is not None:
        responses, pairs = _ranking(row, cols)
        prompt_value: Prompt = _text(prompt, cols.prompt) if not isinstance(prompt, list) else _messages(
            prompt, cols.prompt)  # fmt: skip
        return PreferenceExample(prompt_value, responses, pairs, row_number)
    chosen, rejected = row.get(cols.chosen), row.get(cols.rejected)
    if chosen is None or rejected is None:
        raise RowError(f"missing '{cols.chosen}' or '{cols.rejected}'")
    if isinstance(chosen, list) or isinstance(rejected, list):
        prompt_value, chosen_text, rejected_text = _conversational(prompt, chosen, rejected, cols)
    elif prompt is None:
        try:
            dialogues = _text(chosen, cols.chosen), _text(rejected, cols.rejected)
            prompt_value, chosen_text, rejected_text = split_implicit_prompt(*dialogues)
        except RowError as e:  # no prompt field: the row had to be an implicit-prompt dialogue
            raise RowError(f"no '{cols.prompt}' field, and not an implicit-prompt dialogue: {e}") from None
        chosen_text, rejected_text = _text(chosen_text, cols.chosen), _text(rejected_text, cols.rejected)
    else:
        prompt_value = _text(prompt, cols.prompt) if not isinstance(prompt, list) else _messages(prompt, cols.prompt)
        chosen_text, rejected_text = _text(chosen, cols.chosen), _text(rejected, cols.rejected)
    if chosen_text == rejected_text:
        raise RowError("chosen and rejected are identical")
    return PreferenceExample(prompt_value, (chosen_text, rejected_text), ((0, 1),), row_number)


def parse_rows(rows: Iterable[dict], cols: Columns = Columns(), strict: bool = False) -> PreferenceData:
    data = PreferenceData([])
    for number, row in enumerate(rows, 1):
        try:
            data.examples.append(parse_row(row, cols, number))
        except RowError as e:
            if strict:
                raise DpormError(f"row {number}: {e}") from None
            data.skipped.append((number, str(e)))
    if not data.examples:
        reasons = "; ".join(f"row {n}: {why}" for n, why in data.skipped[:3])
        raise DpormError(f"no usable preference rows ({len(data.skipped)} skipped{': ' + reasons if reasons else ''})")
    return data


# --- sources ---------------------------------------------------------------------------------------


def require_split_applies(source: str, split: str | None) -> None:
    """``--split`` names a split of a dataset dir or hub id; a file has none: a one-line error, not ignored."""
    if split is not None and Path(source).expanduser().is_file():
        raise DpormError(f"--split applies to dataset directories and hub ids; {source} is a file")


def load_rows(source: str, split: str = "train"):
    """Rows of a local JSONL/JSON/Parquet/CSV file (``.gz`` ok), a saved dataset dir, or a hub dataset id."""
    import zlib

    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
                raise DpormError(f"{source}: no split {split!r}; it has {', '.join(map(repr, loaded))} (choose with "
                                 "--split)")  # fmt: skip
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        suffixes = [s for s in path.suffixes if s != ".gz"]
        if path.is_file():
            if path.stat().st_size == 0:
                raise DpormError(f"{source}: the file is empty")
            builder = LOCAL_BUILDERS.get(suffixes[-1] if suffixes else "")
            if builder is None:
                raise DpormError(f"{source}: unsupported file type (use .jsonl, .json, .parquet or .csv)")
            return _quietly(datasets, lambda: datasets.load_dataset(builder, data_files=str(path), split="train"))
        if source.startswith((".", "/", "~")) or path.suffix:
            raise DpormError(f"{source}: no such file or directory")
        return datasets.load_dataset(source, split=split)
    except (ValueError, OSError, EOFError, zlib.error, StopIteration, datasets.exceptions.DatasetGenerationError) as e:
        cause = e.__cause__ or e  # a generation error wraps the parser's own message
        why = str(cause).splitlines()[0] if str(cause) else f"{type(cause).__name__} (a malformed file?)"
        bad_line = _first_bad_json_line(path) if path.is_file() and ".jsonl" in path.suffixes else None
        raise DpormError(f"cannot load {source}: {bad_line or why}") from None


def _first_bad_json_line(path: Path) -> str | None:
    """``line N: why`` for the first line of a JSONL file that is not UTF-8 JSON object (the parser's own row
    numbers count from 0 within a block); None when every line parses and there is one at least."""
    import gzip
    import zlib

    opener, rows = gzip.open if path.suffix == ".gz" else open, 0
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"line {n}, column {e.start + 1}: not UTF-8 (byte 0x{raw[e.start]:02x})"
                if not line.strip():
                    continue
                rows += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {n}, column {e.colno}: not valid JSON ({e.msg})"
                if not isinstance(record, dict):
                    return f"line {n}: not a JSON object"
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
        return f"{type(e).__name__}: {e} (a truncated or corrupt file?)"
    return None if rows else "the file is empty (no JSON lines)"


def _quietly(datasets, load):
    """``load()`` without datasets' own error log lines (a malformed file ends in our one-line error instead) and
    without its "Generating train split" bars for a local file (our commands show their own progress)."""
    level, bars_off = datasets.logging.get_verbosity(), datasets.are_progress_bars_disabled()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    datasets.disable_progress_bars()
    try:
        return load()
    finally:
        datasets.logging.set_verbosity(level)
        if not bars_off:
            datasets.enable_progress_bars()


def load_preferences(source: str, cols: Columns = Columns(), split: str = "train", strict: bool = False,
                     report=lambda msg: print(msg, file=sys.stderr)) -> PreferenceData:  # fmt: skip
    """Load, parse and validate; skipped rows are reported (first few with reasons) and counted."""
    data = parse_rows(load_rows(source, split), cols, strict)
    if data.skipped:
        shown = ", ".join(f"{n} ({why})" for n, why in data.skipped[:5])
        more = f" and {len(data.skipped) - 5} more" if len(data.skipped) > 5 else ""
        report(f"skipped {len(data.skipped)} unusable row(s): {shown}{more}")
    return data

"""Errors caused by user input. The CLI prints them as one line, never a traceback."""

import tempfile
from pathlib import Path


class DpormError(Exception):
    """Base class for errors a user can fix (bad input, missing file, bad option)."""


class EncodingError(DpormError):
    """A (prompt, response) pair cannot be turned into tokens as the rules require."""


class ResponseTooLongError(EncodingError):
    """The response alone exceeds ``max_length`` and cutting it was not allowed."""


def require_at_least(options: object, names: tuple[str, ...], minimum: float = 1) -> None:
    """Raise for the first option in ``names`` that is set and below ``minimum`` (named as its ``--flag``)."""
    for name in names:
        value = getattr(options, name, None)
        if value is not None and value < minimum:
            raise DpormError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value:g}")


def require_writable(
    path: str | Path, option: str = "--output", parents: bool = False, directory: bool = False
) -> None:
    """Fail now, before any model work, when ``path`` (a file, or with ``directory`` a directory) could not be
    written: a file is tried where it would go (with ``parents``, in the nearest existing ancestor)."""
    target = Path(path).expanduser().absolute()
    if target.exists() and target.is_dir() != directory:
        raise DpormError(f"{option} {path}: {'not a directory' if directory else 'is a directory'}")
    folder = target if directory and target.exists() else target.parent
    while parents and not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise DpormError(f"{option} {path}: no such directory {folder}")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise DpormError(f"{option} {path}: cannot write in {folder} ({e.strerror or e})") from None

"""Errors caused by user input. The CLI prints them as one line, never a traceback."""


class DpormError(Exception):
    """Base class for errors a user can fix (bad input, missing file, bad option)."""


class EncodingError(DpormError):
    """A (prompt, response) pair cannot be turned into tokens as the rules require."""


class ResponseTooLongError(EncodingError):
    """The response alone exceeds ``max_length`` and cutting it was not allowed."""

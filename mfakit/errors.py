"""The error every user mistake or unusable input raises: the command line prints its first line as
`mfakit: error: ...` and exits 2. Any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class MfakitError(ValueError):
    """Bad input or a request mfakit cannot carry out; the message names the file, tensor or option at fault."""


class OptionsError(MfakitError):
    """An option value that no conversion or fine-tuning run can use."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (with the next one when the first only introduces it, ending in a
    colon), or its type name when the message is empty: a library's multi-line error as one line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]

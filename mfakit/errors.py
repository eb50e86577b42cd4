"""The error every user mistake or unusable input raises: the command line prints its first line as
`mfakit: error: ...` and exits 2. Any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class MfakitError(ValueError):
    """Bad input or a request mfakit cannot carry out; the message names the file, tensor or option at fault."""


class OptionsError(MfakitError):
    """An option value that no conversion or fine-tuning run can use."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty (for wrapping a
    library's multi-line error into one line)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

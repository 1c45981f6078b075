"""One exception type for every user-facing mistake.

Library code raises :class:`M4RError` with a message that names the input, the problem and the
fix. The CLI turns it into ``Error: <message>`` and the exit code carried by the exception, so a
user never sees a Python traceback for their own mistake.
"""

from __future__ import annotations


class M4RError(Exception):
    """A problem with the user's input or environment (not a bug in m4r-export)."""

    #: exit code the CLI uses: 1 = failure (parity failed, artifact broken), 2 = usage error
    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(M4RError):
    """Bad arguments or bad input files: exit code 2."""

    exit_code = 2

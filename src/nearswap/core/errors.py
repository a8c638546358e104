"""What a user sees when something is wrong: one plain sentence saying what, where, and how to fix it.

- ``NearswapError``: bad input, a refused operation, a missing file. The CLI prints ``str(err)``
  as one line and exits non-zero; library callers catch it. ``InvalidValue`` is the one for a
  bad argument value (also a ``ValueError``): every user-facing error is a ``NearswapError``.
- ``WriteFailed``: the output could not be written (disk full, I/O error); a merge keeps its
  journaled partial output for the next run to continue.
- ``NearswapWarning``: something worth saying that does not stop the work (the CLI prints it
  as ``nearswap: warning: ...``; library callers get a normal Python warning).
- ``InterruptedAfterCommit``: Ctrl-C or SIGTERM arrived once the output was already complete
  and in place (say, while the old output it replaced was being removed): it says so, and what
  is left over, instead of claiming that nothing was written.

Values that come from files (tensor names, dtypes, metadata, recipe fields) reach messages
only through ``shown``: quoted, escaped onto one line, and cut short.
"""

from __future__ import annotations

from typing import Any


class NearswapError(Exception):
    """A user-facing error: bad input, refused operation, missing file.

    The CLI prints ``str(err)`` as one line and exits non-zero; library callers catch it.
    """


class InvalidValue(NearswapError, ValueError):
    """A bad value given to a library call (a negative t, an unknown dtype): a ``NearswapError``
    like every user-facing error, and a ``ValueError`` as Python callers expect of bad values."""


class WriteFailed(NearswapError):
    """Writing the output failed (disk full, an I/O error): what was durably written may be
    kept for the next run to continue (``nearswap merge`` resumes)."""


class NearswapWarning(UserWarning):
    """Something the user should know that does not stop the work."""


class InterruptedAfterCommit(KeyboardInterrupt):
    """Interrupted after the output was complete and in place; the message says what is where."""


def shown(value: Any, limit: int = 80) -> str:
    """An untrusted value as it may appear in a one-line message: ``repr`` (so newlines, escape
    sequences and lone surrogates are escaped), cut to ``limit`` characters. Never expands a
    huge or self-referencing structure: containers are described, not printed.

    >>> shown("F32\\n\\x1b[2J")
    "'F32\\\\n\\\\x1b[2J'"
    >>> shown(list(range(10**6)))
    'a list of 1000000 items'
    """
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"  # (repr of a huge int is slow, or refused)
    text = repr(value) if isinstance(value, (str, bytes, int, float, bool, type(None))) else f"a {type(value).__name__}"
    if len(text) > limit:
        text = text[: limit - 5] + "…" + text[-4:]
    return text

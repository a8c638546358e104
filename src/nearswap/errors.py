"""The one exception a user should see: a plain sentence saying what, where, and how to fix it."""


class NearswapError(Exception):
    """A user-facing error: bad input, refused operation, missing file.

    The CLI prints ``str(err)`` as one line and exits non-zero; library callers catch it.
    """

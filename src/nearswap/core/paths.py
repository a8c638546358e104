"""Where nearswap keeps what it fetches, and how many threads it uses by default: one place each."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$NEARSWAP_CACHE``, else ``$XDG_CACHE_HOME/nearswap``, else ``~/.cache/nearswap``."""
    if os.environ.get("NEARSWAP_CACHE"):
        return Path(os.environ["NEARSWAP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nearswap"


def default_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

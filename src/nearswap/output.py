"""Atomic output: a result appears whole at its path, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import NearswapError


def refuse_existing(target: Path, force: bool) -> None:
    """Refuse to clobber ``target`` unless ``force``; cheap, so callers run it before any work."""
    if target.exists() and not force:
        raise NearswapError(f"{target} already exists; choose another output path or pass --force to replace it")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; rename it into place on success.

    On any exception (Ctrl-C included) the temporary directory is removed and ``target``
    is left as it was. With ``force`` an existing ``target`` is replaced only after the new
    one is complete. The temporary name starts with a dot and ends in ``.partial``.
    """
    target = Path(target)
    refuse_existing(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a result should look like any new folder
        fsync_dir(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rename(target, old / "replaced")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

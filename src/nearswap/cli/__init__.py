"""The ``nearswap`` command: thin wrappers over the library, one module per family of commands
(``merge``, ``measure``, ``judge``, ``ship``, ``tools``) on the group of ``group`` and the
shared options of ``options``. Heavy imports happen inside commands."""

from . import judge, measure, merge, ship, tools  # noqa: F401  (each registers its commands on the group)
from .group import cli, main

__all__ = ["cli", "main"]

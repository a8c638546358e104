"""nearswap: exact, streaming, sequential NearSwap merges of language models.

>>> import numpy as np, nearswap
>>> nearswap.nearswap(1e-4, np.float32([0.5, 0.50005]), np.float32([0.6, 0.5]))
array([0.5001, 0.5   ], dtype=float32)

The heavy parts load on first use, so ``import nearswap`` (and ``nearswap --help``) is fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .core.errors import NearswapError, NearswapWarning

if TYPE_CHECKING:
    from .core.kernels import nearswap

__all__ = ["__version__", "NearswapError", "NearswapWarning", "nearswap", "merge", "load_recipe"]


def merge(base: Any, secondaries: Any = (), t: Any = None, out: Any = None, **options: Any) -> dict:
    """Merge ``base`` with each of ``secondaries`` in turn by NearSwap (``api.merge``, whose
    docstring says every option); returns the report.

    >>> nearswap.merge("base/", ["s1/", "s2/"], t=1e-4, out="merged/")  # doctest: +SKIP
    """
    from .api import merge as run

    return run(base, secondaries, t, out, **options)


def load_recipe(path: Any) -> Any:
    """Load and validate a YAML recipe (see ``nearswap.merging.recipe``)."""
    from .merging.recipe import load

    return load(path)


def __getattr__(name: str) -> Any:
    if name == "nearswap":
        from .core.kernels import nearswap

        return nearswap
    raise AttributeError(f"module 'nearswap' has no attribute {name!r}")

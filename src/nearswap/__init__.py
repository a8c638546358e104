"""nearswap: exact, streaming, sequential NearSwap merges of language models.

>>> import numpy as np, nearswap
>>> nearswap.nearswap(1e-4, np.float32([0.5, 0.50005]), np.float32([0.6, 0.5]))
array([0.5001, 0.5   ], dtype=float32)

The heavy parts load on first use, so ``import nearswap`` (and ``nearswap --help``) is fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import NearswapError, NearswapWarning

if TYPE_CHECKING:
    from .kernels import nearswap

__all__ = ["__version__", "NearswapError", "NearswapWarning", "nearswap", "merge", "load_recipe"]


def merge(base: Any, secondaries: Any = (), t: Any = None, out: Any = None, **options: Any) -> dict:
    """Merge ``base`` with each of ``secondaries`` in turn by NearSwap; write an HF checkpoint to ``out``.

    ``t`` is one threshold or a list with one per secondary. ``base`` may instead be a
    ``Recipe`` (then ``secondaries`` and ``t`` are unused). Options: ``dtype``,
    ``shard_size``, ``tokenizer_source``, ``carry_float32``, ``allow_nonfinite`` (recipe
    fields) and ``force``, ``threads`` or ``settings`` (a ``stream.Settings``: chunk size and
    threads), ``ray_address`` (run on a Ray cluster: ``HOST:PORT``, ``auto`` or ``local``),
    ``progress`` (run settings), ``resume`` (``auto``: continue an earlier, killed run of
    the same merge into ``out``; ``restart``; ``never``). An ``out`` ending in
    ``.gguf`` merges GGUF inputs of one architecture into a GGUF file, ``gguf_type`` giving
    its tensor type (default ``like-base``). Returns the report.

    >>> nearswap.merge("base/", ["s1/", "s2/"], t=1e-4, out="merged/")  # doctest: +SKIP
    """
    from . import engine, recipe

    run_keys = {"force", "threads", "settings", "progress", "on_plan", "gguf_type", "ray_address", "resume"}
    run = {k: v for k, v in options.items() if k in run_keys}
    fields = {k: v for k, v in options.items() if k not in run_keys}
    if isinstance(base, recipe.Recipe):
        rec = base
    else:
        secondaries = [secondaries] if isinstance(secondaries, (str, bytes)) or hasattr(secondaries, "__fspath__") else list(secondaries)
        ts = list(t) if isinstance(t, (list, tuple)) else [t] * len(secondaries)
        if len(ts) != len(secondaries):
            raise NearswapError(f"{len(ts)} thresholds for {len(secondaries)} secondaries")
        steps = [{"model": str(m), "t": x} for m, x in zip(secondaries, ts)]
        rec = recipe.build({"base": str(base), "steps": steps, **fields}, "merge()")
    if out is None:
        raise NearswapError("merge() needs out=, the output directory")
    return engine.merge(rec, out, **run)


def load_recipe(path: Any) -> Any:
    """Load and validate a YAML recipe (see ``nearswap.recipe``)."""
    from .recipe import load

    return load(path)


def __getattr__(name: str) -> Any:
    if name == "nearswap":
        from .kernels import nearswap

        return nearswap
    raise AttributeError(f"module 'nearswap' has no attribute {name!r}")

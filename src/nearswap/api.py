"""The library's front door: what ``nearswap.merge`` and the ``nearswap merge`` command run.

``merge`` builds the recipe from its arguments (``merging.recipe.build``, the one recipe builder)
and ``run_recipe`` runs one: the merge into a directory, a .gguf file or ``null:``, and the
model card written into a directory output (``ship.card.merge``), as the command line does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .core.errors import NearswapError, NearswapWarning


def merge(base: Any, secondaries: Any = (), t: Any = None, out: Any = None, **options: Any) -> dict:
    """Merge ``base`` with each of ``secondaries`` in turn by NearSwap; write an HF checkpoint to ``out``.

    ``t`` is one threshold or a list with one per secondary. ``base`` may instead be a
    ``Recipe`` (then ``secondaries`` and ``t`` are unused; recipe fields given set its own, with
    a warning for each value they change, as the command line does). Options: ``dtype``,
    ``shard_size``, ``tokenizer_source``, ``carry_float32``, ``allow_nonfinite`` (recipe
    fields) and ``force``, ``threads`` or ``settings`` (a ``stream.Settings``: chunk size and
    threads), ``ray_address`` (run on a Ray cluster: ``HOST:PORT``, ``auto`` or ``local``),
    ``progress`` (run settings), ``resume`` (``auto``: continue an earlier, killed run of
    the same merge into ``out``; ``restart``; ``never``). An ``out`` ending in
    ``.gguf`` merges GGUF inputs of one architecture into a GGUF file, ``gguf_type`` giving
    its tensor type (default ``like-base``). Returns the report.

    >>> nearswap.merge("base/", ["s1/", "s2/"], t=1e-4, out="merged/")  # doctest: +SKIP
    """
    from .merging import recipe

    run_keys = {"force", "threads", "settings", "progress", "on_plan", "gguf_type", "ray_address", "resume"}
    run = {k: v for k, v in options.items() if k in run_keys}
    fields = {k: v for k, v in options.items() if k not in run_keys}
    if isinstance(base, recipe.Recipe):
        rec, said = recipe.with_fields(base, fields)
        for sentence in said:
            warnings.warn(sentence, NearswapWarning, stacklevel=2)
    else:
        rec = recipe.from_inputs(base, secondaries, t, fields)
    if out is None:
        raise NearswapError("merge() needs out=, the output directory")
    return run_recipe(rec, out, **run)


def run_recipe(rec: Any, out: str | Path, gguf_type: str | None = None, **run: Any) -> dict:
    """Run the recipe ``rec`` into ``out`` (a directory, a ``.gguf`` file or ``null:``), the
    card included; ``run``: ``force``, ``threads``, ``settings``, ``progress``, ``on_plan``,
    ``ray_address``, ``resume``. Returns the report."""
    from .ship.card import merge as published

    return published(rec, out, gguf_type, **run)


def tune(base: Any, secondaries: Any, budget: str, out: str | Path, *, max_merges: int | None = None,
         threads: int | None = None, force: bool = False, drift_text: Any = None, per_kind: bool = False,
         echo: Any = lambda s: None, progress: Any = None, on_plan: Any = None) -> dict:
    """``nearswap tune``: each step's t at the edge of a drift ``budget`` (``kl<=0.01``: see
    ``judge.tune``), the search written to ``out``, then the chosen recipe merged with its card
    into ``out/merged`` (as ``nearswap merge`` of ``out/recipe.yaml`` would). Returns the
    search's result with the merge's report under ``merge``."""
    from .judge import tune as tuning
    from .merging import recipe

    result = tuning.search(base, secondaries, budget, out, max_merges=max_merges or tuning.MAX_MERGES,
                           threads=threads, force=force, drift_text=drift_text, per_kind=per_kind, echo=echo)
    chosen = recipe.build(result["recipe"], "tune")
    echo(f"merging the chosen recipe into {Path(out) / 'merged'}")
    tuning.remove_own_merge(Path(out) / "merged")  # an earlier tune's merge, checked now; anything else refused
    result["merge"] = run_recipe(chosen, Path(out) / "merged", threads=threads, progress=progress,
                                 on_plan=on_plan)
    return result

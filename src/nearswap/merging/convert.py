"""`nearswap convert`: any model nearswap reads, rewritten as an HF checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core import dtypes
from ..core.errors import NearswapError
from .recipe import DEFAULT_SHARD_SIZE, Recipe, parse_size
from .report import MergeReport
from .sinks import write_checkpoint


def convert(source: str | Path, out: str | Path, *, dtype: str | None = None,
            shard_size: str | int = DEFAULT_SHARD_SIZE, **run: Any) -> MergeReport:
    """Write ``source`` (a GGUF file, safetensors file or HF directory) to ``out`` as an HF
    checkpoint: sharded safetensors, config.json (from GGUF metadata for a GGUF), tokenizer
    files (built from the GGUF vocabulary when transformers is installed).

    ``dtype`` casts floating tensors (round to nearest even); by default they keep their
    dtype, which for a GGUF is float32 (its dequantized values, exactly). ``run``: ``force``,
    ``threads`` or ``settings``, ``progress``, ``on_plan`` as for ``merge``.
    """
    try:
        name = dtypes.by_name(dtype).name if dtype else None
        size = parse_size(shard_size)
    except ValueError as e:
        raise NearswapError(str(e)) from None
    # no steps: a conversion (a user recipe needs at least one, so this bypasses build())
    recipe = Recipe(base=str(source), steps=[], dtype=name, shard_size=size, allow_nonfinite=True)
    return write_checkpoint(recipe, out, {"nearswap_converted_from": recipe.base}, **run)[1]

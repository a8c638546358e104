"""The files of a checkpoint besides its weights: configs, every tokenizer file,
sentence-transformers' folders, copied from the base (the tokenizer's from ``tokenizer_source``
when a recipe gives one), or written from a GGUF base's metadata."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from ..core.dtypes import BY_NAME
from ..core.errors import (
    NearswapError,
    NearswapWarning,
)
from ..formats import TOKENIZER_FILES
from .plan import Plan


def copy_side_files(plan_: Plan, dest: Path, regenerated: tuple[str, ...] = ()) -> list[str]:
    """Every non-weight file of the base (configs, every tokenizer file, sentence-transformers'
    files and folders, ...), with the tokenizer files from the tokenizer source instead when
    one is given; ``regenerated`` (the model card) is left to the caller. Links that lead out of
    a model directory are not followed (a warning names them). Returns what was copied."""

    from ..core.files import open_regular
    from ..formats import side_files

    recipe = plan_.recipe
    base_dir = plan_.base.directory
    copied: list[str] = []
    jobs: list[tuple[str, Path]] = []
    if base_dir is not None:
        skip = set(regenerated) | (set(TOKENIZER_FILES) if recipe.tokenizer_source != "base" else set())
        found, left_out = side_files(base_dir, skip)
        jobs += found
        for rel in left_out:
            warnings.warn(f"{base_dir / rel} was not copied: it is a link leading out of the model directory, "
                          "a linked folder or not a regular file", NearswapWarning)
    if recipe.tokenizer_source != "base":
        src = Path(recipe.tokenizer_source)
        found, left_out = side_files(src)
        jobs += [(rel, path) for rel, path in found if rel in TOKENIZER_FILES]
    for rel, path in jobs:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = open_regular(path, "side file")
        try:
            with os.fdopen(fd, "rb", closefd=False) as src_f, open(target, "wb") as out:
                shutil.copyfileobj(src_f, out, 1 << 20)
        except OSError as e:
            raise NearswapError(f"cannot copy {path} to {target}: {e.strerror}") from None
        finally:
            os.close(fd)
        copied.append(rel)
    if base_dir is None and plan_.base.side_files is not None:  # e.g. a GGUF base: from its metadata
        copied += plan_.base.side_files(dest, skip_tokenizer=recipe.tokenizer_source != "base")
    config = dest / "config.json"
    if config.exists() and recipe.dtype:
        data = json.loads(config.read_text())
        data["torch_dtype"] = BY_NAME[recipe.dtype].hf_name
        config.write_text(json.dumps(data, indent=2) + "\n")
    return copied



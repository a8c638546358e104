"""Opening models: a path (HF directory or a single file) becomes a ``Model``.

Each container format lives in its own module; this one decides which applies to a path,
from the tables below, and checks the things that span files (index vs shards).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import NearswapError
from . import safetensors as st
from .safetensors import TensorInfo

# Checkpoints that are Python pickles: loading them can run arbitrary code, so we refuse.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_HINT = (
    "it is a pickle checkpoint, and loading pickles can run arbitrary code; convert it to "
    "safetensors first, e.g. `python -c \"import transformers as t; "
    "t.AutoModelForCausalLM.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\"`"
)
# Files copied from the base (or the tokenizer source) into a merged model.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class Model:
    """A checkpoint opened for streaming: tensor locations plus its config, nothing loaded."""

    path: Path
    label: str  # how messages name it: "base", "s1", ...
    format: str
    files: list[Path]
    tensors: dict[str, TensorInfo]  # in file order, then offset order
    config: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # writes config/tokenizer files for a model that has no HF directory (GGUF); returns their names
    side_files: Callable[..., list[str]] | None = None

    @property
    def directory(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    @property
    def architectures(self) -> list[str] | None:
        return (self.config or {}).get("architectures")

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def describe(self) -> str:
        return f"{self.label} ({self.path})"


def open_model(path: str | Path, label: str = "model") -> Model:
    """Open a model for streaming: an HF directory, a ``.safetensors`` or a ``.gguf`` file.

    Raises ``NearswapError`` with a one-line explanation for anything unusable.
    """
    path = Path(path)
    if not path.exists():
        raise NearswapError(f"{label}: {path} does not exist")
    if path.is_dir():
        return _open_directory(path, label)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise NearswapError(f"{label}: refusing {path}: {PICKLE_HINT}")
    if suffix == ".gguf":
        from .gguf import open_gguf

        from .gguf import write_side_files

        fmt, tensors, config, meta = open_gguf(path, label)
        return Model(path, label, fmt, [path], tensors, config, {k: str(v) for k, v in meta.items()},
                     side_files=lambda dest, skip_tokenizer=False: write_side_files(path, config, dest, skip_tokenizer))
    if suffix != ".safetensors":
        raise NearswapError(f"{label}: {path}: unknown model format {suffix or '(no suffix)'}; "
                            "expected an HF directory, a .safetensors or a .gguf file")
    tensors, metadata = st.read_header(path)
    return Model(path, label, "safetensors file", [path], tensors, None, metadata)


def _open_directory(path: Path, label: str) -> Model:
    config = _read_json(path / "config.json", label) if (path / "config.json").exists() else None
    index_path = path / st.INDEX_NAME
    if index_path.exists():
        files, tensors = _open_index(index_path, label)
        fmt = f"HF safetensors, {len(files)} shards"
    elif (path / st.SINGLE_NAME).exists():
        files = [path / st.SINGLE_NAME]
        tensors, _ = st.read_header(files[0])
        fmt = "HF safetensors, 1 file"
    else:
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            files = found
            tensors, _ = st.read_header(found[0])
            fmt = "HF safetensors, 1 file"
        elif found:
            raise NearswapError(f"{label}: {path} has {len(found)} .safetensors files but no {st.INDEX_NAME}; add the index or pass one file")
        elif any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise NearswapError(f"{label}: refusing {path}: {PICKLE_HINT}")
        else:
            raise NearswapError(f"{label}: {path} holds no model (no .safetensors files)")
    metadata = st.read_header(files[0])[1]
    return Model(path, label, fmt, files, tensors, config, metadata)


def _open_index(index_path: Path, label: str) -> tuple[list[Path], dict[str, TensorInfo]]:
    index = _read_json(index_path, label)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise NearswapError(f"{label}: {index_path} has no weight_map; the index is corrupt: regenerate it")
    shard_names = list(dict.fromkeys(weight_map.values()))
    files = [index_path.parent / name for name in sorted(shard_names)]
    for f in files:
        if not f.exists():
            raise NearswapError(f"{label}: {index_path.name} names shard {f.name}, which is missing from {index_path.parent}")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        in_file, _ = st.read_header(f)
        for name, info in in_file.items():
            expected = weight_map.get(name)
            if expected is None:
                raise NearswapError(f"{label}: tensor {name!r} is in {f.name} but not in {index_path.name}; the index is stale: regenerate it")
            if expected != f.name:
                raise NearswapError(f"{label}: {index_path.name} places {name!r} in {expected}, but it is in {f.name}; the index is stale")
            tensors[name] = info
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise NearswapError(f"{label}: {index_path.name} lists {len(missing)} tensors not found in any shard (first: {missing[0]!r})")
    return files, tensors


def _read_json(path: Path, label: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise NearswapError(f"{label}: cannot read {path}: {e}") from None

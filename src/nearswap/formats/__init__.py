"""Opening models: a path (HF directory or a single file) becomes a ``Model``.

Each container format lives in its own module; this one decides which applies to a path,
from the tables below, and checks the things that span files (index vs shards).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Collection

from ..core.errors import NearswapError, shown
from ..core.files import read_json_object
from . import safetensors as st
from .types import Model, TensorInfo, role

# Checkpoints that are Python pickles: loading them can run arbitrary code, so we refuse.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_HINT = (
    "it is a pickle checkpoint, and loading pickles can run arbitrary code; convert it to "
    "safetensors first, e.g. `python -c \"import transformers as t; "
    "t.AutoModelForCausalLM.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\"`"
)
# Side files: everything in a model directory that is not weights is carried into a merge or
# conversion of it (configs, every tokenizer file, sentence-transformers' modules and pooling
# folders, preprocessor configs, ...), except these:
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx")
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")
SKIPPED_DIRS = (".git", ".cache", "__pycache__")  # version control and download caches, not the model
CONFIG_FILES = ("config.json", "generation_config.json")
# Tokenizer files: the tokenizer_source replaces exactly these.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "vocab.txt", "sentencepiece.bpe.model", "spiece.model", "spm.model", "bpe.codes", "qwen.tiktoken",
    "tokenizer.tiktoken",
)
# of those, the files that hold a vocabulary: a model directory with none has no tokenizer
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
MAX_SIDE_FILES = 10_000  # a model directory with more is not a model directory


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEXES)


def _allowed_root(directory: Path) -> Path:
    """Where a side file's symlink may lead: inside the model directory, or, for a snapshot of
    the Hugging Face cache (``models--org--name/snapshots/REV``), inside that repository's cache
    folder (its ``blobs/``)."""
    d = directory.resolve()
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent
    return d


def side_files(directory: Path, skip: Collection[str] = frozenset()) -> tuple[list[tuple[str, Path]], list[str]]:
    """The non-weight files of a model directory, as (relative path, file to read), and the
    relative paths left out because they are links leading outside the model, linked folders,
    or not regular files. ``skip``: relative paths not to take (say, tokenizer files from elsewhere)."""
    root = _allowed_root(directory)
    found: list[tuple[str, Path]] = []
    left_out: list[str] = []
    stack = [directory]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            rel = Path(e.path).relative_to(directory).as_posix()
            path = Path(e.path)
            real = path.resolve()
            if real != root and root not in real.parents:
                left_out.append(rel)
                continue
            if e.is_dir():
                if e.is_symlink():  # a linked folder is not walked (it could loop back on itself)
                    left_out.append(rel)
                elif e.name not in SKIPPED_DIRS:
                    stack.append(path)
                continue
            if is_weight_file(e.name) or rel in skip:
                continue
            if not real.is_file():
                left_out.append(rel)
                continue
            found.append((rel, path))
            if len(found) > MAX_SIDE_FILES:
                raise NearswapError(f"{directory} holds more than {MAX_SIDE_FILES:,} files besides its weights; "
                                    "point nearswap at the model's own directory")
    return sorted(found), left_out


def open_model(path: str | Path, label: str = "model", native: bool = False) -> Model:
    """Open a model for streaming: an HF directory, a ``.safetensors`` or a ``.gguf`` file.
    ``native``: a GGUF under its own names and stored values, of any architecture (only GGUF
    files can be opened so).

    ``synthetic:SHAPE?seed=N`` is a checkpoint generated on the fly (``generated``).

    Raises ``NearswapError`` with a one-line explanation for anything unusable.
    """
    from .generated import is_generated, open_generated

    if is_generated(path) and not native:
        return open_generated(str(path), label)
    path = Path(path)
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NearswapError(f"{role(label)}: {path} is a symbolic link that leads back to itself (a loop); point "
                                "it at the model's file or folder") from None
        if os.path.islink(path):
            raise NearswapError(f"{role(label)}: {path} is a symbolic link to {shown(os.readlink(path), 120)}, which "
                                "does not exist; fix the link or give the model's real path") from None
    if not path.exists():
        text = str(path)
        if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith("."):  # a Hugging Face Hub id?
            raise NearswapError(f"{role(label)}: {path} does not exist here; nearswap reads local files only (no download): "
                                f"fetch it first, e.g. `huggingface-cli download {text} --local-dir DIR`, and give DIR")
        raise NearswapError(f"{role(label)}: {path} does not exist")
    suffix = path.suffix.lower()
    if native and (path.is_dir() or suffix != ".gguf"):
        raise NearswapError(f"{role(label)}: {path} is not a GGUF file; a merge into a .gguf output reads GGUF inputs only "
                            "(merge into a directory, then `nearswap export` it)")
    if path.is_dir():
        return _open_directory(path, label)
    if suffix in PICKLE_SUFFIXES:
        raise NearswapError(f"{role(label)}: refusing {path}: {PICKLE_HINT}")
    if suffix == ".gguf":
        from .gguf import open_gguf, write_side_files

        fmt, tensors, config, meta = open_gguf(path, label, native)
        if native:
            return Model(path, label, fmt, [path], tensors, None, {k: str(v) for k, v in meta.items()}, kind="gguf")
        vocabulary = meta.get("tokenizer.ggml.model")
        hf_config = config or {}  # (a GGUF read under HF names always has one)
        return Model(path, label, fmt, [path], tensors, config, {k: str(v) for k, v in meta.items()},
                     side_files=lambda dest, skip_tokenizer=False: write_side_files(path, hf_config, dest, skip_tokenizer,
                                                                                    vocabulary), kind="gguf")
    if suffix != ".safetensors":
        raise NearswapError(f"{role(label)}: {path}: unknown model format {suffix or '(no suffix)'}; "
                            "expected an HF directory, a .safetensors or a .gguf file")
    tensors, metadata = st.read_header(path)
    return Model(path, label, "safetensors file", [path], tensors, None, metadata)


def _open_directory(path: Path, label: str) -> Model:
    config = read_config(path, label)
    index_path = path / st.INDEX_NAME
    if os.path.lexists(index_path):
        files, tensors = _open_index(index_path, label)
        fmt = f"HF safetensors, {len(files)} shards"
    elif os.path.lexists(path / st.SINGLE_NAME):
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
            raise NearswapError(f"{role(label)}: {path} has {len(found)} .safetensors files but no {st.INDEX_NAME}; add the index or pass one file")
        elif any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise NearswapError(f"{role(label)}: refusing {path}: {PICKLE_HINT}")
        else:
            raise NearswapError(f"{role(label)}: {path} holds no model (no .safetensors files)")
    metadata = st.read_header(files[0])[1]
    return Model(path, label, fmt, files, tensors, config, metadata)


def read_config(directory: Path, label: str) -> dict | None:
    """config.json of a model directory, if it has one: a JSON object whose ``architectures``,
    if present, is a list of names."""
    path = directory / "config.json"
    if not os.path.lexists(path):
        return None
    config = read_json_object(path, label)
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise NearswapError(f"{role(label)}: {path}: architectures is {shown(arch)}, not a list of names; fix config.json")
    return config


def _shard_path(index_path: Path, name: object, label: str) -> Path:
    """Where an index entry points, refused unless it is a plain relative path inside the
    model directory naming a regular file (a symlink to one is fine: the HF cache)."""
    def bad(why: str) -> NearswapError:
        return NearswapError(f"{role(label)}: {index_path} names shard {shown(name)}, {why}; the index is corrupt: regenerate it")

    if not isinstance(name, str) or not name:
        raise bad("which is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise bad("which is outside the model directory")
    path = index_path.parent / rel
    if not os.path.lexists(path):
        raise NearswapError(f"{role(label)}: {index_path.name} names shard {shown(name)}, which is missing from "
                            f"{index_path.parent}")
    if not os.path.isfile(path):  # follows a symlink; a FIFO, device or directory is not a shard
        raise bad("which is not a regular file")
    return path


def _open_index(index_path: Path, label: str) -> tuple[list[Path], dict[str, TensorInfo]]:
    index = read_json_object(index_path, label)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise NearswapError(f"{role(label)}: {index_path} has no weight_map; the index is corrupt: regenerate it")
    names: dict[str, Path] = {}
    for shard in weight_map.values():  # every entry checked before any shard is opened
        if not isinstance(shard, str) or shard not in names:
            names[shard] = _shard_path(index_path, shard, label)  # (refuses what is not a str)
    files = sorted(set(names.values()))
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        in_file, _ = st.read_header(f)
        for name, info in in_file.items():
            expected = weight_map.get(name)
            if expected is None:
                raise NearswapError(f"{role(label)}: tensor {shown(name)} is in {f.name} but not in {index_path.name}; the index is stale: regenerate it")
            if expected != f.name and names.get(expected) != f:
                raise NearswapError(f"{role(label)}: {index_path.name} places {shown(name)} in {shown(expected)}, but it is in {f.name}; the index is stale")
            tensors[name] = info
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise NearswapError(f"{role(label)}: {index_path.name} lists {len(missing)} tensors not found in any shard (first: {shown(missing[0])})")
    return files, tensors

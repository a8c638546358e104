"""What is in a model: format, shards, tensors, parameters, dtypes, architecture."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..core.errors import NearswapError, shown
from ..core.files import parse_json
from ..formats import open_model


def describe_gguf(path: Path, list_tensors: bool = False) -> dict:
    """Any GGUF, whether or not nearswap maps its architecture to HF names: architecture,
    tensors and their quantization types, parameters, and its scalar metadata."""
    from ..formats.gguf import ARCHITECTURES
    from ..formats.gguf_header import HeaderError, read_header

    try:
        header = read_header(path)
    except (HeaderError, OSError) as e:
        raise NearswapError(f"model: {path}: not a readable GGUF file: {e}; re-download it") from None
    arch = header.metadata.get("general.architecture", "?")
    qtypes: Counter[str] = Counter()
    for t in header.tensors:
        qtypes[t.tensor_type.name] += t.n_elements
    info = {
        "path": str(path),
        "format": f"GGUF v{header.version} ({shown(arch) if not isinstance(arch, str) else arch})",
        "kind": "gguf",
        "gguf_version": header.version,
        "architectures": None,
        "gguf_architecture": arch if isinstance(arch, str) else None,
        "hf_names": isinstance(arch, str) and arch in ARCHITECTURES,
        "parameters": sum(t.n_elements for t in header.tensors),
        "bytes": sum(t.n_bytes for t in header.tensors),
        "tensor_count": len(header.tensors),
        "dtypes": dict(qtypes.most_common()),
        "files": [path.name],
        "metadata": {k: v for k, v in header.metadata.items() if not (isinstance(v, str) and len(v) > 200)},
        "arrays": header.array_lengths,
    }
    if list_tensors:
        info["tensors"] = [{"name": t.name, "dtype": t.tensor_type.name, "shape": list(reversed(t.shape)), "file": path.name}
                           for t in header.tensors]
    return info


def describe(path: str | Path, list_tensors: bool = False) -> dict:
    """A JSON-ready description of the model at ``path`` (headers only; no tensor is read)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        info = describe_gguf(path, list_tensors)
        if info["hf_names"]:  # also what a merge or conversion sees: HF names and config
            model = open_model(path, "model")
            info["architectures"] = model.architectures
            info["format"] = model.format
        return info
    model = open_model(path, "model")
    dtypes: Counter[str] = Counter()
    for t in model.tensors.values():
        dtypes[t.dtype.name] += t.numel
    info = {
        "path": str(model.path),
        "format": model.format,
        "kind": model.kind,
        "architectures": model.architectures,
        "parameters": model.num_params,
        "bytes": model.nbytes,
        "tensor_count": len(model.tensors),
        "dtypes": dict(dtypes.most_common()),
        "files": [f.name for f in model.files],
        "nearswap": model.metadata.get("nearswap_version"),
    }
    if model.metadata.get("nearswap_recipe"):
        try:
            info["recipe"] = parse_json(model.metadata["nearswap_recipe"], "its nearswap_recipe metadata")
        except NearswapError as e:  # a description still helps; the damage is said
            info["recipe_error"] = str(e)
    if list_tensors:
        info["tensors"] = [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "file": t.file.name}
                           for t in model.tensors.values()]
    return info

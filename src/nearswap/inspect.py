"""What is in a model: format, shards, tensors, parameters, dtypes, architecture."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .errors import NearswapError
from .files import parse_json
from .formats import open_model


def describe(path: str | Path, list_tensors: bool = False) -> dict:
    """A JSON-ready description of the model at ``path`` (headers only; no tensor is read)."""
    model = open_model(path, "model")
    dtypes: Counter[str] = Counter()
    for t in model.tensors.values():
        dtypes[t.dtype.name] += t.numel
    info = {
        "path": str(model.path),
        "format": model.format,
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

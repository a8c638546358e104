"""A model's identity across machines, for reports that name the models they measured."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.errors import NearswapError
from ..core.files import read_json_object


def identity(path: str | Path) -> str:
    """What makes a model the same one in two reports, without a path that differs between
    machines: a nearswap merge directory by the checksums it recorded of its files (its copy
    anywhere is the same merge); anything else by a hash of its resolved path and its weight
    files' sizes and modification times (a name that is no path: by that name)."""
    path = Path(path)
    report = path / "merge_report.json"
    if path.is_dir() and report.is_file():
        try:
            recorded = (read_json_object(report).get("output") or {}).get("checksums")
        except (NearswapError, AttributeError):
            recorded = None
        if isinstance(recorded, dict) and isinstance(recorded.get("files"), dict):
            data = json.dumps(recorded["files"], sort_keys=True)
            return "merge:" + hashlib.sha256(data.encode()).hexdigest()[:32]
    if not path.exists():
        return "name:" + str(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin")) if path.is_dir() else [path]
    parts = [str(path.resolve())] + [f"{f.name}|{f.stat().st_size}|{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return "files:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def name_of(path: str | Path) -> str:
    """A model's one name in everything nearswap shows (a card's tables, an eval report): its
    folder's or file's name as given (``merged``, ``SmolLM2-135M-Instruct.Q4_1.gguf``)."""
    path = Path(path)
    return path.name or str(path)

"""What every format presents, whatever its container: tensors, models, and the three seams.

- ``TensorInfo``: where one tensor's elements are (file, offset, dtype, shape) and, when they
  must be decoded on the way (GGUF blocks), its ``Source``.
- ``Model``: a checkpoint opened for streaming — tensor locations and config, nothing loaded.
- ``Reader``: fills a caller's buffer with a run of a tensor's elements, from any thread
  (``safetensors.FileReader`` for every format; decoding is the ``Source``'s job).
- ``Writer``: an output whose layout is fixed before any data arrives; ``write`` from any
  thread, in any order; ``close`` makes it whole, ``abort`` gives up
  (``safetensors.ShardedWriter``, ``gguf_writer.GGUFStreamWriter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..core.dtypes import DType


class Source(Protocol):
    """Decodes a tensor's stored form (GGUF blocks) into its elements. A source whose
    ``fileless`` attribute is true makes them itself (``generated``): the reader opens no
    file for it and passes ``fd`` -1."""

    def read(self, fd: int, info: "TensorInfo", start: int, out: Any) -> Any: ...


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's elements are: file, absolute offset, dtype, shape."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the first element (or block) in ``file``
    source: Source | None = None  # set when the bytes must be decoded (GGUF)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes as it is read out (``dtype``: a GGUF block type decodes to float32)."""
        return self.numel * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        """Bytes in its file: a coded source's blocks (``block`` elements in ``type_size``
        bytes), else ``nbytes``."""
        block, size = getattr(self.source, "block", None), getattr(self.source, "type_size", None)
        return self.numel // block * size if block and size else self.nbytes


class Reader(Protocol):
    def read(self, info: TensorInfo, start: int, out: Any) -> Any: ...

    def close(self) -> None: ...


class Writer(Protocol):
    total_size: int

    def write(self, name: str, start: int, data: Any) -> None: ...

    def close(self) -> list[Path]: ...

    def abort(self) -> None: ...


@dataclass
class Model:
    """A checkpoint opened for streaming: tensor locations plus its config, nothing loaded."""

    path: Path
    label: str  # how messages name it: "base", "s1", ...
    format: str  # a description for people ("HF safetensors, 3 shards"); code uses ``kind``
    files: list[Path]
    tensors: dict[str, TensorInfo]  # in file order, then offset order
    config: dict | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # writes config/tokenizer files for a model that has no HF directory (GGUF); returns their names
    side_files: Callable[..., list[str]] | None = None
    kind: str = "safetensors"  # the container: "safetensors" or "gguf"

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

    @property
    def stored_bytes(self) -> int:
        """The tensors' bytes as the files hold them (a GGUF's quant blocks, not their float32)."""
        return sum(t.stored_bytes for t in self.tensors.values())

    def describe(self) -> str:
        return f"{role(self.label)} ({self.path})"


def role(label: str) -> str:
    """A model's label as messages spell it: ``s2`` (the step table's short label, easily taken
    for a user's folder named ``s2``) becomes ``secondary 2``; ``base`` and others stay."""
    if label[:1] == "s" and label[1:].isdigit():
        return f"secondary {label[1:]}"
    return label

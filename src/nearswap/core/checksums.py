"""Checksums of a written checkpoint, computed as it is written, at almost no cost.

Each work item's output bytes get a CRC-32C (the ``crc32c`` library: SSE4.2/ARMv8 instructions),
in the worker thread that wrote them, while they are still in cache. A shard's digest is the sha256 of
its tensors' chunk CRCs, in file order (big-endian 4 bytes each); the chunk size in elements
is recorded with it, and so is the CRC-32C of each file's header (every byte before its first
tensor's data), which the digest of the data does not cover. ``nearswap verify`` reads the
shard back in the same chunks and recomputes both: any flipped bit changes a CRC. A resumed
merge reads back what it adopts the same way (``crc_of_span``). Why not a sha256 of each file (it runs on
one core, in file order) or zlib's CRC-32: docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Callable, Iterable

METHOD = "crc32c of each chunk, sha256 of the CRCs per file"
_crc32c: Callable[[Any, int], int] | None = None


def crc(data: Any, value: int = 0) -> int:
    """The CRC-32C of ``data``; ``value``: the CRC of the bytes before it (so a chunk's CRC can
    be computed piece by piece)."""
    global _crc32c
    if _crc32c is None:  # imported on first use: its package reads its own metadata, which curve need not pay for
        from crc32c import crc32c

        _crc32c = crc32c
    return _crc32c(data, value)


def digest(tensor_crcs: Iterable[list[int]]) -> str:
    """A file's digest from the chunk CRCs of its tensors, in file order."""
    sha = hashlib.sha256()
    for crcs in tensor_crcs:
        sha.update(struct.pack(f">{len(crcs)}I", *crcs))
    return sha.hexdigest()


def record(files: dict[str, list[str]], crcs: dict[str, list[int]], chunk: int,
           headers: dict[str, int]) -> dict[str, Any]:
    """The report's entry: ``files`` maps each shard to its tensors in file order, ``headers``
    to the CRC-32C of its header."""
    return {"method": METHOD, "chunk": chunk,
            "files": {name: digest(crcs.get(t, []) for t in tensors) for name, tensors in files.items()},
            "headers": {name: headers[name] for name in files}}


PIECE = 1 << 20  # bytes per read of crc_of_span


def crc_of_span(fd: int, offset: int, size: int) -> int:
    """The CRC-32C of ``size`` bytes of the file ``fd`` from ``offset``, read in pieces; a file
    shorter than that raises ``OSError``."""
    value, done = 0, 0
    while done < size:
        piece = os.pread(fd, min(PIECE, size - done), offset + done)
        if not piece:
            raise OSError(f"the file ends at byte {offset + done}")
        value = crc(piece, value)
        done += len(piece)
    return value


UNRECORDED = ("README.md", "merge_report.json")  # rewritten after the merge (``nearswap card``), or the record itself


def file_hashes(root: Any, skip: Iterable[str]) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative POSIX paths; links are not followed) but
    those named in ``skip`` and ``UNRECORDED``: what ``verify`` compares the small files with."""
    from pathlib import Path

    root, skip = Path(root), set(skip) | set(UNRECORDED)
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if rel in skip:
                continue
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            found[rel] = sha.hexdigest()
    return found

"""safetensors: validating header reader, positional chunk reads, streaming sharded writer.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names
to ``{dtype, shape, data_offsets}``, then the tensor bytes. Reads go through ``os.preadv``
into caller-owned buffers (no memory map, so resident memory stays bounded by the buffers
no matter how large the file); passes that only read can take zero-copy views of memory maps
instead (``MappedReader``), releasing each chunk's pages as they go. The writer lays out every
shard up front, then accepts chunks at any offset from any thread, which is what lets the
engine write each output tensor exactly once, in parallel.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..dtypes import BY_NAME, DType
from ..errors import NearswapError

_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
if TYPE_CHECKING:
    import numpy as np

MAX_HEADER = 100 * 1024 * 1024  # same limit as the safetensors library
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute offset, dtype, shape."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the first element in ``file``
    source: Any = None  # set when the bytes must be decoded (GGUF): has read(fd, info, start, out)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors in offset order, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NearswapError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise NearswapError(
                    f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size}); "
                    "the file is truncated or not safetensors: re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise NearswapError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise NearswapError(f"{path}: corrupt safetensors header ({e}); re-download or re-save the file") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        tensors.append(_tensor_info(path, name, entry, data_start, data_len))
    tensors.sort(key=lambda t: t.offset)
    end = data_start
    for t in tensors:
        if t.offset != end and t.nbytes:
            raise NearswapError(f"{path}: tensor {t.name!r} does not follow the previous one (gap or overlap); the file is corrupt")
        end = t.offset + t.nbytes if t.nbytes else end
    if end != size:
        raise NearswapError(
            f"{path}: {size - end} bytes {'missing' if end > size else 'left over'} after the last tensor; "
            "the file is truncated or corrupt: re-download it"
        )
    return {t.name: t for t in tensors}, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    def bad(why: str) -> NearswapError:
        return NearswapError(f"{path}: tensor {name!r}: {why}; the file is corrupt: re-download or re-save it")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("header entry lacks dtype/shape/data_offsets")
    dtype = BY_NAME.get(str(entry["dtype"]))
    if dtype is None:
        raise NearswapError(
            f"{path}: tensor {name!r} has dtype {entry['dtype']}, which nearswap does not handle "
            f"(supported: {', '.join(BY_NAME)})"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad(f"bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise bad(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data_offsets {offsets} fall outside the {data_len}-byte data section (truncated file?)")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise bad(f"{end - begin} bytes for shape {shape} of {dtype.name}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin)


def byte_view(buf: Any) -> memoryview:
    """The bytes of a numpy array (any dtype, bfloat16 included) or of a buffer, as a memoryview."""
    if hasattr(buf, "dtype") and hasattr(buf, "view"):
        return memoryview(buf.view("u1"))
    view = memoryview(buf)
    return view if view.format == "B" else view.cast("B")


def pread_exact(fd: int, view: memoryview, pos: int, info: TensorInfo) -> None:
    """Fill ``view`` from ``fd`` at ``pos``; a short file is an error naming the tensor."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], pos + done)
        if got == 0:
            raise NearswapError(f"{info.file}: unexpected end of file reading {info.name!r}; "
                                "the file changed or is truncated")
        done += got


class FileReader:
    """Positional reads of tensor chunks into caller buffers; one fd per file, thread-safe."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, info: TensorInfo, start: int, out: Any) -> Any:
        """Fill ``out`` (a 1-D numpy array of ``info.dtype``, or a byte buffer holding whole
        elements) with the elements from ``start`` on; returns ``out``."""
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds.setdefault(info.file, os.open(info.file, os.O_RDONLY))
        if info.source is not None:
            return info.source.read(fd, info, start, out)
        pread_exact(fd, byte_view(out), info.offset + start * info.dtype.itemsize, info)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _largest_folio() -> int:
    """The most a single page fault may map: Linux maps a whole page-cache folio at once, and
    folios go up to the PMD size (2 MiB on x86-64)."""
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 * 1024 * 1024


FOLIO_MARGIN = _largest_folio()


class MappedReader:
    """Zero-copy chunk views into read-only memory maps of whole files, for passes that only
    read (the curve). ``view`` hands out a memoryview of a chunk's bytes in the page cache;
    ``release`` drops that range from this process's page tables (``MADV_DONTNEED``: the page
    cache keeps the data), so resident memory stays bounded by the chunks in flight however
    large the files. Faster than ``FileReader`` when the kernel that consumes the view
    prefetches (no copy out of the page cache). GGUF tensors, which must be decoded, and files
    the system will not map are not served (``mappable`` says which are)."""

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, memoryview] | None] = {}  # None: the file cannot be mapped
        self._lock = threading.Lock()

    def mappable(self, info: TensorInfo) -> bool:
        """Whether ``view`` serves this tensor: raw bytes (not GGUF, which must be decoded) in a
        file the system lets us map (some network and FUSE file systems do not: read those)."""
        return info.source is None and self._map(info) is not None

    def _map(self, info: TensorInfo) -> tuple[mmap.mmap, memoryview] | None:
        if info.file not in self._maps:
            with self._lock:
                if info.file not in self._maps:
                    try:
                        with open(info.file, "rb") as f:
                            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                        self._maps[info.file] = (m, memoryview(m))
                    except (OSError, ValueError):
                        self._maps[info.file] = None
        return self._maps[info.file]

    def _mapped(self, info: TensorInfo) -> tuple[mmap.mmap, memoryview]:
        entry = self._map(info)
        if entry is None:
            raise NearswapError(f"{info.file}: cannot be memory-mapped; read it with FileReader")
        return entry

    def view(self, info: TensorInfo, start: int, n: int) -> memoryview:
        """The bytes of elements ``start .. start + n`` of ``info``."""
        lo = info.offset + start * info.dtype.itemsize
        hi = lo + n * info.dtype.itemsize
        _, whole = self._mapped(info)
        if hi > len(whole):  # the file shrank since its header was read
            raise NearswapError(f"{info.file}: unexpected end of file reading {info.name!r}; "
                                "the file changed or is truncated")
        return whole[lo:hi]

    def release(self, info: TensorInfo, start: int, n: int, more: bool = False) -> None:
        """Unmap a chunk's pages from this process (they stay in the page cache), and those the
        kernel mapped around it: a fault maps a whole folio (up to FOLIO_MARGIN bytes), so pages
        of neighbouring chunks released earlier come back with it and would stay mapped — measured
        on a 1.48B pair, peak RSS 33 MB with this margin, 646 MB with a 64 KiB one. Zapping a
        page another thread is still reading only makes it fault again. ``more=True``: the
        caller reads on from the chunk's end, so the pages from there on are left alone (the
        call for the last chunk of the run releases them)."""
        m, whole = self._mapped(info)
        lo = info.offset + start * info.dtype.itemsize
        hi = lo + n * info.dtype.itemsize
        lo = max(0, lo - FOLIO_MARGIN) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = hi // mmap.PAGESIZE * mmap.PAGESIZE if more else min(len(whole), hi + FOLIO_MARGIN)
        if hi > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        with self._lock:
            for entry in self._maps.values():
                if entry is None:
                    continue
                m, whole = entry
                whole.release()
                try:
                    m.close()
                except BufferError:  # a caller still holds a view: unmapped when the last one goes
                    pass
            self._maps.clear()


# ---------------------------------------------------------------- writing


@dataclass
class _Shard:
    path: Path
    tensors: list[tuple[str, DType, tuple[int, ...]]] = field(default_factory=list)
    nbytes: int = 0


def shard_names(count: int) -> list[str]:
    """HF's shard names: ``model.safetensors`` alone, else ``model-00001-of-00003.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """Writes a sharded HF checkpoint whose layout is fixed before any data arrives.

    ``plan`` lists (name, dtype, shape) in output order. Tensors are packed greedily into
    shards of at most ``shard_size`` bytes (a larger tensor gets a shard of its own). After
    construction every tensor has a place; ``write(name, start, array)`` may be called from
    any thread, in any order; ``close()`` fsyncs everything and writes the index.
    """

    def __init__(self, directory: Path, plan: Iterable[tuple[str, DType, tuple[int, ...]]],
                 shard_size: int, metadata: dict[str, str]) -> None:
        shards: list[_Shard] = []
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if not shards or (shards[-1].tensors and shards[-1].nbytes + nbytes > shard_size):
                shards.append(_Shard(Path()))
            shards[-1].tensors.append((name, dtype, shape))
            shards[-1].nbytes += nbytes
        self.directory = directory
        self.places: dict[str, tuple[int, int, DType]] = {}  # name -> (fd, offset, dtype)
        self.weight_map: dict[str, str] = {}
        self.fds: list[int] = []
        self.total_size = 0
        for shard, fname in zip(shards, shard_names(len(shards))):
            shard.path = directory / fname
            self._lay_out(shard, metadata)

    def _lay_out(self, shard: _Shard, metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
        pos = 0
        for name, dtype, shape in shard.tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": dtype.name, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
        fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.fds.append(fd)
        os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
        data_start = 8 + len(raw)
        os.ftruncate(fd, data_start + pos)
        for name, dtype, shape in shard.tensors:
            begin = header[name]["data_offsets"][0]  # type: ignore[index]
            self.places[name] = (fd, data_start + begin, dtype)
            self.weight_map[name] = shard.path.name
        self.total_size += pos

    def write(self, name: str, start: int, data: Any) -> None:
        """Write ``data`` (a 1-D array of the tensor's dtype, or its bytes) at element ``start``."""
        fd, offset, dtype = self.places[name]
        view = byte_view(data)
        pos = offset + start * dtype.itemsize
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], pos + done)
        if _FADV_DONTNEED is not None:
            # Start writing these pages to disk now (asynchronously) and let the page cache
            # drop them once written: the final fsync has little left to wait for, and a
            # 140 GB output does not push the inputs out of the cache.
            os.posix_fadvise(fd, pos, len(view), _FADV_DONTNEED)

    def close(self) -> list[Path]:
        """fsync and close every shard; write the index when there are several. Returns the files."""
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds.clear()
        files = sorted({self.directory / f for f in self.weight_map.values()})
        if len(files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            path = self.directory / INDEX_NAME
            path.write_text(json.dumps(index, indent=2) + "\n")
            files.append(path)
        return files

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

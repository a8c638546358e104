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

import errno
import json
import math
import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from ..core.dtypes import BY_NAME, DType
from ..core.errors import NearswapError, WriteFailed, shown
from ..core.files import open_regular, parse_json
from .types import TensorInfo

_FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)
if TYPE_CHECKING:
    pass

MAX_HEADER = 100 * 1024 * 1024  # same limit as the safetensors library
MAX_TENSORS = 1 << 17  # per file: a 70B shard holds ~100, the largest MoE checkpoints a few thousand
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


MAX_DIM = 2**64 - 1  # safetensors stores shapes as usize


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors in offset order, metadata).

    Refused, in one line naming the file: anything the safetensors library itself would not
    read (a shape of booleans, a dimension beyond 64 bits or a shape whose product overflows,
    names or metadata that are not UTF-8, metadata that is not strings), a header with no
    length (a shard whose writer was killed before finishing it: nearswap writes the header
    last), gaps, overlaps and truncation."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise NearswapError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n == 0:
            raise NearswapError(f"{path}: unfinished safetensors file (its header was never written: the program "
                                "writing it was interrupted); delete it and write it again")
        if n > MAX_HEADER or 8 + n > size:
            raise NearswapError(
                f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size}); "
                "the file is truncated or not safetensors: re-download it"
            )
        raw = os.pread(fd, n, 8)
    except OSError as e:
        raise NearswapError(f"{path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)
    entries = raw.count(b'"data_offsets"')  # counted before parsing: a million entries cost gigabytes parsed
    if entries > MAX_TENSORS:
        raise NearswapError(f"{path}: its header lists {entries:,} tensors, more than any model's file holds "
                            f"({MAX_TENSORS:,} at most here); the file is corrupt or not a model")
    header = parse_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise NearswapError(f"{path}: corrupt safetensors header (not a JSON object); re-download or re-save the file")
    if len(header) > MAX_TENSORS + 1:  # (keys written with escapes are not counted above)
        raise NearswapError(f"{path}: its header lists {len(header) - 1:,} tensors, more than any model's file holds "
                            f"({MAX_TENSORS:,} at most here); the file is corrupt or not a model")
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start = 8 + n
    data_len = size - data_start
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        tensors.append(_tensor_info(path, name, entry, data_start, data_len))
    tensors.sort(key=lambda t: (t.offset, t.nbytes))  # as the library orders data_offsets
    end = data_start
    for t in tensors:
        if t.offset != end:  # an empty tensor too must sit where the previous one ends, as the library requires
            raise NearswapError(f"{path}: tensor {shown(t.name)} does not follow the previous one (gap or overlap); "
                                "the file is corrupt")
        end = t.offset + t.nbytes
    if end != size:
        raise NearswapError(
            f"{path}: {size - end} bytes {'missing' if end > size else 'left over'} after the last tensor; "
            "the file is truncated or corrupt: re-download it"
        )
    return {t.name: t for t in tensors}, metadata


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: JSON allows them, UTF-8 (and the library) do not
        return False
    return True


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise NearswapError(f"{path}: __metadata__ must map strings to strings (it is {shown(metadata)}); "
                            "the file is corrupt: re-save it")
    for k, v in metadata.items():
        if not (_utf8(k) and _utf8(v)):
            raise NearswapError(f"{path}: __metadata__ entry {shown(k)} is not valid UTF-8; the file is corrupt")
    return metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    def bad(why: str) -> NearswapError:
        return NearswapError(f"{path}: tensor {shown(name)}: {why}; the file is corrupt: re-download or re-save it")

    if not _utf8(name):
        raise bad("the name is not valid UTF-8")
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("header entry lacks dtype/shape/data_offsets")
    dtype = BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise NearswapError(
            f"{path}: tensor {shown(name)} has dtype {shown(entry['dtype'])}, which nearswap does not handle "
            f"(supported: {', '.join(BY_NAME)})"
        )
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise bad(f"bad shape {shown(shape if isinstance(shape, list) and len(shape) > 8 else str(shape))}")
    numel = 1
    for d in shape:  # as the library checks it: a running product that must fit in 64 bits
        numel *= d
        if numel > MAX_DIM:
            raise bad(f"shape {shape} has more elements than 64 bits can count")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"bad data_offsets {shown(str(offsets))}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data_offsets {offsets} fall outside the {data_len}-byte data section (truncated file?)")
    if end - begin != numel * dtype.itemsize:
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
        try:
            got = os.preadv(fd, [view[done:]], pos + done)
        except OSError as e:
            raise NearswapError(f"cannot read {info.file} ({shown(info.name)}): {e.strerror}") from None
        if got == 0:
            raise NearswapError(f"{info.file}: unexpected end of file reading {shown(info.name)}; "
                                "the file changed or is truncated")
        done += got


class FileReader:
    """Positional reads of tensor chunks into caller buffers; one fd per file, thread-safe."""

    def __init__(self, random: bool = False, ahead: int = 0) -> None:
        self._fds: dict[Path, int] = {}
        self.random = random  # reads scattered over the files: no readahead (POSIX_FADV_RANDOM)
        # reads in order: after each, ask the kernel to start reading the next ``ahead`` reads'
        # worth of that file (POSIX_FADV_WILLNEED), so a cold disk works while the chunk is merged
        self.ahead = ahead if hasattr(os, "posix_fadvise") else 0

    def will_need(self, info: TensorInfo, start: int, n: int) -> None:
        """Ask the kernel to start reading elements ``start`` to ``start + n`` of a plain
        tensor now (POSIX_FADV_WILLNEED), so that many scattered reads queue at the disk at once."""
        if info.source is None and info.file is not None and hasattr(os, "posix_fadvise"):
            size = info.dtype.itemsize
            os.posix_fadvise(self._fd(info), info.offset + start * size, n * size, os.POSIX_FADV_WILLNEED)

    def _fd(self, info: TensorInfo) -> int:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = open_regular(info.file)
            if self.random and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            if self._fds.setdefault(info.file, fd) != fd:  # another thread opened it first
                os.close(fd)
                fd = self._fds[info.file]
        return fd

    def read(self, info: TensorInfo, start: int, out: Any) -> Any:
        """Fill ``out`` (a 1-D numpy array of ``info.dtype``, or a byte buffer holding whole
        elements) with the elements from ``start`` on; returns ``out``."""
        if info.source is not None and getattr(info.source, "fileless", False):  # generated on the fly
            return info.source.read(-1, info, start, out)
        fd = self._fd(info)
        if info.source is not None:
            return info.source.read(fd, info, start, out)
        view = byte_view(out)
        pos = info.offset + start * info.dtype.itemsize
        pread_exact(fd, view, pos, info)
        if self.ahead:
            os.posix_fadvise(fd, pos + len(view), len(view) * self.ahead, os.POSIX_FADV_WILLNEED)
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
                    fd = open_regular(info.file)
                    try:
                        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                        self._maps[info.file] = (m, memoryview(m))
                    except (OSError, ValueError):
                        self._maps[info.file] = None
                    finally:
                        os.close(fd)
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
            raise NearswapError(f"{info.file}: unexpected end of file reading {shown(info.name)}; "
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
    any thread, in any order; ``close()`` writes each shard's header, fsyncs everything and
    writes the index. Until ``close`` a shard's 8-byte header length is zero, so a shard left
    by a killed run reads as unfinished, never as a model whose missing data are zeros.
    """

    def __init__(self, directory: Path, plan: Iterable[tuple[str, DType, tuple[int, ...]]],
                 shard_size: int, metadata: dict[str, str], resume: bool = False) -> None:
        self.directory = directory
        self.places: dict[str, tuple[int, int, DType, Path]] = {}  # name -> (fd, offset, dtype, file)
        self.weight_map: dict[str, str] = {}
        self.fds: list[int] = []
        self.headers: list[tuple[int, bytes, Path]] = []  # written by close()
        self.total_size = 0
        for shard in self._pack(plan, shard_size):
            shard.path = directory / shard.path
            self._lay_out(shard, metadata, resume)

    @staticmethod
    def _pack(plan: Iterable[tuple[str, DType, tuple[int, ...]]], shard_size: int) -> list[_Shard]:
        """The tensors packed greedily into shards of at most ``shard_size`` bytes, named."""
        shards: list[_Shard] = []
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype.itemsize
            if not shards or (shards[-1].tensors and shards[-1].nbytes + nbytes > shard_size):
                shards.append(_Shard(Path()))
            shards[-1].tensors.append((name, dtype, shape))
            shards[-1].nbytes += nbytes
        for shard, fname in zip(shards, shard_names(len(shards))):
            shard.path = Path(fname)
        return shards

    @staticmethod
    def file_names(plan: Iterable[tuple[str, DType, tuple[int, ...]]], shard_size: int) -> list[str]:
        """The names of the files the writer writes: its shards and, with several, the index."""
        names = [shard.path.name for shard in ShardedWriter._pack(plan, shard_size)]
        return names + [INDEX_NAME] if len(names) > 1 else names

    @staticmethod
    def layout(plan: Iterable[tuple[str, DType, tuple[int, ...]]], shard_size: int) -> dict[str, Any]:
        """What fixes where every byte goes (for a resumed run to check it is the same)."""
        return {"shard_size": shard_size, "tensors": [[n, d.name, list(s)] for n, d, s in plan]}

    def _lay_out(self, shard: _Shard, metadata: dict[str, str], resume: bool) -> None:
        header: dict[str, object] = {"__metadata__": metadata}
        pos = 0
        for name, dtype, shape in shard.tensors:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": dtype.name, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        try:
            raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise NearswapError(f"{shard.path.name}: a tensor name or metadata value is not valid UTF-8 "
                                "(safetensors needs UTF-8)") from None
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
        data_start = 8 + len(raw)
        # a resumed shard is opened as it is (or made anew: its tensors are then found missing by
        # the re-check), but never through a link, nor anything but a file; sized as this run lays it out
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_CREAT | (os.O_NOFOLLOW | os.O_NONBLOCK if resume else os.O_EXCL)
        try:
            fd = os.open(shard.path, flags, 0o644)
        except OSError as e:
            raise NearswapError(f"cannot write {shard.path}: {e.strerror}") from None
        self.fds.append(fd)
        if resume and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NearswapError(f"{shard.path} is not a regular file (something put it there while nearswap ran); run the merge again")
        self._io(shard.path, os.ftruncate, fd, data_start + pos)  # the length field stays 0 until close()
        self.headers.append((fd, struct.pack("<Q", len(raw)) + raw, shard.path))
        for name, dtype, shape in shard.tensors:
            begin = header[name]["data_offsets"][0]  # type: ignore[index]
            self.places[name] = (fd, data_start + begin, dtype, shard.path)
            self.weight_map[name] = shard.path.name
        self.total_size += pos

    def _io(self, path: Path, fn: Any, *args: Any) -> Any:
        """An OS call on a shard; a failure (disk full, I/O error) is one line naming the file."""
        try:
            return fn(*args)
        except OSError as e:
            hint = (f"; the output needs {self.total_size / 1e6:,.1f} MB in all: free space and run again"
                    if e.errno == errno.ENOSPC else "")
            raise WriteFailed(f"cannot write {path}: {e.strerror}{hint}") from None

    def __getstate__(self) -> dict[str, Any]:
        """A copy for another process (a pass sent to a worker): it writes tensor data into the
        same files, reopened by path on first use; headers and the index stay the driver's."""
        return {"directory": self.directory, "weight_map": self.weight_map, "total_size": self.total_size,
                "places": {n: (None, off, dt, path) for n, (_, off, dt, path) in self.places.items()},
                "fds": [], "headers": []}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._opened: dict[Path, int] = {}
        self._open_lock = threading.Lock()

    def _fd(self, fd: int | None, path: Path) -> int:
        if fd is not None:
            return fd
        with self._open_lock:
            if path not in self._opened:
                self._opened[path] = self._io(path, os.open, path, os.O_WRONLY | os.O_CLOEXEC)
                self.fds.append(self._opened[path])
            return self._opened[path]

    def span(self, name: str, start: int, n: int) -> tuple[Path, int, int]:
        """Where elements ``start`` .. ``start + n`` of ``name`` lie: (file, byte offset, bytes)."""
        _, offset, dtype, path = self.places[name]
        return path, offset + start * dtype.itemsize, n * dtype.itemsize

    def header_crcs(self) -> dict[str, int]:
        """Each shard's CRC-32C of its header (the bytes ``close`` writes before the data)."""
        from ..core import checksums

        return {path.name: checksums.crc(header) for _, header, path in self.headers}

    def write(self, name: str, start: int, data: Any) -> int:
        """Write ``data`` (a 1-D array of the tensor's dtype, or its bytes) at element ``start``;
        returns the CRC-32C of the bytes written."""
        from ..core import checksums

        fd, offset, dtype, path = self.places[name]
        fd = self._fd(fd, path)
        view = byte_view(data)
        pos = offset + start * dtype.itemsize
        done = 0
        while done < len(view):
            done += self._io(path, os.pwrite, fd, view[done:], pos + done)
        if _FADV_DONTNEED is not None:
            # Start writing these pages to disk now (asynchronously) and let the page cache
            # drop them once written: the final fsync has little left to wait for, and a
            # 140 GB output does not push the inputs out of the cache.
            os.posix_fadvise(fd, pos, len(view), _FADV_DONTNEED)
        return checksums.crc(view)

    def sync(self) -> None:
        """Everything written so far is on disk when this returns (for the journal)."""
        for fd, _, path in self.headers:
            self._io(path, os.fdatasync, fd)

    def close(self) -> list[Path]:
        """Write the headers, fsync and close every shard; write the index when there are several.
        Returns the files. (A copy in another process only syncs and closes what it opened.)"""
        if not self.headers and self.__dict__.get("_opened") is not None:
            for fd in self.fds:
                self._io(self.directory, os.fsync, fd)
                os.close(fd)
            self.fds.clear()
            return []
        for fd, header, path in self.headers:
            self._io(path, os.pwrite, fd, header, 0)
            self._io(path, os.fsync, fd)
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        files = sorted({self.directory / f for f in self.weight_map.values()})
        if len(files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            path = self.directory / INDEX_NAME
            self._io(path, path.write_text, json.dumps(index, indent=2, ensure_ascii=False) + "\n")
            files.append(path)
        return files

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

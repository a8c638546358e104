"""The I/O floor of a merge: nearswap's exact I/O pattern with no arithmetic at all.

    python benchmarks/io_floor.py [--stream] OUT_DIR OUT_BYTES MODEL_DIR [MODEL_DIR ...]

Every input byte is read and an output of OUT_BYTES is written, the way the engine does it:
work items of 2 MiB (1M bf16 elements) on one thread per core; each item preads the same
range of every model (its shards taken as one byte stream) into per-thread buffers, then
pwrites that many bytes at the item's offset in the output, with the same early writeback
(POSIX_FADV_DONTNEED); the output is fsynced at the end. What a merge takes beyond this
is the cost of its arithmetic and bookkeeping.

With ``--stream``, the disk's own best instead of the engine's pattern: each model read front
to back by a thread of its own in 8 MiB reads (the kernel's readahead at work), the output
written front to back by another, all at once; fsynced at the end. When the page cache is cold
the engine's pattern waits on each item's reads in turn and is no floor; this one is.
"""

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 2 << 20


class Stream:
    """A model's shards read as one byte stream (the order does not matter for a floor)."""

    def __init__(self, model: Path) -> None:
        files = sorted(model.glob("*.safetensors"))
        self.parts = [(os.open(f, os.O_RDONLY), f.stat().st_size) for f in files]
        self.size = sum(size for _, size in self.parts)

    def read(self, pos: int, view: memoryview) -> None:
        for fd, size in self.parts:
            if pos >= size:
                pos -= size
                continue
            got = os.preadv(fd, [view], pos)
            view = view[got:]
            pos = 0
            if not view:
                return


STREAM_CHUNK = 8 << 20


def stream(out: Path, nbytes: int, models: list[Path]) -> None:
    files = [f for m in models for f in sorted(m.glob("*.safetensors"))]
    fd = os.open(out / "model.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, nbytes)

    def read_model(model: Path) -> int:
        buf, total = bytearray(STREAM_CHUNK), 0
        for f in sorted(model.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while got := fh.readinto(buf):
                    total += got
        return total

    def write() -> None:
        buf = memoryview(bytearray(STREAM_CHUNK))
        for pos in range(0, nbytes, STREAM_CHUNK):
            view = buf[: min(STREAM_CHUNK, nbytes - pos)]
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], pos + done)
            os.posix_fadvise(fd, pos, len(view), os.POSIX_FADV_DONTNEED)

    with ThreadPoolExecutor(len(models) + 1) as pool:
        writer = pool.submit(write)
        read = sum(pool.map(read_model, models))
        writer.result()
    os.fsync(fd)
    os.close(fd)
    print(f"read {read} bytes from {len(files)} files, wrote {nbytes} (streamed)")


def main() -> None:
    if sys.argv[1] == "--stream":
        out, nbytes, models = Path(sys.argv[2]), int(sys.argv[3]), [Path(p) for p in sys.argv[4:]]
        out.mkdir(parents=True, exist_ok=True)
        return stream(out, nbytes, models)
    out, nbytes, models = Path(sys.argv[1]), int(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
    out.mkdir(parents=True, exist_ok=True)
    streams = [Stream(m) for m in models]
    fd = os.open(out / "model.safetensors", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.ftruncate(fd, nbytes)
    local = threading.local()

    def item(pos: int) -> None:
        if not hasattr(local, "bufs"):
            local.bufs = [bytearray(CHUNK) for _ in streams]
        n = min(CHUNK, nbytes - pos)
        for stream, buf in zip(streams, local.bufs):
            stream.read(pos * stream.size // nbytes, memoryview(buf)[:n])
        view = memoryview(local.bufs[0])[:n]
        done = 0
        while done < n:
            done += os.pwrite(fd, view[done:], pos + done)
        os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(item, range(0, nbytes, CHUNK)))
    os.fsync(fd)
    os.close(fd)
    print(f"read {sum(s.size for s in streams)} bytes, wrote {nbytes}")


if __name__ == "__main__":
    main()

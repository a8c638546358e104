"""The I/O floor of a merge: read every input byte, write (and fsync) an output of the same size.

    python benchmarks/io_floor.py OUT_DIR OUT_BYTES MODEL_DIR [MODEL_DIR ...]

Uses the same two cores the merge may use: one thread per input stream, 1 MiB chunks, the
output written alongside with the same early writeback nearswap uses (POSIX_FADV_DONTNEED
after each chunk), then fsynced. No arithmetic at all: the best I/O we know how to do.
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 20


def read_all(path: Path) -> int:
    buf = bytearray(CHUNK)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buf):
            n += got
    return n


def write_out(path: Path, nbytes: int) -> None:
    buf = bytes(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        while pos < nbytes:
            n = os.write(fd, buf[: min(CHUNK, nbytes - pos)])
            os.posix_fadvise(fd, pos, n, os.POSIX_FADV_DONTNEED)
            pos += n
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    out, nbytes, models = Path(sys.argv[1]), int(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
    out.mkdir(parents=True, exist_ok=True)
    files = [f for m in models for f in sorted(m.glob("*.safetensors"))]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        writing = pool.submit(write_out, out / "model.safetensors", nbytes)
        total = sum(pool.map(read_all, files))
        writing.result()
    print(f"read {total} bytes, wrote {nbytes}")


if __name__ == "__main__":
    main()

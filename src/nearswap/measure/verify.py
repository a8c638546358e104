"""`nearswap verify`: is a merged checkpoint still what nearswap wrote, and what its inputs give?

1. Every shard's digest recorded by the merge (``merge_report.json``: ``output.checksums``,
   CRC-32s of each chunk as it was written, see ``checksums``) is recomputed from the files,
   their chunks read by several threads.
2. The headers and the index are validated by opening the checkpoint as any input is opened.
3. With ``inputs``: a random sample of chunks is recomputed from the inputs named in the saved
   recipe (``nearswap_recipe.yaml``), through the same pass a merge runs, and compared bit for
   bit with the checkpoint.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..core.errors import NearswapError, shown

READ_PIECE = 1 << 20  # bytes per read, into a reused buffer (docs/benchmarks.md: why not whole chunks)


class _ChunkCRCs:
    """CRC-32Cs of chunks of a checkpoint's tensors read back from disk, one chunk per call, from
    any thread: each chunk read in pieces of at most READ_PIECE bytes into the calling thread's
    own buffer, its CRC carried from piece to piece (no numpy: importing ml_dtypes for bfloat16
    costs more than the hashing; see docs/benchmarks.md)."""

    def __init__(self, model: Any) -> None:
        import threading

        from ..formats.safetensors import FileReader

        self.model, self.reader, self.local = model, FileReader(), threading.local()

    def __call__(self, item: tuple[str, int, int]) -> int:
        from ..core import checksums

        name, start, end = item
        info = self.model.tensors[name]
        size = info.dtype.itemsize
        piece = max(1, READ_PIECE // size)  # elements per read
        buf = getattr(self.local, "buf", None)
        if buf is None or len(buf) < piece * size:
            buf = self.local.buf = memoryview(bytearray(piece * size))
        crc = 0
        for lo in range(start, end, piece):
            m = min(piece, end - lo)
            crc = checksums.crc(self.reader.read(info, lo, buf[: m * size]), crc)
        return crc

    def close(self) -> None:
        self.reader.close()


def digests(model: Any, files: dict[str, list[str]], chunk: int, threads: int,
            progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Each shard's digest (see ``checksums``) from its bytes on disk: the chunks of every shard
    read by ``threads`` threads (two streams keep a disk busier than one)."""
    from ..core import checksums

    items = [(file, name, start, min(start + chunk, model.tensors[name].numel))
             for file, names in files.items() for name in names
             for start in range(0, model.tensors[name].numel, chunk)]
    crc_of = _ChunkCRCs(model)

    def one(item: tuple[str, str, int, int]) -> int:
        file, name, start, end = item
        crc = crc_of((name, start, end))
        if progress:
            progress((end - start) * model.tensors[name].dtype.itemsize)
        return crc

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items)))) as pool:
            crcs = list(pool.map(one, items))
    finally:
        crc_of.close()
    per_tensor: dict[str, dict[str, list[int]]] = {file: {name: [] for name in names} for file, names in files.items()}
    for (file, name, _, _), crc in zip(items, crcs):
        per_tensor[file][name].append(crc)
    return {file: checksums.digest(per_tensor[file][name] for name in names) for file, names in files.items()}


MIN_CHUNK, MAX_CHUNK = 64, 1 << 26  # elements per recorded chunk: what a merge can have written
MAX_CHUNKS = 1 << 24  # chunks in all (64 MB of CRCs): a 70B merge at the default chunk has ~70,000
MAX_ENTRIES = 1 << 20  # files a record may name


def _refuse(where: Path, what: str) -> NearswapError:
    return NearswapError(f"{where}: {what}; it was not written by this nearswap, or was altered since: "
                         "merge again to get a checkpoint that can be verified")


def _hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _crc32(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 32


def _chunk_of(where: Path, recorded: dict[str, Any], numels: list[int], block: int = 1) -> int:
    """The recorded chunk size, checked to be one a merge could have used for these tensors
    (bounded before anything is allocated or looped over)."""
    chunk = recorded.get("chunk")
    if type(chunk) is not int or not MIN_CHUNK <= chunk <= MAX_CHUNK or chunk % block:
        raise _refuse(where, f"the recorded chunk size {shown(chunk)} is not one a merge uses "
                             f"({MIN_CHUNK}..{MAX_CHUNK} elements{f', a multiple of {block}' if block > 1 else ''})")
    count = sum(-(-n // chunk) for n in numels)
    if count > MAX_CHUNKS:
        raise _refuse(where, f"chunks of {chunk} elements make {count:,} chunks, more than a merge records "
                             f"({MAX_CHUNKS:,})")
    return chunk


def verify(out: str | Path, inputs: bool = False, sample: int = 64, seed: int | None = None,
           threads: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Check ``out`` (a nearswap merge directory, or a .gguf file a merge wrote); returns what
    was checked. Raises ``NearswapError`` naming the first file or tensor that is not as
    written, any file in the directory that the merge did not write (a loader could read it
    instead of the merge), and a record it cannot vouch for."""
    from ..core.files import read_json_object
    from ..core.paths import default_threads
    from ..formats import open_model
    from ..merging.layout import RECIPE_NAME, REPORT_NAME

    out = Path(out)
    threads = threads or default_threads()
    if out.is_file() and not out.is_symlink() and out.suffix.lower() == ".gguf":
        return _verify_gguf(out, inputs, sample, seed, threads, progress)
    if not out.is_dir() or out.is_symlink():
        raise NearswapError(f"{out} is not a directory or a .gguf file: verify checks a merge written by nearswap")
    if not (out / REPORT_NAME).is_file():
        raise NearswapError(f"{out} has no {REPORT_NAME}: it was not written by nearswap merge/convert, "
                            "nothing to verify against")
    report = read_json_object(out / REPORT_NAME, "merge report")
    output = report.get("output") if isinstance(report.get("output"), dict) else {}
    recorded = output.get("checksums")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict) or not recorded["files"]:
        raise NearswapError(f"{out / REPORT_NAME} records no checksums (written by an older nearswap): "
                            "merge again to get a checkpoint that can be verified")
    shards, headers, other = recorded["files"], recorded.get("headers"), recorded.get("other")
    if not isinstance(headers, dict) or not isinstance(other, dict):
        raise NearswapError(f"{out / REPORT_NAME} records the shards' data but not their headers and the other files "
                            "(written by an older nearswap): merge again to get a checkpoint that can be verified")
    if len(shards) + len(other) > MAX_ENTRIES:
        raise _refuse(out / REPORT_NAME, f"it names {len(shards) + len(other):,} files")
    for name, digest in shards.items():
        if "/" in name or name in ("", ".", "..") or not _hex64(digest) or not _crc32(headers.get(name)):
            raise _refuse(out / REPORT_NAME, f"its record of the shard {shown(name)} is not one nearswap writes")
    for rel, digest in other.items():
        parts = rel.split("/")
        if not _hex64(digest) or rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise _refuse(out / REPORT_NAME, f"its record of the file {shown(rel)} is not one nearswap writes")
    _check_file_set(out, set(shards), other)
    model = open_model(out, "merge")  # every header and the index, checked as for any input
    files: dict[str, list[str]] = {}
    for name, info in sorted(model.tensors.items(), key=lambda kv: (kv[1].file.name, kv[1].offset)):
        files.setdefault(info.file.name, []).append(name)
    for name in shards:
        if name not in files:
            raise NearswapError(f"{out}: {shown(name)}, a shard the merge wrote, is missing or holds no tensor")
    extra = sorted(set(files) - set(shards))
    if extra:
        raise NearswapError(f"{out / extra[0]} is a shard of the checkpoint that the merge did not write")
    chunk = _chunk_of(out / REPORT_NAME, recorded, [info.numel for info in model.tensors.values()])
    for name in sorted(shards):
        if _header_crc(out / name) != headers[name]:
            raise NearswapError(f"{out / name}: its header (tensor names, shapes, metadata) differs from what the "
                                "merge wrote: the file changed or was damaged since (copy it again)")
    started = time.perf_counter()
    names = sorted(files)
    found = digests(model, {name: files[name] for name in names}, chunk, threads, progress)
    seconds = time.perf_counter() - started
    for name in names:
        if found[name] != shards[name]:
            raise NearswapError(f"{out / name}: its data differ from what the merge wrote (checksum "
                                f"{found[name][:12]} != {str(shards[name])[:12]} recorded): the file "
                                "changed or was damaged since (copy it again)")
    hashed = sum(info.nbytes for info in model.tensors.values())
    result: dict[str, Any] = {"output": str(out), "files": len(names), "bytes": hashed,
                              "seconds": round(seconds, 3), "tensors": len(model.tensors), "other_files": len(other)}
    if inputs:
        from ..merging import recipe as recipes

        if not (out / RECIPE_NAME).is_file():
            raise NearswapError(f"{out} has no {RECIPE_NAME}: the inputs are unknown; verify without --inputs")
        result["recomputed"] = _recompute(out, recipes.load(out / RECIPE_NAME), model, chunk, sample, seed)
    return result


def _check_file_set(out: Path, shards: set[str], other: dict[str, str]) -> None:
    """Every file under ``out`` is one the merge wrote (a shard, or a file whose SHA-256 it
    recorded), the model card or the report; each recorded file is there and unchanged. No
    links: a loader would follow one to whatever it names."""
    import hashlib
    import os
    import stat

    from ..core.checksums import UNRECORDED

    present = set()
    for folder, dirs, names in os.walk(out):
        for name in [*dirs, *names]:
            path = Path(folder) / name
            rel = path.relative_to(out).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise NearswapError(f"{path} is a link or not a regular file, which a merge never writes; a loader "
                                    "would read what it names: remove it")
            if stat.S_ISREG(mode):
                present.add(rel)
    for rel in sorted(present):
        if rel not in shards and rel not in other and rel not in UNRECORDED:
            raise NearswapError(f"{out / rel} is not a file the merge wrote (a loader may read it instead of, or "
                                "with, the merge): remove it, or merge again")
    for rel in sorted([*shards, *other]):
        if rel not in present:
            raise NearswapError(f"{out / rel}, a file the merge wrote, is missing (copy it again)")
    for rel, digest in sorted(other.items()):
        sha = hashlib.sha256()
        with open(out / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        if sha.hexdigest() != digest:
            raise NearswapError(f"{out / rel} differs from what the merge wrote (sha256 {sha.hexdigest()[:12]} != "
                                f"{digest[:12]} recorded): it changed or was damaged since (copy it again)")


def _header_crc(path: Path) -> int:
    """The CRC-32C of a safetensors file's header: its length field and the JSON (validated and
    bounded by the reader that opened the checkpoint)."""
    import os
    import struct

    from ..core import checksums

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        return checksums.crc_of_span(fd, 0, 8 + n)
    finally:
        os.close(fd)


def _verify_gguf(path: Path, inputs: bool, sample: int, seed: int | None, threads: int,
                 progress: Callable[[int], None] | None) -> dict[str, Any]:
    """A .gguf file a merge wrote, against the record in its own metadata (``nearswap.checksums``):
    the header's CRC (with that record's placeholder back in place), every chunk of coded bytes,
    and the padding between tensors (zeros, as the writer leaves it)."""
    import json
    import os

    from gguf import GGML_QUANT_SIZES

    from ..core import checksums
    from ..formats.gguf_header import HeaderError, read_header
    from ..formats.gguf_writer import CHECKSUM_KEY, CHECKSUM_LEN, PLACEHOLDER

    try:
        header = read_header(path)
    except (HeaderError, OSError) as e:
        raise NearswapError(f"{path}: not a GGUF file llama.cpp reads ({e})") from None
    text = header.metadata.get(CHECKSUM_KEY)
    if not isinstance(text, str):
        raise NearswapError(f"{path} records no checksums ({CHECKSUM_KEY}): it was not written by nearswap merge, or "
                            "by an older one; nothing to verify against")
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if (not isinstance(record, dict) or len(text.encode()) != CHECKSUM_LEN or record.get("method") != checksums.METHOD
            or not _crc32(record.get("header")) or not _hex64(record.get("data"))):
        raise _refuse(path, f"its {CHECKSUM_KEY} is not a record nearswap writes")
    tensors = sorted(header.tensors, key=lambda t: t.data_offset)
    chunk = _chunk_of(path, record, [t.n_elements for t in tensors], 256)
    size = path.stat().st_size
    data_start = tensors[0].data_offset if tensors else size
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        raw = os.pread(fd, data_start, 0)
        if raw.count(text.encode()) != 1 or checksums.crc(raw.replace(text.encode(), PLACEHOLDER.encode())) != record["header"]:
            raise NearswapError(f"{path}: its header (metadata, tensor names, shapes or types) differs from what the "
                                "merge wrote: the file changed or was damaged since (copy it again)")
        for t, after in zip(tensors, [*(u.data_offset for u in tensors[1:]), size]):
            gap = after - (t.data_offset + t.n_bytes)
            if gap < 0 or gap >= 1 << 16 or os.pread(fd, gap, t.data_offset + t.n_bytes).strip(b"\0"):
                raise NearswapError(f"{path}: the bytes after tensor {shown(t.name)} are not the writer's padding "
                                    "(the file changed or was damaged since: copy it again)")
        items = []
        for t in tensors:
            block, tsize = GGML_QUANT_SIZES[t.tensor_type]
            for start in range(0, t.n_elements, chunk):
                n = min(chunk, t.n_elements - start)
                items.append((t.data_offset + start // block * tsize, n // block * tsize))
        started = time.perf_counter()

        def one(span: tuple[int, int]) -> int:
            crc = checksums.crc_of_span(fd, *span)
            if progress:
                progress(span[1])
            return crc

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items) or 1))) as pool:
            crcs = list(pool.map(one, items))
    finally:
        os.close(fd)
    per_tensor, k = [], 0
    for t in tensors:
        n = -(-t.n_elements // chunk)
        per_tensor.append(crcs[k:k + n])
        k += n
    if checksums.digest(per_tensor) != record["data"]:
        raise NearswapError(f"{path}: its tensor data differ from what the merge wrote: the file changed or was damaged "
                            "since (copy it again)")
    result: dict[str, Any] = {"output": str(path), "files": 1, "bytes": sum(t.n_bytes for t in tensors),
                              "seconds": round(time.perf_counter() - started, 3), "tensors": len(tensors)}
    if inputs:
        from ..core.files import parse_json
        from ..merging import recipe as recipes

        text = header.metadata.get("nearswap.recipe")
        if not isinstance(text, str):
            raise NearswapError(f"{path} records no recipe (nearswap.recipe): the inputs are unknown; verify without --inputs")
        rec = recipes.build(parse_json(text, f"{path}: nearswap.recipe"), f"{path}: nearswap.recipe")
        result["recomputed"] = _recompute_gguf(path, rec, {t.name: t for t in tensors}, chunk, sample, seed)
    return result


class _Compare:
    """A writer that compares what the pass would write with the checkpoint."""

    def __init__(self, out: Path, model: Any) -> None:
        from ..formats.safetensors import FileReader

        self.out, self.model, self.reader = out, model, FileReader()
        self.elements = 0

    def write(self, name: str, start: int, data: Any) -> int:
        import numpy as np

        info = self.model.tensors[name]
        want = np.frombuffer(data, info.dtype.np) if not isinstance(data, np.ndarray) else data
        got = self.reader.read(info, start, np.empty(len(want), info.dtype.np))
        got = np.frombuffer(got, info.dtype.np)
        if got.tobytes() != want.tobytes():
            size = info.dtype.itemsize
            differ = int((got.view(np.uint8).reshape(-1, size) != want.view(np.uint8).reshape(-1, size)).any(axis=1).sum())
            _differs(self.out, name, start, len(want), f"{differ} differ")
        self.elements += len(want)
        return 0


def _differs(out: Path, name: str, start: int, n: int, what: str) -> None:
    raise NearswapError(f"{out}: tensor {shown(name)}, elements {start}..{start + n - 1}: {what} from what the recipe "
                        "gives from its inputs (the checkpoint or an input changed since)")


class _CompareCoded:
    """A writer that codes what the pass would write as the GGUF's type and compares the bytes."""

    def __init__(self, path: Path, tensors: dict[str, Any]) -> None:
        import os

        self.path, self.tensors, self.elements = path, tensors, 0
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def write(self, name: str, start: int, data: Any) -> int:
        import os

        import numpy as np
        from gguf import GGML_QUANT_SIZES

        from ..formats.gguf_writer import quantize

        t = self.tensors[name]
        block, size = GGML_QUANT_SIZES[t.tensor_type]
        want = memoryview(quantize(np.frombuffer(data, np.float32), t.tensor_type)).cast("B")
        n = len(np.frombuffer(data, np.float32))
        got = os.pread(self.fd, len(want), t.data_offset + start // block * size)
        if got != want.tobytes():
            _differs(self.path, name, start, n, "the coded blocks differ")
        self.elements += n
        return 0

    def close(self) -> None:
        import os

        os.close(self.fd)


def _sampled(pass_: Any, numels: list[int], chunk: int, sample: int, seed: int | None) -> tuple[int, float]:
    """Run ``pass_`` on ``sample`` chunks drawn uniformly from every chunk of every tensor (a
    tensor's first and last chunk as likely as any; all of them when there are no more than
    ``sample``); returns how many were run and the seconds it took."""
    import bisect

    counts = [-(-n // chunk) for n in numels]
    ends, total = [], 0
    for c in counts:
        total += c
        ends.append(total)
    rng = random.Random(seed)
    picked = range(total) if sample >= total else sorted(rng.sample(range(total), sample))
    started = time.perf_counter()
    for k in picked:
        i = bisect.bisect_right(ends, k)
        start = (k - (ends[i] - counts[i])) * chunk
        pass_.work((i, start, min(chunk, numels[i] - start)))
    return len(picked), time.perf_counter() - started


def _recompute(out: Path, rec: Any, model: Any, chunk: int, sample: int, seed: int | None) -> dict[str, Any]:
    from ..merging.passes import ChainPass, CopyPass
    from ..merging.plan import plan

    plan_ = plan(rec)
    for task in plan_.tasks:
        info = model.tensors.get(task.name)
        if info is None or info.shape != task.shape or info.dtype != task.out_dtype:
            raise NearswapError(f"{out}: tensor {shown(task.name)} is not what the recipe's inputs give "
                                f"({'missing' if info is None else f'{info.dtype.name} {list(info.shape)}'}; "
                                f"expected {task.out_dtype.name} {list(task.shape)})")
    compare = _Compare(out, model)
    pass_ = ChainPass(plan_, compare) if rec.steps else CopyPass(plan_.tasks, compare)
    try:
        chunks, seconds = _sampled(pass_, [t.numel for t in plan_.tasks], chunk, sample, seed)
    finally:
        pass_.close()
        compare.reader.close()
    return {"chunks": chunks, "elements": compare.elements, "seconds": round(seconds, 3), "seed": seed}


def _recompute_gguf(path: Path, rec: Any, tensors: dict[str, Any], chunk: int, sample: int,
                    seed: int | None) -> dict[str, Any]:
    from ..merging.passes import ChainPass
    from ..merging.plan import plan

    plan_ = plan(rec, native=True)
    for task in plan_.tasks:
        t = tensors.get(task.name)
        if t is None or t.n_elements != task.numel:
            raise NearswapError(f"{path}: tensor {shown(task.name)} is not what the recipe's inputs give "
                                f"({'missing' if t is None else f'{t.n_elements} elements'}; expected {task.numel})")
    compare = _CompareCoded(path, tensors)
    pass_ = ChainPass(plan_, compare)
    try:
        chunks, seconds = _sampled(pass_, [t.numel for t in plan_.tasks], chunk, sample, seed)
    finally:
        pass_.close()
        compare.close()
    return {"chunks": chunks, "elements": compare.elements, "seconds": round(seconds, 3), "seed": seed}

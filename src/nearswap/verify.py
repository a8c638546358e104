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

from .errors import NearswapError, shown


READ_PIECE = 1 << 20  # bytes per read, into a reused buffer (docs/benchmarks.md: why not whole chunks)


class _ChunkCRCs:
    """CRC-32Cs of chunks of a checkpoint's tensors read back from disk, one chunk per call, from
    any thread: each chunk read in pieces of at most READ_PIECE bytes into the calling thread's
    own buffer, its CRC carried from piece to piece (no numpy: importing ml_dtypes for bfloat16
    costs more than the hashing; see docs/benchmarks.md)."""

    def __init__(self, model: Any) -> None:
        import threading

        from .formats.safetensors import FileReader

        self.model, self.reader, self.local = model, FileReader(), threading.local()

    def __call__(self, item: tuple[str, int, int]) -> int:
        from . import checksums

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
    from . import checksums

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


def verify(out: str | Path, inputs: bool = False, sample: int = 64, seed: int | None = None,
           threads: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Check ``out`` (a nearswap merge directory); returns what was checked. Raises
    ``NearswapError`` naming the first file or tensor that is not as written."""
    from .engine import RECIPE_NAME, REPORT_NAME
    from .files import read_json_object
    from .formats import open_model
    from .stream import default_threads

    out = Path(out)
    if not out.is_dir():
        raise NearswapError(f"{out} is not a directory: verify checks a merge written by nearswap (an HF directory)")
    if not (out / REPORT_NAME).is_file():
        raise NearswapError(f"{out} has no {REPORT_NAME}: it was not written by nearswap merge/convert, "
                            "nothing to verify against")
    report = read_json_object(out / REPORT_NAME, "merge report")
    output = report.get("output") if isinstance(report.get("output"), dict) else {}
    recorded = output.get("checksums")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict) or not recorded["files"]:
        raise NearswapError(f"{out / REPORT_NAME} records no checksums (written by an older nearswap, or a .gguf "
                            "merge): merge again to get a checkpoint that can be verified")
    chunk = recorded.get("chunk")
    if type(chunk) is not int or chunk <= 0:
        raise NearswapError(f"{out / REPORT_NAME}: output.checksums.chunk is not a positive number of elements")
    model = open_model(out, "merge")  # every header and the index, checked as for any input
    files: dict[str, list[str]] = {}
    for name, info in sorted(model.tensors.items(), key=lambda kv: (kv[1].file.name, kv[1].offset)):
        files.setdefault(info.file.name, []).append(name)
    for name in recorded["files"]:
        if name not in files:
            raise NearswapError(f"{out}: {shown(name)}, a shard the merge wrote, is missing or holds no tensor")
    extra = sorted(set(files) - set(recorded["files"]))
    if extra:
        raise NearswapError(f"{out / extra[0]} is a shard of the checkpoint that the merge did not write")
    started = time.perf_counter()
    names = sorted(files)
    found = digests(model, {name: files[name] for name in names}, chunk, threads or default_threads(), progress)
    seconds = time.perf_counter() - started
    for name in names:
        if found[name] != recorded["files"][name]:
            raise NearswapError(f"{out / name}: its data differ from what the merge wrote (checksum "
                                f"{found[name][:12]} != {str(recorded['files'][name])[:12]} recorded): the file "
                                "changed or was damaged since (copy it again)")
    hashed = sum(info.nbytes for info in model.tensors.values())
    result: dict[str, Any] = {"output": str(out), "files": len(names), "bytes": hashed,
                              "seconds": round(seconds, 3), "tensors": len(model.tensors)}
    if inputs:
        result["recomputed"] = _recompute(out, out / RECIPE_NAME, model, sample, seed)
    return result


class _Compare:
    """A writer that compares what the pass would write with the checkpoint."""

    def __init__(self, out: Path, model: Any) -> None:
        from .formats.safetensors import FileReader

        self.out, self.model, self.reader = out, model, FileReader()
        self.elements = 0

    def write(self, name: str, start: int, data: Any) -> None:
        import numpy as np

        info = self.model.tensors[name]
        want = np.frombuffer(data, info.dtype.np) if not isinstance(data, np.ndarray) else data
        got = self.reader.read(info, start, np.empty(len(want), info.dtype.np))
        got = np.frombuffer(got, info.dtype.np)
        if got.tobytes() != want.tobytes():
            size = info.dtype.itemsize
            differ = int((got.view(np.uint8).reshape(-1, size) != want.view(np.uint8).reshape(-1, size)).any(axis=1).sum())
            raise NearswapError(f"{self.out}: tensor {shown(name)}, elements {start}..{start + len(want) - 1}: {differ} "
                                "differ from what the recipe gives from its inputs (the checkpoint or an input changed "
                                "since)")
        self.elements += len(want)


def _recompute(out: Path, recipe_path: Path, model: Any, sample: int, seed: int | None) -> dict[str, Any]:
    from . import engine, recipe as recipes
    from .stream import DEFAULT_CHUNK

    if not recipe_path.is_file():
        raise NearswapError(f"{out} has no {recipe_path.name}: the inputs are unknown; verify without --inputs")
    rec = recipes.load(recipe_path)
    plan_ = engine.plan(rec)
    for task in plan_.tasks:
        info = model.tensors.get(task.name)
        if info is None or info.shape != task.shape or info.dtype != task.out_dtype:
            raise NearswapError(f"{out}: tensor {shown(task.name)} is not what the recipe's inputs give "
                                f"({'missing' if info is None else f'{info.dtype.name} {list(info.shape)}'}; "
                                f"expected {task.out_dtype.name} {list(task.shape)})")
    compare = _Compare(out, model)
    pass_ = engine.ChainPass(plan_, compare) if rec.steps else engine.CopyPass(plan_.tasks, compare)
    rng = random.Random(seed)
    weights = [max(t.numel, 1) for t in plan_.tasks]
    started = time.perf_counter()
    try:
        for _ in range(sample):
            i = rng.choices(range(len(plan_.tasks)), weights)[0]
            numel = plan_.tasks[i].numel
            start = rng.randrange(0, max(numel, 1), 256)  # block-aligned, as every work item of a merge
            pass_.work((i, start, min(DEFAULT_CHUNK, numel - start)))
    finally:
        pass_.close()
        compare.reader.close()
    return {"chunks": sample, "elements": compare.elements, "seconds": round(time.perf_counter() - started, 3),
            "seed": seed}

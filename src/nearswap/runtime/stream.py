"""The streaming runtime every pass runs on: work items over tensors, a thread pool, buffers.

A **pass** is what a job does to each chunk: merge's chain (``merging.passes.ChainPass``), convert's
copy (``merging.passes.CopyPass``), curve's counts (``curve.CountPass``). It is a picklable object
with three methods — ``items(settings)`` (what to do), ``work(item)`` (pure: reads its inputs,
opening its readers lazily, and returns a small result; runs on any thread, or in another
process once unpickled) and ``collect(result)`` (on the driver, in item order of completion)
— and ``close()``. ``run`` drives one over a pool of threads with at most 2 x threads items in
flight, so memory is bounded by threads x chunk x inputs, not by model size.

Settings are passed, never read from the environment here: only the CLI reads
``NEARSWAP_CHUNK`` (``Settings.from_env``).
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol

from ..core.dtypes import DType
from ..core.errors import NearswapError
from ..core.paths import default_threads

DEFAULT_CHUNK = 1 << 20  # elements per work item: 4 MB of float32, a multiple of every GGUF block


@dataclass(frozen=True)
class Settings:
    """How a pass is run: elements per work item, worker threads (None: all cores), on a Ray
    cluster the input bytes per task, and how often a resumable output is journaled."""

    chunk: int = DEFAULT_CHUNK
    threads: int | None = None
    group_bytes: int = 256 << 20
    journal_bytes: int = 64 << 20  # a resumable output is synced and journaled every this many bytes

    def __post_init__(self) -> None:
        if type(self.chunk) is not int or self.chunk <= 0:
            raise NearswapError(f"the chunk size must be a positive number of elements, got {self.chunk!r}")

    @property
    def workers(self) -> int:
        return self.threads or default_threads()

    @classmethod
    def from_env(cls, environ: Mapping[str, str], threads: int | None = None) -> "Settings":
        """``NEARSWAP_CHUNK`` from ``environ`` (the CLI's way to shrink work items for tests and
        experiments), else the default."""
        text = environ.get("NEARSWAP_CHUNK")
        if text is None:
            return cls(threads=threads)
        try:
            return cls(int(text), threads)
        except ValueError:
            raise NearswapError(f"NEARSWAP_CHUNK={text!r} is not a whole number of elements") from None


class Pass(Protocol):
    """What a job does to each chunk (see the module docstring)."""

    def items(self, settings: Settings) -> Iterator[tuple]: ...

    def work(self, item: tuple) -> Any: ...

    def collect(self, result: Any) -> None: ...

    def close(self) -> None: ...


class ChunkBuffers(threading.local):
    """Per-thread reusable chunk buffers (raw bytes: no numpy), keyed by (slot, dtype)."""

    def get(self, slot: int, dtype: DType, n: int) -> memoryview:
        """A buffer for ``n`` elements of ``dtype``."""
        pool = self.__dict__.setdefault("pool", {})
        buf = pool.get((slot, dtype.name))
        if buf is None or len(buf) < n * dtype.itemsize:
            buf = pool[(slot, dtype.name)] = memoryview(bytearray(n * dtype.itemsize))
        return buf[: n * dtype.itemsize]


def work_items(numels: list[int], chunk: int) -> Iterator[tuple[int, int, int]]:
    """(tensor index, first element, elements) for every chunk of every tensor (one empty item
    for an empty tensor, so that it is still written)."""
    for i, numel in enumerate(numels):
        for start in range(0, max(numel, 1), chunk):
            yield i, start, min(chunk, numel - start)


def run_pool(items: Iterator[tuple], work: Callable[..., Any], collect: Callable[[Any], None], threads: int) -> None:
    """Run ``work(*item)`` for every item on ``threads`` threads, at most 2 x threads in flight,
    handing each result to ``collect`` on this thread. An exception (Ctrl-C included) in either
    cancels what has not started and is re-raised once the running items have finished."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nearswap")
    pending: set[Future] = set()
    try:
        for item in items:
            if len(pending) >= 2 * threads:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    collect(fut.result())
            pending.add(pool.submit(work, *item))
        for fut in pending:
            collect(fut.result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run(pass_: Pass, settings: Settings, progress: Callable[[int], None] | None = None) -> None:
    """Drive ``pass_`` to the end on ``settings.workers`` threads; ``progress`` gets the input
    bytes of each finished item (results carry them as ``result.nbytes``)."""

    def collect(result: Any) -> None:
        pass_.collect(result)
        if progress:
            progress(result.nbytes)

    try:
        run_pool(pass_.items(settings), lambda *item: pass_.work(item), collect, settings.workers)
    finally:
        pass_.close()

"""The passes a merge runs on ``runtime.stream`` (or Ray): ``ChainPass`` (merge: each chunk of
every tensor through the chain of NearSwap steps) and ``CopyPass`` (convert). Both pickle, so
they run unchanged on a Ray cluster; each reports its chunks' CRCs and, for a journaled run,
each tensor once its chunks are written."""

from __future__ import annotations

import threading
from array import array
from typing import Any, Iterator, NamedTuple

from ..core import kernels
from ..core.dtypes import DType
from ..core.errors import (
    NearswapError,
    shown,
)
from ..formats import Model
from ..formats.safetensors import FileReader
from ..runtime.stream import DEFAULT_CHUNK, ChunkBuffers, Settings, work_items
from .plan import Plan, TensorTask
from .report import NetChange, StepReport, Tally

# Cold inputs: after each chunk, ask the kernel to start reading this many further chunks of that
# input (POSIX_FADV_WILLNEED) when an item reads READ_AHEAD_FROM inputs or more; with two, the
# kernel's own readahead keeps up (the measurements: docs/benchmarks.md, "Read-ahead hints").
READ_AHEAD, READ_AHEAD_FROM = 1, 3


class Result(NamedTuple):
    """What one work item did: its tensor, the per-step counts (None: copied), input bytes read,
    its first element and the CRC-32 of the bytes it wrote (``checksums``)."""

    tensor: int  # its index in the pass's tasks
    counts: kernels.ChainCounts | None
    nbytes: int
    start: int = 0
    crc: int | None = None


class _Inputs:
    """Readers and buffers a pass opens lazily in whichever process runs it (so that the pass
    pickles: none of them travel)."""

    _open_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_buffers")}

    def _io(self) -> tuple[FileReader, ChunkBuffers]:
        reader, buffers = self.__dict__.get("_reader"), self.__dict__.get("_buffers")
        if reader is None or buffers is None:
            with _Inputs._open_lock:
                if self.__dict__.get("_reader") is None:
                    self._buffers = ChunkBuffers()
                    self._reader = FileReader(ahead=self.read_ahead)
            reader, buffers = self._reader, self._buffers
        return reader, buffers

    read_ahead = 0  # FileReader's ``ahead`` for this pass's reads

    def close(self) -> None:
        reader = self.__dict__.pop("_reader", None)
        self.__dict__.pop("_buffers", None)
        if reader is not None:
            reader.close()


class CopyPass(_Inputs):
    """Convert's pass: every tensor copied to the writer, cast to its output dtype.

    With a ``journal`` (a ``JournalWriter``, on the driver) each tensor is reported to it once
    all its chunks are written; tensors in ``skip`` (written by an earlier run) are not run."""

    journal: Any = None

    def __init__(self, tasks: list[TensorTask], writer: Any) -> None:
        self.tasks, self.writer = tasks, writer
        self.skip: set[int] = set()
        self._left: dict[int, int] = {}
        self.crcs: dict[int, array] = {}  # tensor index -> each chunk's CRC-32C (4 bytes a chunk, however large the model)
        self._chunk = 1

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__getstate__().items() if k not in ("journal", "_left", "crcs")}

    def items(self, settings: Settings) -> Iterator[tuple[int, int, int]]:
        numels = [t.numel for t in self.tasks]
        self._chunk = settings.chunk
        self._left = {i: max(1, -(-n // settings.chunk)) for i, n in enumerate(numels) if i not in self.skip}
        return (item for item in work_items(numels, settings.chunk) if item[0] not in self.skip)

    def resume(self, done: dict[str, Any]) -> int:
        """Skip the tensors an earlier run completed (name -> journaled tallies); returns the
        input bytes they stand for."""
        skipped = 0
        for i, task in enumerate(self.tasks):
            if task.name in done:
                self.skip.add(i)
                self._restore(task, done[task.name]["tallies"])
                self.crcs[i] = array("I", done[task.name]["crc"])
                skipped += task.in_bytes
        return skipped

    def checksums(self) -> dict[str, list[int]]:
        """Each tensor's chunk CRCs in element order."""
        return {self.tasks[i].name: list(chunks) for i, chunks in self.crcs.items()}

    def _restore(self, task: TensorTask, tallies: Any) -> None:
        pass

    def _tallies(self, task: TensorTask) -> Any:
        return None

    def _completed(self, result: Result) -> None:
        if result.crc is not None:
            crcs = self.crcs.get(result.tensor)
            if crcs is None:
                crcs = self.crcs[result.tensor] = array("I", bytes(4 * -(-self.tasks[result.tensor].numel // self._chunk)))
            crcs[result.start // self._chunk] = result.crc
        if self.journal is None:
            return
        left = self._left[result.tensor] - 1
        self._left[result.tensor] = left
        if left == 0:
            task = self.tasks[result.tensor]
            self.journal.done(task.name, {"tallies": self._tallies(task), "crc": list(self.crcs.get(result.tensor, ()))},
                              task.numel * task.out_dtype.itemsize)

    def work(self, item: tuple[int, int, int]) -> Result:
        i, start, n = item
        task = self.tasks[i]
        if n == 0:
            return Result(i, None, 0)
        reader, buffers = self._io()
        base = reader.read(task.base, start, buffers.get(0, task.base.dtype, n))
        out = _cast(base, task.base.dtype, task.out_dtype)
        crc = self.writer.write(task.name, start, out)  # of the bytes stored (a GGUF's coded blocks)
        return Result(i, None, len(base), start, crc)

    def collect(self, result: Result) -> None:
        self._completed(result)


class ChainPass(CopyPass):
    """Merge's pass: each chunk of every floating tensor through the chain of NearSwap steps
    (the C kernel, GIL released), the per-step counts tallied on the driver; integer tensors
    copied. Refuses non-finite inputs unless the recipe allows them."""

    def __init__(self, plan_: Plan, writer: Any) -> None:
        super().__init__(plan_.tasks, writer)
        recipe = plan_.recipe
        self.inputs = [plan_.base, *plan_.secondaries]
        self.read_ahead = READ_AHEAD if len(self.inputs) >= READ_AHEAD_FROM else 0
        self.round_between = not recipe.carry_float32
        self.requantized = getattr(writer, "requantizes", False)
        self.allow_nonfinite = recipe.allow_nonfinite
        self.steps = [StepReport(model=s.model, label=m.label, t=s.t) for s, m in zip(recipe.steps, plan_.secondaries)]
        self.net = NetChange()  # the chain's, all steps together
        for task in self.tasks:
            if task.merged:
                self.net.tensors[task.name] = [task.numel, 0]
                for k, step in enumerate(self.steps):
                    step.tensors[task.name] = Tally()
                    step.t_by_tensor[task.name] = task.ts[k]

    def work(self, item: tuple[int, int, int]) -> Result:
        i, start, n = item
        task = self.tasks[i]
        if n == 0 or not task.merged or not task.secondaries:  # copied (integers)
            return super().work(item)
        reader, buffers = self._io()
        base = reader.read(task.base, start, buffers.get(0, task.base.dtype, n))
        secs = [reader.read(s, start, buffers.get(k + 1, s.dtype, n)) for k, s in enumerate(task.secondaries)]
        out = buffers.get(-1, task.out_dtype, n)
        counts = kernels.chain_raw(out, task.out_dtype, base, task.base.dtype,
                                   list(zip(secs, (s.dtype for s in task.secondaries))), task.ts, self.round_between)
        if self.requantized:  # a .gguf output: "changed" is what changed in the values it stores
            crc, coded, qtype = self.writer.write_coded(task.name, start, out)
            counts = _stored_changes(counts, coded, qtype, base)
        else:
            crc = self.writer.write(task.name, start, out)
        return Result(i, counts, len(base) + sum(len(x) for x in secs), start, crc)

    def collect(self, result: Result) -> None:
        if result.counts is not None:
            task = self.tasks[result.tensor]
            for step, c in zip(self.steps, result.counts.steps):
                step.tensors[task.name].add(c)
            self.net.tensors[task.name][1] += result.counts.changed or 0
            if not self.allow_nonfinite and any(c.nonfinite for c in result.counts.steps):
                _refuse_nonfinite(self.inputs, task)
        self._completed(result)

    def _tallies(self, task: TensorTask) -> Any:
        if task.name not in self.steps[0].tensors:
            return None
        return {"steps": [step.tensors[task.name].to_journal() for step in self.steps],
                "changed": self.net.tensors[task.name][1]}

    def _restore(self, task: TensorTask, tallies: Any) -> None:
        if tallies is not None:
            for step, tally in zip(self.steps, tallies["steps"]):
                step.tensors[task.name] = Tally.from_journal(tally)
            self.net.tensors[task.name][1] = int(tallies["changed"])


def _stored_changes(counts: kernels.ChainCounts, coded: Any, qtype: Any, base: Any) -> kernels.ChainCounts:
    """The chain's counts with "changed" taken from the values a .gguf output stores (``coded``,
    as ``qtype``) against the base's (float32, as read): the net change, and the step's own
    when there is one step (in a longer chain the steps before the last are held in float32,
    and are counted so; the last step's count is of float32 too)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from ..formats.gguf import dequantize

    if qtype == Q.F32:
        stored = np.asarray(coded, np.float32)
    elif qtype == Q.F16:
        stored = np.asarray(coded).astype(np.float32)
    else:
        stored = dequantize(np.frombuffer(memoryview(coded).cast("B"), np.uint8), qtype).reshape(-1)
    changed = int(np.count_nonzero(stored != np.frombuffer(base, np.float32)))
    steps = counts.steps if len(counts.steps) != 1 else [counts.steps[0]._replace(changed=changed)]
    return kernels.ChainCounts(steps, changed)


def _cast(data: memoryview, src: DType, dst: DType) -> Any:
    """Elements of ``src`` as ``dst`` (round to nearest even); a no-op when they are the same."""
    if src == dst:
        return data
    import numpy as np

    return np.frombuffer(data, src.np).astype(dst.np)


def _refuse_nonfinite(models: list[Model], task: TensorTask) -> None:
    """An input of ``task`` holds NaN/inf: name the model and the count, then stop."""
    import numpy as np

    reader = FileReader()
    try:
        for model, info in zip(models, [task.base, *task.secondaries]):
            bad = 0
            for start in range(0, info.numel, DEFAULT_CHUNK):
                n = min(DEFAULT_CHUNK, info.numel - start)
                chunk = reader.read(info, start, np.empty(n, info.dtype.np))
                bad += int(n - np.count_nonzero(np.isfinite(chunk)))
            if bad:
                raise NearswapError(f"{model.describe()}: tensor {shown(task.name)} has {bad} non-finite values "
                                    "(NaN/inf); repair the checkpoint, or pass --allow-nonfinite to merge them by the formula")
    finally:
        reader.close()
    # Only the differences overflowed (huge finite weights of opposite sign): the formula keeps v0.



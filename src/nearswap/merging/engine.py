"""The merge: preflight every input, plan the stream, run the chain pass, write atomically.

read -> plan -> pass -> write -> report. Each input tensor is read once and each output
tensor written once, in chunks (``stream.Settings``), by the pass's work run on a pool of
threads (``stream.run``): memory is bounded by threads x chunk x models, not by model size.
Merge's pass is ``ChainPass``, convert's ``CopyPass`` (a recipe without steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
import warnings
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence, cast

from .._version import __version__
from ..core import checksums, kernels
from ..core.dtypes import BY_NAME, DType
from ..core.errors import (
    InvalidValue,
    NearswapError,
    NearswapWarning,
    WriteFailed,
    shown,
)
from ..formats import TOKENIZER_FILES, Model, open_model
from ..formats import safetensors as st
from ..formats.generated import is_generated
from ..formats.null import NullWriter, is_null
from ..formats.safetensors import FileReader, ShardedWriter
from ..formats.types import TensorInfo
from ..runtime import stream
from ..runtime.output import atomic_directory, check_free_space, check_name
from ..runtime.stream import DEFAULT_CHUNK, ChunkBuffers, Settings, work_items
from .recipe import Recipe
from .report import MergeReport, NetChange, StepReport, Tally, journaled_tallies_ok

REPORT_NAME = "merge_report.json"
# Cold inputs: after each chunk, ask the kernel to start reading this many further chunks of that
# input (POSIX_FADV_WILLNEED) when an item reads READ_AHEAD_FROM inputs or more; with two, the
# kernel's own readahead keeps up (the measurements: docs/benchmarks.md, "Read-ahead hints").
READ_AHEAD, READ_AHEAD_FROM = 1, 3
RECIPE_NAME = "nearswap_recipe.yaml"
EMBEDDING_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output.weight", "token_embd")


@dataclass
class TensorTask:
    """One output tensor: where its inputs are and the t of each step."""

    name: str
    shape: tuple[int, ...]
    out_dtype: DType
    base: TensorInfo
    secondaries: list[TensorInfo]
    ts: list[float]

    @property
    def merged(self) -> bool:  # integer/bool tensors are copied from the base
        return self.base.dtype.is_float

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def in_bytes(self) -> int:  # as read out (decoded): the progress bar's units
        return self.base.nbytes + (sum(s.nbytes for s in self.secondaries) if self.merged else 0)

    @property
    def read_bytes(self) -> int:  # from the input files
        return self.base.stored_bytes + (sum(s.stored_bytes for s in self.secondaries) if self.merged else 0)


@dataclass
class Plan:
    """Everything the merge will do, checked before the first tensor byte is read."""

    recipe: Recipe
    base: Model
    secondaries: list[Model]
    tasks: list[TensorTask]
    stored: dict[str, int] | None = None  # bytes per tensor where the output codes it in blocks (GGUF types)

    @property
    def out_bytes(self) -> int:
        return self.out_bytes_of(None)

    def out_bytes_of(self, names: Any) -> int:
        """Output bytes of the tensors in ``names`` (all of them for None)."""
        size = (lambda t: self.stored[t.name]) if self.stored else (lambda t: t.numel * t.out_dtype.itemsize)
        return sum(size(t) for t in self.tasks if names is None or t.name in names)

    @property
    def in_bytes(self) -> int:
        return sum(t.in_bytes for t in self.tasks)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)


# ---------------------------------------------------------------- preflight


def plan(recipe: Recipe, native: bool = False) -> Plan:
    """Open every input and check that they can be merged. Raises ``NearswapError``.
    ``native``: GGUF inputs under their own names and values (a merge into a .gguf file)."""
    base = open_model(recipe.base, "base", native)
    secondaries = [open_model(step.model, f"s{i}", native) for i, step in enumerate(recipe.steps, 1)]
    for sec in secondaries:
        _check_compatible(base, sec)
    if recipe.tokenizer_source != "base":
        src = Path(recipe.tokenizer_source)
        if not src.is_dir():
            raise NearswapError(f"tokenizer_source {src} is not a model directory")
        if not any((src / name).is_file() for name in TOKENIZER_FILES):
            raise NearswapError(f"tokenizer_source {src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...): "
                                "the output would have no tokenizer; point it at a model directory that has one")
    out_dtype = BY_NAME[recipe.dtype] if recipe.dtype else None
    tasks = []
    for name, info in base.tensors.items():
        tasks.append(TensorTask(
            name=name,
            shape=info.shape,
            out_dtype=(out_dtype or info.dtype) if info.dtype.is_float else info.dtype,
            base=info,
            secondaries=[sec.tensors[name] for sec in secondaries],
            ts=[step.t_for(name) for step in recipe.steps],
        ))
    _warn_unmatched_rules(recipe, [t.name for t in tasks])
    return Plan(recipe, base, secondaries, tasks)


def _warn_unmatched_rules(recipe: Recipe, names: list[str]) -> None:
    """A per-tensor rule whose glob matches no tensor of the base does nothing: say so (a typo
    such as ``*.mpl.*`` would otherwise merge those tensors at the step's t, silently)."""
    import fnmatch
    import warnings

    from ..core.errors import NearswapWarning

    for k, step in enumerate(recipe.steps, 1):
        for rule in step.rules:
            if not any(fnmatch.fnmatchcase(name, rule.match) for name in names):
                warnings.warn(f"step {k}: rule {shown(rule.match)} matches no tensor of the base; it does nothing "
                              "(check the glob against `nearswap inspect BASE --tensors`)", NearswapWarning)


def warn_no_ops(steps: list[StepReport]) -> None:
    """A secondary identical to the running result (every element the same) changed nothing:
    say so (the wrong folder, or a secondary saved from the base)."""
    import warnings

    from ..core.errors import NearswapWarning

    for k, step in enumerate(steps, 1):
        total = step.totals
        if total.total and total.identical == total.total:
            warnings.warn(f"step {k} ({step.label}: {step.model}) changed nothing: it is identical to "
                          f"{'the base' if k == 1 else 'the result of step ' + str(k - 1)}", NearswapWarning)


def _check_compatible(base: Model, sec: Model) -> None:
    arch = "general.architecture"
    if base.metadata.get(arch) != sec.metadata.get(arch) and (base.metadata.get(arch) or sec.metadata.get(arch)) \
            and base.kind == sec.kind == "gguf":
        raise NearswapError(f"{sec.describe()} is a GGUF of architecture {shown(sec.metadata.get(arch))} but the base "
                            f"is {shown(base.metadata.get(arch))}; NearSwap merges models of one architecture")
    missing = [n for n in base.tensors if n not in sec.tensors]
    extra = [n for n in sec.tensors if n not in base.tensors]
    shapes = [n for n in base.tensors if n in sec.tensors and base.tensors[n].shape != sec.tensors[n].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} base tensors missing (first: {shown(missing[0])})")
        if extra:
            parts.append(f"{len(extra)} tensors not in the base (first: {shown(extra[0])})")
        if shapes:
            n = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (first: {shown(n)}: base {list(base.tensors[n].shape)} vs {sec.label} {list(sec.tensors[n].shape)})")
        vocab = [n for n in shapes if any(h in n for h in EMBEDDING_HINTS)
                 and base.tensors[n].shape[1:] == sec.tensors[n].shape[1:]]
        hint = "NearSwap needs the same architecture and tensor names in every model"
        if vocab:
            n = vocab[0]
            hint = (f"the vocabulary sizes differ ({base.tensors[n].shape[0]} vs {sec.tensors[n].shape[0]} rows in {shown(n)}): "
                    "NearSwap needs the same vocabulary; resize the secondary's embeddings to the base tokenizer first")
        raise NearswapError(f"{sec.describe()} does not match the base: {'; '.join(parts)}; {hint}")
    if base.architectures and sec.architectures and base.architectures != sec.architectures:
        raise NearswapError(f"{sec.describe()} is a {shown(str(sec.architectures))} but the base is a "
                            f"{shown(str(base.architectures))}; "
                            "NearSwap merges models of one architecture")


def _input_files(model: Model) -> list[Path]:
    """Every file of ``model`` that a merge reads or copies: weights, index, side files."""
    from ..formats import side_files

    files = [model.path, *model.files]
    if model.directory is not None:
        files += [model.directory / st.INDEX_NAME] + [path for _, path in side_files(model.directory)[0]]
    return files


def check_output_not_input(out: Path, models: list[Model], extra: Sequence[Path] = ()) -> None:
    """Refuse an output that would replace or sit inside an input. Files are compared after
    resolving symlinks: an input whose shard is a link into the output directory (the Hugging
    Face cache layout) would lose its data when ``--force`` replaces that directory."""
    target = out.resolve()
    for model in models:
        for f in [*_input_files(model), *extra]:
            if not os.path.lexists(f):
                continue
            real = f.resolve()
            if real == target or target in real.parents:
                via = f" (through {f})" if real != f.absolute() else ""
                raise NearswapError(f"the output {out} holds {real}, a file of {model.describe()}{via}; "
                                    "replacing the output would delete it: write the merge somewhere else")
        if model.directory is not None and model.directory.resolve() in target.parents:
            raise NearswapError(f"the output {out} is inside {model.describe()}; write the merge somewhere else")


# ---------------------------------------------------------------- the passes


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


# ---------------------------------------------------------------- the merge


def merge(recipe: Recipe, out: str | Path, gguf_type: str | None = None, *,
          card: Callable[[Path, MergeReport, str], None] | None = None, **run: Any) -> MergeReport:
    """Run a recipe into ``out``: an HF checkpoint written atomically with the recipe and
    ``merge_report.json`` (and whatever ``card(partial_dir, report, recipe_yaml)`` adds there
    before it is put in place: the model card, ``ship.card``); a GGUF file when ``out`` ends in
    ``.gguf`` (``merge_to_gguf``, ``gguf_type``); nothing stored for ``null:``. Returns the
    report. ``run``: ``force``, ``threads``, ``progress``, ``on_plan`` as for
    ``write_checkpoint``."""
    if is_null(out):
        if gguf_type is not None:
            raise NearswapError("--type is for a .gguf output; null: stores nothing")
        return merge_to_null(recipe, **run)
    out = Path(out)
    if out.suffix.lower() == ".gguf":
        return merge_to_gguf(recipe, out, gguf_type or "like-base", **run)
    if gguf_type is not None:
        raise NearswapError(f"--type is for a .gguf output; {out} is a directory (use --dtype there)")

    def finish(tmp: Path, report: MergeReport) -> None:
        from ..runtime import journal
        from ..runtime.output import PARTIAL_MARKER

        recipe_yaml = recipe.to_yaml(relative_to=out.absolute())  # re-runs from any working directory (inputs checked)
        (tmp / RECIPE_NAME).write_text(recipe_yaml)
        recorded = report["output"]["checksums"]
        recorded["other"] = checksums.file_hashes(tmp, [*recorded["files"], journal.JOURNAL_NAME, PARTIAL_MARKER])
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n")
        if card is not None:
            card(tmp, report, recipe_yaml)

    steps, report = write_checkpoint(recipe, out, {"nearswap_recipe": json.dumps(recipe.to_dict())}, finish,
                                     regenerated=("README.md", REPORT_NAME, RECIPE_NAME), **run)
    return report


def merge_to_null(recipe: Recipe, *, threads: int | None = None, settings: Settings | None = None,
                  progress: Callable[[int], None] | None = None, on_plan: Callable[[Plan], None] | None = None,
                  ray_address: str | None = None, force: bool = False, resume: str = "auto") -> MergeReport:
    """Run a recipe into the null sink (``-o null:``): every chunk read, merged and
    checksummed as for a real output, nothing stored. The report has the statistics and a
    SHA-256 over every tensor's chunk CRCs in tensor order (``output.digest``), which a run
    into a directory of the same recipe reproduces from its own checksums."""
    if ray_address:
        raise NearswapError("null: is a sink of this process; drop --ray, or merge into a directory")
    if force or resume != "auto":
        raise NearswapError(f"{'--force' if force else '--restart or --no-resume'} is for an output that is stored; "
                            "null: stores nothing (there is nothing to replace or to continue)")
    settings = settings or Settings(threads=threads)
    plan_ = plan(recipe)
    if on_plan:
        on_plan(plan_)
    started = time.perf_counter()
    writer = NullWriter([(t.name, t.out_dtype, t.shape) for t in plan_.tasks])
    pass_ = ChainPass(plan_, writer) if recipe.steps else CopyPass(plan_.tasks, writer)
    stream.run(pass_, settings, progress)
    steps = getattr(pass_, "steps", [])
    warn_no_ops(steps)
    writer.close()
    crcs = pass_.checksums()
    return _report(recipe, started, recipe.dtype or "as base", pass_, {
        "null": True, "total_size": writer.total_size, "tensors": len(plan_.tasks),
        "parameters": plan_.base.num_params, "chunk": settings.chunk,
        "digest": checksums.digest([crcs.get(t.name, []) for t in plan_.tasks])})


def _report(recipe: Recipe, started: float, output_type: str, pass_: Any, output: dict[str, Any],
            resumed: dict[str, int] | None = None) -> MergeReport:
    """The report of a merge into any sink (directory, .gguf file, null:): the run, the
    output's ``output_type`` (a dtype, "as base", or a GGUF type) and what the sink says of
    ``output``, each step's counts and the chain's net change."""
    steps = getattr(pass_, "steps", [])
    report: MergeReport = {
        "nearswap_version": __version__, "kernel": kernels.describe_backend(), "base": recipe.base,
        "output_type": output_type, "carry_float32": recipe.carry_float32,
        "seconds": round(time.perf_counter() - started, 3), "output": output,
        "steps": [s.to_json() for s in steps]}
    if steps:
        report["all_steps"] = pass_.net.to_json()
    if resumed is not None:
        report["resumed"] = resumed
    return report


def describe_plan(plan_: Plan) -> list[str]:
    """What a merge will read, write and need on disk, fused (this run) and as the separate
    two-model passes other tools run, one per secondary (each intermediate written, then read
    back by the next pass)."""
    out, n = plan_.out_bytes, len(plan_.secondaries)
    reads = plan_.read_bytes
    gb = 1e9
    lines = [f"plan: {plan_.base.label} + {n} secondar{'y' if n == 1 else 'ies'}, {plan_.base.num_params / 1e9:.2f}B "
             f"parameters each; fused chain (this run): reads {reads / gb:.1f} GB, writes {out / gb:.1f} GB, "
             f"needs {out / gb:.1f} GB of disk"]
    if n > 1:
        lines.append(f"  as {n} separate passes: reads {(reads + (n - 1) * out) / gb:.1f} GB, writes {n * out / gb:.1f} GB "
                     f"({n - 1} intermediate{'s' if n > 2 else ''}), needs {2 * out / gb:.1f} GB of disk at once")
    return lines


RESUME_MODES = ("auto", "restart", "never")


def write_checkpoint(recipe: Recipe, out: str | Path, provenance: dict[str, str],
                     finish: Callable[[Path, MergeReport], None] | None = None, *, regenerated: tuple[str, ...] = (),
                     force: bool = False, threads: int | None = None, settings: Settings | None = None,
                     ray_address: str | None = None, progress: Callable[[int], None] | None = None,
                     on_plan: Callable[[Plan], None] | None = None, resume: str = "auto") -> tuple[list[StepReport], MergeReport]:
    """Preflight ``recipe``, stream it into an HF checkpoint at ``out`` (atomically: a hidden
    partial directory renamed into place) with every side file of the base (but those in
    ``regenerated``, which ``finish`` writes), and ``provenance`` in every shard's metadata;
    ``finish(partial_dir, report)`` adds files before the rename. A recipe without steps
    rewrites the base (``nearswap.merging.convert``).

    The partial directory is resumable: a journal there records the tensors durably written.
    ``resume``: ``auto`` continues the unfinished partial output of an earlier run of the same
    merge (refusing, with the reason, one of a different merge or changed inputs) and keeps
    this run's when writing fails (disk full, I/O error); ``restart`` discards an earlier
    run's; ``never`` also keeps nothing on failure.

    ``progress`` is called with the number of input bytes processed as work completes;
    ``on_plan`` once the preflight has passed (e.g. to size a progress bar); ``settings``
    (chunk size, threads) how the pass runs (``threads`` alone: the default chunk);
    ``ray_address``: run the pass's work on that Ray cluster (``distributed``) instead of
    local threads. Returns the per-step reports and the report dict.
    """
    from ..runtime import journal

    if resume not in RESUME_MODES:
        raise InvalidValue(f"resume must be one of {', '.join(RESUME_MODES)}, got {shown(resume)}")
    out = Path(out)
    check_name(out)
    settings = settings or Settings(threads=threads)
    plan_ = plan(recipe)
    extra = [Path(recipe.tokenizer_source)] if recipe.tokenizer_source != "base" else []
    check_output_not_input(out, [plan_.base, *plan_.secondaries], extra)
    metadata = {"format": "pt", "nearswap_version": __version__, **provenance}
    layout = [(t.name, t.out_dtype, t.shape) for t in plan_.tasks]
    print_ = journal.fingerprint(
        _resolved(recipe), [f for m in (plan_.base, *plan_.secondaries) for f in _input_files(m)],
        {**ShardedWriter.layout(layout, recipe.shard_size), "metadata": metadata}, __version__)
    earlier: list[journal.Journal] = []
    adopt = _adopter(resume, print_, out, earlier)
    partial: list[Path] = []
    with _keeping_partial(resume, partial):
        with atomic_directory(out, force, adopt=adopt, keep=lambda e: resume != "never" and isinstance(e, WriteFailed),
                              scratch=(journal.JOURNAL_NAME,)) as tmp:  # the lock on OUT is held to the rename
            partial.append(tmp)
            done = earlier[0].done if earlier else {}
            check_free_space(out, plan_.out_bytes - plan_.out_bytes_of(done))
            steps, report = _write(plan_, tmp, layout, metadata, settings, ray_address, progress, on_plan,
                                   earlier[0] if earlier else None, print_)
            report["output"]["copied"] = _copy_side_files(plan_, tmp, regenerated)
            if finish:
                finish(tmp, report)
    return steps, report


def _resume_settings(earlier: Any, settings: Settings) -> Settings:
    """The settings of a run that continues ``earlier`` (a journal, or None): its chunk size
    (the same chunks, so the same tallies and CRCs)."""
    if earlier is not None and earlier.chunk and earlier.chunk != settings.chunk:
        settings = dataclasses.replace(settings, chunk=earlier.chunk)
    return settings


def _adopt(earlier: Any, writer: Any, plan_: Plan, settings: Settings, tmp: Path, merged: bool,
           removed: list[str]) -> tuple[dict[str, Any], int]:
    """What of an earlier run's journaled tensors the partial output in ``tmp`` still holds, each
    chunk read back through ``writer.span`` and its CRC compared (``journal.recheck``); says
    what is continued, what is merged again and what was removed. Returns (the tensors adopted,
    their output bytes)."""
    from ..runtime import journal

    if earlier is None:
        return {}, 0
    chunk = settings.chunk
    expected = {}
    for task in plan_.tasks:
        spans = [writer.span(task.name, start, min(chunk, task.numel - start)) for start in range(0, task.numel, chunk)]
        path = spans[0][0] if spans else tmp
        expected[task.name] = (path, [(off, size) for _, off, size in spans], merged and task.merged)
    done, dropped = journal.recheck(earlier.done, expected, settings.workers, journaled_tallies_ok)
    written = plan_.out_bytes_of(done)
    notes = []
    if dropped:
        notes.append(f"{dropped} journaled tensor{'s' if dropped != 1 else ''} not as recorded, merged again")
    if removed:
        notes.append(f"removed {len(removed)} entr{'ies' if len(removed) != 1 else 'y'} besides the weights "
                     f"({', '.join(shown(r, 40) for r in removed[:3])}{', ...' if len(removed) > 3 else ''}): "
                     "the rest of the output is written anew")
    warnings.warn(f"continuing {tmp}, the unfinished output of an earlier run of this merge ({len(done)} of "
                  f"{len(plan_.tasks)} tensors, {written / 1e9:.2f} of {plan_.out_bytes / 1e9:.2f} GB written, each "
                  f"re-checked{'; ' + '; '.join(notes) if notes else ''}); --restart starts over",
                  NearswapWarning, stacklevel=5)
    return done, written


def _run_journaled(pass_: CopyPass, done: dict[str, Any], tmp: Path, print_: dict[str, Any], writer: Any,
                   settings: Settings, progress: Callable[[int], None] | None, ray_address: str | None = None) -> None:
    """Run ``pass_`` into ``writer``, skipping the tensors in ``done`` (re-checked: they start
    the new journal) and journaling in ``tmp`` each tensor once its data are on disk
    (``writer.sync``)."""
    from ..runtime import journal

    skipped = pass_.resume(done)
    pass_.journal = journal.JournalWriter(tmp, print_, writer.sync, settings.journal_bytes, adopted=done,
                                          chunk=settings.chunk)
    if progress and skipped:
        progress(skipped)
    try:
        if ray_address:
            from ..runtime import distributed

            distributed.run(pass_, settings, ray_address, progress)
        else:
            stream.run(pass_, settings, progress)
        pass_.journal.flush()
    finally:
        pass_.journal.close()


def _adopter(resume: str, print_: dict[str, Any], out: Path, earlier: list[Any],
             usable: Callable[[Path], bool] = lambda partial: True) -> Callable[[Path], bool]:
    """The ``adopt`` of an atomic output: accepts the partial output of a killed run whose
    journal has this run's fingerprint (appending the journal to ``earlier``) and that
    ``usable`` accepts; one of another run refuses, naming the first difference."""
    from ..runtime import journal

    def adopt(partial: Path) -> bool:
        found = journal.read(partial) if resume == "auto" else None
        if found is None:
            return False
        why = journal.difference(found.fingerprint, print_)
        if why:
            raise NearswapError(f"{partial} holds the unfinished output of a different run into {out}: {why}; "
                                "run that merge again to continue it, or pass --restart to discard it")
        if not usable(partial):
            return False
        earlier.append(found)
        return True

    return adopt


@contextmanager
def _keeping_partial(resume: str, partial: list[Path]) -> Iterator[None]:
    """A write that failed (disk full, I/O error) says where its work is kept for the next run."""
    try:
        yield
    except WriteFailed as e:
        if resume != "never" and partial and partial[0].is_dir():
            raise WriteFailed(f"{e}; what was written is kept in {partial[0]}: the same command continues from "
                              "there (--no-resume discards it)") from None
        raise


def _prune(tmp: Path, files: list[str]) -> list[str]:
    """Before a run continues the partial directory ``tmp``: remove every entry but its marker,
    its journal and the regular files named in ``files`` (what this run writes there), so that
    the output holds only what this run wrote. Returns the names removed."""
    import stat

    from ..runtime import journal
    from ..runtime.output import PARTIAL_MARKER, remove_entry

    keep = {PARTIAL_MARKER, journal.JOURNAL_NAME, *files}
    removed = []
    for entry in sorted(os.listdir(tmp)):
        if entry == PARTIAL_MARKER:
            continue
        try:
            regular = stat.S_ISREG(os.lstat(tmp / entry).st_mode)
        except OSError:
            regular = False
        if entry in keep and regular:
            continue
        remove_entry(tmp / entry)
        removed.append(entry)
    return removed


def _resolved(recipe: Recipe) -> dict[str, Any]:
    """The recipe with every model path absolute and resolved (for the fingerprint)."""
    def resolve(p: str) -> str:
        return p if is_generated(p) else str(Path(p).resolve())

    data = recipe.to_dict()
    data["base"] = resolve(recipe.base)
    for step in data["steps"]:
        step["model"] = resolve(step["model"])
    if recipe.tokenizer_source != "base":
        data["tokenizer_source"] = str(Path(recipe.tokenizer_source).resolve())
    return data


def _write(plan_: Plan, tmp: Path, layout: list, metadata: dict[str, str], settings: Settings,
           ray_address: str | None, progress: Callable[[int], None] | None, on_plan: Callable[[Plan], None] | None,
           earlier: Any, print_: dict[str, Any]) -> tuple[list[StepReport], MergeReport]:
    """The pass into ``tmp``, continuing ``earlier`` (a journal) when given."""
    recipe = plan_.recipe
    settings = _resume_settings(earlier, settings)
    removed = _prune(tmp, ShardedWriter.file_names(layout, recipe.shard_size)) if earlier is not None else []
    if on_plan:
        on_plan(plan_)
    started = time.perf_counter()
    writer = ShardedWriter(tmp, layout, recipe.shard_size, metadata, resume=earlier is not None)
    try:
        done, written = _adopt(earlier, writer, plan_, settings, tmp, bool(recipe.steps), removed)
        pass_ = ChainPass(plan_, writer) if recipe.steps else CopyPass(plan_.tasks, writer)
        _run_journaled(pass_, done, tmp, print_, writer, settings, progress, ray_address)
        steps = getattr(pass_, "steps", [])
        warn_no_ops(steps)
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    report = _report(recipe, started, recipe.dtype or "as base", pass_, {
        "files": [f.name for f in files], "copied": [], "total_size": writer.total_size,
        "tensors": len(plan_.tasks), "parameters": plan_.base.num_params,
        "checksums": checksums.record(_tensors_by_file(writer), pass_.checksums(), settings.chunk,
                                      writer.header_crcs())},
        {"tensors": len(done), "output_bytes": written} if earlier is not None else None)
    return steps, report


def _tensors_by_file(writer: ShardedWriter) -> dict[str, list[str]]:
    files: dict[str, list[str]] = {}
    for name, fname in writer.weight_map.items():  # in file order
        files.setdefault(fname, []).append(name)
    return files


def _copy_side_files(plan_: Plan, dest: Path, regenerated: tuple[str, ...] = ()) -> list[str]:
    """Every non-weight file of the base (configs, every tokenizer file, sentence-transformers'
    files and folders, ...), with the tokenizer files from the tokenizer source instead when
    one is given; ``regenerated`` (the model card) is left to the caller. Links that lead out of
    a model directory are not followed (a warning names them). Returns what was copied."""
    import warnings

    from ..core.errors import NearswapWarning
    from ..core.files import open_regular
    from ..formats import side_files

    recipe = plan_.recipe
    base_dir = plan_.base.directory
    copied: list[str] = []
    jobs: list[tuple[str, Path]] = []
    if base_dir is not None:
        skip = set(regenerated) | (set(TOKENIZER_FILES) if recipe.tokenizer_source != "base" else set())
        found, left_out = side_files(base_dir, skip)
        jobs += found
        for rel in left_out:
            warnings.warn(f"{base_dir / rel} was not copied: it is a link leading out of the model directory, "
                          "a linked folder or not a regular file", NearswapWarning)
    if recipe.tokenizer_source != "base":
        src = Path(recipe.tokenizer_source)
        found, left_out = side_files(src)
        jobs += [(rel, path) for rel, path in found if rel in TOKENIZER_FILES]
    for rel, path in jobs:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = open_regular(path, "side file")
        try:
            with os.fdopen(fd, "rb", closefd=False) as src_f, open(target, "wb") as out:
                shutil.copyfileobj(src_f, out, 1 << 20)
        except OSError as e:
            raise NearswapError(f"cannot copy {path} to {target}: {e.strerror}") from None
        finally:
            os.close(fd)
        copied.append(rel)
    if base_dir is None and plan_.base.side_files is not None:  # e.g. a GGUF base: from its metadata
        copied += plan_.base.side_files(dest, skip_tokenizer=recipe.tokenizer_source != "base")
    config = dest / "config.json"
    if config.exists() and recipe.dtype:
        data = json.loads(config.read_text())
        data["torch_dtype"] = BY_NAME[recipe.dtype].hf_name
        config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


# ---------------------------------------------------------------- GGUF in, GGUF out


def gguf_types(plan_: Plan, type_name: str) -> list[Any]:
    """The GGML type of each output tensor: the base's own (``like-base``), or ``type_name``
    for matrices (F16 where a row does not fill whole blocks) and F32 for the rest, as
    llama.cpp's quantizer does."""
    from gguf import GGMLQuantizationType as Q

    from ..formats.gguf_writer import tensor_type

    if type_name == "like-base":
        return [cast(Any, t.base.source).qtype for t in plan_.tasks]  # (GGUF inputs: a GGUFSource each)
    try:
        qtype = Q[type_name.upper()]
    except KeyError:
        raise NearswapError(f"unknown GGUF type {type_name!r}; give like-base or a GGML type such as "
                            "f16, bf16, q8_0, q4_0, q4_k, q6_k") from None
    return [tensor_type(t.shape, qtype) for t in plan_.tasks]


def gguf_plan(recipe: Recipe, type_name: str = "like-base") -> tuple[Plan, list[Any]]:
    """The plan of a merge into a .gguf file (inputs kept in their own types) and each tensor's
    GGUF type; the plan's output bytes are the file's tensor bytes in those types."""
    from ..formats.gguf_writer import coded_bytes

    plan_ = plan(recipe, native=True)
    types = gguf_types(plan_, type_name)
    plan_.stored = {t.name: coded_bytes(t.numel, q) for t, q in zip(plan_.tasks, types)}
    return plan_, types


def plan_for(recipe: Recipe, out: str | Path, gguf_type: str | None = None) -> Plan:
    """The plan of a merge into ``out``: a directory, a .gguf file (its types' sizes) or null:."""
    if not is_null(out) and Path(out).suffix.lower() == ".gguf":
        return gguf_plan(recipe, gguf_type or "like-base")[0]
    return plan(recipe)


def merge_to_gguf(recipe: Recipe, out: str | Path, type_name: str = "like-base", *, force: bool = False,
                  threads: int | None = None, settings: Settings | None = None, ray_address: str | None = None,
                  progress: Callable[[int], None] | None = None,
                  on_plan: Callable[[Plan], None] | None = None, resume: str = "auto") -> MergeReport:
    """Merge GGUF inputs of one architecture, any architecture, in their own names and values
    into the GGUF file ``out``: every metadata value of the base (vocabulary, chat template)
    kept, each tensor coded as ``type_name`` (``like-base``: the base tensor's own type).
    Written inside a hidden partial directory with a journal, and renamed when complete; a
    killed run is continued by the next run of the same merge (``resume`` as for
    ``write_checkpoint``)."""
    import gguf

    from ..formats.gguf_writer import GGUFStreamWriter, file_type, metadata_of, quantizer_for
    from ..runtime import journal
    from ..runtime.output import resumable_file

    if resume not in RESUME_MODES:
        raise InvalidValue(f"resume must be one of {', '.join(RESUME_MODES)}, got {shown(resume)}")
    out = Path(out)
    if recipe.dtype:
        raise NearswapError("--dtype is for directory outputs; a .gguf output takes --type (like-base, f16, q8_0, ...)")
    if recipe.tokenizer_source != "base":
        raise NearswapError("a .gguf output keeps the base's vocabulary; tokenizer_source is for directory outputs")
    if ray_address:
        raise NearswapError("--ray writes directory outputs for now; merge into a directory, or drop --ray for a .gguf")
    settings = settings or Settings(threads=threads)
    if settings.chunk % 256:  # chunks must start on block boundaries (blocks are 1, 32 or 256 elements)
        raise NearswapError(f"a chunk of {settings.chunk} elements is not a multiple of 256, which a .gguf output needs")
    check_name(out)
    plan_, types = gguf_plan(recipe, type_name)
    check_output_not_input(out, [plan_.base, *plan_.secondaries])
    coders = {q.name: quantizer_for(q) for q in set(types)}  # refuses up front what cannot be written here
    layout = [(t.name, t.shape, q) for t, q in zip(plan_.tasks, types)]
    print_ = journal.fingerprint(
        _resolved(recipe), [f for m in (plan_.base, *plan_.secondaries) for f in _input_files(m)],
        {"type": type_name, "tensors": {name: {"shape": list(shape), "type": q.name} for name, shape, q in layout}},
        __version__)
    earlier: list[journal.Journal] = []

    def usable(partial: Path) -> bool:  # not if killed just after its rename (the directory is left without it)
        return os.path.isfile(partial / out.name) and not os.path.islink(partial / out.name)

    partial: list[Path] = []
    adopt = _adopter(resume, print_, out, earlier, usable)
    with _keeping_partial(resume, partial):
        with resumable_file(out, force, adopt, keep=lambda e: resume != "never" and isinstance(e, WriteFailed)) as tmp:
            partial.append(tmp)
            previous = earlier[0] if earlier else None
            settings = _resume_settings(previous, settings)
            removed = _prune(tmp, [out.name]) if previous else []
            check_free_space(out, plan_.out_bytes - plan_.out_bytes_of(previous.done if previous else ()))
            if on_plan:
                on_plan(plan_)
            started = time.perf_counter()
            arch, kv = metadata_of(plan_.base.path, drop=() if type_name == "like-base" else ("general.file_type",))
            kv = [entry for entry in kv if not entry[0].startswith("nearswap.")]  # a merge of a merge: this run's own
            if type_name != "like-base":
                kind = file_type(gguf.GGMLQuantizationType[type_name.upper()])
                if kind is not None:
                    kv.append(("general.file_type", kind, gguf.GGUFValueType.UINT32, None))
            kv.append(("nearswap.version", __version__, gguf.GGUFValueType.STRING, None))
            kv.append(("nearswap.recipe", json.dumps(recipe.to_dict()), gguf.GGUFValueType.STRING, None))
            writer = GGUFStreamWriter(tmp / out.name, arch, kv, layout, resume=previous is not None)
            try:
                done, written = _adopt(previous, writer, plan_, settings, tmp, True, removed)
                pass_ = ChainPass(plan_, writer)
                _run_journaled(pass_, done, tmp, print_, writer, settings, progress)
                steps = pass_.steps
                warn_no_ops(steps)
                sealed = writer.seal(settings.chunk, pass_.checksums())
                writer.close()
            except BaseException:
                writer.abort()
                raise
            counts: dict[str, int] = {}
            for q in types:
                counts[q.name] = counts.get(q.name, 0) + 1
            report = _report(recipe, started, type_name, pass_, {
                "files": [out.name], "total_size": writer.total_size, "tensors": len(plan_.tasks),
                "parameters": plan_.base.num_params, "gguf_architecture": arch, "types": counts,
                "quantizers": coders, "checksums": sealed},
                {"tensors": len(done), "output_bytes": written} if earlier else None)
    return report

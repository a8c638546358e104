"""The threshold curve: how many weights a NearSwap pass swaps at any t, without merging.

One streaming pass over BASE and the first secondary computes d = |base - s1| in float32
exactly as the merge does and counts, for every requested t, the elements with
0 < d <= t (swapped) and d == 0 (identical) — exact integers, per tensor, so also per
tensor kind and per layer — plus a histogram of d for the plotted curve (every 8th element,
binned at 16 points per octave). Later steps of a chain see the running result, which
depends on t, so for several secondaries the chain is simulated at each requested t (the
merge kernel, nothing written) and its exact per-step counts are reported.

Safetensors inputs are read through memory maps, chunk by chunk, without a copy: the pass
costs little more than the page cache's own bandwidth, and each chunk's pages are released
once counted, so memory stays bounded however large the model. numpy is needed only for
``--json`` and the plots.
"""

from __future__ import annotations

import math
import re
import threading
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

from ..core import kernels, plots
from ..core.errors import InvalidValue, NearswapError
from ..formats.safetensors import FileReader, MappedReader
from ..merging import recipe
from ..merging.plan import Plan, check_output_not_input, plan
from ..runtime import stream
from ..runtime.output import atomic_directory, check_replaceable
from ..runtime.stream import ChunkBuffers, Settings, work_items

if TYPE_CHECKING:
    import numpy as np

DEFAULT_TS = (1e-4, 3e-4, 1e-3, 2.5e-3, 5e-3, 1e-2)
# Elements per block when a chain is simulated at every t: a block of each input fits in L2.
CHAIN_BLOCK = 1 << 16
# A work item spans this many of the merge's chunks, counted (and their pages released) one by
# one: resident memory as with single chunks, an eighth of the hand-offs between threads.
CHUNKS_PER_ITEM = 8

# Tensor kinds by name, first match wins (HF names; GGUF inputs are presented under HF names).
KINDS = [
    (re.compile(r"self_attn\.q_proj\."), "attn_q"),
    (re.compile(r"self_attn\.k_proj\."), "attn_k"),
    (re.compile(r"self_attn\.v_proj\."), "attn_v"),
    (re.compile(r"self_attn\.o_proj\."), "attn_o"),
    (re.compile(r"mlp\.gate_proj\."), "mlp_gate"),
    (re.compile(r"mlp\.up_proj\."), "mlp_up"),
    (re.compile(r"mlp\.down_proj\."), "mlp_down"),
    (re.compile(r"embed_tokens|wte\.|word_embeddings"), "embed"),
    (re.compile(r"lm_head|embed_out"), "head"),
    (re.compile(r"norm"), "norm"),
]
KIND_ORDER = [k for _, k in KINDS] + ["other"]
LAYER = re.compile(r"layers\.(\d+)\.")


def kind_of(name: str) -> str:
    return next((kind for pattern, kind in KINDS if pattern.search(name)), "other")


def layer_of(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def _zeros(n: int) -> array:
    return array("q", bytes(8 * n))


@dataclass
class Counts:
    """Exact counts over a set of elements: swapped[k] is 0 < d <= ts[k]."""

    total: int = 0
    identical: int = 0
    nonfinite: int = 0
    swapped: list[int] = field(default_factory=list)

    def add(self, total: int, identical: int, nonfinite: int, swapped: Sequence[int]) -> None:
        self.total += total
        self.identical += identical
        self.nonfinite += nonfinite
        self.swapped = [a + b for a, b in zip(self.swapped, swapped)] if self.swapped else list(swapped)

    def to_json(self, ts: Sequence[float]) -> dict[str, Any]:
        sw = self.swapped or [0] * len(ts)
        return {"total": self.total, "identical": self.identical, "nonfinite": self.nonfinite,
                "swapped": {repr(t): int(n) for t, n in zip(ts, sw)},
                "share": {repr(t): (int(n) / self.total if self.total else 0.0) for t, n in zip(ts, sw)}}


@dataclass
class StepCurve:
    """One step of the chain: exact counts by tensor; totals, kinds and layers derive from them."""

    model: str
    tensors: dict[str, Counts] = field(default_factory=dict)

    def group(self, key: Callable[[str], Any]) -> dict[Any, Counts]:
        out: dict[Any, Counts] = {}
        for name, c in self.tensors.items():
            g = out.setdefault(key(name), Counts())
            g.add(c.total, c.identical, c.nonfinite, c.swapped)
        return out

    @property
    def totals(self) -> Counts:
        return self.group(lambda _: "all")["all"]


@dataclass
class Sample:
    """What a sampled curve read and how sure its shares are: ``stderr[k][j]`` is the standard
    error of step k's share at ts[j], between blocks (a ratio estimator over equal-position
    blocks of every tensor)."""

    fraction: float
    blocks: int
    elements: int  # sampled
    of: int  # in all
    bytes_read: int
    stderr: list[list[float]]


@dataclass
class CurveResult:
    ts: list[float]
    base: str
    steps: list[StepCurve]
    hist_by_kind: dict[str, array]  # step 1's sample of d, binned (kernels.HIST_*)
    sample: Sample | None = None  # None: every element counted (exact)

    @property
    def hist_all(self) -> np.ndarray:
        import numpy as np

        return sum((np.frombuffer(h, np.int64) for h in self.hist_by_kind.values()), np.zeros(kernels.HIST_BINS, np.int64))

    @property
    def edges(self) -> np.ndarray:
        """The upper edge of every histogram bin: d < edge[k] exactly for the samples in bins <= k."""
        import numpy as np

        bits = (np.arange(kernels.HIST_BINS, dtype=np.uint32) + kernels.HIST_LO + 1) << kernels.HIST_SHIFT
        return bits.view(np.float32).astype(np.float64)

    def curve_share(self, hist: Any) -> np.ndarray:
        """Share of sampled elements with 0 < d < edge: bin 0 (d < 2^-40, zeros included) is left
        out, as identical weights are not swapped ones."""
        import numpy as np

        hist = np.frombuffer(hist, np.int64) if isinstance(hist, array) else hist
        total = hist.sum()
        below = np.cumsum(hist) - hist[0]
        return below / total if total else np.zeros(len(hist))

    @property
    def plotted(self) -> slice:
        """The bins worth plotting: from the first that holds a nonzero |d| to the last."""
        import numpy as np

        filled = np.nonzero(self.hist_all[1:])[0] + 1
        return slice(int(filled[0]), int(filled[-1]) + 1) if len(filled) else slice(0, 0)

    def to_json(self) -> dict[str, Any]:
        steps = []
        for step in self.steps:
            layers: dict[str, dict[str, Any]] = {}
            for (layer, kind), c in step.group(lambda n: (layer_of(n), kind_of(n))).items():
                if layer is not None:
                    layers.setdefault(str(layer), {})[kind] = c.to_json(self.ts)
            steps.append({"model": step.model, **step.totals.to_json(self.ts),
                          "by_kind": {k: c.to_json(self.ts) for k, c in sorted(step.group(kind_of).items(),
                                                                                key=lambda kv: KIND_ORDER.index(kv[0]))},
                          "by_layer": dict(sorted(layers.items(), key=lambda kv: int(kv[0])))})
        keep = self.plotted
        sampled = {} if self.sample is None else {"sample": {
            "fraction": self.sample.fraction, "blocks": self.sample.blocks, "elements": self.sample.elements,
            "of": self.sample.of, "bytes_read": self.sample.bytes_read,
            "stderr": [{repr(t): e for t, e in zip(self.ts, per_t)} for per_t in self.sample.stderr]}}
        return {
            "base": self.base, "ts": self.ts, "steps": steps, **sampled,
            "curve": {"step": 1, "sample_every": kernels.HIST_STRIDE, "d_below": self.edges[keep].tolist(),
                      "share": self.curve_share(self.hist_all)[keep].tolist(),
                      "by_kind": {k: self.curve_share(h)[keep].tolist() for k, h in self.hist_by_kind.items()}},
        }


class _ThreadHistograms(threading.local):
    """Each worker thread's own step-1 histograms by tensor kind, added to in place by the kernel."""

    def __init__(self, registry: list[dict[str, array]]) -> None:
        self.by_kind: dict[str, array] = {}
        registry.append(self.by_kind)  # runs once per thread, on its first use


class Counted(NamedTuple):
    """What one work item of the count pass found."""

    index: int  # the tensor
    n: int  # elements
    identical: int
    nonfinite: int
    le: array  # step 1: elements with |d| <= t, per t
    later: list[tuple[int, list[Any]]]  # steps 2+: (elements, per-t step counts) per block
    nbytes: int  # input bytes read


class CountPass:
    """Curve's pass: exact step-1 counts at every t (and the step-1 |d| histogram by kind), and
    for chains the per-step counts at each t, without writing anything. The inputs are mapped
    (zero-copy from the page cache; a chunk's pages dropped once counted) or, for GGUF,
    decoded into per-thread buffers; all of it opened lazily where the pass runs, so the pass
    pickles."""

    def __init__(self, tasks: list[Any], ts: Sequence[float], secondaries: Sequence[str | Path],
                 sample: float | None = None) -> None:
        self.tasks = tasks
        self.ts = list(ts)
        self.kinds = [kind_of(t.name) for t in tasks]
        self.steps = [StepCurve(str(s)) for s in secondaries]
        self.registry: list[dict[str, array]] = []  # each thread's histograms (this process)
        self.sample = sample  # None: every element; else the share of SAMPLE_BLOCK blocks read (sample_items)
        self.blocks: list[tuple[int, list[list[int]]]] = []  # sampled: (elements, swapped per step per t) per block
        self.bytes_read = 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_io", "registry")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, registry=[])

    def _open(self) -> tuple[MappedReader | None, FileReader, ChunkBuffers, _ThreadHistograms]:
        io = self.__dict__.get("_io")
        if io is None:
            with _OPEN_LOCK:
                io = self.__dict__.get("_io")
                if io is None:
                    # a sample reads scattered blocks: positional reads with readahead off (a page fault
                    # in a map, or a read, would otherwise pull in megabytes around each block)
                    io = self._io = (None if self.sample else MappedReader(), FileReader(random=bool(self.sample)),
                                     ChunkBuffers(), _ThreadHistograms(self.registry))
        return io

    def items(self, settings: Settings) -> Iterator[tuple[int, int, int, int]]:
        if self.sample:
            blocks = list(sample_items([t.numel for t in self.tasks], self.sample))
            reader = self._open()[1]
            for i, start, n in blocks:  # every block asked for at once: the disk serves them in its own order
                for info in (self.tasks[i].base, *self.tasks[i].secondaries):
                    reader.will_need(info, start, n)
            for i, start, n in blocks:
                yield i, start, n, n
            return
        for i, start, n in work_items([t.numel for t in self.tasks], CHUNKS_PER_ITEM * settings.chunk):
            yield i, start, n, settings.chunk

    def work(self, item: tuple[int, int, int, int]) -> Counted:
        i, start, n, chunk = item
        mapped, reader, buffers, histograms = self._open()
        task = self.tasks[i]
        ts = self.ts
        inputs = [task.base, *task.secondaries]
        hist = histograms.by_kind.get(self.kinds[i])
        if hist is None:
            hist = histograms.by_kind[self.kinds[i]] = _zeros(kernels.HIST_BINS)
        le = _zeros(len(ts))
        identical = nonfinite = 0
        later: list[tuple[int, list[Any]]] = []
        for sub in range(start, start + n, chunk):  # pages are released every chunk
            m = min(chunk, start + n - sub)
            views = [mapped.view(info, sub, m) if mapped is not None and mapped.mappable(info)  # zero-copy
                     else reader.read(info, sub, buffers.get(k, info.dtype, m))  # decoded (GGUF)
                     for k, info in enumerate(inputs)]
            counts = kernels.threshold_counts(views[0], task.base.dtype, views[1], task.secondaries[0].dtype, ts, le, hist)
            identical += counts.identical
            nonfinite += counts.nonfinite
            if len(views) > 2:  # the chain at each t: exact per-step counts against the running result
                later += _chains(task, views, ts, buffers.get(-1, task.out_dtype, min(m, CHAIN_BLOCK)))
            del views
            for info in inputs:
                if mapped is not None and mapped.mappable(info):
                    # resident memory stays bounded by the chunks in flight
                    mapped.release(info, sub, m, more=sub + m < start + n)
        return Counted(i, n, identical, nonfinite, le, later, sum(info.dtype.itemsize for info in inputs) * n)

    def collect(self, result: Counted) -> None:
        name = self.tasks[result.index].name
        first = [c - result.identical for c in result.le]
        self.steps[0].tensors.setdefault(name, Counts()).add(result.n, result.identical, result.nonfinite, first)
        later = [[0] * len(self.ts) for _ in self.steps[1:]]
        for m, per_t in result.later:
            for k in range(1, len(self.steps)):
                step_k = [counts[k] for counts in per_t]
                self.steps[k].tensors.setdefault(name, Counts()).add(m, step_k[0].identical, step_k[0].nonfinite,
                                                                     [c.swapped for c in step_k])
                later[k - 1] = [a + c.swapped for a, c in zip(later[k - 1], step_k)]
        self.bytes_read += result.nbytes
        if self.sample:
            self.blocks.append((result.n, [first, *later]))

    def sample_result(self, total: int) -> Sample | None:
        """The sample's size and each share's standard error between blocks (None: exact)."""
        if not self.sample:
            return None
        n = sum(b for b, _ in self.blocks)
        count = len(self.blocks)
        stderr = []
        for k in range(len(self.steps)):
            per_t = []
            for j in range(len(self.ts)):
                p = sum(sw[k][j] for _, sw in self.blocks) / n if n else 0.0
                resid = sum((sw[k][j] - p * b) ** 2 for b, sw in self.blocks)
                per_t.append(math.sqrt(count / (count - 1) * resid) / n if count > 1 and n else float("nan"))
            stderr.append(per_t)
        return Sample(self.sample, count, n, total, self.bytes_read, stderr)

    def close(self) -> None:
        io = self.__dict__.pop("_io", None)
        if io is not None:
            if io[0] is not None:
                io[0].close()
            io[1].close()

    def histograms(self) -> dict[str, array]:
        """The step-1 histograms by kind, summed over the threads that ran here."""
        by_kind: dict[str, array] = {}
        for per_thread in self.registry:
            for kind, h in per_thread.items():
                total = by_kind.setdefault(kind, _zeros(kernels.HIST_BINS))
                for b, v in enumerate(h):
                    total[b] += v
        return dict(sorted(by_kind.items(), key=lambda kv: KIND_ORDER.index(kv[0])))


_OPEN_LOCK = threading.Lock()

# A sampled curve reads blocks of this many elements (128 KB of bf16) at fixed positions.
SAMPLE_BLOCK = 1 << 16


def sample_items(sizes: Sequence[int], fraction: float) -> Iterator[tuple[int, int, int]]:
    """A systematic sample of the model: its tensors' SAMPLE_BLOCK-element blocks (a tensor's
    last block may be short) numbered through the model in order, and every
    ``round(1 / fraction)``-th of them read, starting half a stride in. Every block has the same
    chance to be read, so the shares of the sample estimate the model's (a tensor smaller than
    a stride may not be read at all); the positions are the same in every model, as their
    tensors line up element for element. A fraction too small to reach one block reads one
    block at least (the middle one). Yields (tensor, first element, elements)."""
    total = sum(-(-size // SAMPLE_BLOCK) for size in sizes)
    stride = max(1, min(round(1 / fraction), total))
    seen = 0  # blocks numbered so far
    for i, size in enumerate(sizes):
        blocks = -(-size // SAMPLE_BLOCK)
        first = (stride // 2 - seen) % stride
        for b in range(first, blocks, stride):
            start = b * SAMPLE_BLOCK
            yield i, start, min(SAMPLE_BLOCK, size - start)
        seen += blocks


# Where the inputs are more than this machine's memory (no page cache holds them: the full curve
# reads them all from disk, 276 GB for a 70B pair), the command estimates from this fraction.
AUTO_SAMPLE = 0.01


def memory_bytes() -> int:
    """This machine's physical memory."""
    import os

    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_sample(plan_: Plan) -> tuple[float | None, str]:
    """The command's default for a curve of ``plan_`` (``curve_plan``): every element (None)
    while the inputs fit in memory, else ``AUTO_SAMPLE``, with the sentence that says why."""
    reads, memory = plan_.read_bytes, memory_bytes()
    if reads <= memory:
        return None, ""
    return AUTO_SAMPLE, (f"the inputs ({reads / 1e9:.1f} GB) are more than this machine's memory "
                         f"({memory / 1e9:.1f} GB): a {100 * AUTO_SAMPLE:g}% sample by default; --exact reads every element")


def curve_plan(base: str | Path, secondaries: Sequence[str | Path], dtype: str | None = None) -> Plan:
    """The same preflight as a merge's (names, shapes, architectures; headers only). ``dtype``:
    that of the merge the counts are for (a chain's running result is stored in it between
    steps, so steps 2+ depend on it; default: as the base)."""
    rec = recipe.build({"base": str(base), "steps": [{"model": str(s), "t": 0} for s in secondaries],
                        **({"dtype": dtype} if dtype else {})}, "curve")
    return plan(rec)


def compute(base: str | Path, secondaries: Sequence[str | Path], ts: Sequence[float] = DEFAULT_TS, *,
            threads: int | None = None, settings: Settings | None = None,
            progress: Callable[[int], None] | None = None,
            on_plan: Callable[[Plan], None] | None = None, sample: float | None = None,
            dtype: str | None = None, plan_: Plan | None = None) -> CurveResult:
    """Exact swap counts at every t in ``ts`` (per step, tensor, kind, layer) and the step-1 curve;
    with ``sample`` (a fraction in (0, 1]), counts over a systematic sample of blocks
    (``sample_items``) and the standard error of each share (``CurveResult.sample``). ``dtype``
    as for ``curve_plan``; ``plan_``: that plan, when the caller made it already."""
    if sample is not None and not (isinstance(sample, (int, float)) and 0 < sample <= 1):
        raise InvalidValue(f"--sample must be a fraction in (0, 1], got {sample!r}")
    ts = sorted(kernels.check_t(t) for t in ts)
    if not 1 <= len(ts) <= kernels.MAX_THRESHOLDS:
        raise NearswapError(f"give 1 to {kernels.MAX_THRESHOLDS} values of t (got {len(ts)})")
    if plan_ is None:
        plan_ = curve_plan(base, secondaries, dtype)
    if on_plan:
        on_plan(plan_)
    pass_ = CountPass([t for t in plan_.tasks if t.merged], ts, secondaries, sample if sample != 1 else None)
    stream.run(pass_, settings or Settings(threads=threads), progress)
    total = sum(t.numel for t in pass_.tasks)
    return CurveResult(list(ts), str(base), pass_.steps, pass_.histograms(), pass_.sample_result(total))


def _chains(task: Any, views: list[Any], ts: Sequence[float], scratch: Any) -> list[tuple[int, list[Any]]]:
    """The chain over one chunk at every t: (elements, per-t step counts) for each block of
    CHAIN_BLOCK elements. Block by block, a block of every input comes from memory once and
    stays in cache for all the t: three 0.51B secondaries at six t take 3.2 s this way, 5.4 s
    when each t ran over the whole chunk in turn."""
    dtypes = [task.base.dtype, *(s.dtype for s in task.secondaries)]
    n = len(views[0]) // dtypes[0].itemsize
    out = []
    for lo in range(0, n, CHAIN_BLOCK):
        hi = min(n, lo + CHAIN_BLOCK)
        block = [v[lo * d.itemsize:hi * d.itemsize] for v, d in zip(views, dtypes)]
        pairs = list(zip(block[1:], dtypes[1:]))
        res = scratch[:(hi - lo) * task.out_dtype.itemsize]
        out.append((hi - lo, [kernels.chain_raw(res, task.out_dtype, block[0], dtypes[0], pairs, [t] * len(pairs),
                                                count_net=False).steps for t in ts]))
    return out


def format_table(result: CurveResult, by_kind: bool = True) -> str:
    """t by step, the exact % swapped (or, sampled, the estimate ± its standard error); then
    (``by_kind``) step 1 by tensor kind."""
    sample = result.sample
    if sample is None:
        lines = ["% of weights fully swapped (0 < |d| <= t), exact:"]
    else:
        lines = [f"% of weights fully swapped (0 < |d| <= t), estimated from a systematic sample: {sample.blocks:,} "
                 f"blocks, {sample.elements:,} of {sample.of:,} elements ({100 * sample.elements / sample.of:.2f}%), "
                 f"{sample.bytes_read / 1e9:.3f} GB read; ± one standard error between blocks:"]
    width = 10 if sample is None else 18
    lines.append("t".ljust(10) + "".join(f"step {k + 1}".rjust(width) for k in range(len(result.steps))))
    totals = [s.totals for s in result.steps]
    for j, t in enumerate(result.ts):
        if sample is None:
            lines.append(f"{t:<10g}" + "".join(f"{100 * c.swapped[j] / c.total:9.2f}%" for c in totals))
        else:
            lines.append(f"{t:<10g}" + "".join(f"{100 * c.swapped[j] / c.total:9.2f}% ±{100 * sample.stderr[k][j]:.2f}"
                                               .rjust(width) for k, c in enumerate(totals)))
    lines.append("identical (|d| = 0): " + ", ".join(f"step {k + 1} {100 * c.identical / c.total:.2f}%"
                                                      for k, c in enumerate(totals)))
    if not by_kind:
        return "\n".join(lines)
    lines.append("\nstep 1 by tensor kind:" + (" (in the sample)" if sample is not None else ""))
    lines.append("kind".ljust(10) + "".join(f"{t:>10g}" for t in result.ts)
                 + ("   weights" if sample is None else "   sampled"))
    for kind, c in sorted(result.steps[0].group(kind_of).items(), key=lambda kv: KIND_ORDER.index(kv[0])):
        lines.append(kind.ljust(10) + "".join(f"{100 * n / c.total:9.2f}%" for n in c.swapped) + f"  {c.total:>9,}")
    return "\n".join(lines)


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NearswapError("plots need matplotlib: pip install 'nearswap[plot]'") from None


def check_plot_output(directory: str | Path, force: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """What ``write_plots`` would refuse, checked before the pass: an existing directory
    (without ``force``; with it, anything but an earlier nearswap output), a directory that
    holds one of ``inputs``' files, or no matplotlib."""
    from ..formats import open_model

    check_replaceable(Path(directory), force)
    check_output_not_input(Path(directory), [open_model(p, "input") for p in inputs])
    _check_matplotlib()


def write_plots(result: CurveResult, directory: str | Path, at: float | None = None, force: bool = False) -> list[Path]:
    """``plot`` into a new directory that appears whole or not at all, with the numbers behind
    the plots in ``curve.json`` (an existing plot directory is replaced only with ``force``,
    once the new one is complete). Returns the files' final paths."""
    import json

    from .._version import __version__

    directory = Path(directory)
    with atomic_directory(directory, force) as tmp:
        written = plot(result, tmp, at)
        (tmp / "curve.json").write_text(json.dumps({"nearswap_version": __version__, **result.to_json()}, indent=1) + "\n")
        written.append(tmp / "curve.json")
    return [directory / p.name for p in written]


def plot(result: CurveResult, directory: str | Path, at: float | None = None) -> list[Path]:
    """Swap share vs t (log axis, a line per tensor kind) and a layer x kind heatmap at ``at``;
    PNG and SVG each, into an existing ``directory``. Returns the files written."""
    import numpy as np

    directory = Path(directory)
    at = result.ts[0] if at is None else at
    written = []

    fig, ax = plots.figure((8, 5))
    keep = result.plotted
    for kind, h in result.hist_by_kind.items():
        ax.plot(result.edges[keep], 100 * result.curve_share(h)[keep], lw=1, label=kind)
    ax.plot(result.edges[keep], 100 * result.curve_share(result.hist_all)[keep], color="black", lw=2.5, label="all")
    totals = result.steps[0].totals
    ax.scatter(result.ts, [100 * n / totals.total for n in totals.swapped], color="black", zorder=5,
               label="step 1: exact, at the requested t")
    for k, step in enumerate(result.steps[1:], 2):  # later steps: exact at the requested t only
        later = step.totals
        ax.plot(result.ts, [100 * n / later.total for n in later.swapped], ls="--", marker="o", ms=4, lw=1,
                label=f"step {k}: {Path(step.model).name} (exact, at the requested t)")
    for t, n in zip(result.ts, totals.swapped):
        ax.annotate(f"{100 * n / totals.total:.1f}%", (t, 100 * n / totals.total), textcoords="offset points",
                    xytext=(6, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("t (threshold on |base - secondary|)")
    ax.set_ylabel("% of weights fully swapped (0 < |d| <= t)")
    ax.set_title(f"NearSwap swap share vs t, step 1: {Path(result.steps[0].model).name}"
                 + (f" (+ {len(result.steps) - 1} later steps)" if len(result.steps) > 1 else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    for ext in ("png", "svg"):
        plots.save(fig, directory / f"curve.{ext}", dpi=120, bbox_inches="tight")
        written.append(directory / f"curve.{ext}")

    j = min(range(len(result.ts)), key=lambda k: abs(np.log(result.ts[k] / at)) if at > 0 else k)
    grid: dict[tuple[int, str], float] = {}
    for (layer, kind), c in result.steps[0].group(lambda n: (layer_of(n), kind_of(n))).items():
        if layer is not None:
            grid[(layer, kind)] = 100 * c.swapped[j] / c.total
    if grid:
        layers = sorted({layer for layer, _ in grid})
        kinds = [k for k in KIND_ORDER if any(kind == k for _, kind in grid)]
        data = np.full((len(layers), len(kinds)), np.nan)
        for (layer, kind), v in grid.items():
            data[layers.index(layer), kinds.index(kind)] = v
        fig, ax = plots.figure((1.1 * len(kinds) + 2, 0.22 * len(layers) + 1.5))
        im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_ylabel("layer")
        ax.set_title(f"% swapped at t = {result.ts[j]:g}, step 1, by layer and tensor kind")
        fig.colorbar(im, ax=ax, label="% swapped")
        for ext in ("png", "svg"):
            plots.save(fig, directory / f"heatmap.{ext}", dpi=120, bbox_inches="tight")
            written.append(directory / f"heatmap.{ext}")
    return written

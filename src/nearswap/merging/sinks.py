"""The three sinks of a merge, one entry point: ``merge`` writes an HF checkpoint directory
(``write_checkpoint``), a .gguf file (``merge_to_gguf``) or nothing (``merge_to_null``), each
atomically and resumably where something is stored, and each with the one report builder
(``_report``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from .._version import __version__
from ..core import checksums, kernels
from ..core.errors import (
    NearswapError,
    WriteFailed,
)
from ..formats.null import NullWriter, is_null
from ..formats.safetensors import ShardedWriter
from ..runtime import stream
from ..runtime.output import atomic_directory, check_free_space, check_name
from ..runtime.stream import Settings
from .adoption import (
    adopted,
    adopter,
    check_resume_mode,
    keeping_partial,
    prune,
    resolved,
    resume_settings,
    run_journaled,
)
from .layout import RECIPE_NAME, REPORT_NAME
from .passes import ChainPass, CopyPass
from .plan import Plan, check_output_not_input, gguf_plan, input_files, plan, warn_no_ops
from .recipe import Recipe
from .report import MergeReport, StepReport
from .side_files import copy_side_files


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

    check_resume_mode(resume)
    out = Path(out)
    check_name(out)
    settings = settings or Settings(threads=threads)
    plan_ = plan(recipe)
    extra = [Path(recipe.tokenizer_source)] if recipe.tokenizer_source != "base" else []
    check_output_not_input(out, [plan_.base, *plan_.secondaries], extra)
    metadata = {"format": "pt", "nearswap_version": __version__, **provenance}
    layout = [(t.name, t.out_dtype, t.shape) for t in plan_.tasks]
    print_ = journal.fingerprint(
        resolved(recipe), [f for m in (plan_.base, *plan_.secondaries) for f in input_files(m)],
        {**ShardedWriter.layout(layout, recipe.shard_size), "metadata": metadata}, __version__)
    earlier: list[journal.Journal] = []
    adopt = adopter(resume, print_, out, earlier)
    partial: list[Path] = []
    with keeping_partial(resume, partial):
        with atomic_directory(out, force, adopt=adopt, keep=lambda e: resume != "never" and isinstance(e, WriteFailed),
                              scratch=(journal.JOURNAL_NAME,)) as tmp:  # the lock on OUT is held to the rename
            partial.append(tmp)
            done = earlier[0].done if earlier else {}
            check_free_space(out, plan_.out_bytes - plan_.out_bytes_of(done))
            steps, report = _write(plan_, tmp, layout, metadata, settings, ray_address, progress, on_plan,
                                   earlier[0] if earlier else None, print_)
            report["output"]["copied"] = copy_side_files(plan_, tmp, regenerated)
            if finish:
                finish(tmp, report)
    return steps, report


def _write(plan_: Plan, tmp: Path, layout: list, metadata: dict[str, str], settings: Settings,
           ray_address: str | None, progress: Callable[[int], None] | None, on_plan: Callable[[Plan], None] | None,
           earlier: Any, print_: dict[str, Any]) -> tuple[list[StepReport], MergeReport]:
    """The pass into ``tmp``, continuing ``earlier`` (a journal) when given."""
    recipe = plan_.recipe
    settings = resume_settings(earlier, settings)
    removed = prune(tmp, ShardedWriter.file_names(layout, recipe.shard_size)) if earlier is not None else []
    if on_plan:
        on_plan(plan_)
    started = time.perf_counter()
    writer = ShardedWriter(tmp, layout, recipe.shard_size, metadata, resume=earlier is not None)
    try:
        done, written = adopted(earlier, writer, plan_, settings, tmp, bool(recipe.steps), removed)
        pass_ = ChainPass(plan_, writer) if recipe.steps else CopyPass(plan_.tasks, writer)
        run_journaled(pass_, done, tmp, print_, writer, settings, progress, ray_address)
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

    check_resume_mode(resume)
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
        resolved(recipe), [f for m in (plan_.base, *plan_.secondaries) for f in input_files(m)],
        {"type": type_name, "tensors": {name: {"shape": list(shape), "type": q.name} for name, shape, q in layout}},
        __version__)
    earlier: list[journal.Journal] = []

    def usable(partial: Path) -> bool:  # not if killed just after its rename (the directory is left without it)
        return os.path.isfile(partial / out.name) and not os.path.islink(partial / out.name)

    partial: list[Path] = []
    adopt = adopter(resume, print_, out, earlier, usable)
    with keeping_partial(resume, partial):
        with resumable_file(out, force, adopt, keep=lambda e: resume != "never" and isinstance(e, WriteFailed)) as tmp:
            partial.append(tmp)
            previous = earlier[0] if earlier else None
            settings = resume_settings(previous, settings)
            removed = prune(tmp, [out.name]) if previous else []
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
                done, written = adopted(previous, writer, plan_, settings, tmp, True, removed)
                pass_ = ChainPass(plan_, writer)
                run_journaled(pass_, done, tmp, print_, writer, settings, progress)
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

"""Resume: a killed merge's partial output continued by the next run of the same merge. The
journal's fingerprint decides whether an earlier run is this one (``adopter``); what it wrote is
re-checked before it is adopted (``adopted``), everything else in the partial directory removed
(``prune``), and the new run journals each tensor once its data are on disk (``run_journaled``)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import (
    InvalidValue,
    NearswapError,
    NearswapWarning,
    WriteFailed,
    shown,
)
from ..formats.generated import is_generated
from ..runtime import stream
from ..runtime.stream import Settings
from .passes import CopyPass
from .plan import Plan
from .recipe import Recipe
from .report import journaled_tallies_ok

RESUME_MODES = ("auto", "restart", "never")


def check_resume_mode(resume: str) -> None:
    if resume not in RESUME_MODES:
        raise InvalidValue(f"resume must be one of {', '.join(RESUME_MODES)}, got {shown(resume)}")


def resume_settings(earlier: Any, settings: Settings) -> Settings:
    """The settings of a run that continues ``earlier`` (a journal, or None): its chunk size
    (the same chunks, so the same tallies and CRCs)."""
    if earlier is not None and earlier.chunk and earlier.chunk != settings.chunk:
        settings = dataclasses.replace(settings, chunk=earlier.chunk)
    return settings


def adopted(earlier: Any, writer: Any, plan_: Plan, settings: Settings, tmp: Path, merged: bool,
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


def run_journaled(pass_: CopyPass, done: dict[str, Any], tmp: Path, print_: dict[str, Any], writer: Any,
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


def adopter(resume: str, print_: dict[str, Any], out: Path, earlier: list[Any],
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
def keeping_partial(resume: str, partial: list[Path]) -> Iterator[None]:
    """A write that failed (disk full, I/O error) says where its work is kept for the next run."""
    try:
        yield
    except WriteFailed as e:
        if resume != "never" and partial and partial[0].is_dir():
            raise WriteFailed(f"{e}; what was written is kept in {partial[0]}: the same command continues from "
                              "there (--no-resume discards it)") from None
        raise


def prune(tmp: Path, files: list[str]) -> list[str]:
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


def resolved(recipe: Recipe) -> dict[str, Any]:
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



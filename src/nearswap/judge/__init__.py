"""``nearswap eval``: is a merge better than its base at anything, and is the difference real?

The first model is the reference (usually the base); every other model is compared with it,
item by item:

1. **Benchmarks** through lm-evaluation-harness (``harness``: its prompts and metrics, local
   data from ``data``), scored by nearswap's batched LM (``lm``) whose decisions equal lm-eval's
   own HF backend's; per task: each model's score ± its standard error, and the paired
   difference from the reference with a 95% interval and a word (``stats``).
2. **Drift** (``drift``): KL divergence of each model's next-token distributions from the
   reference's on a fixed text, top-1 agreement, perplexity.
3. **Writing** (``writing``): seeded stories from fixed prompts, scored for clichés,
   distinct n-grams, repetition and word salad.

Everything goes into one report directory, written atomically (``report``). Needs the
``judge`` extra: torch (CPU), transformers, lm-eval.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import NearswapError
from .models import require

Progress = Callable[[str, int, int], None]  # (what, done, total)


def evaluate(models: list[str | Path], out: str | Path, *, tasks: str = "quick", limit: int | None = None,
             drift: bool = True, writing: bool = True, cliches: str | Path | None = None,
             drift_text: str | Path | None = None, threads: int | None = None, force: bool = False,
             echo: Callable[[str], None] = lambda s: None, progress: Progress | None = None,
             ray_address: str | None = None, backend: str = "auto",
             against: list[str | Path] | None = None) -> dict[str, Any]:
    """Evaluate ``models`` (the first is the reference) and write ``report.json``, ``report.md``
    and ``report.html`` into ``out``. Returns the report. ``tasks``: task names and presets,
    comma-separated ("" for none); ``limit``: the first N items of every task (default: the
    quick preset's fixed limit for ``quick``, else all); ``ray_address``: one model per task on
    that Ray cluster (``run.run_models_ray``) instead of one after another here; ``backend``:
    what runs the models — "auto" (llama.cpp when every model is a ``.gguf``, else torch),
    "llama.cpp", "torch", or "per-file" (``models.resolve_backend``); ``against``: one model for
    each model after the reference, in order (the base's same quant for each quant of a merge):
    each model's task scores are then also paired with its own, item by item, in the report's
    quant table (``report.quant_table``: which quant to ship), those models run for the tasks only."""
    from ..runtime.output import check_replaceable
    from . import data
    from . import models as loader
    from . import tasks as task_table

    started = time.perf_counter()
    if not models:
        raise NearswapError("give at least one model (the reference) to evaluate")
    selected = task_table.select(tasks) if tasks else []
    if limit is None and tasks and all(p.strip() == "quick" for p in tasks.split(",")):
        limit = task_table.QUICK_LIMIT
    if limit is not None and limit < 1:
        raise NearswapError(f"--limit must be at least 1, got {limit}")
    phrases = None
    if writing:
        from . import writing as writing_mod

        phrases = writing_mod.load_cliches(cliches) if cliches else dict(writing_mod.CLICHES)
    text = None
    if drift:
        text = _read_text(drift_text) if drift_text else _fixed_text()
    out = Path(out)
    check_replaceable(out, force)  # before any work (atomic_directory checks again, under its lock)
    require()
    against = list(against or [])
    if against and len(against) != len(models) - 1:
        raise NearswapError(f"--against takes one model for each model after the reference, in the same order: "
                            f"{len(models) - 1} model(s) to pair, {len(against)} given")
    if against and not selected:
        raise NearswapError("--against pairs the models' task scores: give --tasks (not 'none')")
    labels = ["reference", *(f"model {i + 2}" for i in range(len(models) - 1)),
              *(f"--against {i + 1}" for i in range(len(against)))]
    candidates = loader.check([*models, *against], labels, backend=backend)
    for cand in candidates[len(models):]:
        cand.tasks_only = True
    loader.check_pairs(candidates[1:len(models)], candidates[len(models):])
    data.prepare([s.task for s in selected], echo=echo)  # (only what is not prepared yet)
    from ..merging.plan import check_output_not_input
    from ..runtime.output import atomic_directory
    from . import harness
    from . import report as reports
    from .run import run_models, run_models_ray

    with atomic_directory(out, force) as tmp:
        check_output_not_input(out, [c.model for c in candidates])  # --force never replaces a model it reads
        config_dir = tmp / "tasks"
        if selected:
            harness.write_configs(selected, config_dir, limit)
        if ray_address:
            results = run_models_ray(candidates, selected, limit, phrases, text, config_dir, threads, ray_address, echo)
        else:
            results = run_models(candidates, selected, limit, phrases, text, config_dir, threads, echo, progress)
        result = reports.build(candidates, selected, limit, results, phrases, out, time.perf_counter() - started)
        reports.write(result, tmp)
    return result


def _fixed_text() -> str:
    from .quick import fixed_text

    return fixed_text()


def _read_text(path: str | Path) -> str:
    from ..core.files import read_text

    return read_text(path, "--drift-text", 16 << 20)

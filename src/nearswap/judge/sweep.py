"""`nearswap sweep`: the card's t-table for any models — merge at each t, then judge the result.

For every t: merge (``merging.sinks``), then (``judge`` extra, CPU) measure how far the merge
moved from the base and whether it still writes:

- ``kl_mean``: the mean KL divergence of its next-token distributions from the base's on the
  fixed text (``nearswap.judge.drift``): the most sensitive signal, and one whose scale does
  not depend on the model (nats per token);
- a quick task subset through lm-evaluation-harness (``--tasks``, default ARC-Easy and
  HellaSwag at 50 items), compared with the base item by item (``nearswap.judge.stats``):
  ``tasks_worse`` counts the tasks where the merge is detectably worse;
- an 80-token seeded continuation of a story prompt, scored for ``distinct2`` (distinct word
  bigrams / bigrams: loops drive it down) and ``nondict`` (share of words that are not a
  whole-word token of the base tokenizer: word salad drives it up); and, for reference, the
  perplexity on the fixed text and the continuation's perplexity under the base.

The verdict (``VERDICT`` below, also in docs/judging.md) is the first rule a row crosses, the
most severe first, and the row says which metric decided it.
t values run in parallel in a process pool bounded by cores and memory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core import kernels, plots
from ..core.markup import md
from ..merging import recipe, sinks
from ..merging.plan import check_output_not_input, plan
from ..runtime.output import atomic_directory, check_name
from .writing import vocabulary_words

DEFAULT_SWEEP_TS = (1e-4, 3e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
DEFAULT_TASKS = "arc_easy:0,hellaswag:0"
DEFAULT_LIMIT = 50
CONTINUATION_TOKENS = 80
SAMPLE_WORDS = 40  # of each row's continuation shown in sweep.md (all of it is in sweep.json)

# (verdict, metric, limit, direction), most severe first: the first rule a row crosses decides.
VERDICT = [
    ("garbage", "kl_mean", 2.0, "above"),  # next-token distributions far from the base's (nats/token)
    ("garbage", "nondict", 0.30, "above"),  # word salad: words that are not words of the vocabulary
    ("repetitive", "distinct2", 0.50, "below"),  # fluent but looping
    ("degraded", "tasks_worse", 0, "above"),  # detectably worse than the base on a quick task
    ("degraded", "kl_mean", 0.2, "above"),
    ("degraded", "nondict", 0.15, "above"),
    ("degraded", "distinct2", 0.75, "below"),
]


def verdict_and_reason(metrics: dict[str, float]) -> tuple[str, str]:
    """(verdict, the rule that decided it) by the table ``VERDICT``; ("ok", "") when none applies."""
    for word, metric, limit, direction in VERDICT:
        value = metrics.get(metric)
        if value is None:
            continue
        if (value > limit) if direction == "above" else (value < limit):
            return word, f"{metric} {value:.3g} {'>' if direction == 'above' else '<'} {limit:g}"
    return "ok", ""


def verdict(metrics: dict[str, float]) -> str:
    """ok / degraded / repetitive / garbage by the table ``VERDICT``."""
    return verdict_and_reason(metrics)[0]


def degeneration(text: str, vocabulary: set[str]) -> dict[str, float]:
    """A continuation's ``distinct2`` and ``nondict``, computed as the eval report computes them
    (``writing``: one word pattern, one formula)."""
    from .writing import distinct, nondict, words

    ws = words(text)
    return {"words": len(ws), "distinct2": distinct(ws, 2), "nondict": nondict(ws, vocabulary)}


def judge(path: Path, tokenizer_path: Path, base_path: Path, *, selected: Sequence[Any] = (),
          config_dir: Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """Drift from the base, the quick tasks (per item), a seeded continuation and its scores,
    for the model at ``path``."""
    from . import drift
    from . import quick as evaluate
    from .models import load

    model, tokenizer = load(path, tokenizer=tokenizer_path)
    out: dict[str, Any] = {"perplexity": evaluate.perplexity(model, tokenizer)}
    text = evaluate.generate(model, tokenizer, max_new_tokens=CONTINUATION_TOKENS)
    out["sample"] = text
    base, base_tokenizer = (model, tokenizer) if path == base_path else load(base_path, tokenizer=tokenizer_path)
    out["cont_ppl"] = evaluate.continuation_perplexity(base, base_tokenizer, evaluate.STORY_PROMPT, text)
    out.update(degeneration(text, vocabulary_words(tokenizer)))
    ref = drift.reference(base, base_tokenizer, evaluate.fixed_text())
    d = drift.compare(ref, model)
    out.update({k: d[k] for k in ("kl_mean", "kl_median", "kl_p99", "top1_agreement")})
    if selected:
        from . import harness
        from .lm import make_lm

        results = harness.run(make_lm(model, tokenizer), list(selected), config_dir, limit)
        out["tasks"] = {name: {"value": r.value, "metric": r.metric, "items": r.items} for name, r in results.items()}
    return out


def _one_t(t: float, rec_data: dict, out_dir: str, tokenizer_path: str, base_path: str, keep: bool,
           selected: Sequence[Any], limit: int | None, threads: int = 1) -> dict[str, Any]:
    """Worker: merge at t, judge, drop the model unless kept. Runs in its own process."""
    import torch

    torch.set_num_threads(threads)
    model_dir = Path(out_dir) / "models" / f"t={t:g}"
    rec = recipe.build(rec_data, "sweep")
    report = sinks.merge(rec, model_dir, threads=threads)
    result = {"t": t, "swapped": [s["swapped"] / s["total"] for s in report["steps"]]}
    result.update(judge(model_dir, Path(tokenizer_path), Path(base_path), selected=selected,
                        config_dir=Path(out_dir) / "tasks", limit=limit))
    if not keep:
        shutil.rmtree(model_dir)
    return result


def run(base: str | Path, secondaries: Sequence[str | Path], ts: Sequence[float] = DEFAULT_SWEEP_TS, *,
        out: str | Path, keep: bool = False, jobs: int | None = None, force: bool = False,
        tasks: str = DEFAULT_TASKS, limit: int | None = DEFAULT_LIMIT, ray_address: str | None = None,
        threads: int = 1, echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Merge at every t and judge each merge; writes sweep.json, sweep.md and sweep.png to ``out``.
    ``ray_address``: one t per task on that Ray cluster (``distributed.map_tasks``) instead of
    local processes; ``out`` must then be on storage every node sees. ``threads``: CPU threads
    each t's merge and evaluation use (``jobs`` of them run at once)."""
    from . import data, harness, stats
    from . import models as loader
    from . import tasks as task_table

    loader.require(lm_eval=False)  # the eval extra, or one clear line
    ts = sorted(kernels.check_t(float(t)) for t in ts)
    selected = task_table.select(tasks) if tasks else []
    if selected:
        loader.require()
        data.prepare([s.task for s in selected], echo=echo)  # (only what is not prepared yet)
    steps = [{"model": str(s), "t": ts[0]} for s in secondaries]
    plan_ = plan(recipe.build({"base": str(base), "steps": steps}, "sweep"))  # preflight first
    base_model = plan_.base
    # everything that can be checked, before the first minute of work: the output's name, then each
    # model as the judge reads it (a secondary without tokenizer files is read with the base's, as a
    # merge takes them)
    check_name(Path(out))
    base_candidate = loader.check([base], ["base"])[0]
    sec_candidates = loader.check(list(secondaries), [f"secondary {i}" for i in range(1, len(secondaries) + 1)],
                                  tokenizer=False)
    with atomic_directory(out, force) as tmp:
        check_output_not_input(Path(out), [plan_.base, *plan_.secondaries])
        # a GGUF base is evaluated through its HF conversion, cached outside the output
        base_hf = loader.hf_directory(base_candidate, echo)
        if selected:
            harness.write_configs(selected, tmp / "tasks", limit)
        echo("judging the base model")
        rows = [{"t": 0.0, "swapped": [0.0] * len(secondaries),
                 **judge(base_hf, base_hf, base_hf, selected=selected, config_dir=tmp / "tasks", limit=limit)}]
        base_row = rows[0]
        sec_rows = []  # each secondary itself: where a large t ends (at t >= every |difference| the merge is it)
        for i, sec in enumerate(secondaries, 1):
            echo(f"judging secondary {i}")
            sec_hf = loader.hf_directory(sec_candidates[i - 1], echo)
            sec_rows.append({"label": f"s{i}", "model": str(sec),
                             **judge(sec_hf, base_hf, base_hf, selected=selected, config_dir=tmp / "tasks", limit=limit)})
        jobs = jobs or _default_jobs(base_model.nbytes, len(ts))
        echo(f"merging and judging {len(ts)} values of t, {jobs} at a time")
        calls = [(t, {"base": str(base), "steps": [{**s, "t": t} for s in steps]}, str(tmp), str(base_hf),
                  str(base_hf), keep, selected, limit, threads) for t in ts]

        def done(row: dict[str, Any]) -> None:
            rows.append(row)
            echo(f"t={row['t']:g}: KL {row['kl_mean']:.3g}, perplexity {row['perplexity']:.2f}")

        if ray_address:  # one t per Ray task: its merge and its evaluation on the same node
            from ..runtime import distributed

            distributed.map_tasks(_one_t, calls, ray_address, done)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                for fut in [pool.submit(_one_t, *call) for call in calls]:
                    done(fut.result())
        for row in [*rows, *sec_rows]:
            row["ppl_ratio"] = row["perplexity"] / base_row["perplexity"]
            row["cont_ppl_ratio"] = row["cont_ppl"] / base_row["cont_ppl"]
            worse = 0
            for name, res in row.get("tasks", {}).items():
                ref_items = base_row["tasks"][name]["items"]
                keys = sorted(ref_items)
                p = stats.paired([ref_items[k] for k in keys], [res["items"][k] for k in keys])
                res.update(diff=p.diff, low=p.low, high=p.high, verdict=p.verdict)
                worse += p.verdict == "worse"
            row["tasks_worse"] = worse
            row["verdict"], row["decided_by"] = verdict_and_reason(row)
        from .._version import __version__
        from ..formats.identity import identity

        result = {"nearswap_version": __version__, "base": str(base), "secondaries": [str(s) for s in secondaries],
                  "identities": [identity(p) for p in (base, *secondaries)],  # (what a card checks it against)
                  "tasks": [{"name": s.task.name, "shots": s.shots} for s in selected], "limit": limit, "rows": rows,
                  "secondary_rows": sec_rows,
                  "verdict_rule": [dict(zip(("verdict", "metric", "limit", "direction"), v)) for v in VERDICT]}
        (tmp / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
        (tmp / "sweep.md").write_text(markdown(result) + "\n")
        plot(result, tmp / "sweep.png")
        if not keep and (tmp / "models").exists():
            shutil.rmtree(tmp / "models")
    return result


def _default_jobs(model_bytes: int, n: int) -> int:
    """Processes: no more than cores, t values, or what memory holds (~3x the model + 1 GB each)."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = 8 << 30
    per_job = 3 * model_bytes + (1 << 30)
    return max(1, min(os.cpu_count() or 1, n, avail // per_job))


def markdown(result: dict[str, Any]) -> str:
    """The card's table: t, % swapped per step, KL from the base, the quick tasks' differences,
    perplexity, the verdict and what decided it, the first words of the sample; then a row per
    secondary, judged as it is (where a large t ends)."""
    n = len(result["secondaries"])
    tasks = [t["name"] for t in result.get("tasks", [])]
    head = ("| t | " + " | ".join(f"% swapped, step {k + 1}" for k in range(n)) + " | KL from base | "
            + "".join(f"{md(t)} Δ | " for t in tasks) + "perplexity | verdict | decided by | sample |")
    lines = [head, "|" + "---|" * (n + len(tasks) + 6)]
    for row in [*result["rows"], *result.get("secondary_rows", [])]:
        words = md(" ".join(row["sample"].split()[:SAMPLE_WORDS]))
        t = md(row["label"]) + " itself" if "label" in row else "base" if row["t"] == 0 else f"{row['t']:g}"
        swapped = (" | ".join(f"{100 * s:.2f}%" for s in row["swapped"]) if row.get("t") else
                   " | ".join("—" for _ in range(n)))
        deltas = "".join(("— | " if row.get("t") == 0 else
                          f"{100 * row['tasks'][name]['diff']:+.1f} ({md(row['tasks'][name]['verdict'].replace('no detectable difference', 'n.d.'))}) | ")
                         for name in tasks)
        lines.append(f"| {t} | {swapped} | {row['kl_mean']:.3g} | {deltas}{row['perplexity']:.2f} | {md(row['verdict'])} | "
                     f"{md(row.get('decided_by') or '—')} | {words} … |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Perplexity vs t (log axis), points coloured by verdict, swap share on a second axis."""
    rows = [r for r in result["rows"] if r["t"] > 0]
    base = result["rows"][0]
    colors = {"ok": "tab:green", "degraded": "tab:orange", "repetitive": "tab:purple", "garbage": "tab:red"}
    fig, ax = plots.figure((8, 5))
    ax.plot([r["t"] for r in rows], [r["perplexity"] for r in rows], color="gray", lw=1)
    for r in rows:
        ax.scatter(r["t"], r["perplexity"], color=colors[r["verdict"]], s=50, zorder=3)
    ax.axhline(base["perplexity"], color="black", ls="--", lw=1, label=f"base ({base['perplexity']:.1f})")
    for v, c in colors.items():
        ax.scatter([], [], color=c, label=v)
    ax.set_xscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("perplexity on the fixed text")
    ax2 = ax.twinx()
    ax2.plot([r["t"] for r in rows], [100 * r["swapped"][0] for r in rows], color="tab:blue", ls=":", label="% swapped, step 1")
    ax2.set_ylabel("% swapped (step 1)", color="tab:blue")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("NearSwap sweep: quality vs t")
    plots.save(fig, path, dpi=120, bbox_inches="tight")

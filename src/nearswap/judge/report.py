"""The evaluation report: ``report.json`` (every figure and every item's result), ``report.md``
(the card's table and the rest in text), ``report.html`` (the same with plots, self-contained:
inline SVG, no script, no font or style sheet from anywhere else)."""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from .._version import __version__
from ..core import plots
from ..core.markup import md
from ..formats.identity import identity
from . import stats
from .tasks import Selected

# the card's names for the leaderboard's tasks
CARD_NAMES = {"arc_challenge": "AI2 Reasoning Challenge", "hellaswag": "HellaSwag", "mmlu": "MMLU",
              "truthfulqa_mc2": "TruthfulQA", "winogrande": "Winogrande", "gsm8k": "GSM8k"}


def _row_name(sel: Selected) -> str:
    name = CARD_NAMES.get(sel.task.name, sel.task.title)
    return f"{name} ({sel.shots}-shot)"


def build(candidates: list[Any], selected: list[Selected], limit: int | None, results: list[Any],
          phrases: dict[str, str] | None, out: Path, seconds: float) -> dict[str, Any]:
    from . import harness

    against = [(c, r) for c, r in zip(candidates, results) if c.tasks_only]
    candidates, results = (list(x) for x in zip(*[(c, r) for c, r in zip(candidates, results) if not c.tasks_only]))
    ref = results[0]
    report: dict[str, Any] = {
        "nearswap_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": harness.versions() if selected else {},
        "reference": candidates[0].name,
        "models": [_model_entry(c) for c in candidates],
        "settings": {"limit": limit, "tasks": [{"name": s.task.name, "shots": s.shots} for s in selected],
                     "bootstrap_resamples": stats.BOOTSTRAP, "bootstrap_seed": stats.SEED, "interval": stats.LEVEL},
        "tasks": [], "seconds": round(seconds, 1),
    }
    per_task_diffs: dict[str, dict[str, list[float]]] = {}
    for sel in selected:
        task = sel.task
        ref_items = ref.tasks[task.name].items
        keys = sorted(ref_items, key=_item_order)
        entry: dict[str, Any] = {"name": task.name, "title": task.title, "row": _row_name(sel), "metric": task.metric,
                                 "shots": sel.shots, "n": len(keys), "notes": task.notes,
                                 "lm_eval_task": task.lm_eval_name, "scores": [], "paired": [], "items": {}}
        for res in results:
            tr = res.tasks[task.name]
            values = [tr.items[k] for k in keys]
            s = stats.score(values)
            entry["scores"].append({"model": res.name, "mean": s.mean, "stderr": s.stderr, "n": s.n,
                                    "lm_eval_value": tr.value})
            entry["items"][res.name] = {k: tr.items[k] for k in keys}
            if res is not ref:
                p = stats.paired([ref_items[k] for k in keys], values)
                entry["paired"].append({"model": res.name, "diff": p.diff, "low": p.low, "high": p.high, "n": p.n,
                                        "only_reference": p.only_a, "only_model": p.only_b,
                                        "p_mcnemar": p.p_mcnemar, "verdict": p.verdict})
                per_task_diffs.setdefault(res.name, {})[task.name] = [v - ref_items[k] for k, v in zip(keys, values)]
        report["tasks"].append(entry)
    if len(selected) > 1:
        report["average"] = _average(report["tasks"], results, per_task_diffs)
    if results[0].drift is not None:
        report["drift"] = [{"model": r.name, **r.drift} for r in results]
    if against:
        report["against"] = [_model_entry(c) for c, _ in against]
        report["quants"] = _quant_rows(report, results[1:], [r for _, r in against])
    if phrases is not None:
        from . import writing

        report["writing"] = {"prompts": list(writing.PROMPTS), "seeds": list(writing.SEEDS),
                             "new_tokens": writing.NEW_TOKENS, "phrases": phrases,
                             "models": [{"model": r.name, **(r.writing or {}),
                                         "stories": [{"prompt": s.prompt, "seed": s.seed, "text": s.text}
                                                     for s in r.stories]} for r in results]}
    report["exactness"] = [{"model": r.name, "requests": r.requests, "input_tokens": r.tokens,
                            "documents_rescored_exactly": r.rescored} for r in results]
    report["timing_seconds"] = [{"model": r.name, **{k: round(v, 1) for k, v in r.seconds.items()}} for r in results]
    if selected:
        first = candidates[0]
        report["lm_eval_command"] = harness.cli_command(selected, out / "tasks", Path(first.hf_dir or ""), limit,
                                                        first.given if first.hf_dir != first.given else None)
    return report


def _model_entry(c: Any) -> dict[str, Any]:
    return {"name": c.name, "path": str(c.given), "format": c.format, "quant": c.quant, "parameters": c.parameters,
            "evaluated_from": str(c.given if c.backend == "llama.cpp" else c.hf_dir), "backend": c.backend,
            **_size(c), "identity": identity(c.given)}


def _quant_rows(report: dict[str, Any], models: list[Any], against: list[Any]) -> list[dict[str, Any]]:
    """Which quant to ship: for each model after the reference, its size and drift from the
    reference (a float model: the KL quant makers quote), and its task scores paired item by
    item with its --against model's (the base's same quant): the difference, its interval, the
    word; the average over tasks as the Avg. row computes it."""
    entries = {m["name"]: m for m in [*report["models"], *report["against"]]}
    drift = {d["model"]: d for d in report.get("drift", [])}
    rows = []
    for res, other in zip(models, against):
        tasks, diffs = [], {}
        for t in report["tasks"]:
            keys = list(t["items"][report["models"][0]["name"]])
            mine = [res.tasks[t["name"]].items[k] for k in keys]
            theirs = [other.tasks[t["name"]].items[k] for k in keys]
            t["items"][other.name] = dict(zip(keys, theirs))
            p = stats.paired(theirs, mine)
            tasks.append({"name": t["name"], "row": t["row"], "model": stats.score(mine).mean,
                          "against": stats.score(theirs).mean, "diff": p.diff, "low": p.low, "high": p.high, "n": p.n,
                          "verdict": p.verdict})
            diffs[t["name"]] = [a - b for a, b in zip(mine, theirs)]
        m, a = entries[res.name], entries[other.name]
        d = drift.get(res.name, {})
        rows.append({"model": res.name, "against": other.name, "quant": m["quant"], "against_quant": a["quant"],
                     "bytes": m["bytes"], "bits_per_weight": m["bits_per_weight"], "kl_mean": d.get("kl_mean"),
                     "top1_agreement": d.get("top1_agreement"), "tasks": tasks,
                     "average": stats.paired_average([diffs[t["name"]] for t in report["tasks"]]) if len(tasks) > 1 else None})
    return rows


def _size(c: Any) -> dict[str, Any]:
    """The bytes of a model's weights (its GGUF file, or its weight files) and bits per weight:
    with the drift table against a float reference, which quant to ship."""
    files = [c.given] if c.given.is_file() else list(getattr(c.model, "files", []) or [])
    size = sum(f.stat().st_size for f in files)
    weights = getattr(c.model, "stored_bytes", 0)  # the tensors' bytes over their elements, as llama.cpp's BPW and the card
    return {"bytes": size, "bits_per_weight": round(8 * weights / c.parameters, 3) if c.parameters and weights else None}


def _item_order(key: str) -> tuple[str, int]:
    sub, _, doc = key.rpartition("/")
    return sub, int(doc) if doc.isdigit() else 0


def _average(tasks: list[dict[str, Any]], results: list[Any], diffs: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The card's Avg. row: the mean of the task scores, and for each model its paired
    difference from the reference with a bootstrap interval that resamples every task's items."""
    import numpy as np

    avg = {"scores": [], "paired": []}
    for res in results:
        means = [next(s["mean"] for s in t["scores"] if s["model"] == res.name) for t in tasks]
        avg["scores"].append({"model": res.name, "mean": float(np.mean(means))})
    for name, by_task in diffs.items():
        avg["paired"].append({"model": name, **stats.paired_average([by_task[t["name"]] for t in tasks])})
    return avg


# ---------------------------------------------------------------- markdown


def _one_line(text: str) -> str:
    return text if text.isprintable() else "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def paired_cell(p: dict[str, Any]) -> str:
    """A paired difference as a table cell: points, the 95% interval, the word."""
    return f"{100 * p['diff']:+.2f} [{100 * p['low']:+.2f}, {100 * p['high']:+.2f}] {md(p['verdict'])}"


def benchmark_table(report: dict[str, Any]) -> list[str]:
    """The card's table as lines: a row per task and an Avg. row, each model's score ± its
    standard error, and each model's paired difference from the reference with its word."""
    names = [md(m["name"]) for m in report["models"]]
    head = "| Metric | " + " | ".join(names) + "".join(f" | {n} − {names[0]}" for n in names[1:]) + " |"
    rows = [head, "|---" * (len(names) * 2) + "|"]
    if "average" in report:
        a = report["average"]
        rows.append("| Avg. | " + " | ".join(_pct(s["mean"]) for s in a["scores"])
                    + "".join(f" | {paired_cell(p)}" for p in a["paired"]) + " |")
    for t in report["tasks"]:
        cells = [f"{_pct(s['mean'])} ± {_pct(s['stderr'])}" for s in t["scores"]]
        rows.append(f"| {md(t['row'])} | " + " | ".join(cells) + "".join(f" | {paired_cell(p)}" for p in t["paired"]) + " |")
    return rows


def quant_table(report: dict[str, Any]) -> list[str]:
    """Which quant to ship, as lines: per model after the reference its quant, size and bits
    per weight, its drift from the reference, and its task scores minus its --against model's
    (the base's same quant) with the paired interval and the word; [] without --against."""
    rows = report.get("quants") or []
    if not rows:
        return []
    ref = md(report["models"][0]["name"])
    titles = [md(t["row"]) for t in report["tasks"]]
    head = (f"| model | compared with | quant | size | bits per weight | KL to {ref} | top-1 | "
            + ("Avg. difference | " if any(r["average"] for r in rows) else "") + " | ".join(titles) + " |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|" + "---|" * (len(titles) + bool(rows[0]["average"]))]
    for r in rows:
        kl = "—" if r["kl_mean"] is None else f"{r['kl_mean']:.4g}"
        top1 = "—" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.2f}%"
        cells = ([paired_cell(r["average"])] if r["average"] else []) + [paired_cell(t) for t in r["tasks"]]
        lines.append(f"| {md(r['model'])} | {md(r['against'])} | {md(r['quant'] or '—')} | {r['bytes'] / 2**20:,.1f} MiB | "
                     f"{r['bits_per_weight'] or 0:.2f} | {kl} | {top1} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    names = [md(m["name"]) for m in report["models"]]
    ref = names[0]
    lines = [f"# nearswap eval: {', '.join(names)}", "",
             f"Reference: **{ref}**. Every other model is compared with it on the same items: its score minus the "
             f"reference's, with a {int(100 * stats.LEVEL)}% paired-bootstrap interval ({stats.BOOTSTRAP:,} resamples), "
             "and a word: *better* / *worse* only when the whole interval is on one side of zero.", ""]
    lines += ["| model | format | run by | size | bits per weight |", "|---|---|---|---:|---:|"]
    lines += [f"| {md(m['name'])} | {md(m['format'])} | {m.get('backend', 'torch')} | {m.get('bytes', 0) / 2**20:,.1f} MiB | "
              f"{m.get('bits_per_weight') or 0:.2f} |" for m in [*report["models"], *report.get("against", [])]]
    lines += [""]
    if report["tasks"]:
        lines += ["## Benchmarks (lm-evaluation-harness)", "", *benchmark_table(report)]
        limit = report["settings"]["limit"]
        lines += ["", f"Values in %: {', '.join(sorted({t['metric'] for t in report['tasks']}))} as lm-eval computes them "
                  f"(± standard error); {'the first ' + str(limit) + ' items of each task' if limit else 'every item'}.",
                  "", "Data and few-shot notes:"]
        lines += [f"- {md(t['title'])}: {t['notes']}" for t in report["tasks"] if t["notes"]]
        mc = [(t["title"], p) for t in report["tasks"] for p in t["paired"] if p["p_mcnemar"] is not None]
        if mc:
            lines += ["", "McNemar's exact test (items where exactly one model is right):", ""]
            lines += [f"- {md(title)}, {md(p['model'])}: {p['only_reference']} only {ref}, {p['only_model']} only "
                      f"{md(p['model'])}, p = {p['p_mcnemar']:.3g}" for title, p in mc]
        lines += ["", "The same tasks from lm-eval's own command line:", "", f"    {_one_line(report['lm_eval_command'])}"]
    if report.get("quants"):
        lines += ["", "## Which quant to ship", "", *quant_table(report), "",
                  "Each model's task scores minus those of the model it is compared with (`--against`: the base's same "
                  "quant), item by item, in percentage points with the 95% paired interval; KL and top-1 from the "
                  "reference's next-token distributions on the fixed text (nats per token)."]
    if "drift" in report:
        lines += ["", "## Drift from the reference (next-token distributions on the fixed text)", "",
                  "| model | tokens | KL mean | KL median | KL p99 | top-1 agreement | perplexity |", "|---|---:|---:|---:|---:|---:|---:|"]
        for d in report["drift"]:
            lines.append(f"| {md(d['model'])} | {d['tokens']} | {d['kl_mean']:.3g} | {d['kl_median']:.3g} | {d['kl_p99']:.3g} | "
                         f"{100 * d['top1_agreement']:.2f}% | {d['perplexity']:.3f} |")
        lines += ["", "KL(P_reference || P_model) in nats per token, as llama.cpp's --kl-divergence reports it."]
    if "writing" in report:
        w = report["writing"]
        lines += ["", "## Writing", "", f"{len(w['prompts'])} prompts × {len(w['seeds'])} seeds, {w['new_tokens']} new tokens each "
                  "(sampled at temperature 0.7, top-p 0.95).", "",
                  "| model | words | clichés / 1,000 words | distinct-2 | distinct-3 | longest repeat (words) | non-dictionary |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m in w["models"]:
            lines.append(f"| {md(m['model'])} | {m['words']} | {m['cliches_per_1000_words']:.2f} | {m['distinct2']:.3f} | "
                         f"{m['distinct3']:.3f} | {m['longest_repeat']} | {100 * m.get('nondict', 0):.1f}% |")
        found = sorted({p for m in w["models"] for p in m["cliche_counts"]})
        if found:
            lines += ["", "Clichés found: " + "; ".join(
                f"'{p}' " + ", ".join(f"{md(m['model'])} {m['cliche_counts'].get(p, 0)}" for m in w["models"]) for p in found)]
        lines += ["", "### Stories", ""]
        for i, prompt in enumerate(w["prompts"]):
            for seed in w["seeds"]:
                lines += [f"**{md(prompt)}** (seed {seed})", ""]
                for m in w["models"]:
                    story = next(s["text"] for s in m["stories"] if s["prompt"] == prompt and s["seed"] == seed)
                    lines += [f"- *{md(m['model'])}*: {md(' '.join(story.split()))}", ""]
    lines += ["", f"nearswap {report['nearswap_version']}, {report['created']}, {report['seconds']:.0f} s; "
              + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- HTML


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    plots.save(fig, buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plots(report: dict[str, Any]) -> dict[str, str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    names = [m["name"] for m in report["models"]]
    out = {}
    if report["tasks"]:
        fig, ax = plots.figure((8, 0.5 + 0.45 * len(report["tasks"]) * len(names)))
        y = 0
        labels, ticks = [], []
        for t in reversed(report["tasks"]):
            for k, s in enumerate(t["scores"]):
                err = 1.96 * s["stderr"] if not math.isnan(s["stderr"]) else 0
                ax.errorbar(100 * s["mean"], y, xerr=100 * err, fmt="o", color=f"C{k}", capsize=3,
                            label=s["model"] if t is report["tasks"][-1] else None)
                y += 1
            ticks.append(y - (len(names) + 1) / 2)
            labels.append(t["row"])
            y += 0.8
        ax.set_yticks(ticks, labels)
        ax.set_xlabel("score, % (95% interval: ±1.96 standard errors)")
        ax.legend(fontsize=8, loc="best")
        ax.grid(axis="x", alpha=0.3)
        out["scores"] = _svg(fig)
        if len(names) > 1:
            fig, ax = plots.figure((8, 0.5 + 0.45 * len(report["tasks"]) * (len(names) - 1)))
            y = 0
            labels, ticks = [], []
            colors = {"better": "tab:green", "worse": "tab:red", "no detectable difference": "tab:gray"}
            for t in reversed(report["tasks"]):
                for p in t["paired"]:
                    ax.errorbar(100 * p["diff"], y, xerr=[[100 * (p["diff"] - p["low"])], [100 * (p["high"] - p["diff"])]],
                                fmt="o", color=colors[p["verdict"]], capsize=3)
                    ticks.append(y)
                    labels.append(f"{t['row']}: {p['model']}")
                    y += 1
            ax.axvline(0, color="black", lw=1)
            ax.set_yticks(ticks, labels)
            ax.set_xlabel(f"difference from {names[0]}, percentage points (95% paired bootstrap interval)")
            ax.grid(axis="x", alpha=0.3)
            out["paired"] = _svg(fig)
    if "drift" in report and len(names) > 1:
        fig, ax = plots.figure((8, 3.2))
        for k, d in enumerate(report["drift"][1:], 1):
            ax.plot(d["kl_per_token"], lw=0.8, color=f"C{k}", label=f"{d['model']} (mean {d['kl_mean']:.3g})")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_xlabel("token position in the fixed text")
        ax.set_ylabel("KL(reference || model), nats")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        out["drift"] = _svg(fig)
    if "writing" in report:
        fig, ax = plots.figure((6, 0.6 + 0.4 * len(names)))
        rates = [m["cliches_per_1000_words"] for m in report["writing"]["models"]]
        ax.barh(range(len(names))[::-1], rates, color=[f"C{k}" for k in range(len(names))])
        ax.set_yticks(range(len(names))[::-1], names)
        ax.set_xlabel("clichés per 1,000 words (the report's phrase list)")
        out["cliches"] = _svg(fig)
    return out


STYLE = """body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right;vertical-align:top}
td:first-child,th:first-child{text-align:left}.better{color:#1a7f37;font-weight:600}.worse{color:#c62828;font-weight:600}
.none{color:#666}table.stories{table-layout:fixed;width:100%}.stories td,.stories th{text-align:left}
.stories td:first-child,.stories th:first-child{width:22%}code{background:#f4f4f4;padding:.1em .3em}svg{max-width:100%;height:auto}
.note{color:#555;font-size:90%}"""


def page(report: dict[str, Any], plots: dict[str, str]) -> str:
    e = html.escape
    names = [m["name"] for m in report["models"]]
    ref = names[0]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>nearswap eval: {e(', '.join(names))}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>nearswap eval</h1><p>Reference: <b>{e(ref)}</b>. "
             + ("Compared with it, item by item: " + ", ".join(f"<b>{e(n)}</b>" for n in names[1:]) + "."
                if len(names) > 1 else "No other model was given: its scores alone.") + "</p>"]
    parts.append("<table><tr><th>model</th><th>format</th><th>run by</th><th>size</th><th>bits per weight</th></tr>" + "".join(
        f"<tr><td>{e(m['name'])}</td><td>{e(m['format'])}</td><td>{e(m.get('backend', 'torch'))}</td>"
        f"<td>{m.get('bytes', 0) / 2**20:,.1f} MiB</td><td>{m.get('bits_per_weight') or 0:.2f}</td></tr>"
        for m in [*report["models"], *report.get("against", [])]) + "</table>")

    def verdict(p: dict[str, Any]) -> str:
        cls = {"better": "better", "worse": "worse"}.get(p["verdict"], "none")
        return (f"{100 * p['diff']:+.2f} <span class=note>[{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]</span> "
                f"<span class={cls}>{e(p['verdict'])}</span>")

    if report["tasks"]:
        head = "".join(f"<th>{e(n)}</th>" for n in names) + "".join(f"<th>{e(n)} − {e(ref)}</th>" for n in names[1:])
        rows = []
        if "average" in report:
            a = report["average"]
            rows.append("<tr><td>Avg.</td>" + "".join(f"<td>{_pct(s['mean'])}</td>" for s in a["scores"])
                        + "".join(f"<td>{verdict(p)}</td>" for p in a["paired"]) + "</tr>")
        for t in report["tasks"]:
            rows.append(f"<tr><td>{e(t['row'])}</td>" + "".join(
                f"<td>{_pct(s['mean'])} <span class=note>± {_pct(s['stderr'])}</span></td>" for s in t["scores"])
                + "".join(f"<td>{verdict(p)}</td>" for p in t["paired"]) + "</tr>")
        parts += ["<h2>Benchmarks</h2>", f"<table><tr><th>Metric</th>{head}</tr>{''.join(rows)}</table>",
                  "<ul class=note>" + "".join(f"<li>{e(t['title'])}: {e(t['notes'])}</li>" for t in report["tasks"]
                                               if t["notes"]) + "</ul>",
                  f"<p class=note>Reproduce with lm-eval's own HF backend: <code>{e(report['lm_eval_command'])}</code></p>"]
        parts += [plots.get("scores", ""), plots.get("paired", "")]
    if report.get("quants"):
        quants = report["quants"]
        avg = bool(quants[0]["average"])
        head = ("<tr><th>model</th><th>compared with</th><th>quant</th><th>size</th><th>bits per weight</th>"
                f"<th>KL to {e(ref)}</th><th>top-1</th>" + ("<th>Avg. difference</th>" if avg else "")
                + "".join(f"<th>{e(t['row'])}</th>" for t in report["tasks"]) + "</tr>")
        rows = "".join(
            f"<tr><td>{e(r['model'])}</td><td>{e(r['against'])}</td><td>{e(r['quant'] or '—')}</td>"
            f"<td>{r['bytes'] / 2**20:,.1f} MiB</td><td>{r['bits_per_weight'] or 0:.2f}</td>"
            f"<td>{'—' if r['kl_mean'] is None else format(r['kl_mean'], '.4g')}</td>"
            f"<td>{'—' if r['top1_agreement'] is None else format(100 * r['top1_agreement'], '.2f') + '%'}</td>"
            + (f"<td>{verdict(r['average'])}</td>" if avg else "") + "".join(f"<td>{verdict(t)}</td>" for t in r["tasks"])
            + "</tr>" for r in quants)
        parts += ["<h2>Which quant to ship</h2>", f"<table>{head}{rows}</table>",
                  "<p class=note>Each model's task scores minus those of the model it is compared with (the base's same "
                  "quant), item by item, in percentage points with the 95% paired interval; KL and top-1 from the "
                  "reference's next-token distributions on the fixed text.</p>"]
    if "drift" in report:
        rows = "".join(f"<tr><td>{e(d['model'])}</td><td>{d['kl_mean']:.3g}</td><td>{d['kl_median']:.3g}</td>"
                       f"<td>{d['kl_p99']:.3g}</td><td>{100 * d['top1_agreement']:.2f}%</td><td>{d['perplexity']:.3f}</td></tr>"
                       for d in report["drift"])
        parts += ["<h2>Drift from the reference</h2>",
                  "<table><tr><th>model</th><th>KL mean</th><th>KL median</th><th>KL p99</th><th>top-1 agreement</th>"
                  f"<th>perplexity</th></tr>{rows}</table>", plots.get("drift", "")]
    if "writing" in report:
        w = report["writing"]
        rows = "".join(f"<tr><td>{e(m['model'])}</td><td>{m['cliches_per_1000_words']:.2f}</td><td>{m['distinct2']:.3f}</td>"
                       f"<td>{m['distinct3']:.3f}</td><td>{m['longest_repeat']}</td><td>{100 * m.get('nondict', 0):.1f}%</td></tr>"
                       for m in w["models"])
        parts += ["<h2>Writing</h2>", "<table><tr><th>model</th><th>clichés / 1,000 words</th><th>distinct-2</th>"
                  f"<th>distinct-3</th><th>longest repeat</th><th>non-dictionary</th></tr>{rows}</table>",
                  plots.get("cliches", ""), "<table class=stories><tr><th>prompt (seed)</th>"
                  + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
        for prompt in w["prompts"]:
            for seed in w["seeds"]:
                cells = "".join("<td>" + e(next(s["text"] for s in m["stories"] if s["prompt"] == prompt and s["seed"] == seed))
                                + "</td>" for m in w["models"])
                parts.append(f"<tr><td>{e(prompt)} <span class=note>({seed})</span></td>{cells}</tr>")
        parts.append("</table>")
    parts.append(f"<p class=note>nearswap {e(report['nearswap_version'])}, {e(report['created'])}, "
                 f"{report['seconds']:.0f} s</p></body></html>")
    return "\n".join(parts)


def write(report: dict[str, Any], directory: Path) -> list[Path]:
    (directory / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (directory / "report.md").write_text(markdown(report))
    (directory / "report.html").write_text(page(report, _plots(report)))
    return [directory / n for n in ("report.json", "report.md", "report.html")]

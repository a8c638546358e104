"""`nearswap sweep`: the card's t-table for any models — merge at each t, then judge the result.

For every t: merge with the engine, then (``eval`` extra, CPU) measure perplexity on the fixed
text and let the merge continue a story prompt (seeded), scored for degeneration:

- ``distinct2``: distinct word bigrams / all bigrams of the continuation (loops drive it down);
- ``nondict``: share of its words that are not a whole-word token of the base tokenizer's
  vocabulary (~32k English words for SmolLM2; "pseudorandom tokens" drive it up);
- ``cont_ppl``: perplexity of the continuation under the *base* model (word salad drives it up).

The verdict compares with the base model's own figures (``VERDICT`` below, also in the README):
garbage if any garbage limit is crossed, else degraded if any degraded limit is, else ok.
t values run in parallel in a process pool bounded by cores and memory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from . import engine, kernels, recipe
from .errors import NearswapError
from .output import atomic_directory

DEFAULT_SWEEP_TS = (1e-4, 3e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
CONTINUATION_TOKENS = 80
WORD = re.compile(r"[A-Za-z]+")

# (metric, limit for "degraded", limit for "garbage", direction): ratios are to the base model.
VERDICT = [
    ("ppl_ratio", 1.5, 5.0, "above"),  # perplexity on the fixed text / base's
    ("cont_ppl_ratio", 3.0, 20.0, "above"),  # continuation perplexity under the base / base's own
    ("nondict", 0.15, 0.30, "above"),  # share of non-dictionary words
    ("distinct2", 0.75, 0.50, "below"),  # distinct bigram share
]


def verdict(metrics: dict[str, float]) -> str:
    """ok / degraded / garbage by the table ``VERDICT``."""
    def crosses(value: float, limit: float, direction: str) -> bool:
        return value > limit if direction == "above" else value < limit

    if any(crosses(metrics[m], g, d) for m, _, g, d in VERDICT):
        return "garbage"
    if any(crosses(metrics[m], deg, d) for m, deg, _, d in VERDICT):
        return "degraded"
    return "ok"


def dictionary(tokenizer: Any) -> set[str]:
    """Lower-case words that are whole tokens of the tokenizer's vocabulary (BPE 'Ġword' or 'word')."""
    words = set()
    for token in tokenizer.get_vocab():
        w = token[1:] if token[:1] in ("Ġ", "▁") else token
        if w.isalpha():
            words.add(w.lower())
    return words


def degeneration(text: str, words: set[str]) -> dict[str, float]:
    ws = [w.lower() for w in WORD.findall(text)]
    bigrams = list(zip(ws, ws[1:]))
    return {
        "words": len(ws),
        "distinct2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "nondict": sum(w not in words for w in ws) / len(ws) if ws else 1.0,
    }


def continuation_perplexity(m: Any, prompt: str, continuation: str) -> float:
    """Perplexity of ``continuation`` given ``prompt`` under model ``m``."""
    import math

    import torch

    p = m.tokenizer(prompt, return_tensors="pt").input_ids
    full = m.tokenizer(prompt + continuation, return_tensors="pt").input_ids
    labels = full.clone()
    labels[:, : p.shape[1]] = -100
    if (labels != -100).sum() == 0:
        return float("inf")
    with torch.no_grad():
        return math.exp(m.model(full, labels=labels).loss.item())


def judge(path: Path, tokenizer_path: Path, base_path: Path) -> dict[str, Any]:
    """Perplexity, a seeded continuation and its degeneration scores for the model at ``path``."""
    from . import evaluate

    m = evaluate.load(path, tokenizer_path)
    out: dict[str, Any] = {"perplexity": evaluate.perplexity(m)}
    text = evaluate.generate(m, max_new_tokens=CONTINUATION_TOKENS)
    out["sample"] = text
    base = m if path == base_path else evaluate.load(base_path, tokenizer_path)
    out["cont_ppl"] = continuation_perplexity(base, evaluate.STORY_PROMPT, text)
    out.update(degeneration(text, dictionary(m.tokenizer)))
    return out


def _one_t(t: float, rec_data: dict, out_dir: str, tokenizer_path: str, base_path: str, keep: bool) -> dict[str, Any]:
    """Worker: merge at t, judge, drop the model unless kept. Runs in its own process."""
    import torch

    torch.set_num_threads(1)
    model_dir = Path(out_dir) / "models" / f"t={t:g}"
    rec = recipe.build(rec_data, "sweep")
    report = engine.merge(rec, model_dir, threads=1)
    result = {"t": t, "swapped": [s["swapped"] / s["total"] for s in report["steps"]]}
    result.update(judge(model_dir, Path(tokenizer_path), Path(base_path)))
    if not keep:
        shutil.rmtree(model_dir)
    return result


def run(base: str | Path, secondaries: Sequence[str | Path], ts: Sequence[float] = DEFAULT_SWEEP_TS, *,
        out: str | Path, keep: bool = False, jobs: int | None = None, force: bool = False,
        echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Merge at every t and judge each merge; writes sweep.json, sweep.md and sweep.png to ``out``."""
    from . import evaluate
    from .convert import convert

    evaluate._torch_and_transformers()  # the eval extra, or one clear line
    ts = sorted(kernels.check_t(float(t)) for t in ts)
    steps = [{"model": str(s), "t": ts[0]} for s in secondaries]
    base_model = engine.plan(recipe.build({"base": str(base), "steps": steps}, "sweep")).base  # preflight first
    with atomic_directory(out, force) as tmp:
        base_hf = Path(base) if base_model.directory else tmp / "base_hf"
        if not base_model.directory:
            echo(f"converting {Path(base).name} to HF for evaluation")
            convert(base, base_hf)
        echo("judging the base model")
        rows = [{"t": 0.0, "swapped": [0.0] * len(secondaries), **judge(base_hf, base_hf, base_hf)}]
        base_row = rows[0]
        jobs = jobs or _default_jobs(base_model.nbytes, len(ts))
        echo(f"merging and judging {len(ts)} values of t, {jobs} at a time")
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_one_t, t, {"base": str(base), "steps": [{**s, "t": t} for s in steps]},
                                   str(tmp), str(base_hf), str(base_hf), keep) for t in ts]
            for fut in futures:
                row = fut.result()
                rows.append(row)
                echo(f"t={row['t']:g}: perplexity {row['perplexity']:.2f}")
        for row in rows:
            row["ppl_ratio"] = row["perplexity"] / base_row["perplexity"]
            row["cont_ppl_ratio"] = row["cont_ppl"] / base_row["cont_ppl"]
            row["verdict"] = verdict(row)
        from ._version import __version__

        result = {"nearswap_version": __version__, "base": str(base), "secondaries": [str(s) for s in secondaries], "rows": rows,
                  "verdict_rule": [dict(zip(("metric", "degraded", "garbage", "direction"), v)) for v in VERDICT]}
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
    """The card's table: t, % swapped per step, perplexity, verdict, first words of the sample."""
    n = len(result["secondaries"])
    head = "| t | " + " | ".join(f"% swapped, step {k + 1}" for k in range(n)) + " | perplexity | verdict | sample |"
    lines = [head, "|" + "---|" * (n + 4)]
    for row in result["rows"]:
        words = " ".join(row["sample"].split()[:12]).replace("|", "/")
        t = "base" if row["t"] == 0 else f"{row['t']:g}"
        swapped = " | ".join(f"{100 * s:.2f}%" for s in row["swapped"]) if row["t"] else " | ".join("—" for _ in range(n))
        lines.append(f"| {t} | {swapped} | {row['perplexity']:.2f} | {row['verdict']} | {words} … |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Perplexity vs t (log axis), points coloured by verdict, swap share on a second axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NearswapError("plots need matplotlib: pip install 'nearswap[plot]'") from None
    rows = [r for r in result["rows"] if r["t"] > 0]
    base = result["rows"][0]
    colors = {"ok": "tab:green", "degraded": "tab:orange", "garbage": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 5))
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
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

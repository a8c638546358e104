"""`nearswap sweep` and `nearswap eval`: is a merge better than its base, and is the difference real."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.errors import NearswapError
from .group import _p, _say, cli
from .options import (
    _parse_ts,
    force_option,
    json_option,
    quiet_option,
    ray_option,
    t_option,
    threads_option,
)
from .progress import _Phases


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@t_option("1e-4,3e-4,1e-3,2.5e-3,5e-3,1e-2,2e-2,5e-2,1e-1",
          "Thresholds to merge and judge (comma-separated, or repeat -t).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory for the table and plot.")
@click.option("--keep", is_flag=True, help="Keep the merged models (under OUT/models/).")
@click.option("--jobs", type=click.IntRange(1, 64), help="Parallel t values (default: by cores and memory).")
@force_option("Replace an existing output directory.")
@click.option("--tasks", default="arc_easy:0,hellaswag:0", show_default=True,
              help="Benchmark tasks each merge is compared with the base on ('none' to skip).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1), help="Items per task.")
@ray_option("One t per task on a Ray cluster (HOST:PORT, auto or local); OUT on storage every node sees.")
@threads_option("CPU threads per t value (default: 1; --jobs of them run at once).")
@json_option("Print the sweep (sweep.json) instead of the table.")
@quiet_option("No progress messages.")
def sweep(inputs, ts, out, keep, jobs, force, tasks, limit, ray_address, threads, as_json, quiet):
    """Merge BASE SECONDARY [...] at each t and judge it: the card's quality table (judge extra)."""
    from ..judge import sweep as sweeps

    if len(inputs) < 2:
        raise NearswapError("give a base and at least one secondary")
    values = _parse_ts(ts)
    say = (lambda m: None) if quiet or as_json else click.echo
    result = sweeps.run(inputs[0], inputs[1:], values, out=out, keep=keep, jobs=jobs, force=force,
                        tasks="" if tasks.strip() == "none" else tasks, limit=limit, ray_address=ray_address,
                        threads=threads or 1, echo=say)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    _say(sweeps.markdown(result))
    _say(f"wrote {_p(out / 'sweep.md')}, {_p(out / 'sweep.json')}, {_p(out / 'sweep.png')}")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--budget", required=True, help="The drift the merge may have, from the base: kl<=X (mean KL, nats per "
              "token), kl_p99<=X, or top1>=X (top-1 agreement).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output folder: tune.json/.md, frontier.png, recipe.yaml, the merge (merged/), the trials.")
@click.option("--max-merges", type=click.IntRange(2, 64), help="Merges a step, at most (default 6).")
@click.option("--drift-text", type=click.Path(path_type=Path), help="Text for the drift (default: the shipped one).")
@click.option("--per-kind", is_flag=True, help="Then a t per group of tensors (norms, attention, MLP, embeddings) "
              "within the same budget, from the single t upward (one secondary).")
@force_option("Discard an earlier tune's measured candidates in OUT and start over.")
@threads_option()
@json_option("Print the result (tune.json) instead of the table.")
@quiet_option("No progress messages.")
def tune(inputs, budget, out, max_merges, drift_text, per_kind, force, threads, as_json, quiet):
    """The largest t the base tolerates: each step's t at the edge of a drift budget, by
    bisection on the swap share (a few merges, not a grid), then the merge at that t with its
    card. A killed tune, run again, continues from its measured candidates.

    \b
      nearswap tune base/ s1/ s2/ s3/ --budget "kl<=0.01" -o tuned/
    """
    from .. import api
    from ..judge.tune import markdown, parse_budget

    parse_budget(budget)  # (a bad budget is one line before anything is opened)
    if len(inputs) < 2:
        raise NearswapError("give a base and at least one secondary")
    say = (lambda m: None) if quiet or as_json else (lambda m: click.echo(m, err=True))
    result = api.tune(inputs[0], list(inputs[1:]), budget, out, max_merges=max_merges, threads=threads, force=force,
                      drift_text=drift_text, per_kind=per_kind, echo=say)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "merge"}, indent=1))
        return
    _say(markdown(result))
    _say(f"wrote {_p(out / 'tune.md')}, {_p(out / 'tune.json')}, {_p(out / 'frontier.png')}, "
         f"{_p(out / 'recipe.yaml')}, {_p(out / 'merged')}")


@cli.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Report directory (written atomically).")
@click.option("--tasks", default="quick", show_default=True,
              help="Task names and presets (quick, leaderboard, all), comma-separated; NAME:N sets N few-shot examples; "
                   "'none' for no benchmarks.")
@click.option("--limit", type=click.IntRange(1), help="Score the first N items of each task (default: 100 for quick, else all).")
@click.option("--no-drift", is_flag=True, help="Skip the KL divergence from the reference.")
@click.option("--no-writing", is_flag=True, help="Skip the stories and their scores.")
@click.option("--cliches", type=click.Path(path_type=Path), help="Phrase list for the cliché rate (one phrase per line).")
@click.option("--drift-text", type=click.Path(path_type=Path), help="Text for the KL divergence (default: the shipped one).")
@click.option("--backend", type=click.Choice(["auto", "llama.cpp", "torch", "per-file"]), default="auto", show_default=True,
              help="What runs the models: llama.cpp when all are GGUF files, else torch (auto); one for all; or per-file "
                   "(llama.cpp for each .gguf, torch for the rest).")
@click.option("--against", multiple=True, type=click.Path(path_type=Path),
              help="Repeat once per model after the reference, in order: the model to compare it with on the tasks, "
                   "item by item (the base's same quant: which quant to ship).")
@ray_option("One model per task on a Ray cluster (HOST:PORT, auto or local); the models, the cache and OUT "
           "on storage every node sees.")
@threads_option("CPU threads (default: all cores).")
@force_option("Replace an earlier report directory.")
@json_option("Print the report as JSON (without per-item results).")
@quiet_option("No progress bars or messages.")
def evaluate(models, out, tasks, limit, no_drift, no_writing, cliches, drift_text, backend, against, ray_address, threads,
             force, as_json, quiet):
    """Judge MODEL [MODEL ...] against the first (the reference): benchmarks, drift, writing.

    \b
      nearswap eval base/ merged/ -o report/                  # the quick preset
      nearswap eval base/ merged/ --tasks leaderboard --limit 100 -o report/
      nearswap eval merged.f16.gguf merged.Q8_0.gguf merged.Q4_K_M.gguf \\
          --against base.Q8_0.gguf --against base.Q4_K_M.gguf -o quants/   # which quant to ship
    """
    from .. import judge
    from ..judge.report import markdown

    bar = _Phases(quiet or as_json)
    say = (lambda s: None) if quiet or as_json else (lambda s: (bar.close(), click.echo(s, err=True)))
    try:
        report = judge.evaluate(list(models), out, tasks="" if tasks.strip() == "none" else tasks, limit=limit,
                                drift=not no_drift, writing=not no_writing, cliches=cliches, drift_text=drift_text,
                                threads=threads, force=force, echo=say, progress=bar, ray_address=ray_address,
                                backend=backend, against=list(against))
    finally:
        bar.close()
    if as_json:
        slim = {**report, "tasks": [{k: v for k, v in t.items() if k != "items"} for t in report["tasks"]]}
        click.echo(json.dumps(slim, indent=1))
        return
    _say(markdown(report).split("\n### Stories")[0].rstrip())
    _say(f"\nwrote {_p(out / 'report.md')}, {_p(out / 'report.html')}, {_p(out / 'report.json')} ({report['seconds']:.0f} s)")

"""`nearswap curve`, `verify` and `inspect`: what a merge swaps, whether an output is as written, what a model holds."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.errors import NearswapError, shown
from .group import _p, _say, cli
from .options import (
    _parse_ts,
    _settings,
    force_option,
    json_option,
    quiet_option,
    t_option,
    threads_option,
)
from .progress import _Progress


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@t_option("1e-4,3e-4,1e-3,2.5e-3,5e-3,1e-2", "Thresholds to count exactly (comma-separated, or repeat -t).")
@click.option("--plot", "plot_dir", type=click.Path(path_type=Path), help="Write curve and heatmap (PNG, SVG) here.")
@click.option("--at", type=float, help="t of the layer x kind heatmap (default: the first --t).")
@threads_option()
@json_option("Print the counts and the curve as JSON.")
@force_option("Replace an existing --plot directory (once the new one is complete).")
@click.option("--swap-share", help="Instead of the table: for each step, the t at which this share of the weights "
              "swaps (e.g. 0.8%), found exactly (two reading passes per step), as merge --swap-share picks it.")
@click.option("--sample", type=click.FloatRange(0, 1, min_open=True),
              help="Read this fraction of every tensor (a systematic sample of blocks) and estimate each share "
                   "with its standard error, instead of counting every element. Default: every element while "
                   "the inputs fit in memory, else 0.01 (said in the output).")
@click.option("--exact", is_flag=True, help="Count every element, however large the inputs.")
@click.option("--dtype", help="The merge's output dtype, as merge --dtype (steps 2+ start from the result stored in "
              "it). Default: each base tensor's own.")
@quiet_option()
def curve(inputs, ts, plot_dir, at, threads, as_json, force, swap_share, sample, exact, dtype, quiet):
    """Swap share of BASE SECONDARY [SECONDARY ...] at any t, from one read, without merging.

    \b
      nearswap curve base/ s1/ --t 1e-4,1e-3,1e-2 --plot plots/
    """
    from ..measure import curve as curves

    if len(inputs) < 2:
        raise NearswapError("give a base and at least one secondary")
    if swap_share is not None:
        from ..measure.swapshare import choose, parse_share
        from ..merging import recipe as recipes
        from ..merging.plan import plan

        share = parse_share(swap_share)
        rec = recipes.build({"base": inputs[0], "steps": [{"model": m, "t": 0} for m in inputs[1:]],
                             **({"dtype": dtype} if dtype else {})}, "command line")
        chosen = choose(plan(rec), share, _settings(threads),
                        echo=(lambda m: None) if as_json else click.echo)
        if as_json:
            click.echo(json.dumps({"share": share, "steps": [c.__dict__ for c in chosen]}, indent=1))
        else:
            click.echo(f"merge with: -t {','.join(repr(c.t) for c in chosen)}")
        return
    values = _parse_ts(ts)
    if exact and sample is not None:
        raise click.UsageError("--exact and --sample exclude each other")
    if plot_dir:
        curves.check_plot_output(plot_dir, force, inputs)  # before the pass, not after it
    plan = curves.curve_plan(inputs[0], inputs[1:], dtype)
    why = ""
    if sample is None and not exact:
        sample, why = curves.default_sample(plan)
        if why and not as_json:
            click.echo(f"nearswap: {why}", err=True)
    bar = _Progress("reading", quiet or as_json)
    try:
        result = curves.compute(inputs[0], inputs[1:], values, settings=_settings(threads), progress=bar.update,
                                sample=sample, plan_=plan, on_plan=lambda p: bar.start(int(p.in_bytes * (sample or 1))))
    finally:
        bar.close()
    written = curves.write_plots(result, plot_dir, at, force) if plot_dir else []
    if as_json:
        data = result.to_json()
        if why:
            data["sample"]["why"] = why
        click.echo(json.dumps(data, indent=1))
        return
    _say(curves.format_table(result))
    for path in written:
        _say(f"wrote {_p(path)}")


@cli.command()
@click.argument("out")
@click.option("--inputs", is_flag=True, help="Also recompute a random sample of chunks from the inputs in the saved "
              "recipe and compare them bit for bit.")
@click.option("--sample", type=click.IntRange(1, 1_000_000), default=64, show_default=True,
              help="Chunks to recompute with --inputs.")
@click.option("--seed", type=int, help="Seed of the sample (default: a new one each run).")
@threads_option("Shards checked at once (default: all cores).")
@quiet_option()
@json_option("Print what was checked as JSON.")
def verify(out, inputs, sample, seed, threads, quiet, as_json):
    """Check a merge OUT (a directory, or a .gguf file) against the checksums it recorded when it
    was written (every byte re-read; any file it did not write is refused), and (--inputs)
    against its inputs.

    \b
      nearswap verify merged/
      nearswap verify merged/ --inputs --sample 200
      nearswap verify merged.gguf
    """
    from pathlib import Path as _Path

    from ..measure.verify import verify as run_verify

    bar = _Progress("verifying", quiet or as_json)
    try:
        where = _Path(out)
        bar.start(sum(p.stat().st_size for p in where.glob("*.safetensors")) if where.is_dir() else
                  where.stat().st_size if where.is_file() else 0)
        result = run_verify(out, inputs=inputs, sample=sample, seed=seed, threads=threads, progress=bar.update)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    rate = result["bytes"] / result["seconds"] / 1e9 if result["seconds"] else 0.0
    if "other_files" in result:
        line = (f"{_p(out)}: {result['files']} shards ({result['bytes'] / 1e9:.2f} GB) as written ({result['seconds']:.1f} s, "
                f"{rate:.2f} GB/s); headers, index and {result['other_files']} other files as written, no file it did not write")
    else:
        line = (f"{_p(out)}: header and {result['tensors']} tensors ({result['bytes'] / 1e9:.2f} GB) as written "
                f"({result['seconds']:.1f} s, {rate:.2f} GB/s)")
    if "recomputed" in result:
        r = result["recomputed"]
        line += f"; {r['chunks']} chunks ({r['elements']:,} elements) recomputed from the inputs: identical"
    _say(line)


@cli.command()
@click.argument("model")
@json_option("Print as JSON.")
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor.")
def inspect(model, as_json, list_tensors):
    """Describe MODEL: format, shards, tensors, parameters, dtypes, architecture."""
    from ..measure.describe import describe

    info = describe(model, list_tensors)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    _say(f"{_p(info['path'])}: {info['format']}")
    if info.get("gguf_architecture") and not info.get("hf_names"):
        _say(f"  architecture  {_p(info['gguf_architecture'])} (GGUF; no HF name table in nearswap yet: "
                   "inspect works, merging needs one)")
    else:
        _say(f"  architecture  {_p(', '.join(info['architectures'] or ['(no config.json)']))}")
    click.echo(f"  parameters    {info['parameters']:,} in {info['tensor_count']} tensors, {info['bytes'] / 1e9:.3f} GB")
    _say("  dtypes        " + ", ".join(f"{_p(k)} {v:,}" for k, v in info["dtypes"].items()))
    _say(f"  files         {_p(', '.join(info['files'])) or 'none (generated while read)'}")
    if info.get("nearswap"):
        _say(f"  made by       nearswap {_p(info['nearswap'])}")
    for t in info.get("tensors", []):
        name = t["name"] if t["name"].isprintable() else shown(t["name"], 200)  # no control codes on a terminal
        click.echo(f"  {name:<60} {t['dtype']:<5} {t['shape']}")

"""`nearswap merge` and `nearswap convert`: the merging layer's commands."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from ..core.errors import NearswapError, NearswapWarning
from .group import _p, _say, cli
from .options import (
    _parse_ts,
    _resume_mode,
    _settings,
    force_option,
    json_option,
    quiet_option,
    ray_option,
    resume_options,
    t_option,
    threads_option,
)
from .progress import _Progress, _stderr_is_a_terminal

RECIPE_SUFFIXES = (".yaml", ".yml")
PLAN_SHOWN_FROM = 10 * 10**9  # input bytes from which a merge prints its plan where no terminal shows a bar


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@t_option(None, "Threshold: one for all steps, or one per secondary (repeat -t, or comma-separated).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output directory (HF format), or a .gguf file (GGUF inputs of one architecture).")
@click.option("--swap-share", help="Instead of -t: for each step, the t at which this share of the weights swaps "
              "(e.g. 0.8%), found exactly before merging; the recipe records the t values.")
@click.option("--dtype", help="Output dtype (bfloat16, float16, float32). Default: each base tensor's own.")
@click.option("--plan", "show_plan", is_flag=True, help="Check the inputs, print what the merge would read, write and "
              "need on disk (and what separate passes would), and stop.")
@click.option("--type", "gguf_type", help="Tensor type of a .gguf output: like-base (default: each tensor keeps the "
              "base's type), f32, f16, bf16, q8_0, q4_0, q5_0, q4_k, q6_k, ...")
@click.option("--shard-size", help="Largest output shard, e.g. 5GB (default), 500MB, 2GiB.")
@click.option("--tokenizer-source", help="Model directory to take tokenizer files from (default: the base).")
@click.option("--carry-float32", is_flag=True, help="Keep float32 between steps instead of rounding after each.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge NaN/inf weights by the formula instead of refusing.")
@force_option()
@resume_options
@threads_option()
@ray_option("Run on a Ray cluster: HOST:PORT, auto (this machine's `ray start` cluster; the default "
           "when --ray is given alone) or local (a private Ray for this run). Needs the ray extra.")
@json_option("Print the merge report as JSON.")
@quiet_option()
def merge(inputs, ts, out, swap_share, dtype, show_plan, gguf_type, shard_size, tokenizer_source, carry_float32, allow_nonfinite,
          force, restart, no_resume, threads, ray_address, as_json, quiet):
    """Merge BASE SECONDARY [SECONDARY ...] (or one RECIPE.yaml) sequentially by NearSwap.

    \b
      nearswap merge base/ s1/ s2/ s3/ -t 1e-4 -o merged/
      nearswap merge recipe.yaml -o merged/
      nearswap merge base.gguf s1.gguf -t 1e-4 -o merged.gguf --type like-base
    """
    from ..api import run_recipe
    from ..merging import recipe as recipes
    from ..merging.layout import REPORT_NAME
    from ..merging.plan import describe_plan, plan, plan_for
    from ..merging.report import format_table

    options = {k: v for k, v in dict(dtype=dtype, shard_size=shard_size, tokenizer_source=tokenizer_source).items()
               if v is not None}
    options.update({k: True for k, v in dict(carry_float32=carry_float32, allow_nonfinite=allow_nonfinite).items() if v})
    if swap_share is not None and (ts or (len(inputs) == 1 and inputs[0].lower().endswith(RECIPE_SUFFIXES))):
        raise NearswapError("--swap-share chooses the t values: give it instead of -t, with a base and secondaries")
    if len(inputs) == 1 and inputs[0].lower().endswith(RECIPE_SUFFIXES):
        if ts:
            raise NearswapError("-t goes in the recipe when merging from a recipe file; remove -t")
        rec, said = recipes.with_fields(recipes.load(inputs[0]), options)
        for sentence in said:  # what the command line changed that the recipe set
            warnings.warn(sentence, NearswapWarning)
    else:
        secondaries = inputs[1:]
        if swap_share is not None:
            ts = (",".join(["0"] * len(secondaries)),)  # chosen below, once the inputs are checked
        rec = recipes.from_inputs(inputs[0], secondaries, _parse_ts(ts, check=False) if ts else None, options)
        if swap_share is not None and not show_plan:  # (the plan's bytes do not depend on t)
            from ..measure.swapshare import choose, parse_share

            share = parse_share(swap_share)
            say = (lambda m: None) if quiet or as_json else (lambda m: click.echo(m, err=True))
            say(f"choosing t for {100 * share:g}% swapped per step (two reading passes per step)")
            chosen = choose(plan(rec), share, _settings(threads), echo=say)
            rec = recipes.from_inputs(inputs[0], secondaries, [c.t for c in chosen], options)

    bar = _Progress("merging", quiet or as_json)

    if show_plan:
        _say("\n".join(describe_plan(plan_for(rec, out, gguf_type))))
        return

    def on_plan(p) -> None:  # noqa: ANN001
        if not (quiet or as_json) and (p.read_bytes >= PLAN_SHOWN_FROM or _stderr_is_a_terminal()):
            click.echo("\n".join(describe_plan(p)), err=True)
        bar.start(p.in_bytes)

    try:
        report = run_recipe(rec, out, gguf_type, force=force, settings=_settings(threads), ray_address=ray_address,
                            progress=bar.update, resume=_resume_mode(restart, no_resume), on_plan=on_plan)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        _say(format_table(report["steps"], report.get("all_steps")))
        size = f"{report['output']['total_size'] / 1e9:.2f} GB"
        if report["output"].get("null"):
            params = report["output"]["parameters"]
            click.echo(f"streamed {size} into null: (checksummed, not stored; digest {report['output']['digest'][:16]}); "
                       f"{report['seconds']:.1f} s, {params * (1 + len(report['steps'])) / max(report['seconds'], 1e-3) / 1e9:.2f}B "
                       "input parameters/s")
        elif "types" in report["output"]:  # a GGUF file
            types = ", ".join(f"{k} x{v}" for k, v in report["output"]["types"].items())
            _say(f"wrote {_p(out)} ({size}; {_p(types)}; {report['seconds']:.1f} s)")
        else:
            _say(f"wrote {_p(out)} ({size} in {len(report['output']['files'])} files, "
                 f"{report['seconds']:.1f} s); per-tensor counts in {_p(out / REPORT_NAME)}")


@cli.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output directory (HF format).")
@click.option("--dtype", help="Cast floating tensors (bfloat16, float16, float32). Default: keep (F32 for GGUF).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@force_option()
@resume_options
@threads_option()
@quiet_option()
@json_option("Print the conversion report as JSON.")
def convert(model, out, dtype, shard_size, force, restart, no_resume, threads, quiet, as_json):
    """Rewrite MODEL (GGUF, safetensors, HF dir) as an HF checkpoint: safetensors, config, tokenizer."""
    from ..merging.convert import convert as run_convert

    bar = _Progress("converting", quiet or as_json)
    try:
        report = run_convert(model, out, dtype=dtype, shard_size=shard_size, force=force, settings=_settings(threads),
                             resume=_resume_mode(restart, no_resume), progress=bar.update, on_plan=lambda p: bar.start(p.in_bytes))
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    _say(f"wrote {_p(out)} ({report['output']['total_size'] / 1e9:.2f} GB, {report['output']['tensors']} tensors)")
    for name in report["output"]["copied"]:
        _say(f"  {_p(name)}")

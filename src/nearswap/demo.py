"""`nearswap demo`: the quartet on an embedded default, no download needed.

A generated Llama-shaped float32 base (~31M parameters) and three secondaries (base +
Laplace noise of scale 0.0125 on every weight but the norms: stand-ins for three
fine-tunes, sized so that t = 0.0001 swaps ~0.8% per pass, as on the model card) are
merged sequentially at t = 0.0001, and the per-step report is printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import engine, recipe, synthetic

T = 1e-4
NOISE = 0.0125
STEPS = 3


def default_workdir() -> Path:
    import os

    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "nearswap" / "demo"


def ensure_models(workdir: Path, echo: Callable[[str], None]) -> tuple[Path, list[Path]]:
    """Generate the base and secondaries once; later runs reuse them."""
    base = workdir / "base"
    secondaries = [workdir / f"s{i}" for i in range(1, STEPS + 1)]
    if not (base / "config.json").exists():
        echo(f"generating the demo base ({synthetic.SHAPES['demo'].num_params / 1e6:.0f}M parameters, float32) in {base}")
        _atomic(base, lambda d: synthetic.make_base(d, "demo", "float32", seed=0))
    for i, sec in enumerate(secondaries, 1):
        if not (sec / "config.json").exists():
            echo(f"generating secondary s{i}: base + Laplace noise, scale {NOISE}")
            _atomic(sec, lambda d, i=i: synthetic.make_secondary(base, d, NOISE, seed=i))
    return base, secondaries


def _atomic(target: Path, make: Callable[[Path], object]) -> None:
    from .output import atomic_directory

    with atomic_directory(target, force=True) as tmp:
        make(tmp)


def run_demo(workdir: Path | None, echo: Callable[[str], None], progress=None, on_plan=None) -> dict:
    workdir = Path(workdir) if workdir else default_workdir()
    base, secondaries = ensure_models(workdir, echo)
    rec = recipe.build({"base": str(base), "steps": [{"model": str(s), "t": T} for s in secondaries]}, "demo")
    out = workdir / "merged"
    echo(f"merging base + {len(secondaries)} secondaries sequentially at t = {T} -> {out}")
    report = engine.merge(rec, out, force=True, progress=progress, on_plan=on_plan)
    echo(report["table"])
    echo(f"expected per step: 1 - exp(-t/scale) = {100 * (1 - __import__('math').exp(-T / NOISE)):.2f}% swapped "
         "(the model card's ~0.8%)")
    echo(f"merged model: {out} ({report['output']['total_size'] / 1e6:.0f} MB, {report['seconds']:.2f} s); "
         f"report: {out / engine.REPORT_NAME}")
    return report

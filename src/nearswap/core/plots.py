"""Figures without pyplot: no backend is switched, no global style is changed.

``figure`` makes a ``matplotlib.figure.Figure`` (rendered by Agg when saved, whatever the
process's pyplot backend); ``save`` writes it with the settings nearswap wants (SVG glyphs as
paths: no font is ever fetched) applied for that call only.
"""

from __future__ import annotations

from typing import Any

from .errors import NearswapError


def figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes) of ``figsize`` inches; a one-line error when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise NearswapError("plots need matplotlib: pip install 'nearswap[plot]'") from None
    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def save(fig: Any, target: Any, **options: Any) -> None:
    """``fig.savefig(target, **options)`` with SVG text as paths, for this call only."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "path"}):
        fig.savefig(target, **options)

"""The options that several commands share, each declared once, and how their values are
read (thresholds, threads and chunk size, the resume mode)."""

from __future__ import annotations

import os

import click

from ..core.errors import NearswapError, shown


def _settings(threads: int | None):
    """How passes run: ``--threads``, and ``NEARSWAP_CHUNK`` (elements per work item) from the
    environment — the only place nearswap reads it."""
    from ..runtime.stream import Settings

    return Settings.from_env(os.environ, threads)


def t_option(default: str | None, help: str):
    """``-t``/``--t``, the same on every command that takes thresholds: repeatable, and each
    value may be a comma-separated list (``-t 1e-4 -t 3e-4`` is ``-t 1e-4,3e-4``)."""
    return click.option("-t", "--t", "ts", multiple=True, default=(default,) if default else (), show_default=True,
                        help=help)


def threads_option(help: str = "Worker threads (default: all cores)."):
    return click.option("--threads", type=click.IntRange(1, 256), help=help)


def json_option(help: str):
    return click.option("--json", "as_json", is_flag=True, help=help)


def quiet_option(help: str = "No progress bar."):
    return click.option("-q", "--quiet", is_flag=True, help=help)


def force_option(help: str = "Replace an existing output (only once the new one is complete)."):
    return click.option("--force", is_flag=True, help=help)


def resume_options(command):
    """``--restart`` and ``--no-resume``, the same on every command whose output resumes."""
    command = click.option("--no-resume", is_flag=True, help="Neither continue an earlier run nor keep this run's "
                           "partial output when writing fails.")(command)
    return click.option("--restart", is_flag=True, help="Discard the unfinished output of an earlier, killed run "
                        "into OUT instead of continuing it.")(command)


def ray_option(help: str):
    return click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
                        help=help)


def _parse_ts(text: "str | tuple[str, ...]", check: bool = True) -> list[float]:
    """Thresholds from -t/--t values (each a number or a comma-separated list), at least one;
    with ``check``, finite numbers >= 0 (``merge`` leaves that to the recipe builder, which
    says it in the words ``nearswap.merge()`` uses). ``1_0`` is refused: Python reads it as 10."""
    text = ",".join(text) if isinstance(text, tuple) else text
    parts = [x.strip() for x in text.split(",") if x.strip()]
    try:
        if any("_" in x for x in parts):
            raise ValueError
        values = [float(x) for x in parts]
    except ValueError:
        raise click.BadParameter(f"takes numbers (or comma-separated lists of them), got {shown(text)}",
                                 param_hint="-t/--t") from None
    if not values:
        raise click.BadParameter("needs at least one threshold", param_hint="-t/--t")
    if not check:
        return values
    from ..core.kernels import check_t

    try:
        return [check_t(t) for t in values]
    except ValueError as e:
        raise NearswapError(str(e)) from None



def _resume_mode(restart: bool, no_resume: bool) -> str:
    return "never" if no_resume else "restart" if restart else "auto"


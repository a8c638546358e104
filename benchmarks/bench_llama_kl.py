"""KL of a quant to its float model: nearswap's drift (llama.cpp backend) against llama.cpp's own
``llama-perplexity --kl-divergence`` on the same text, the same chunks and positions.

SmolLM2-135M: an F16 GGUF (nearswap's export of its HF twin) is the reference; Q8_0 and Q4_K_M
are made from it by ``llama-quantize``. llama-perplexity cuts the text into chunks of ``-c``
tokens and scores the second half of each; nearswap's ``drift.compare`` (the figure ``eval``
reports) is computed on each chunk through ``LlamaModel`` and averaged over the same positions.

    PATH=LLAMA_CPP/build/bin:$PATH .venv/bin/python benchmarks/bench_llama_kl.py [--ctx 256]

(llama-perplexity and llama-quantize built from llama.cpp's source: the xllamacpp 2026.10.11549
sdist's ``thirdparty/llama.cpp``, ``cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF`` and
``cmake --build build --target llama-perplexity llama-quantize``: ~12 minutes on two cores.)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-kl-") as tmp:  # (the models it writes: removed after)
        measure(args, Path(tmp))


def measure(args: argparse.Namespace, work: Path) -> None:
    perplexity, quantize = shutil.which("llama-perplexity"), shutil.which("llama-quantize")
    if not perplexity or not quantize:
        raise SystemExit("llama-perplexity and llama-quantize must be on PATH (see the docstring)")

    import numpy as np

    from nearswap.demo.fetch import fetch
    from nearswap.judge import drift
    from nearswap.judge.quick import fixed_text
    from nearswap.merging.convert import convert
    from nearswap.runtime.llama_model import LlamaModel
    from nearswap.ship.gguf_export import export_gguf

    convert(fetch(), work / "hf")
    export_gguf(work / "hf", work / "f16.gguf", "f16")
    text = work / "text.txt"
    text.write_text(fixed_text())
    base = subprocess.run([perplexity, "-m", work / "f16.gguf", "-f", text, "-c", str(args.ctx), "-t", "2",
                           "--kl-divergence-base", work / "f16.kld"], capture_output=True, text=True)
    assert base.returncode == 0, base.stderr[-2000:]
    figures = {"ctx": args.ctx, "quants": {}}
    with LlamaModel(work / "f16.gguf", n_ctx=args.ctx) as ref_model:
        ids = ref_model.tokenize(fixed_text(), add_special=False)
        chunks = [ids[i:i + args.ctx] for i in range(0, len(ids) - args.ctx + 1, args.ctx)]
        if ref_model.adds_bos:  # as llama-perplexity: a chunk's first token becomes BOS
            chunks = [[ref_model.bos, *c[1:]] for c in chunks]
        refs = [drift.Reference(c, drift.log_probs(ref_model, c)) for c in chunks]
    first = args.ctx // 2
    for qtype in ("Q8_0", "Q4_K_M"):
        q = work / f"{qtype.lower()}.gguf"
        made = subprocess.run([quantize, work / "f16.gguf", q, qtype], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr[-2000:]
        theirs = subprocess.run([perplexity, "-m", q, "-f", text, "-c", str(args.ctx), "-t", "2",
                                 "--kl-divergence-base", work / "f16.kld", "--kl-divergence"],
                                capture_output=True, text=True)
        assert theirs.returncode == 0, theirs.stderr[-2000:]
        found = re.search(r"Mean\s+KLD:\s+([\d.]+)", theirs.stdout + theirs.stderr)
        kl_llama = float(found.group(1)) if found else float("nan")
        with LlamaModel(q, n_ctx=args.ctx) as model:
            per = [drift.compare(r, model)["kl_per_token"][first:args.ctx - 1] for r in refs]
        ours = float(np.mean([v for p in per for v in p]))
        figures["quants"][qtype] = {"size_bytes": q.stat().st_size, "kl_nearswap": ours, "kl_llama_perplexity": kl_llama,
                                    "relative_difference": abs(ours - kl_llama) / kl_llama, "chunks": len(chunks),
                                    "positions": sum(len(p) for p in per)}
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""GGUF dequantization: nearswap's C kernel against gguf.quants, and what it does to a merge.

    .venv/bin/python benchmarks/bench_dequant.py [--elements 16777216] [--repeat 5]

1. Per type, one core: million parameters per second of ``gguf.quants.dequantize`` (numpy)
   and of ``nearswap.formats.gguf.dequantize`` (the C kernel) on the same random blocks,
   after checking that they agree bit for bit.
2. The demo merge (SmolLM2-135M, one secondary, t = 1e-4) from the Q4_1 GGUF base and from
   its safetensors twin (the same float32 values), interleaved rounds, wall time medians
   (``--outdir /dev/shm`` writes the merges to memory: this VM's disk varies by 2x between runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def per_type(elements: int, repeat: int) -> list[dict]:
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from nearswap.formats import gguf as g

    rows = []
    for qtype in (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, (elements // block // 1024, 1024 * size), dtype=np.uint8)
        raw.reshape(-1, size)[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite scales
        n = raw.size // size * block
        times = {"gguf": [], "nearswap": []}
        for _ in range(repeat):
            for name, fn in (("gguf", lambda: quants.dequantize(raw, qtype)), ("nearswap", lambda: g.dequantize(raw, qtype))):
                t = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t)
        assert np.array_equal(np.asarray(quants.dequantize(raw, qtype), np.float32).view(np.uint32),
                              g.dequantize(raw, qtype).view(np.uint32))
        del out
        ours, theirs = statistics.median(times["nearswap"]), statistics.median(times["gguf"])
        rows.append({"type": qtype.name, "elements": n, "gguf_mparams_s": n / theirs / 1e6,
                     "nearswap_mparams_s": n / ours / 1e6, "speedup": theirs / ours})
        print(f"{qtype.name:<6} gguf {n / theirs / 1e6:8.0f} M/s   nearswap {n / ours / 1e6:8.0f} M/s   {theirs / ours:6.1f}x",
              flush=True)
    return rows


def merge_gguf_vs_twin(repeat: int, outdir: Path | None) -> dict:
    from nearswap.demo import fetch, synthetic
    from nearswap.merging.convert import convert

    work = Path(tempfile.mkdtemp(prefix="nearswap-bench-dq-"))
    try:
        base = fetch.fetch()
        convert(base, work / "twin")
        synthetic.make_secondary(base, work / "s1", 0.0125, seed=1)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(synthetic.__file__).parent)], check=True)
        out = (outdir or work) / "nearswap-bench-dq-out"
        runs = {"GGUF base": [], "safetensors twin": []}
        for _ in range(repeat):
            for name, b in (("GGUF base", base), ("safetensors twin", work / "twin")):
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "nearswap", "merge", str(b), str(work / "s1"), "-t", "1e-4",
                                "-o", str(out), "-q"], check=True, capture_output=True)
                runs[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in runs.items()}
        ratio = med["GGUF base"] / med["safetensors twin"]
        print(f"\nmerge from the GGUF base {med['GGUF base']:.2f} s, from its safetensors twin "
              f"{med['safetensors twin']:.2f} s: {ratio:.2f}x (medians of {repeat})")
        shutil.rmtree(out, ignore_errors=True)
        return {"median_s": med, "runs": runs, "ratio": ratio, "outdir": str(outdir or "disk")}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--outdir", type=Path, help="where the merges write (/dev/shm takes the disk out of it)")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    result = {"per_type": per_type(args.elements, args.repeat), "merge": merge_gguf_vs_twin(args.repeat, args.outdir)}
    out = HERE / "results" / "dequant.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()

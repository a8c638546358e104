"""imatrix quants of SmolLM2-135M-Instruct: llama.cpp's perplexity with and without the matrix.

    PATH=/path/to/llama.cpp/build/bin:$PATH python benchmarks/bench_imatrix.py [--types q2_k,q3_k_s,iq4_xs]

Needs llama.cpp's `llama-quantize` and `llama-perplexity` on PATH (llama-cpp-python ships
neither: build them from its sdist's vendor/llama.cpp, `cmake --build build --target
llama-quantize llama-perplexity`) and llama-cpp-python (the quantizer without a matrix).
The original is the demo model converted to an HF float32 checkpoint (`nearswap convert`).
`nearswap imatrix` computes the matrix over the first 150 passages of LAMBADA's test split (the
evaluation data cache); each type is exported twice (`nearswap export --type T`, and the same
with `--imatrix`), and `llama-perplexity -c 256` measures both on LAMBADA's last 200 passages
(held out). Writes benchmarks/results/imatrix-smollm2.md.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def nearswap(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "nearswap", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"nearswap {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def perplexity(gguf: Path, text: Path) -> tuple[float, float]:
    proc = subprocess.run(["llama-perplexity", "-m", str(gguf), "-f", str(text), "-c", "256", "-t", "2"],
                          capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", proc.stdout + proc.stderr)
    if not found:
        sys.exit(f"llama-perplexity failed on {gguf}: {(proc.stdout + proc.stderr).strip()[-500:]}")
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q2_k,q3_k_s,iq4_xs")
    ap.add_argument("--workdir", type=Path, default=HERE / "work" / "imatrix")
    args = ap.parse_args()
    for program in ("llama-quantize", "llama-perplexity"):
        if shutil.which(program) is None:
            sys.exit(f"{program} is not on PATH (see this script's docstring)")
    from nearswap.demo import fetch

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    lambada = fetch.cache_dir() / "eval" / "data" / "lambada" / "test.jsonl"
    texts = [json.loads(line)["text"] for line in lambada.read_text().splitlines()]
    (work / "calibration.txt").write_text("\n\n".join(texts[:150]) + "\n")
    (work / "held-out.txt").write_text("\n\n".join(texts[-200:]) + "\n")
    original = work / "smollm2-hf"
    if not (original / "config.json").is_file():
        nearswap("convert", str(fetch.fetch()), "-o", str(original), "-q")
    started = time.perf_counter()
    made = json.loads(nearswap("imatrix", str(original), "--text", str(work / "calibration.txt"), "-o",
                               str(work / "imatrix.gguf"), "--force", "--json"))
    imatrix_seconds = time.perf_counter() - started
    nearswap("export", str(original), "-o", str(work / "f16.gguf"), "--type", "f16", "--force", "-q")
    rows = [("f16", "-", *perplexity(work / "f16.gguf", work / "held-out.txt"), (work / "f16.gguf").stat().st_size, "")]
    for type_name in args.types.split(","):
        for label, extra in (("no", []), ("yes", ["--imatrix", str(work / "imatrix.gguf")])):
            out = work / f"{type_name}-{'imat' if extra else 'plain'}.gguf"
            report = json.loads(nearswap("export", str(original), "-o", str(out), "--type", type_name, "--force",
                                         "--json", *extra))
            ppl, err = perplexity(out, work / "held-out.txt")
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(report["tensors"].items()))
            rows.append((type_name, label, ppl, err, out.stat().st_size, kinds))
            print(f"{type_name} imatrix={label}: PPL {ppl:.4f} +/- {err:.4f}; {kinds}", flush=True)
    lines = ["# imatrix quants of SmolLM2-135M-Instruct: llama.cpp's perplexity\n",
             f"`python benchmarks/bench_imatrix.py --types {args.types}`: `nearswap imatrix` over {made['chunks']} "
             f"chunks of {made['chunk_tokens']} tokens (150 LAMBADA test passages) took {imatrix_seconds:.0f} s on "
             "this 2-core CPU; perplexity by `llama-perplexity -c 256` on the last 200 LAMBADA test passages.\n",
             "| type | imatrix | PPL | +/- | MB | tensor types |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {t} | {m} | {p:.4f} | {e:.4f} | {s / 1e6:.1f} | {k} |" for t, m, p, e, s, k in rows]
    (HERE / "results" / "imatrix-smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

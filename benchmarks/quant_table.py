"""Which quant to ship: the demo merge's GGUF quants against the base's same quants.

    python benchmarks/quant_table.py [--limit 100]

The README's walkthrough merge (SmolLM2-135M-Instruct's Q4_1 GGUF with the demo's three derived
secondaries, t = 1e-4, bfloat16) and its base, each exported as Q8_0 (nearswap), Q4_K_M
(llama.cpp's whole-file quantizer) and IQ4_XS with an importance matrix of its own
(`nearswap imatrix` over LAMBADA's last 150 test passages, none of them among the items scored);
then one `nearswap eval` in llama.cpp: the merge's F32 GGUF as the reference (KL and top-1 of
each quant to it), each merge quant paired with the base's same quant on the quick preset's
items (`--against`). The quants come from llama.cpp's own quantizer (compiled once against the
prebuilt llama.cpp, or `llama-quantize` where it is on PATH: the same bytes). Writes the eval
report under --workdir and benchmarks/results/quant-table-smollm2.md; prints the commands.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TYPES = (("q8_0", False), ("q4_k_m", False), ("iq4_xs", True))  # (type, with an importance matrix)


def nearswap(*args: str) -> str:
    print("$ nearswap " + " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "nearswap", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"nearswap {' '.join(args)} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100, help="items per quick task (the quick preset's own: 100)")
    ap.add_argument("--workdir", type=Path, default=HERE / "work" / "quant-table")
    args = ap.parse_args()
    from nearswap.demo import fetch
    from nearswap.judge import data, tasks

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    base = fetch.fetch()
    demo = fetch.cache_dir() / "demo" / "smollm2"  # where `nearswap demo` keeps its files
    if not all((demo / f"s{i}" / "config.json").is_file() for i in (1, 2, 3)):
        nearswap("demo")  # derives the secondaries s1..s3 (base + seeded noise) into the cache
    data.prepare([s.task for s in tasks.select("quick")])
    lambada = fetch.cache_dir() / "eval" / "data" / "lambada" / "test.jsonl"
    texts = [json.loads(line)["text"] for line in lambada.read_text().splitlines()]
    (work / "calibration.txt").write_text("\n\n".join(texts[-150:]) + "\n")  # not among the first --limit scored
    merged = work / "merged"
    if not (merged / "merge_report.json").is_file():
        nearswap("merge", str(base), *(str(demo / f"s{i}") for i in (1, 2, 3)), "-t", "1e-4", "--dtype", "bfloat16",
                 "-o", str(merged), "--force", "-q")
    started = time.perf_counter()
    files: dict[tuple[str, str], Path] = {}
    for name, source in (("merged", merged), ("base", base)):
        imatrix = work / f"{name}.imatrix.gguf"
        if not imatrix.is_file():
            nearswap("imatrix", str(source), "--text", str(work / "calibration.txt"), "-o", str(imatrix), "-q")
        for type_name, with_matrix in (("f32", False), *TYPES) if name == "merged" else TYPES:
            out = files[name, type_name] = work / f"{name}.{type_name}.gguf"
            if not out.is_file():
                nearswap("export", str(source), "-o", str(out), "--type", type_name, "-q",
                         *(["--imatrix", str(imatrix)] if with_matrix else []))
    made = time.perf_counter() - started
    report_dir = work / "quants"
    started = time.perf_counter()
    nearswap("eval", str(files["merged", "f32"]), *(str(files["merged", t]) for t, _ in TYPES),
             *(x for t, _ in TYPES for x in ("--against", str(files["base", t]))), "--limit", str(args.limit),
             "--no-writing", "-o", str(report_dir), "--force", "-q")
    judged = time.perf_counter() - started
    nearswap("card", str(merged), *(x for t, _ in TYPES for x in ("--quants", str(files["merged", t]))),
             "--quant-eval", str(report_dir))
    report = json.loads((report_dir / "report.json").read_text())
    from nearswap.judge.report import quant_table

    table = quant_table(report)
    lines = ["# Which quant to ship: the demo merge's quants against the base's (SmolLM2-135M-Instruct)\n",
             f"`python benchmarks/quant_table.py --limit {args.limit}`: exports and "
             f"importance matrices {made:.0f} s, the eval (7 models in llama.cpp, the quick preset's "
             f"{args.limit} items a task) {judged:.0f} s on this machine.\n", *table, "",
             "Per task: the merge quant's score minus the base's same quant's, in points, with the 95% paired "
             "interval; KL and top-1 to the merge's F32 GGUF on nearswap's fixed text.\n"]
    (HERE / "results" / "quant-table-smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

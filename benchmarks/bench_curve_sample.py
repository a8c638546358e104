"""`nearswap curve --sample` against the full (exact) curve, cold and warm, side by side.

    python benchmarks/bench_curve_sample.py [--size 0.5b] [--sample 0.01] [--repeat 3]

Per round: drop the page cache (needs root; otherwise the "cold" rows are warm and say so),
run the full curve of the synthetic pair of bench_merge; drop it again, run the sampled one;
then both once more with every input read into the page cache first. Reports the medians of wall time, the bytes each read, and every
share of the sample against the exact one in standard errors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from bench_merge import HERE, ensure_inputs
from bench_verify import drop_caches


def run(cmd: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return time.perf_counter() - started, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--sample", type=float, default=0.01)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    base, secs = ensure_inputs(args.size, HERE / "work")
    full = [sys.executable, "-m", "nearswap", "curve", str(base), str(secs[0]), "--json", "-q"]
    sampled = [*full, "--sample", str(args.sample)]
    times: dict[str, list[float]] = {}
    cold = True
    results = {}
    for _ in range(args.repeat):
        for warmth in ("cold", "warm"):
            for name, cmd in (("full curve (exact)", full), (f"--sample {args.sample:g}", sampled)):
                if warmth == "cold":
                    cold = drop_caches() and cold
                else:  # every input byte in the page cache
                    for f in [*base.glob("*.safetensors"), *secs[0].glob("*.safetensors")]:
                        with open(f, "rb") as fh:
                            while fh.read(64 << 20):
                                pass
                took, results[name] = run(cmd)
                times.setdefault(f"{name}, {warmth}", []).append(took)
    exact, est = results["full curve (exact)"], results[f"--sample {args.sample:g}"]
    total = exact["steps"][0]["total"]
    in_bytes = sum(p.stat().st_size for d in (base, secs[0]) for p in d.glob("*.safetensors"))
    sample = est["sample"]
    print(f"{args.size}, one pair, {total:,} weights; medians of {args.repeat}"
          + ("" if cold else " (page cache could not be dropped: the 'cold' rows are warm)"))
    print(f"sample: {sample['blocks']:,} blocks, {sample['elements']:,} elements ({100 * sample['elements'] / total:.2f}%), "
          f"{sample['bytes_read'] / 1e6:.1f} MB read of {in_bytes / 1e6:.0f} MB ({in_bytes / sample['bytes_read']:.0f}x less)")
    print("| run | wall s |")
    print("|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} |")
    print("| t | exact | sampled | ± s.e. | off by (s.e.) |")
    print("|---|---:|---:|---:|---:|")
    for t in exact["ts"]:
        key = repr(t)
        e, s, se = exact["steps"][0]["share"][key], est["steps"][0]["share"][key], sample["stderr"][0][key]
        print(f"| {t:g} | {100 * e:.3f}% | {100 * s:.3f}% | {100 * se:.3f} | {abs(s - e) / se:.2f} |")


if __name__ == "__main__":
    main()

"""`nearswap curve --sample` against the full (exact) curve, cold and warm, side by side.

    python benchmarks/bench_curve_sample.py [--size 0.5b] [--sample 0.01] [--repeat 3]

Per round: drop the page cache (needs root; otherwise the "cold" rows are warm and say so),
run the full curve of the synthetic pair of bench_merge; drop it again, run the sampled one;
then both once more with every input read into the page cache first. Each is timed twice: the
command (`nearswap curve ... --json`, a fresh process) and the curve itself (a process that
imports nearswap, then drops the page cache, then times `curve.compute`): at 0.5B a sampled
command is mostly the start of Python. Reports the medians of wall time, the bytes each read,
and every share of the sample against the exact one in standard errors.
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


# The curve alone: imports done, then the page cache dropped (cold) or left (warm), then timed.
INNER = r"""
import json, sys, time
from nearswap.measure import curve
sys.path.insert(0, %r)
from bench_verify import drop_caches
base, sec, sample, cold = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "cold"
if cold:
    drop_caches()
started = time.perf_counter()
curve.compute(base, [sec], sample=sample if sample < 1 else None)
print(json.dumps(time.perf_counter() - started))
""" % str(HERE)


def inner(base, sec, sample: float, warmth: str) -> float:
    proc = subprocess.run([sys.executable, "-c", INNER, str(base), str(sec), str(sample), warmth],
                          check=True, stdout=subprocess.PIPE, text=True)
    return float(proc.stdout)


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
            for name, cmd, fraction in (("full curve (exact)", full, 1.0),
                                        (f"--sample {args.sample:g}", sampled, args.sample)):
                for what in ("command", "curve.compute"):
                    if warmth == "cold":
                        cold = drop_caches() and cold
                    else:  # every input byte in the page cache
                        for f in [*base.glob("*.safetensors"), *secs[0].glob("*.safetensors")]:
                            with open(f, "rb") as fh:
                                while fh.read(64 << 20):
                                    pass
                    if what == "command":
                        took, results[name] = run(cmd)
                    else:
                        took = inner(base, secs[0], fraction, warmth)
                    times.setdefault((name, warmth, what), []).append(took)
    exact, est = results["full curve (exact)"], results[f"--sample {args.sample:g}"]
    total = exact["steps"][0]["total"]
    in_bytes = sum(p.stat().st_size for d in (base, secs[0]) for p in d.glob("*.safetensors"))
    sample = est["sample"]
    print(f"{args.size}, one pair, {total:,} weights; medians of {args.repeat}"
          + ("" if cold else " (page cache could not be dropped: the 'cold' rows are warm)"))
    print(f"sample: {sample['blocks']:,} blocks, {sample['elements']:,} elements ({100 * sample['elements'] / total:.2f}%), "
          f"{sample['bytes_read'] / 1e6:.1f} MB read of {in_bytes / 1e6:.0f} MB ({in_bytes / sample['bytes_read']:.0f}x less)")
    print("| run | command, wall s | curve.compute alone, s |")
    print("|---|---:|---:|")
    for warmth in ("cold", "warm"):
        for name in ("full curve (exact)", f"--sample {args.sample:g}"):
            cmd, alone = (statistics.median(times[(name, warmth, w)]) for w in ("command", "curve.compute"))
            print(f"| {name}, {warmth} | {cmd:.3f} | {alone:.3f} |")
    for warmth in ("cold", "warm"):
        ratio = [statistics.median(times[("full curve (exact)", warmth, w)])
                 / statistics.median(times[(f"--sample {args.sample:g}", warmth, w)]) for w in ("command", "curve.compute")]
        print(f"{warmth}: the sample takes {ratio[0]:.1f}x less time as a command, {ratio[1]:.1f}x less as the curve alone")
        rounds = [f / e for f, e in zip(times[("full curve (exact)", warmth, "curve.compute")],
                                        times[(f"--sample {args.sample:g}", warmth, "curve.compute")])]
        print(f"  (the curve alone, round by round: {min(rounds):.1f}x to {max(rounds):.1f}x)")
    print("| t | exact | sampled | ± s.e. | off by (s.e.) |")
    print("|---|---:|---:|---:|---:|")
    for t in exact["ts"]:
        key = repr(t)
        e, s, se = exact["steps"][0]["share"][key], est["steps"][0]["share"][key], sample["stderr"][0][key]
        print(f"| {t:g} | {100 * e:.3f}% | {100 * s:.3f}% | {100 * se:.3f} | {abs(s - e) / se:.2f} |")


if __name__ == "__main__":
    main()

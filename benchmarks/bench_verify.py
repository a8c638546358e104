"""`nearswap verify` against reading the same files with `cat`, cold and warm, side by side.

    python benchmarks/bench_verify.py [--size 0.5b] [--repeat 3]

Merges the synthetic pair of bench_merge once (1 step, under benchmarks/work/), then per round:
drop the page cache (needs root; otherwise the "cold" rows are warm and say so), `cat` the
shards to /dev/null; drop it again, `nearswap verify`; then both once more with the cache warm.
Medians of wall time: verify's work is reading every shard (CRC-32C in hardware is not the limit);
the last column is verify's own figure for the reading and checking alone (``--json``: seconds),
without the start of a Python process, its imports and the header checks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_merge import HERE, ensure_inputs


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def wall(cmd: list[str], inner: list[float] | None = None) -> float:
    """Wall seconds of ``cmd``; with ``inner``, append the ``seconds`` of its JSON output."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    took = time.perf_counter() - started
    if inner is not None:
        inner.append(json.loads(proc.stdout)["seconds"])
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    args = ap.parse_args()
    base, secs = ensure_inputs(args.size, args.workdir)
    out = args.workdir / f"verify-{args.size}"
    if not (out / "merge_report.json").is_file():
        subprocess.run([sys.executable, "-m", "nearswap", "merge", "-q", str(base), str(secs[0]), "-t", "1e-4",
                        "-o", str(out)], check=True, stdout=subprocess.DEVNULL)
    shards = sorted(str(p) for p in out.glob("*.safetensors"))
    size = sum(os.path.getsize(p) for p in shards)
    cat = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *shards]
    verify = [sys.executable, "-m", "nearswap", "verify", "-q", "--json", str(out)]
    times: dict[str, list[float]] = {}
    inner: dict[str, list[float]] = {}
    cold = True
    for _ in range(args.repeat):
        for name, cmd in (("cat", cat), ("nearswap verify", verify)):
            cold = drop_caches() and cold
            times.setdefault(f"{name}, cold", []).append(wall(cmd, inner.setdefault(f"{name}, cold", []) if cmd is verify else None))
        for name, cmd in (("cat", cat), ("nearswap verify", verify)):
            times.setdefault(f"{name}, warm", []).append(wall(cmd, inner.setdefault(f"{name}, warm", []) if cmd is verify else None))
    print(f"{args.size}: {len(shards)} shard(s), {size / 1e9:.2f} GB; medians of {args.repeat}"
          + ("" if cold else " (page cache could not be dropped: the 'cold' rows are warm)"))
    print("| run | wall s | GB/s | reading and checking alone: s | GB/s |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        m = statistics.median(values)
        alone = f"{statistics.median(inner[name]):.2f} | {size / statistics.median(inner[name]) / 1e9:.2f}" if inner.get(name) else " | "
        print(f"| {name} | {m:.2f} | {size / m / 1e9:.2f} | {alone} |")


if __name__ == "__main__":
    main()

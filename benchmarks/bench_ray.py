"""A merge through a local two-node Ray cluster against the same merge on local threads.

    .venv/bin/python benchmarks/bench_ray.py [--size 0.5b] [--steps 1] [--repeat 3] [--outdir /dev/shm]

Starts a head and a second Ray node of its own on 127.0.0.1 (one CPU each: this machine's two
cores; stopped without touching any other Ray on the machine), merges the benchmark pair (``bench_merge.py``'s inputs) with ``--ray`` and without,
interleaved, and checks that the outputs are bit-identical. On one machine Ray can only add
overhead (connecting, starting worker processes, scheduling tasks); it pays off when the I/O
is spread over nodes with their own disks or network storage (docs/distributed.md, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--outdir", type=Path)
    args = ap.parse_args()
    work = HERE / "work" / args.size
    if not (work / "base").is_dir():
        sys.exit(f"no inputs in {work}: run benchmarks/bench_merge.py --size {args.size} first")
    sys.path.insert(0, str(HERE.parent / "tests"))
    from ray_cluster import (
        LocalCluster,  # a cluster of our own, stopped without touching any other Ray
    )

    cluster = LocalCluster(2)
    address = cluster.start()
    env = cluster.env
    try:
        inputs = [str(work / "base")] + [str(work / f"s{i}") for i in range(1, args.steps + 1)]
        out_root = Path(tempfile.mkdtemp(prefix="nearswap-ray-bench-", dir=args.outdir))
        times: dict[str, list[float]] = {"local threads": [], "Ray, 2 nodes": []}
        for r in range(args.repeat):
            for name, extra in (("local threads", []), ("Ray, 2 nodes", ["--ray", address])):
                out = out_root / name.split()[0].strip(",")
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "nearswap", "merge", *inputs, "-t", "1e-4", "-o", str(out), "-q", *extra]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env=env)
                times[name].append(time.perf_counter() - t0)
                print(f"round {r + 1}: {name:<14} {times[name][-1]:.2f} s")
        same = all(filecmp.cmp(a, out_root / "Ray" / a.name, shallow=False)
                   for a in sorted((out_root / "local").glob("*.safetensors")))
        shutil.rmtree(out_root, ignore_errors=True)
    finally:
        cluster.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["Ray, 2 nodes"] / med["local threads"]
    print(f"\nmerge of the {args.size} pair ({args.steps} step): local {med['local threads']:.2f} s, "
          f"Ray 2 nodes {med['Ray, 2 nodes']:.2f} s: {ratio:.2f}x (medians of {args.repeat}); bit-identical: {same}")
    result = {"size": args.size, "steps": args.steps, "times": times, "medians": med, "ratio": ratio,
              "identical": same, "outdir": str(args.outdir) if args.outdir else "disk"}
    path = HERE / "results" / f"ray-{args.size}-{args.steps}step.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()

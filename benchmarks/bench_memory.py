"""Peak memory of a merge, and of the curve, as the model grows: both should stay flat.

    python benchmarks/bench_memory.py [--sizes 0.5b,1.5b] [--steps 1]

For each synthetic bf16 shape (generated once, 3 shards per model), runs `nearswap merge`
and `nearswap curve` on the same inputs under /usr/bin/time -v and reports the peak RSS.
The merge reads through pread into fixed per-thread buffers; the curve reads memory maps and
drops each chunk's pages once counted (max RSS counts mapped file pages that are touched, so
this is what shows whether that works). Neither figure should grow with the model.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench_merge import HERE, T, compile_nearswap, ensure_inputs, settle, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    args = ap.parse_args()
    compile_nearswap()
    from nearswap.formats import open_model

    rows = []
    for size in args.sizes.split(","):
        base, secs = ensure_inputs(size, args.workdir, args.steps)
        params = open_model(base).num_params
        inputs = [str(base), *map(str, secs)]
        out = Path(tempfile.mkdtemp(dir=args.workdir)) / "out"
        settle()
        wall, rss = timed([sys.executable, "-m", "nearswap", "merge", "-q", "-t", str(T), *inputs, "-o", str(out)])
        shutil.rmtree(out.parent)
        curve_wall, curve_rss = timed([sys.executable, "-m", "nearswap", "curve", "-q", *inputs])
        rows.append((size, params, wall, rss, curve_wall, curve_rss))
        print(f"{size}: {params / 1e9:.2f}B params, {args.steps} step(s): merge {wall:.2f} s, peak RSS {rss:.0f} MB; "
              f"curve {curve_wall:.2f} s, peak RSS {curve_rss:.0f} MB", flush=True)
    print("\n| model | parameters | steps | merge wall s | merge peak RSS MB | curve wall s | curve peak RSS MB |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for size, params, wall, rss, curve_wall, curve_rss in rows:
        print(f"| {size} | {params / 1e9:.2f}B | {args.steps} | {wall:.2f} | {rss:.0f} | {curve_wall:.2f} | {curve_rss:.0f} |")


if __name__ == "__main__":
    main()

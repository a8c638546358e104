"""Peak memory of a merge as the model grows: it should stay flat.

    python benchmarks/bench_memory.py [--sizes 0.5b,1.5b] [--steps 1]

For each synthetic bf16 shape (generated once, 3 shards per model), runs
`nearswap merge` under /usr/bin/time -v and reports the peak RSS. Reads go through
pread into fixed per-thread buffers, so the figure should not grow with the model.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench_merge import HERE, T, ensure_inputs, settle, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    args = ap.parse_args()
    from nearswap.formats import open_model

    rows = []
    for size in args.sizes.split(","):
        base, secs = ensure_inputs(size, args.workdir, args.steps)
        params = open_model(base).num_params
        out = Path(tempfile.mkdtemp(dir=args.workdir)) / "out"
        settle()
        wall, rss = timed([sys.executable, "-m", "nearswap", "merge", "-q", "-t", str(T), str(base),
                           *map(str, secs), "-o", str(out)])
        shutil.rmtree(out.parent)
        rows.append((size, params, wall, rss))
        print(f"{size}: {params / 1e9:.2f}B params, {args.steps} step(s): {wall:.2f} s, peak RSS {rss:.0f} MB", flush=True)
    print("\n| model | parameters | steps | wall s | peak RSS MB |\n|---|---:|---:|---:|---:|")
    for size, params, wall, rss in rows:
        print(f"| {size} | {params / 1e9:.2f}B | {args.steps} | {wall:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()

"""A killed merge, resumed: the second run's time against a full merge's, side by side in one run.

    python benchmarks/bench_resume.py [--size 0.5b] [--steps 1] [--at 0.5] [--repeat 3] [--cold] [--baseline DIR]

Per round: a full merge (timed); a merge SIGKILLed once ``--at`` of its output bytes are
written (a child process that kills itself there: a real SIGKILL, at a known point); the
same command again, which continues the journaled partial output (timed). Reports the
medians and the ratio resumed / full; the issue's target is <= 0.6 at 50%. Inputs are the
synthetic pair of bench_merge (generated once under benchmarks/work/), page cache warm; with
``--cold`` the page cache is dropped before each timed run (needs root), as it is for a 70B
merge whose inputs never fit in memory. ``--baseline DIR`` runs each round a second time from
another checkout (as bench_merge's), interleaved: before/after figures from one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from bench_merge import HERE, ensure_inputs, settle, timed
from bench_verify import drop_caches

T = 1e-4
KILL_AT = r"""
import os, signal, sys
import nearswap.cli
from nearswap.formats import safetensors as st
limit = int(sys.argv[1])
state = {"n": 0}
write = st.ShardedWriter.write
def counted(self, name, start, data):
    crc = write(self, name, start, data)
    state["n"] += len(st.byte_view(data))
    if state["n"] >= limit:
        os.kill(os.getpid(), signal.SIGKILL)
    return crc
st.ShardedWriter.write = counted
sys.argv = ["nearswap", *sys.argv[2:]]
nearswap.cli.main()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--at", type=float, default=0.5, help="kill once this share of the output is written")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each timed run")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--baseline", type=Path, help="another nearswap checkout (src/ with its C kernel built in place)")
    args = ap.parse_args()
    import os

    variants = {"this": None}
    if args.baseline:
        variants["baseline"] = {**os.environ, "PYTHONPATH": str(args.baseline.resolve() / "src")}

    base, secs = ensure_inputs(args.size, args.workdir)
    secs = secs[: args.steps]
    out_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))  # the output is the base's size
    out = args.workdir / "resume-out"
    cmd = ["merge", "-q", str(base), *map(str, secs), "-t", str(T), "-o", str(out)]
    def warm() -> None:  # the page cache as bench_merge has it, or (--cold) empty
        if args.cold:
            if not drop_caches():
                sys.exit("--cold: the page cache could not be dropped (needs root)")
            return
        for d in (base, *secs):
            for f in d.glob("*.safetensors"):
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass

    def clean() -> None:
        shutil.rmtree(out, ignore_errors=True)
        for p in out.parent.glob(f".{out.name}.*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        settle()

    full: dict[str, list[float]] = {v: [] for v in variants}
    resumed: dict[str, list[float]] = {v: [] for v in variants}
    killed_at: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeat):
        for name, env in variants.items():
            clean()
            warm()
            full[name].append(timed([sys.executable, "-m", "nearswap", *cmd], env)[0])
            clean()
            proc = subprocess.run([sys.executable, "-c", KILL_AT, str(int(out_bytes * args.at)), *cmd],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != -signal.SIGKILL:
                sys.exit(f"the merge was not killed: rc {proc.returncode}\n{proc.stderr[-2000:]}")
            settle()
            warm()
            resumed[name].append(timed([sys.executable, "-m", "nearswap", *cmd], env)[0])
            report = json.loads((out / "merge_report.json").read_text())
            killed_at[name].append(report["resumed"]["output_bytes"] / out_bytes)
    clean()
    print(f"{args.size}, {args.steps} step(s), page cache {'dropped' if args.cold else 'warm'}, killed at "
          f"{100 * args.at:.0f}% of {out_bytes / 1e9:.2f} GB of output; medians of {args.repeat}:")
    print("| code | full merge, wall s | resumed merge (the run after the kill), wall s | resumed / full | journaled when killed |")
    print("|---|---|---|---|---|")
    for name in variants:
        f, r = statistics.median(full[name]), statistics.median(resumed[name])
        print(f"| {name} | {f:.2f} | {r:.2f} | {r / f:.2f} | {', '.join(f'{100 * k:.0f}%' for k in killed_at[name])} |")
    if args.baseline:
        print("this / baseline: full " + ", ".join(f"{a / b:.2f}" for a, b in zip(full["this"], full["baseline"]))
              + "; resumed " + ", ".join(f"{a / b:.2f}" for a, b in zip(resumed["this"], resumed["baseline"])))

if __name__ == "__main__":
    main()

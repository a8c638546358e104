"""nearswap eval against lm-evaluation-harness's own HF backend, side by side in one run.

    .venv/bin/python benchmarks/bench_eval.py [--tasks quick] [--limit 100]

The demo pair (SmolLM2-135M-Instruct and its t = 1e-4 quartet merge, made by ``make demo``
into the cache) is scored on the same tasks and items three ways, each timed whole
(start-up and data loading included):

1. ``lm_eval --model hf`` (lm-eval's CLI, its default batch size 1), once per model;
2. ``nearswap eval BASE MERGED --no-drift --no-writing``: the same benchmark work;
3. ``nearswap eval BASE MERGED``: the whole report (benchmarks, drift, stories).

Every accuracy of 1. and 2. is compared (they must be equal), and throughput is given in
input tokens per second: the tokens lm-eval's backend feeds for these requests, one forward
pass each, over the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="quick")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--base", type=Path, help="default: SmolLM2's GGUF in the cache")
    ap.add_argument("--merged", type=Path, help="default: the demo's merge in the cache")
    args = ap.parse_args()
    from nearswap.demo import fetch
    from nearswap.judge import harness, tasks

    cache = fetch.cache_dir()
    base = args.base or fetch.fetch()
    merged = args.merged or cache / "demo" / "smollm2" / "merged"
    if not (merged / "config.json").exists():
        sys.exit(f"no merge at {merged}: run `make demo` first (or pass --merged)")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = Path(tempfile.mkdtemp(prefix="nearswap-bench-eval-"))
    ns = [sys.executable, "-m", "nearswap", "eval", str(base), str(merged), "--tasks", args.tasks, "--limit",
          str(args.limit), "-q"]
    try:
        bench_wall, _ = timed([*ns, "--no-drift", "--no-writing", "-o", str(work / "bench")], env)
        full_wall, _ = timed([*ns, "-o", str(work / "full")], env)
        report = json.loads((work / "bench" / "report.json").read_text())
        selected = tasks.select(args.tasks)
        cli_wall = 0.0
        equal = True
        for position, path in enumerate((base, merged)):
            hf = Path(report["models"][position]["evaluated_from"])
            cmd = harness.cli_command(selected, work / "bench" / "tasks", hf, args.limit).split()
            cmd = [sys.executable, "-m", "lm_eval", *cmd[1:], "--output_path", str(work / f"cli{position}")]
            wall, _ = timed(cmd, env)
            cli_wall += wall
            theirs = json.loads(next((work / f"cli{position}").rglob("results_*.json")).read_text())["results"]
            for t in report["tasks"]:
                key = f"{t['metric']},none" if "," not in t["metric"] else t["metric"]
                mine, other = t["scores"][position]["mean"], theirs[t["lm_eval_task"]][key]
                equal &= mine == other
                print(f"{report['models'][position]['name']:<34} {t['title']:<12} nearswap {mine:.4f}  lm_eval {other:.4f}"
                      f"  {'equal' if mine == other else 'DIFFERENT'}")
        tokens = sum(e["input_tokens"] for e in report["exactness"])
        rows = [("lm_eval --model hf (2 runs)", cli_wall), ("nearswap eval, benchmarks only", bench_wall),
                ("nearswap eval, whole report", full_wall)]
        print(f"\n{args.tasks}, --limit {args.limit}, 2 models, {tokens:,} input tokens\n")
        print("| run | wall s | input tokens/s | vs lm_eval |")
        print("|---|---:|---:|---:|")
        for name, wall in rows:
            speed = f"{tokens / wall:,.0f}" if "report" not in name else "—"
            print(f"| {name} | {wall:.1f} | {speed} | {cli_wall / wall:.2f}x |")
        print(f"\naccuracies equal: {equal}")
        out = HERE / "results" / f"eval-{args.tasks}-{args.limit}.json"
        out.write_text(json.dumps({"tasks": args.tasks, "limit": args.limit, "input_tokens": tokens, "equal": equal,
                                   "wall_s": dict(rows)}, indent=1) + "\n")
        print(f"saved {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Side-by-side merge benchmark: nearswap vs mergekit vs the I/O floor, in one run.

    python benchmarks/bench_merge.py [--size 0.5b] [--mergekit-venv DIR] [--repeat 3] [--baseline DIR]

Generates (once, cached in benchmarks/work/) a bf16 Llama-shaped base and three
secondaries (base + Laplace noise) in 3 shards each, warms the page cache, then runs each
contender under /usr/bin/time -v and reports wall time, parameters/s, peak RSS and ratios.
Medians over --repeat runs; the machine is noisy, so compare ratios within one run.

``--baseline DIR`` runs every nearswap contender a second time from another checkout of
nearswap (``git worktree add DIR COMMIT`` and ``python setup.py build_ext --inplace`` there),
interleaved with this one: before/after figures from one run.

mergekit is optional: create its venv with
    python3 -m venv /work/mk/venv && /work/mk/venv/bin/pip install torch==2.13.0 mergekit==0.1.5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
T = 1e-4
NOISE = 0.001


def ensure_inputs(size: str, root: Path, n: int = 3) -> tuple[Path, list[Path]]:
    """The base and ``n`` secondaries of a synthetic shape, generated once under ``root``."""
    from nearswap.demo import synthetic

    work = root / size
    base = work / "base"
    secs = [work / f"s{i}" for i in range(1, n + 1)]
    if not (base / "config.json").exists():
        print(f"generating {size} base ...", flush=True)
        synthetic.make_base(base, size, "bfloat16", seed=0, shards=3)
    for i, s in enumerate(secs, 1):
        if not (s / "config.json").exists():
            print(f"generating {s.name} ...", flush=True)
            synthetic.make_secondary(base, s, NOISE, seed=i, shards=3)
    return base, secs


def compile_nearswap() -> None:
    """Byte-compile nearswap's modules, as pip does when it installs a wheel: under
    PYTHONDONTWRITEBYTECODE (set on these machines) an editable install would otherwise compile
    every module from source on every run (~15 ms), which no installed user pays. mergekit,
    installed by pip, has its bytecode."""
    import nearswap

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(nearswap.__file__).parent)], check=True)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd`` under /usr/bin/time -v; return (wall seconds, peak RSS in MB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    h, m, s = wall.groups()
    return int(h or 0) * 3600 + int(m) * 60 + float(s), int(rss.group(1)) / 1024


def settle() -> None:
    """Let the disk finish what the previous run left (writeback, and the TRIMs an ext4
    mounted with `discard` issues for deleted files), so no contender pays for another."""
    os.sync()
    time.sleep(2)


def mergekit_config(base: Path, secondary: Path, exact: bool, name: str | None = None) -> str:
    lines = []
    if name:
        lines.append(f"name: {name}")
    lines += [
        "merge_method: nearswap",
        f"base_model: {base}",
        "models:",
        f"  - model: {base}",
        f"  - model: {secondary}",
        "parameters:",
        f"  t: {T}",
    ]
    lines += ["dtype: float32", "out_dtype: bfloat16"] if exact else ["dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.5b", help="synthetic shape: 0.5b (default), 1.5b, demo, tiny")
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/work/mk/venv"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated subset of contenders")
    ap.add_argument("--tag", help="suffix of the results file name (default: 'subset' with --only, else none)")
    ap.add_argument("--workdir", type=Path, default=HERE / "work")
    ap.add_argument("--baseline", type=Path, help="another nearswap checkout (src/ with its C kernel built in place) "
                    "to run each nearswap contender from as well, for before/after figures")
    ap.add_argument("--outdir", type=Path, help="where outputs are written (default: under --workdir, on disk; "
                    "/dev/shm takes the disk out of the measurement)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (needs root): inputs "
                    "come from the disk, as a model larger than RAM does")
    args = ap.parse_args()
    if args.cold:
        from bench_verify import drop_caches

        if not drop_caches():
            sys.exit("--cold: the page cache could not be dropped (needs root)")

    base, secs = ensure_inputs(args.size, args.workdir)
    compile_nearswap()
    if args.baseline:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(args.baseline / "src" / "nearswap")], check=True)
    from nearswap.formats import open_model

    params = open_model(base).num_params
    inputs1 = [base, secs[0]]
    out_bytes = open_model(base).nbytes
    for d in (base, *secs) if not args.cold else ():  # warm the page cache: every contender reads from memory
        for f in d.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

    tmp = Path(tempfile.mkdtemp(prefix="nearswap-bench-", dir=args.workdir))
    out_root = Path(tempfile.mkdtemp(prefix="nearswap-bench-out-", dir=args.outdir)) if args.outdir else tmp
    py = sys.executable
    ns = [py, "-m", "nearswap", "merge", "-q", "-t", str(T)]
    mk = args.mergekit_venv / "bin"
    have_mk = (mk / "mergekit-yaml").exists()
    (tmp / "exact.yml").write_text(mergekit_config(base, secs[0], True))
    (tmp / "default.yml").write_text(mergekit_config(base, secs[0], False))
    multi, prev = [], base
    for i, s in enumerate(secs, 1):
        doc = mergekit_config(prev, s, True, name=f"stage{i}" if i < 3 else None)
        multi.append(doc)
        prev = out_root / "inter" / f"stage{i}"
    (tmp / "multi.yml").write_text("---\n".join(multi))
    mk_env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    contenders = {
        "io-floor 1 step": ([py, str(HERE / "io_floor.py"), str(out_root / "out"), str(out_bytes), *map(str, inputs1)], None, 1),
        "disk floor 1 step": ([py, str(HERE / "io_floor.py"), "--stream", str(out_root / "out"), str(out_bytes),
                               *map(str, inputs1)], None, 1),
        "nearswap 1 step": ([*ns, str(base), str(secs[0]), "-o", str(out_root / "out")], None, 1),
        "nearswap curve 1 step": ([py, "-m", "nearswap", "curve", "-q", str(base), str(secs[0])], None, 1),
        "nearswap convert": ([py, "-m", "nearswap", "convert", "-q", str(base), "-o", str(out_root / "out")], None, 0),
        "mergekit exact 1 step": ([str(mk / "mergekit-yaml"), str(tmp / "exact.yml"), str(out_root / "out")], mk_env, 1),
        "mergekit default 1 step": ([str(mk / "mergekit-yaml"), str(tmp / "default.yml"), str(out_root / "out")], mk_env, 1),
        "io-floor 3 steps": ([py, str(HERE / "io_floor.py"), str(out_root / "out"), str(out_bytes), str(base), *map(str, secs)], None, 3),
        "nearswap 3 steps": ([*ns, str(base), *map(str, secs), "-o", str(out_root / "out")], None, 3),
        "mergekit-multi exact 3 steps": ([str(mk / "mergekit-multi"), str(tmp / "multi.yml"), "--out-path", str(out_root / "out"),
                                          "-I", str(out_root / "inter")], mk_env, 3),
    }
    if args.baseline:
        old_env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve() / "src")}
        for name, (cmd, _, steps) in list(contenders.items()):
            if name.startswith("nearswap"):
                contenders[f"baseline {name}"] = (cmd, old_env, steps)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    chosen = {}
    for name, spec in contenders.items():
        if only and not any(o in name for o in only):
            continue
        if "mergekit" in name and not have_mk:
            print(f"skipping {name}: no mergekit venv at {args.mergekit_venv}")
            continue
        chosen[name] = spec
    # Rounds: every contender once per round, so all of them see the same (noisy) disk.
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
    for rnd in range(1, args.repeat + 1):
        for name, (cmd, env, _) in chosen.items():
            shutil.rmtree(out_root / "out", ignore_errors=True)
            shutil.rmtree(out_root / "inter", ignore_errors=True)
            settle()
            if args.cold:
                drop_caches()
            runs[name].append(timed(cmd, env))
            print(f"round {rnd}: {name:<30} {runs[name][-1][0]:8.2f} s {runs[name][-1][1]:8.0f} MB", flush=True)
    results = {}
    for name, (_, _, steps) in chosen.items():
        wall = statistics.median(r[0] for r in runs[name])
        rss = max(r[1] for r in runs[name])
        results[name] = {"wall_s": wall, "peak_rss_mb": rss, "steps": steps, "params_per_s": params / wall,
                         "baseline": str(args.baseline) if name.startswith("baseline") else None,
                         "runs": runs[name]}
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out_root / "out", ignore_errors=True)
    shutil.rmtree(out_root, ignore_errors=True)
    where = (f"outputs in {args.outdir}" if args.outdir else "outputs on disk") + (
        ", page cache dropped before every run" if args.cold else "")
    print(f"\n{args.size}: {params / 1e6:.0f}M parameters, bf16, 3 shards per model, t = {T}, "
          f"median of {args.repeat} interleaved rounds, {where}\n")
    print("| contender | wall s | M params/s | peak RSS MB | nearswap speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        mine = results.get(f"nearswap {r['steps']} step" + ("s" if r["steps"] > 1 else ""))
        ratio = f"{r['wall_s'] / mine['wall_s']:.1f}x" if mine and "nearswap" not in name else ""
        if "curve" in name and mine and not name.startswith("baseline"):  # how much faster than the merge it predicts
            ratio = f"merge / curve = {mine['wall_s'] / r['wall_s']:.1f}x"
        if name.startswith("baseline") and name.removeprefix("baseline ") in results:
            ratio = f"this / baseline = {results[name.removeprefix('baseline ')]['wall_s'] / r['wall_s']:.2f}x"
        print(f"| {name} | {r['wall_s']:.2f} | {r['params_per_s'] / 1e6:.1f} | {r['peak_rss_mb']:.0f} | {ratio} |")
    floors(results)
    tag = args.tag if args.tag is not None else ("subset" if args.only else "")
    out = HERE / "results" / f"merge-{args.size}{'-' + args.outdir.name if args.outdir else ''}{'-' + tag if tag else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"size": args.size, "params": params, "outdir": str(args.outdir or "disk"),
                               "repeat": args.repeat, "results": results}, indent=1))
    print(f"\nsaved {out}")


def floors(results: dict) -> None:
    """nearswap against each floor round by round (the two ran minutes apart at most, on the same
    disk): the median of the paired ratios with a bootstrap 95% interval, and the ratio of the
    fastest runs. A cold disk varies 2x between rounds; these say how sure a verdict is."""
    import random

    for steps in (1, 3):
        mine = results.get(f"nearswap {steps} step" + ("s" if steps > 1 else ""))
        for name, r in results.items():
            if mine is None or "floor" not in name or r["steps"] != steps:
                continue
            ratios = [a[0] / b[0] for a, b in zip(mine["runs"], r["runs"])]
            rng = random.Random(0)
            boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(10000))
            fastest = min(a[0] for a in mine["runs"]) / min(b[0] for b in r["runs"])
            print(f"nearswap / {name}, round by round: median {statistics.median(ratios):.2f}x (95% interval "
                  f"{boot[250]:.2f}-{boot[9750]:.2f}, rounds {min(ratios):.2f}-{max(ratios):.2f}); fastest runs {fastest:.2f}x")


if __name__ == "__main__":
    main()

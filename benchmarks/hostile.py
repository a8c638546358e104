"""Hostile-input run: mutated safetensors, GGUF, index, config and recipe files through the CLI.

Every case is a small valid model (well under 10 MB) with one file mutated by a seeded random
strategy, run through the command that reads it (``inspect``, ``merge``, ``convert``,
``export``) in a forked child with a 10 s limit. A case passes when the command either
succeeds or refuses in one line (``nearswap: error: ...``, no traceback, not an "internal
error"), within the time limit and under the memory limit. Prints counts per kind and every
failure's command and message.

    .venv/bin/python benchmarks/hostile.py --cases 300 --seed 0
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

TIME_LIMIT = 10.0
RSS_LIMIT_MB = 200

HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64, 2**70, -(2**63), 10**400 // 10**300, 1e308, -0.0,
    "", "\n\x1b[2J", "\ud800", "../../etc/passwd", "/dev/stdin", "F8_E9M9", "BF16", "x" * 5000,
    [], [1], [True, 4], [0, 2**70], [[[]]], {}, {"a": "b"}, "1e400", "nan",
]


def mutate_json(value, rng: random.Random, depth: int = 0):
    """One random change somewhere in a JSON tree."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        action = rng.random()
        out = dict(value)
        if action < 0.15:
            del out[key]
        elif action < 0.25:
            out[rng.choice(["__metadata__", "x", key + "\ud800", ""])] = rng.choice(HOSTILE_VALUES)
        else:
            out[key] = mutate_json(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        out = list(value)
        out[i] = mutate_json(value[i], rng, depth + 1)
        if rng.random() < 0.1:
            out.append(rng.choice(HOSTILE_VALUES))
        return out
    if rng.random() < 0.05:
        return DEEP  # replaced by 50,000 nested lists when serialised (json.loads cannot build it)
    return rng.choice(HOSTILE_VALUES)


DEEP = "__nearswap_deep__"


def dumps(value) -> str:
    return json.dumps(value).replace(json.dumps(DEEP), "[" * 50_000 + "]" * 50_000)


def flip_bytes(data: bytes, rng: random.Random, region: int) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(min(region, len(data)))
        data[i] = rng.randrange(256)
    return bytes(data)


def put_int(data: bytes, rng: random.Random, region: int) -> bytes:
    data = bytearray(data)
    i = rng.randrange(max(1, min(region, len(data)) - 8))
    value = rng.choice([0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1, rng.randrange(2**64)])
    data[i:i + 8] = struct.pack("<Q", value)
    return bytes(data)


def mutate_bytes(data: bytes, rng: random.Random, region: int) -> bytes:
    r = rng.random()
    if r < 0.35:
        return flip_bytes(data, rng, region)
    if r < 0.7:
        return put_int(data, rng, region)
    if r < 0.85:
        return data[:rng.randrange(len(data))]
    return data + bytes(rng.randrange(1, 4096))


# ---------------------------------------------------------------- valid seeds, one per kind


def seeds(root: Path) -> dict[str, Path]:
    from conftest import random_model, write_model
    from test_hostile import llama_gguf

    base = random_model(0, "f32")
    write_model(root / "base", base, shards=2)
    write_model(root / "s1", random_model(1, "f32", like=base), shards=2)
    llama_gguf(root / "m.gguf")
    return {"base": root / "base", "s1": root / "s1", "gguf": root / "m.gguf"}


def make_case(kind: str, seed: int, valid: dict[str, Path], work: Path) -> list[str]:
    """Write one mutated input into ``work``; return the CLI arguments that read it."""
    rng = random.Random(seed)
    if kind in ("safetensors", "index", "config"):
        model = work / "m"
        shutil.copytree(valid["base"], model)
        if kind == "safetensors":
            shard = model / "model-00001-of-00002.safetensors"
            data = shard.read_bytes()
            n = struct.unpack("<Q", data[:8])[0]
            if rng.random() < 0.5:
                header = mutate_json(json.loads(data[8:8 + n]), rng)
                try:
                    raw = dumps(header).encode("utf-8", "surrogatepass")
                except (ValueError, RecursionError):
                    raw = b"{}"
                data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
            else:
                data = mutate_bytes(data, rng, 8 + n)
            shard.write_bytes(data)
        else:
            f = model / ("model.safetensors.index.json" if kind == "index" else "config.json")
            text = f.read_text()
            if rng.random() < 0.8:
                try:
                    text = dumps(mutate_json(json.loads(text), rng))
                except (ValueError, RecursionError):
                    text = "[" * 100_000
            else:
                text = mutate_bytes(text.encode(), rng, len(text)).decode("latin-1")
            f.write_text(text, encoding="utf-8", errors="surrogatepass")
        command = rng.choice(["inspect", "merge"])
        return ["inspect", str(model)] if command == "inspect" else \
            ["merge", str(model), str(valid["s1"]), "-t", "1e-4", "-o", str(work / "out"), "-q"]
    if kind == "gguf":
        data = valid["gguf"].read_bytes()
        path = work / "m.gguf"
        path.write_bytes(mutate_bytes(data, rng, 1200))
        return rng.choice([["inspect", str(path)], ["convert", str(path), "-o", str(work / "out"), "-q"],
                           ["export", str(path), "-o", str(work / "x.gguf"), "--type", "f32", "-q"]])
    if kind == "recipe":
        hostile = rng.choice([
            "[" * 100_000, "&a [x, *a]", "!!python/object/apply:os.system ['true']", "1e400", "-1", ".nan",
            "{" + ", ".join(f"k{i}: v" for i in range(5000)) + "}", "\x00\x01", "*undefined", "'\ud800'",
            "[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]]",
        ])
        field = rng.choice(["base", "t", "model", "dtype", "shard_size", "carry_float32", "rules", "match",
                            "tokenizer_source", "steps"])
        values = {"base": str(valid["base"]), "model": str(valid["s1"]), "t": "1.0e-4", "dtype": "float32",
                  "shard_size": "5GB", "carry_float32": "false", "match": "'*mlp*'", "tokenizer_source": "base"}
        values[field] = hostile
        rules = hostile if field == "rules" else f"[{{match: {values['match']}, t: 0}}]"
        steps = hostile if field == "steps" else f"[{{model: {values['model']}, t: {values['t']}, rules: {rules}}}]"
        text = (f"base: {values['base']}\nsteps: {steps}\ndtype: {values['dtype']}\nshard_size: {values['shard_size']}\n"
                f"carry_float32: {values['carry_float32']}\ntokenizer_source: {values['tokenizer_source']}\n")
        (work / "r.yaml").write_bytes(text.encode("utf-8", "surrogatepass"))
        return ["merge", str(work / "r.yaml"), "-o", str(work / "out"), "-q"]
    raise ValueError(kind)


# ---------------------------------------------------------------- running a case


def run_case(args: list[str]) -> dict:
    """Fork; the child runs the CLI in-process with its output captured to a pipe."""
    from nearswap.cli import cli

    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with redirect_stdout(out), redirect_stderr(err):
            try:
                cli.main(args=args, prog_name="nearswap")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # anything escaping main is a failure of the contract
                import traceback

                err.write("Traceback (escaped main)\n" + "".join(traceback.format_exception(e)))
                code = 99
        payload = json.dumps({"code": code, "stderr": err.getvalue()[:4000]}).encode()
        os.write(write_fd, payload)
        os._exit(0)
    os.close(write_fd)
    deadline = started + TIME_LIMIT
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    with os.fdopen(read_fd, "rb") as f:
        raw = f.read()
    result = json.loads(raw) if raw else {"code": None, "stderr": ""}
    result.update(seconds=time.perf_counter() - started, rss_mb=usage.ru_maxrss / 1024, timed_out=timed_out,
                  signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
    return result


def verdict(result: dict) -> str | None:
    """None when the case kept the contract, else what broke."""
    if result["timed_out"]:
        return f"hang (> {TIME_LIMIT:.0f} s)"
    if result["signal"]:
        return f"killed by signal {result['signal']}"
    if result["rss_mb"] > RSS_LIMIT_MB:
        return f"peak RSS {result['rss_mb']:.0f} MB"
    err = result["stderr"]
    if "Traceback" in err:
        return "traceback"
    if result["code"] == 0:
        return None
    lines = [line for line in err.strip().splitlines() if not line.startswith("nearswap: warning: ")]
    if len(lines) != 1 or not lines[0].startswith("nearswap: error: "):
        return f"not one line: {err.strip()[:200]!r}"
    if "internal error" in lines[0]:
        return lines[0][:300]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200, help="cases per kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="safetensors,index,config,gguf,recipe")
    opts = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    root = Path(tempfile.mkdtemp(prefix="nearswap-hostile-"))
    try:
        valid = seeds(root / "valid")
        import nearswap.cli  # noqa: F401  (imported once, before forking)

        summary, failures = {}, []
        for kind in opts.kinds.split(","):
            counts = {"cases": 0, "succeeded": 0, "refused in one line": 0, "failed": 0}
            worst = {"seconds": 0.0, "rss_mb": 0.0}
            for i in range(opts.cases):
                work = root / f"{kind}-{i}"
                work.mkdir()
                args = make_case(kind, opts.seed * 1_000_003 + i, valid, work)
                sizes = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
                assert sizes < 10 << 20, sizes
                result = run_case(args)
                broke = verdict(result)
                counts["cases"] += 1
                counts["failed" if broke else "succeeded" if result["code"] == 0 else "refused in one line"] += 1
                worst = {k: max(worst[k], result[k]) for k in worst}
                if broke:
                    failures.append((kind, i, broke, args))
                shutil.rmtree(work, ignore_errors=True)
            summary[kind] = {**counts, "slowest_s": round(worst["seconds"], 2), "peak_rss_mb": round(worst["rss_mb"], 1)}
            print(f"{kind:<12} {json.dumps(summary[kind])}", flush=True)
        total = {k: sum(s[k] for s in summary.values()) for k in ("cases", "succeeded", "refused in one line", "failed")}
        print(f"{'all':<12} {json.dumps(total)}")
        for kind, i, broke, args in failures:
            print(f"FAIL {kind} #{i}: {broke}\n     nearswap {' '.join(args)}")
        sys.exit(1 if failures else 0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

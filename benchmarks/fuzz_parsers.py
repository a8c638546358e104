"""Fuzz the parsers of files from strangers at scale: tests/test_fuzz.py with N examples each.

    python benchmarks/fuzz_parsers.py [--examples 10000]

Each parser (safetensors header, model index, GGUF header, then the GGUF model behind it) gets
N hypothesis-generated mutations of a valid file; every one must be refused with a
NearswapError (HeaderError for the low-level GGUF reader) or read in agreement with the
reference library, within 2 s and 64 MB allocated. Prints per parser how many were read and
how many refused, and the time taken.
"""

import argparse
import sys

from fuzz_run import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10_000)
    args = ap.parse_args()
    rc, seconds, module = run("test_fuzz", "NEARSWAP_FUZZ_EXAMPLES", args.examples)
    outcomes = module.OUTCOMES
    print(f"\n{args.examples} examples per test, {seconds:.0f} s, pytest exit {int(rc)}")
    print("| parser | cases | read | refused in one line |")
    print("|---|---:|---:|---:|")
    for parser, counts in outcomes.items():
        print(f"| {parser} | {counts['read'] + counts['refused']:,} | {counts['read']:,} | {counts['refused']:,} |")
    sys.exit(int(rc))


if __name__ == "__main__":
    main()

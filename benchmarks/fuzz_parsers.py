"""Fuzz the parsers of files from strangers at scale: tests/test_fuzz.py with N examples each.

    python benchmarks/fuzz_parsers.py [--examples 10000]

Each parser (safetensors header, model index, GGUF header, then the GGUF model behind it) gets
N hypothesis-generated mutations of a valid file; every one must be refused with a
NearswapError (HeaderError for the low-level GGUF reader) or read in agreement with the
reference library, within 2 s and 64 MB allocated. Prints per parser how many were read and
how many refused, and the time taken.
"""

import sys

import fuzz_run


def main() -> None:
    rc, module = fuzz_run.main(__doc__, "examples", 10_000, "test_fuzz", "NEARSWAP_FUZZ_EXAMPLES")
    outcomes = module.OUTCOMES
    print("| parser | cases | read | refused in one line |")
    print("|---|---:|---:|---:|")
    for parser, counts in outcomes.items():
        print(f"| {parser} | {counts['read'] + counts['refused']:,} | {counts['read']:,} | {counts['refused']:,} |")
    sys.exit(rc)


if __name__ == "__main__":
    main()

"""Fuzz what resume and verify trust at scale: tests/test_fuzz_resume.py with N cases each.

    python benchmarks/fuzz_resume.py [--cases 2500]

The partial output of a killed merge (a directory and a .gguf file) is altered at random N times
and the merge run again: each run must give the fresh merge's bytes or refuse in one line. A
finished output is altered N times: verify must find each alteration. Prints the outcomes.
"""

import argparse
import sys

from fuzz_run import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2500)
    args = ap.parse_args()
    rc, seconds, module = run("test_fuzz_resume", "NEARSWAP_FUZZ_CASES", args.cases)
    outcomes = module.OUTCOMES
    print(f"\n{args.cases} cases per test, {seconds:.0f} s, pytest exit {int(rc)}")
    print("| what | outcome | cases |")
    print("|---|---|---:|")
    for kind, counts in outcomes.items():
        for outcome, n in sorted(counts.items()):
            print(f"| {kind} | {outcome} | {n:,} |")
    sys.exit(int(rc))


if __name__ == "__main__":
    main()

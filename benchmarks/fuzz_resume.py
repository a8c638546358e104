"""Fuzz what resume and verify trust at scale: tests/test_fuzz_resume.py with N cases each.

    python benchmarks/fuzz_resume.py [--cases 2500]

The partial output of a killed merge (a directory and a .gguf file) is altered at random N times
and the merge run again: each run must give the fresh merge's bytes or refuse in one line. A
finished output is altered N times: verify must find each alteration. Prints the outcomes.
"""

import sys

import fuzz_run


def main() -> None:
    rc, module = fuzz_run.main(__doc__, "cases", 2500, "test_fuzz_resume", "NEARSWAP_FUZZ_CASES")
    outcomes = module.OUTCOMES
    print("| what | outcome | cases |")
    print("|---|---|---:|")
    for kind, counts in outcomes.items():
        for outcome, n in sorted(counts.items()):
            print(f"| {kind} | {outcome} | {n:,} |")
    sys.exit(rc)


if __name__ == "__main__":
    main()

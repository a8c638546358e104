"""What the fuzz scripts share: run one test file of the suite at a larger number of examples."""

import argparse
import os
import sys
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def run(test: str, variable: str, count: int) -> tuple[int, float, ModuleType]:
    """Run ``tests/<test>.py`` with ``variable`` set to ``count``; returns pytest's exit code,
    the seconds it took and the test module (for the outcomes it counted)."""
    os.environ[variable] = str(count)
    import pytest

    started = time.perf_counter()
    rc = pytest.main([str(HERE.parent / "tests" / f"{test}.py"), "-q", "-p", "no:cacheprovider", "-x"])
    return int(rc), time.perf_counter() - started, sys.modules[test]


def main(doc: str, option: str, default: int, test: str, variable: str) -> tuple[int, ModuleType]:
    """The command line of a fuzz script: ``--OPTION N`` cases, the run, a line saying how it went;
    returns pytest's exit code and the test module."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument(f"--{option}", type=int, default=default)
    count = getattr(ap.parse_args(), option)
    rc, seconds, module = run(test, variable, count)
    print(f"\n{count} {option} per test, {seconds:.0f} s, pytest exit {rc}")
    return rc, module

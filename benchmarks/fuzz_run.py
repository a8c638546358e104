"""What the fuzz scripts share: run one test file of the suite at a larger number of examples."""

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

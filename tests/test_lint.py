"""The code passes its linter (ruff: pyflakes, pycodestyle, import order; pyproject.toml's
[tool.ruff]) and the type check of the lower layers (mypy: core, formats, runtime, merging;
[tool.mypy]). Both are in the dev extra that `make test` installs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("tool,args", [("ruff", ["check", "src", "tests", "benchmarks"]), ("mypy", [])])
def test_the_code_passes(tool, args):
    pytest.importorskip(tool)
    proc = subprocess.run([sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

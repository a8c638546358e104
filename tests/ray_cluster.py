"""A local Ray cluster of our own for tests and benchmarks: a head and more nodes on
127.0.0.1, under a temp dir of its own, and stopped by killing only its processes — never
`ray stop`, which would stop every Ray on the machine, a user's own cluster included."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``nodes`` Ray nodes of one CPU each; ``address`` once started; ``stop()`` kills what it started."""

    def __init__(self, nodes: int = 2, env: dict[str, str] | None = None) -> None:
        self.nodes = nodes
        # short: Ray puts unix sockets under it, whose paths may not exceed ~107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="nsray", dir="/tmp"))
        self.address = f"127.0.0.1:{free_port()}"
        # Ray runs its workers at nice 15 by default: beside other busy processes (CI's machine) they
        # would get almost no CPU, and a test would take as long as the others let it
        # and a HOME of its own: a token in the user's ~/.ray (Ray 2.60 turns token authentication on
        # where one exists) would change what the cluster asks of its clients
        (self.temp / "home").mkdir()
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
                    "HOME": str(self.temp / "home"), "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",
                    **(env or {})}

    def start(self) -> str:
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        port = self.address.rsplit(":", 1)[1]
        head = subprocess.run([RAY, "start", "--head", "--port", port, "--include-dashboard=false",
                               "--temp-dir", str(self.temp), *common], capture_output=True, text=True, env=self.env)
        if head.returncode:
            self.stop()
            raise RuntimeError(f"ray start failed: {head.stderr.strip()[-300:]}")
        for _ in range(self.nodes - 1):
            node = subprocess.run([RAY, "start", "--address", self.address, *common],
                                  capture_output=True, text=True, env=self.env)
            if node.returncode:
                self.stop()
                raise RuntimeError(f"ray start (node) failed: {node.stderr.strip()[-300:]}")
        return self.address

    def processes(self) -> list[int]:
        """This cluster's processes: those naming its temp dir, and their descendants."""
        parents: dict[int, int] = {}
        ours: set[int] = set()
        key = str(self.temp).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                if key in (entry / "cmdline").read_bytes():
                    ours.add(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        grew = True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in ours and pid not in ours}
            ours |= more
            grew = bool(more)
        return sorted(ours)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.temp, ignore_errors=True)

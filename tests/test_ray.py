"""Passes on a real Ray cluster: a head node and a second node on 127.0.0.1, started with
`ray start` and stopped by the fixture. The merge through the cluster must be bit-identical to
the local one — also when a worker is killed mid-merge — and the sweep must give the same
table. Skipped, with the reason, where Ray (the `ray` extra) is not installed."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import nearswap  # noqa: E402
from nearswap.core.errors import NearswapError  # noqa: E402
from nearswap.demo import synthetic  # noqa: E402
from nearswap.runtime.stream import Settings  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine, of our own (stopped by killing only
    their processes); their address."""
    from ray_cluster import LocalCluster

    nodes = LocalCluster(2)
    try:
        address = nodes.start()
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        yield address
    finally:
        nodes.stop()


@pytest.fixture(scope="module")
def quartet(tmp_path_factory):
    root = tmp_path_factory.mktemp("quartet")
    shape = synthetic.LlamaShape(256, 4, 512, 2048, 4, 2)
    synthetic.make_base(root / "base", shape, "bfloat16", seed=0)
    return [root / "base"] + [synthetic.make_secondary(root / "base", root / f"s{i}", 0.0125, seed=i)
                              for i in (1, 2, 3)]


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors*"))}


def ray_workers() -> list[int]:
    """Pids of Ray worker processes running a merge task (their title names the function)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ray::_run_group" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_three_step_merge_through_the_cluster_is_bit_identical(cluster, quartet, tmp_path):
    settings = Settings(chunk=8192, group_bytes=1 << 20)
    local = nearswap.merge(quartet[0], quartet[1:], t=1e-3, out=tmp_path / "local", shard_size="4MB")
    remote = nearswap.merge(quartet[0], quartet[1:], t=1e-3, out=tmp_path / "ray", shard_size="4MB",
                            settings=settings, ray_address=cluster)
    assert len(files_of(tmp_path / "local")) > 2
    assert files_of(tmp_path / "ray") == files_of(tmp_path / "local")
    assert remote["steps"] == local["steps"]


def test_a_killed_worker_changes_nothing(cluster, quartet, tmp_path):
    settings = Settings(chunk=4096, group_bytes=256 << 10)  # ~100 small tasks: a window to kill one
    local = nearswap.merge(quartet[0], quartet[1:], t=1e-3, out=tmp_path / "local")
    killed = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline and not finished.is_set():
            for pid in ray_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    finished = threading.Event()
    thread = threading.Thread(target=killer)
    thread.start()
    try:
        remote = nearswap.merge(quartet[0], quartet[1:], t=1e-3, out=tmp_path / "ray", settings=settings,
                                ray_address=cluster)
    finally:
        finished.set()
        thread.join()
    if not killed:
        pytest.skip("no Ray worker was caught running a task (the merge finished first)")
    assert files_of(tmp_path / "ray") == files_of(tmp_path / "local")
    assert remote["steps"] == local["steps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local", "ray"]  # no partial left behind


def test_unreachable_cluster_and_missing_paths_are_one_line(quartet, tmp_path, run):
    from ray_cluster import free_port

    result = run("merge", quartet[0], quartet[1], "-t", 1e-3, "-o", tmp_path / "o", "--ray", f"127.0.0.1:{free_port()}")
    assert result.exit_code == 1 and "cannot reach the Ray cluster" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_worker_that_cannot_see_a_path_says_which(cluster, quartet, tmp_path):
    """A pass planned on the driver whose input is not where the workers look (moved away
    here, as on a node that does not mount the share): the task says which path, where."""
    import shutil

    from nearswap.formats.safetensors import ShardedWriter
    from nearswap.merging import recipe
    from nearswap.merging.passes import ChainPass
    from nearswap.merging.plan import plan
    from nearswap.runtime import distributed

    base = tmp_path / "base"
    shutil.copytree(quartet[0], base)
    rec = recipe.build({"base": str(base), "steps": [{"model": str(quartet[1]), "t": 1e-3}]}, "test")
    plan_ = plan(rec)
    (tmp_path / "out").mkdir()
    writer = ShardedWriter(tmp_path / "out", [(t.name, t.out_dtype, t.shape) for t in plan_.tasks], 1 << 40, {})
    base.rename(tmp_path / "elsewhere")
    with pytest.raises(NearswapError, match=f"cannot see {base}"):
        distributed.run(ChainPass(plan_, writer), Settings(), cluster)
    writer.abort()


def test_sweep_through_the_cluster_gives_the_local_table(cluster, tiny_llm, tmp_path, run):
    tables = {}
    for name, extra in (("local", ["--jobs", "1"]), ("ray", ["--ray", cluster])):
        result = run("sweep", tiny_llm / "base", tiny_llm / "s1", "--t", "1e-2", "-o", tmp_path / name,
                     "--tasks", "none", *extra)
        assert result.exit_code == 0, result.output
        rows = json.loads((tmp_path / name / "sweep.json").read_text())["rows"]
        tables[name] = rows
    assert tables["ray"] == tables["local"]
    assert (tmp_path / "ray" / "sweep.md").read_text() == (tmp_path / "local" / "sweep.md").read_text()


def test_eval_through_the_cluster_gives_the_local_report(cluster, tiny_llm, quick_data, tmp_path, monkeypatch, run):
    """eval --ray: one model per task, the second taking the reference's figures from the
    reference model itself; the same scores, items and drift as the local run. (The stories are
    written by the same per-model function in either case; their seeding is test_judge's.)"""
    monkeypatch.setenv("NEARSWAP_CACHE", str(quick_data))
    reports = {}
    for name, extra in (("local", []), ("ray", ["--ray", cluster])):
        result = run("eval", tiny_llm / "base", tiny_llm / "s1", "--tasks", "arc_easy", "--limit", "2", "--no-writing",
                     "-o", tmp_path / name, "-q", *extra)
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    local, remote = reports["local"], reports["ray"]
    assert remote["tasks"] == local["tasks"]  # every item's result, every score and interval
    for a, b in zip(remote["drift"], local["drift"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (pytest.approx(b[key], rel=1e-5) if isinstance(b[key], float) else b[key]), key
    assert remote["drift"][0]["kl_mean"] == 0.0 and remote["drift"][1]["kl_mean"] > 0


def test_a_gguf_output_is_refused_before_any_work(quartet, tmp_path, run):
    """The GGUF writer quantizes in the driver's threads: --ray into a .gguf is one line, up front."""
    result = run("merge", quartet[0], quartet[1], "-t", 1e-3, "-o", tmp_path / "m.gguf", "--ray", "local")
    assert result.exit_code == 1 and "--ray writes directory outputs" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_cluster_started_as_the_docs_say_with_a_token_at_hand(quartet, tmp_path):
    """Ray 2.60's `ray start --head` turns token authentication on where a token exists
    (~/.ray/auth_token): `nearswap merge --ray HOST:PORT` from the same account sends it, as
    Ray's own CLI does, and merges bit-identically to a local run; a client without the token
    is refused in one line that names token authentication and the fix (it said "start one
    with `ray start --head`" while the cluster ran)."""
    import subprocess
    import sys

    from ray_cluster import RAY, LocalCluster

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    made = subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, text=True,
                          env={**env, "HOME": str(home)})
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stderr
    nodes = LocalCluster(1, env={"HOME": str(home)})
    try:
        address = nodes.start()
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        def merge(out: Path, client_home: Path) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "nearswap", "merge", *map(str, quartet[:2]), "-t", "1e-3",
                                   "-o", str(out), "-q", "--ray", address], capture_output=True, text=True,
                                  env={**env, "HOME": str(client_home)}, timeout=600)

        ok = merge(tmp_path / "ray", home)
        assert ok.returncode == 0, ok.stderr
        nearswap.merge(quartet[0], quartet[1:2], t=1e-3, out=tmp_path / "local")
        assert files_of(tmp_path / "ray") == files_of(tmp_path / "local")
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        refused = merge(tmp_path / "refused", stranger)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1, refused.stderr
        assert "runs with token authentication" in lines[0] and "RAY_AUTH_MODE=token" in lines[0]
        assert not (tmp_path / "refused").exists()
    finally:
        nodes.stop()

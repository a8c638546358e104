"""Resume of a merge into a .gguf file: killed by SIGKILL anywhere, the next run of the same
merge continues it to the bytes of an uninterrupted one (the reference merge's file, read as
bytes) and the same statistics; a different merge refuses, saying what differs.

As in test_resume.py, the kills are real SIGKILLs a child sends itself at a chosen point (a
patched function): mid-chunk after some bytes, with and without the journal caught up, and
just after the final rename."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

import nearswap  # noqa: E402
from killer import PRELUDE  # noqa: E402
from nearswap.runtime.stream import Settings  # noqa: E402
from test_gguf_merge import family  # noqa: E402

TS = [1e-3, 2e-3]
SETTINGS = dict(chunk=1024, threads=2, journal_bytes=16 << 10)  # many work items, a journal line every 16 KiB

KILLER = PRELUDE + r"""

if point == "bytes":  # after `arg` bytes of merged float32 values, half a chunk written
    state = {"n": 0}
    write = gguf_writer.GGUFStreamWriter.write_coded
    def patched(self, name, start, data):
        n = memoryview(data).nbytes
        if state["n"] + n >= arg:
            half = memoryview(data).cast("B")[: n // 2 // 1024 * 1024]  # whole blocks of any type
            if len(half):
                write(self, name, start, half)
            die()
        state["n"] += n
        return write(self, name, start, data)
    gguf_writer.GGUFStreamWriter.write_coded = patched

base, out, *secs = sys.argv[3:]
nearswap.merge(base, secs, t=%r, out=out, settings=Settings(**%r))
print("finished")
""" % (TS, SETTINGS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-gguf")
    paths, _, _ = family(root, Q.Q8_0, n=2)
    reference = root / "reference.gguf"
    report = nearswap.merge(paths[0], paths[1:], t=TS, out=reference, settings=Settings(**SETTINGS))
    total = sum(4 * int(np.prod(t.shape)) for t in gguf.GGUFReader(str(paths[0])).tensors)
    return paths, reference, report, total


def kill_at(models, out, point, arg=0):
    paths = models[0]
    return subprocess.run([sys.executable, "-c", KILLER, point, str(arg), str(paths[0]), str(out),
                           *map(str, paths[1:])], capture_output=True, text=True, timeout=120)


def merge_again(models, out, **kw):
    return nearswap.merge(models[0][0], models[0][1:], t=TS, out=out, settings=Settings(**SETTINGS), **kw)


@pytest.mark.parametrize("point,fraction", [("bytes", 0.3), ("bytes", 0.8), ("collected-journaled", 0.6)])
def test_killed_mid_merge_the_next_run_finishes_it_to_the_same_bytes(models, tmp_path, point, fraction):
    paths, reference, expected, total = models
    out = tmp_path / "out.gguf"
    killed = kill_at(models, out, point, int(total * fraction))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # never a half-written output at OUT
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and (partial[0] / "out.gguf").is_file()
    with pytest.warns(nearswap.NearswapWarning) as said:
        report = merge_again(models, out)
    assert out.read_bytes() == reference.read_bytes()
    assert report["steps"] == expected["steps"]  # every count and mean |change|, per tensor and in total
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]  # the partial directory is gone
    message = " ".join(str(w.message) for w in said)
    if point == "collected-journaled":  # the journal had caught up: those tensors were not merged again
        assert "continuing" in message and 0 < report["resumed"]["tensors"] < len(expected["output"]["types"]) + 99
        assert 0 < report["resumed"]["output_bytes"] < reference.stat().st_size
    else:  # how far the background journal got depends on the disk: continued, or started afresh
        assert "continuing" in message or "removed" in message


def test_killed_after_the_rename_the_output_is_whole_and_the_next_run_refuses_to_clobber_it(models, tmp_path):
    paths, reference, _, _ = models
    out = tmp_path / "out.gguf"
    assert kill_at(models, out, "after-rename").returncode == -signal.SIGKILL
    assert out.read_bytes() == reference.read_bytes()
    with pytest.raises(nearswap.NearswapError, match="exists"):
        merge_again(models, out)
    # with --force: the journal left beside it has no file to continue; removed, and the merge made again
    with pytest.warns(nearswap.NearswapWarning, match="removed"):
        report = merge_again(models, out, force=True)
    assert "resumed" not in report and out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_a_different_merge_refuses_to_continue_and_restart_discards(models, tmp_path, run):
    paths, reference, _, total = models
    out = tmp_path / "out.gguf"
    assert kill_at(models, out, "collected-journaled", total // 2).returncode == -signal.SIGKILL
    partial = next(p for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    args = [*paths, "-t", "1e-3,2.5e-3", "-o", out, "-q"]
    result = run("merge", *args)
    assert result.exit_code == 1 and "recipe.steps[2].t was 0.002, now 0.0025" in result.stderr
    assert partial.is_dir() and not out.exists()
    result = run("merge", *paths, "-t", "1e-3,2e-3", "-o", out, "--type", "q4_0")
    assert result.exit_code == 1 and 'output layout.type was "like-base", now "q4_0"' in result.stderr, result.stderr
    result = run("merge", *args, "--restart", "--json")
    assert result.exit_code == 0, result.output
    assert "resumed" not in json.loads(result.stdout) and not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]

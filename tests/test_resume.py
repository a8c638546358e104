"""Resume (issue 12): a merge killed by SIGKILL at any point is continued by the next run of the
same merge, to the bits of an uninterrupted one and the same statistics; a different merge
into the same output refuses, saying what differs.

The kills are real SIGKILLs of a child process, sent by the child to itself at a chosen point
of the write (a patched function, as a fault injector): mid-chunk at random byte offsets, in
the middle of a journal line, between shards, while the shard headers are written, while the
side files and the card are written, just before and just after the final rename.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nearswap
from conftest import random_model, write_model
from killer import PRELUDE
from nearswap.runtime.stream import Settings

SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (96, 128) for i in range(12)}  # 48 KiB each in float32
SHAPES["model.embed_tokens.weight"] = (200, 128)
SETTINGS = dict(chunk=1024, threads=2, journal_bytes=64 << 10)  # many work items, a journal line every 64 KiB
SHARD = "200KB"

KILLER = PRELUDE + r"""

if point == "bytes":  # after `arg` bytes of tensor data, half-way through a chunk
    state = {"n": 0}
    write = st.ShardedWriter.write
    def patched(self, name, start, data):
        view = st.byte_view(data)
        if state["n"] + len(view) >= arg:
            write(self, name, start, view[: len(view) // 2])
            die()
        state["n"] += len(view)
        return write(self, name, start, data)
    st.ShardedWriter.write = patched
elif point == "journal":  # half of the journal's `arg`-th line written
    state = {"n": 0}
    append = journal.JournalWriter._append
    def patched(self, entry):
        state["n"] += 1
        if state["n"] == arg:
            import json
            line = json.dumps(entry, separators=(",", ":")).encode()
            os.write(self.fd, line[: len(line) // 2])
            die()
        append(self, entry)
    journal.JournalWriter._append = patched
elif point == "between-shards":  # the first shard complete (synced and journaled), nothing of the others
    state = {"first": None}
    write = st.ShardedWriter.write
    def patched(self, name, start, data):
        fd, offset, dtype, path = self.places[name]
        if path.name != "model-00001-of-00004.safetensors":
            self.sync()
            j = journal.JournalWriter._live
            j.flush()
            die()
        return write(self, name, start, data)
    st.ShardedWriter.write = patched
elif point == "headers":  # `arg` shard headers written
    state = {"n": 0}
    pwrite = os.pwrite
    close = st.ShardedWriter.close
    def patched(self):
        def counting(fd, data, pos):
            if pos == 0 and any(fd == h[0] for h in self.headers):
                if state["n"] == arg:
                    die()
                state["n"] += 1
            return pwrite(fd, data, pos)
        os.pwrite = counting
        return close(self)
    st.ShardedWriter.close = patched
elif point == "side-files":
    sinks.copy_side_files = lambda *a: die()
elif point == "card":
    import nearswap.ship.card as card
    card.model_card = lambda *a, **k: die()
elif point == "before-rename":
    output._commit = lambda *a, **k: die()

base, out, *secs = sys.argv[3:]
nearswap.merge(base, secs, t=[1e-3, 2e-3, 5e-4], out=out, shard_size="%s",
               settings=Settings(**%r))
print("finished")
""" % (SHARD, SETTINGS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    base = random_model(0, "f32", shapes=SHAPES, scale=0.02)
    paths = [write_model(root / "base", base)]
    for i in (1, 2, 3):
        paths.append(write_model(root / f"s{i}", random_model(i, "f32", shapes=SHAPES, like=base, noise=2e-3)))
    reference = root / "reference"
    report = nearswap.merge(paths[0], paths[1:], t=[1e-3, 2e-3, 5e-4], out=reference, shard_size=SHARD,
                            settings=Settings(**SETTINGS))
    assert len(report["output"]["files"]) == 5  # 4 shards + the index: a multi-shard model
    return paths, reference, report


def kill_at(models, out, point, arg=0):
    paths = models[0]
    proc = subprocess.run([sys.executable, "-c", KILLER, point, str(arg), str(paths[0]), str(out),
                           *map(str, paths[1:])], capture_output=True, text=True, timeout=120)
    return proc


def weights(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.suffix == ".safetensors" or p.name.endswith(".index.json")}


RNG = np.random.default_rng(12)
TOTAL = sum(int(np.prod(s)) * 4 for s in SHAPES.values())
POINTS = ([("bytes", int(b)) for b in sorted(RNG.integers(4096, TOTAL - 4096, 5))]
          + [("journal", 3), ("between-shards", 0), ("headers", 0), ("headers", 2), ("side-files", 0),
             ("card", 0), ("before-rename", 0), ("after-rename", 0)])


@pytest.mark.parametrize("point,arg", POINTS, ids=[f"{p}-{a}" for p, a in POINTS])
def test_killed_anywhere_the_next_run_finishes_it_to_the_same_bits(models, tmp_path, point, arg):
    paths, reference, expected = models
    out = tmp_path / "out"
    killed = kill_at(models, out, point, arg)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "after-rename":  # complete and in place when killed: the next run refuses to clobber it
        assert weights(out) == weights(reference)
        with pytest.raises(nearswap.NearswapError, match="exists"):
            nearswap.merge(paths[0], paths[1:], t=[1e-3, 2e-3, 5e-4], out=out, shard_size=SHARD)
        return
    assert not out.exists()  # never a half-written output at OUT
    partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and partial[0].is_dir()
    with pytest.warns(nearswap.NearswapWarning) as said:
        report = nearswap.merge(paths[0], paths[1:], t=[1e-3, 2e-3, 5e-4], out=out, shard_size=SHARD,
                                settings=Settings(**SETTINGS))
    assert weights(out) == weights(reference)
    assert report["steps"] == expected["steps"]  # every count and mean |change|, per tensor and in total
    # the journaled CRCs included; the recipe's paths are written relative to each output (another file)
    assert without_recipe(report["output"]["checksums"]) == without_recipe(expected["output"]["checksums"])
    on_disk = json.loads((out / "merge_report.json").read_text())
    assert on_disk["steps"] == json.loads((reference / "merge_report.json").read_text())["steps"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # no journal or marker left in the output
    message = " ".join(str(w.message) for w in said)
    if point == "before-rename":
        # complete and no longer marked partial when killed: not removed (it might be an old output that
        # a --force replacement moved aside), named in a warning; it holds the whole merge; the run started over
        assert f"found {partial[0]}" in message and "left as it is" in message and "resumed" not in report
        assert weights(partial[0]) == weights(reference)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", partial[0].name])
    else:
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
        assert "continuing" in message and partial[0].name in message
        resumed = report["resumed"]["tensors"]
        if point in ("bytes", "journal"):
            assert 0 <= resumed < len(SHAPES)
        else:  # the data were complete (or most of the first shard was): that much was not written again
            # the first shard holds the embedding and one layer; the embedding surely was journaled
            assert resumed in ((1, 2) if point == "between-shards" else (len(SHAPES),)), report["resumed"]
        assert on_disk["resumed"] == report["resumed"]


def test_a_resumed_run_does_not_redo_the_journaled_work(models, tmp_path):
    """Killed at 60% of the data, the journal having caught up with the tensors completed by then (how far the
    background sync gets on its own depends on the disk: on CI's it had journaled nothing by 60% of this 0.7 MB
    merge; the catching up happens on the driver's thread, so the machine's load cannot change it): the next run
    reads and writes only the rest."""
    paths = models[0]
    out = tmp_path / "out"
    assert kill_at(models, out, "collected-journaled", int(TOTAL * 0.6)).returncode == -signal.SIGKILL
    read = []
    with pytest.warns(nearswap.NearswapWarning, match="continuing"):
        report = nearswap.merge(paths[0], paths[1:], t=[1e-3, 2e-3, 5e-4], out=out, shard_size=SHARD,
                                settings=Settings(**SETTINGS), progress=read.append)
    assert weights(out) == weights(models[1])
    skipped = report["resumed"]["output_bytes"]
    # every tensor completed by the kill, less those still in flight (two threads, 4 KiB chunks; the largest
    # tensor is 100 KB of the 0.68 MB)
    assert 0.3 * TOTAL <= skipped <= 0.6 * TOTAL, (skipped, TOTAL)
    in_bytes = 4 * TOTAL  # base + three secondaries, float32
    assert read[0] == 4 * skipped and sum(read) == in_bytes  # the progress bar starts where the last run stopped


def without_recipe(recorded):
    return {**recorded, "other": {k: v for k, v in recorded["other"].items() if k != "nearswap_recipe.yaml"}}


def retagged(bodies):
    """Journal lines with the tags the format documents: the first 32 hex digits of SHA-256 over
    the previous line's tag (b"nearswap-journal-3" before the first), a newline and the line."""
    import hashlib

    previous, out = b"nearswap-journal-3", b""
    for body in bodies:
        previous = hashlib.sha256(previous + b"\n" + body).hexdigest()[:32].encode()
        out += previous + b" " + body + b"\n"
    return out


@pytest.mark.parametrize("change", ["t", "input", "shard size", "journal format"])
def test_a_different_merge_refuses_to_continue_and_says_why(models, tmp_path, run, change):
    paths = models[0]
    out = tmp_path / "out"
    assert kill_at(models, out, "bytes", TOTAL // 2).returncode == -signal.SIGKILL
    partial = next(p for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    args = [*paths, "-t", "1e-3,2e-3,5e-4", "-o", out, "--shard-size", SHARD, "-q"]
    if change == "t":
        args[args.index("-t") + 1] = "1e-3,2e-3,6e-4"
        why = "recipe.steps[3].t was 0.0005, now 0.0006"
    elif change == "input":
        tmp_copy = tmp_path / "s2"
        import shutil

        shutil.copytree(paths[2], tmp_copy)
        args[2] = tmp_copy
        why = "recipe.steps[2].model was"
    elif change == "shard size":
        args[args.index("--shard-size") + 1] = "300KB"
        why = "recipe.shard_size was 200000, now 300000"
    else:  # a journal of an older nearswap (its tallies are of another form), its lines' tags intact
        path = partial / ".nearswap-journal"
        lines = path.read_bytes().split(b"\n")
        entry = json.loads(lines[0].split(b" ", 1)[1])
        del entry["fingerprint"]["journal"]
        bodies = [json.dumps(entry).encode()] + [line.split(b" ", 1)[1] for line in lines[1:] if line]
        path.write_bytes(retagged(bodies))
        why = "its journal was written by another nearswap (an older format)"
    result = run("merge", *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output
    assert why in lines[0] and partial.name in lines[0] and "--restart" in lines[0]
    assert partial.is_dir() and not out.exists()  # nothing discarded without being asked
    restarted = run("merge", *args, "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert "removed" in restarted.stderr and not partial.exists()


def test_an_input_changed_in_place_refuses(models, tmp_path, run):
    """The same paths, but a secondary rewritten since the killed run (its size or mtime differ)."""
    import shutil

    paths = list(models[0])
    own = tmp_path / "s3"
    shutil.copytree(paths[3], own)
    paths[3] = own
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLER, "bytes", str(TOTAL // 2), str(paths[0]), str(out),
                           *map(str, paths[1:])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    os.utime(own / "model.safetensors", ns=(1, 1))
    result = run("merge", *paths, "-t", "1e-3,2e-3,5e-4", "-o", out, "--shard-size", SHARD, "-q")
    assert result.exit_code == 1 and f"its input {(own / 'model.safetensors').resolve()} changed" in result.stderr


def test_a_partial_output_tampered_with_never_leads_writes_elsewhere(models, tmp_path, run):
    """Someone swapped a killed run's shard for a link to their own file: the next run removes the
    link (naming it), never writes through it, and finishes the merge; a journal that is a FIFO
    does not hang the next run."""
    paths = models[0]
    out = tmp_path / "out"
    assert kill_at(models, out, "bytes", TOTAL // 2).returncode == -signal.SIGKILL
    partial = next(p for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    shard = partial / "model-00002-of-00004.safetensors"
    theirs = tmp_path / "theirs.bin"  # the shard's size exactly: only the link, not the size, can stop a write
    mine = b"a user's file".ljust(shard.stat().st_size, b"!")
    theirs.write_bytes(mine)
    shard.unlink()
    shard.symlink_to(theirs)
    args = [*paths, "-t", "1e-3,2e-3,5e-4", "-o", out, "--shard-size", SHARD, "-q"]
    result = run("merge", *args)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "removed 1 entry besides the weights ('model-00002-of-00004.safetensors')" in result.stderr
    assert theirs.read_bytes() == mine and weights(out) == weights(models[1])
    shutil.rmtree(out)
    assert kill_at(models, out, "bytes", TOTAL // 2).returncode == -signal.SIGKILL
    partial = next(p for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    (partial / ".nearswap-journal").unlink()
    os.mkfifo(partial / ".nearswap-journal")
    done = subprocess.run([sys.executable, "-m", "nearswap", *map(str, ["merge", *args])], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert weights(out) == weights(models[1]) and theirs.read_bytes() == mine

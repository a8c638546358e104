"""Fuzzing what resume and verify trust (issue 21): the partial output of a killed merge and a
finished output are altered at random — files truncated, bytes flipped, journal lines edited,
duplicated or dropped, entries renamed, deleted, replaced by links, files and folders planted —
and then:

- the next run of the same merge either gives, **byte for byte**, what a fresh merge of the
  current inputs gives (every weight file, the index, the configs and tokenizer, the recipe and
  the card; the report but its timing and resume note), or refuses in one line — never a
  different output with exit 0; a file outside the output that a planted link names is never
  written;
- ``verify`` finds every alteration of a weight file, the index, another recorded file or the
  file set (the card and the report itself are not what it vouches for: the report is the
  record).

Both a directory merge and a merge into a .gguf file. The suite runs ``NEARSWAP_FUZZ_CASES``
cases of each (default 120); ``benchmarks/fuzz_resume.py`` runs thousands and prints the counts.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import nearswap
from conftest import random_model, write_model
from killer import PRELUDE
from nearswap.core.errors import NearswapError
from nearswap.measure.verify import verify
from nearswap.runtime.stream import Settings

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from test_gguf_merge import family  # noqa: E402

CASES = int(os.environ.get("NEARSWAP_FUZZ_CASES", "120"))
SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (48, 64) for i in range(8)}
SHAPES["model.embed_tokens.weight"] = (100, 64)
SHAPES["model.norm.weight"] = (64,)
SETTINGS = dict(chunk=1024, threads=2, journal_bytes=8 << 10)
TS = [1e-3, 2e-3]
OUTCOMES: dict[str, dict[str, int]] = {}  # kind -> outcome -> count (read by benchmarks/fuzz_resume.py)

KILLER = PRELUDE + r"""
if point == "bytes":  # the background journal wherever it is once `arg` bytes of data were handed to the writer
    state = {"n": 0}
    def counting(write):
        def patched(self, name, start, data):
            state["n"] += memoryview(data).nbytes
            if state["n"] >= arg:
                die()
            return write(self, name, start, data)
        return patched
    st.ShardedWriter.write = counting(st.ShardedWriter.write)
    gguf_writer.GGUFStreamWriter.write_coded = counting(gguf_writer.GGUFStreamWriter.write_coded)
base, out, shard, *secs = sys.argv[3:]
kw = {} if out.endswith(".gguf") else {"shard_size": shard}
nearswap.merge(base, secs, t=%r, out=out, settings=Settings(**%r), **kw)
""" % (TS, SETTINGS)


def merge(paths, out):
    kw = {} if str(out).endswith(".gguf") else {"shard_size": "20KB"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nearswap.merge(paths[0], paths[1:], t=TS, out=out, settings=Settings(**SETTINGS), **kw)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or the file ``root``) as bytes; the report without its timing."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "merge_report.json":
                report = json.loads(data)
                report.pop("seconds", None)
                report.pop("resumed", None)
                data = json.dumps(report, sort_keys=True).encode()
            files[path.relative_to(root).as_posix()] = data
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs of both kinds, the reference outputs (fresh merges, at the depth every case's output
    has: the recipe's relative paths are the same), and the partial outputs of killed runs."""
    root = tmp_path_factory.mktemp("fuzz-resume")
    base = random_model(0, "f32", shapes=SHAPES)
    hf = [write_model(root / "in" / "base", base)]
    hf += [write_model(root / "in" / f"s{i}", random_model(i, "f32", shapes=SHAPES, like=base, noise=2e-3))
           for i in (1, 2)]
    (root / "in" / "base" / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    (root / "gg").mkdir()
    gg, _, _ = family(root / "gg", Q.Q8_0, n=2)
    world = {"root": root, "theirs": root / "theirs.bin"}
    world["theirs"].write_bytes(b"a user's file, never to be written")
    for kind, paths, name in (("dir", hf, "out"), ("gguf", gg, "out.gguf")):
        reference = root / "ref" / kind / name
        merge(paths, reference)
        partials = []
        for point, fraction in (("collected-journaled", 0.6), ("bytes", 0.4)):
            where = root / "killed" / kind / point / name
            where.parent.mkdir(parents=True)
            total = sum(4 * int(np.prod(s)) for s in SHAPES.values()) if kind == "dir" else 200_000
            proc = subprocess.run([sys.executable, "-c", KILLER, point, str(int(total * fraction)), str(paths[0]),
                                   str(where), "20KB", *map(str, paths[1:])], capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            (partial,) = [p for p in where.parent.iterdir() if p.name.endswith(".partial")]
            partials.append(partial)
        world[kind] = {"paths": paths, "name": name, "reference": snapshot(reference), "ref_path": reference,
                       "partials": partials}
    return world


# ---------------------------------------------------------------- alterations


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def alter(root: Path, rng: random.Random, theirs: Path, protect: tuple[str, ...] = ()) -> str:
    """One random alteration under ``root`` (a directory); returns what it did."""
    files = [p for p in _files(root) if p.name not in protect]
    target = rng.choice(files) if files else None
    kind = rng.choice(["flip", "flip", "truncate", "append", "journal", "rename", "delete", "plant", "link",
                       "dir"])
    if target is None and kind in ("flip", "truncate", "append", "rename", "delete", "link"):
        kind = "plant"
    if kind == "journal":
        journal = root / ".nearswap-journal"
        if not journal.is_file() or journal.is_symlink():  # (never write through a link this test planted)
            kind = "flip" if target is not None else "plant"
        else:
            lines = journal.read_bytes().split(b"\n")
            how = rng.choice(["digit", "drop", "duplicate", "swap", "garbage"])
            if how == "digit":  # an edited number (a tally, a CRC), the JSON still valid
                k = rng.randrange(len(lines))
                digits = [i for i, c in enumerate(lines[k]) if 48 <= c <= 57]
                if digits:
                    i = rng.choice(digits)
                    lines[k] = lines[k][:i] + bytes([48 + (lines[k][i] - 48 + rng.randrange(1, 10)) % 10]) + lines[k][i + 1:]
            elif how == "drop" and len(lines) > 1:
                del lines[rng.randrange(len(lines))]
            elif how == "duplicate":
                k = rng.randrange(len(lines))
                lines.insert(k, lines[k])
            elif how == "swap" and len(lines) > 2:
                i, j = rng.sample(range(len(lines)), 2)
                lines[i], lines[j] = lines[j], lines[i]
            else:
                lines.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
            journal.write_bytes(b"\n".join(lines))
            return f"journal {how}"
    if kind == "flip":
        data = bytearray(target.read_bytes())
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            target.write_bytes(bytes(data))
        return f"flip {target.name}"
    if kind == "truncate":
        size = target.stat().st_size
        os.truncate(target, rng.randrange(size) if size else 0)
        return f"truncate {target.name}"
    if kind == "append":
        with open(target, "ab") as f:
            f.write(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        return f"append {target.name}"
    if kind == "rename":
        others = [p for p in files if p != target]
        new = rng.choice(others) if others and rng.random() < 0.5 else target.with_name(f"renamed-{rng.randrange(99)}")
        os.replace(target, new)
        return f"rename {target.name} -> {new.name}"
    if kind == "delete":
        target.unlink()
        return f"delete {target.name}"
    if kind == "link":  # a file replaced by a link: to an outside file (never to be written), or a copy of itself
        if rng.random() < 0.5:
            target.unlink()
            target.symlink_to(theirs)
            return f"link {target.name} -> theirs"
        copy = root.parent / f"copy-{rng.randrange(10**6)}"
        shutil.copyfile(target, copy)
        target.unlink()
        target.symlink_to(copy)
        return f"link {target.name} -> a copy"
    if kind == "dir":
        name = rng.choice(["config.json", "model.safetensors", "sub", ".nearswap-journal"])
        path = root / name
        if not os.path.lexists(path):
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"\0" * 16)
        return f"dir {name}"
    name = rng.choice(["model.safetensors", "pytorch_model.bin", "config.json", "extra.txt", "tokenizer.json",
                       "model.safetensors.index.json", "model-00009-of-00009.safetensors"])
    path = root / name
    if not os.path.lexists(path):
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))))
    return f"plant {name}"


# ---------------------------------------------------------------- resume


def _count(kind: str, outcome: str) -> None:
    OUTCOMES.setdefault(kind, {}).setdefault(outcome, 0)
    OUTCOMES[kind][outcome] += 1


@pytest.mark.parametrize("kind", ["dir", "gguf"])
def test_a_rerun_over_an_altered_partial_output_is_the_fresh_merge_or_one_line(world, kind, tmp_path):
    rng = random.Random(f"resume-{kind}")
    w = world[kind]
    theirs = world["theirs"].read_bytes()
    for case in range(CASES):
        # every case's output at the depth of the reference's: the recipe's relative paths are the same
        out = world["root"] / "cases" / f"{kind}-{case}" / w["name"]
        out.parent.mkdir(parents=True)
        source = w["partials"][case % len(w["partials"])]
        partial = out.parent / source.name
        shutil.copytree(source, partial, symlinks=True)
        done = [alter(partial, rng, world["theirs"]) for _ in range(rng.randrange(1, 4))]
        try:
            report = merge(w["paths"], out)
        except NearswapError as e:
            assert "\n" not in str(e), (done, str(e))
            _count(kind, "refused in one line")
        else:
            got = snapshot(out)
            assert got.keys() == w["reference"].keys(), (done, sorted(got))
            for name, data in got.items():
                assert data == w["reference"][name], (done, name)
            _count(kind, "continued, the fresh merge's bytes" if "resumed" in report else
                   "started over, the fresh merge's bytes")
        assert world["theirs"].read_bytes() == theirs, done
        shutil.rmtree(out.parent)
    assert sum(OUTCOMES[kind].values()) >= CASES


# ---------------------------------------------------------------- verify


def state(root: Path) -> list:
    """Everything under ``root``: each entry's kind and bytes (or a link's target)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out.append((rel, "link", os.readlink(path)))
        elif path.is_dir():
            out.append((rel, "dir", b""))
        else:
            out.append((rel, "file", path.read_bytes()))
    return out


@pytest.mark.parametrize("kind", ["dir", "gguf"])
def test_verify_finds_every_alteration(world, kind):
    rng = random.Random(f"verify-{kind}")
    w = world[kind]
    root = world["root"] / "verify" / kind
    for case in range(CASES):
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        out = root / w["name"]
        if kind == "dir":
            shutil.copytree(w["ref_path"], out)
            before = state(out)
            done = alter(out, rng, world["theirs"], protect=("README.md", "merge_report.json"))
            if state(out) == before:
                continue  # nothing changed (the planted name was taken)
        else:
            shutil.copyfile(w["ref_path"], out)
            data = bytearray(out.read_bytes())
            how = rng.choice(["flip", "flip", "flip", "truncate", "append"])
            if how == "flip":
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif how == "truncate":
                del data[rng.randrange(len(data)):]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            out.write_bytes(bytes(data))
            done = how
        with pytest.raises(NearswapError) as found:
            verify(out)
        assert "\n" not in str(found.value), (done, str(found.value))
        _count(f"verify {kind}", "alteration found")
    shutil.rmtree(root)
    assert verify(w["ref_path"])["tensors"] == len(SHAPES) if kind == "dir" else True  # the original passes

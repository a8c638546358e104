"""`nearswap verify` (issue 12): a flipped bit in any shard is found, an output that no longer
matches its inputs is found, a good merge passes; the checksums recorded at write time are those
of the bytes on disk (recomputed here independently: the safetensors library's reads, the crc32c
library, checked against the CRC-32C standard's check value)."""

import hashlib
import json
import struct

import crc32c
import numpy as np
import pytest
from safetensors import safe_open

import nearswap
from conftest import random_model, write_model
from nearswap.runtime.stream import Settings

SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (96, 128) for i in range(9)}
SHAPES["model.embed_tokens.weight"] = (200, 128)
CHUNK = 1000


@pytest.fixture
def merged(tmp_path):
    base = random_model(0, "bf16", shapes=SHAPES)
    paths = [write_model(tmp_path / "base", base)]
    paths += [write_model(tmp_path / f"s{i}", random_model(i, "bf16", shapes=SHAPES, like=base, noise=2e-3))
              for i in (1, 2)]
    report = nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "out", shard_size="100KB",
                            settings=Settings(chunk=CHUNK, threads=2))
    return paths, tmp_path / "out", report


def test_recorded_checksums_are_those_of_the_files(merged):
    """Independently: each shard's tensors read with safetensors, in file order, CRC-32 per chunk."""
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # RFC 3720's check value: it is CRC-32C
    _, out, report = merged
    recorded = report["output"]["checksums"]
    assert recorded["chunk"] == CHUNK and len(recorded["files"]) == len(report["output"]["files"]) - 1 > 2
    for name, digest in recorded["files"].items():
        header = json.loads((out / name).read_bytes()[8: 8 + struct.unpack("<Q", (out / name).read_bytes()[:8])[0]])
        order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        sha = hashlib.sha256()
        with safe_open(str(out / name), "np") as f:
            for tensor in order:
                flat = f.get_tensor(tensor).reshape(-1)
                crcs = [crc32c.crc32c(flat[i: i + CHUNK].tobytes()) for i in range(0, flat.size, CHUNK)]
                sha.update(b"".join(c.to_bytes(4, "big") for c in crcs))
        assert sha.hexdigest() == digest, name


def test_a_good_merge_passes(merged, run):
    _, out, _ = merged
    result = run("verify", out, "--inputs", "--sample", 20, "--seed", 3, "-q")
    assert result.exit_code == 0, result.output
    assert "as written" in result.stdout and "20 chunks" in result.stdout and "identical" in result.stdout


def test_a_flipped_bit_in_any_shard_is_found(merged, run):
    _, out, report = merged
    rng = np.random.default_rng(5)
    for name in report["output"]["checksums"]["files"]:
        path = out / name
        raw = bytearray(path.read_bytes())
        data_start = 8 + struct.unpack("<Q", raw[:8])[0]
        pos = int(rng.integers(data_start, len(raw)))
        raw[pos] ^= 1 << int(rng.integers(0, 8))
        original = path.read_bytes()
        path.write_bytes(bytes(raw))
        result = run("verify", out, "-q")
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output
        assert str(path) in lines[0] and "differ from what the merge wrote" in lines[0]
        path.write_bytes(original)
    assert run("verify", out, "-q").exit_code == 0


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("tensor", sorted(SHAPES)[::4])
def test_an_output_that_its_inputs_no_longer_give_is_found(merged, run, where, tensor):
    """The base changed after the merge, in the first 200 or the last element of one tensor
    only: the checkpoint is as written, but not what the recipe gives. A sample as large as the
    number of chunks recomputes every one; a smaller sample draws every chunk alike, so that a
    change confined to a tensor's first or last chunk is found as often as any other."""
    paths, out, _ = merged
    base = random_model(0, "bf16", shapes=SHAPES)
    flat = base[tensor].reshape(-1)
    if where == "first":
        flat[:200] = flat[:200] + np.float32(0.5)
    else:
        flat[-1] = flat[-1] + np.float32(0.5)
    write_model(paths[0], base)
    chunks = sum(-(-int(np.prod(shape)) // CHUNK) for shape in SHAPES.values())
    result = run("verify", out, "--inputs", "--sample", chunks, "-q")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "differ from what the recipe gives" in lines[0]
    assert repr(tensor) in lines[0]
    first_or_last = "elements 0..999" if where == "first" else f"..{int(np.prod(SHAPES[tensor])) - 1}:"
    assert first_or_last in lines[0], lines[0]
    found = sum(run("verify", out, "--inputs", "--sample", chunks // 4, "--seed", seed, "-q").exit_code == 1
                for seed in range(40))
    assert 2 <= found <= 20  # each run draws the changed chunk with probability 1/4: 10 of 40 expected
    assert run("verify", out, "-q").exit_code == 0  # without --inputs: the files are as written


def test_what_cannot_be_verified_is_one_line(merged, tmp_path, run):
    paths, out, _ = merged
    for target, needle in ((paths[0], "no merge_report.json"), (tmp_path / "nothing", "not a directory")):
        result = run("verify", target)
        assert result.exit_code == 1 and needle in result.stderr and "Traceback" not in result.output
    report = json.loads((out / "merge_report.json").read_text())
    del report["output"]["checksums"]
    (out / "merge_report.json").write_text(json.dumps(report))
    result = run("verify", out)
    assert result.exit_code == 1 and "records no checksums" in result.stderr

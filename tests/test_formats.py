"""safetensors reading and writing, checked against the safetensors library itself."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import random_model, write_model
from nearswap.core.dtypes import BY_NAME
from nearswap.core.errors import NearswapError
from nearswap.formats import open_model
from nearswap.formats.safetensors import (
    FileReader,
    MappedReader,
    ShardedWriter,
    read_header,
)
from reference import same_bits


def test_reader_matches_library(tmp_path):
    arrays = random_model(1, "bf16")
    arrays["ints"] = np.arange(12, dtype=np.int64).reshape(3, 4)
    save_file(arrays, str(tmp_path / "m.safetensors"))
    tensors, _ = read_header(tmp_path / "m.safetensors")
    reader = FileReader()
    for name, want in arrays.items():
        info = tensors[name]
        assert info.shape == want.shape
        got = reader.read(info, 0, np.empty(info.numel, info.dtype.np)).reshape(info.shape)
        assert same_bits(got, want)
        if info.numel > 3:  # a chunk from the middle
            part = reader.read(info, 2, np.empty(info.numel - 3, info.dtype.np))
            assert same_bits(part, want.reshape(-1)[2:-1])
    reader.close()


def test_mapped_views_match_library_and_survive_release(tmp_path):
    """Zero-copy views hold the library's bytes; a released chunk reads back the same."""
    arrays = random_model(1, "bf16")
    arrays["big"] = np.arange(3 * 4096, dtype=np.float32)  # spans pages: release really unmaps some
    save_file(arrays, str(tmp_path / "m.safetensors"))
    tensors, _ = read_header(tmp_path / "m.safetensors")
    reader = MappedReader()
    for name, want in arrays.items():
        info = tensors[name]
        flat = want.reshape(-1)
        got = np.frombuffer(reader.view(info, 0, info.numel), info.dtype.np)
        assert same_bits(got, flat)
        if info.numel > 3:
            reader.release(info, 1, info.numel - 2)
            part = np.frombuffer(reader.view(info, 1, info.numel - 2), info.dtype.np)
            assert same_bits(part, flat[1:-1])
        del got
    reader.close()


def test_mapped_view_of_a_shrunk_file_is_an_error_not_a_crash(tmp_path):
    save_file({"w": np.ones(1000, np.float32)}, str(tmp_path / "m.safetensors"))
    tensors, _ = read_header(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as f:  # truncated after the header was read
        f.truncate(tensors["w"].offset + 100)
    reader = MappedReader()
    with pytest.raises(NearswapError, match="unexpected end of file reading 'w'"):
        reader.view(tensors["w"], 0, 1000)
    reader.close()


@pytest.mark.parametrize("shard_size", [10**9, 3000, 1])
def test_writer_output_loads_in_library(tmp_path, shard_size):
    arrays = random_model(2, "f16")
    plan = [(n, BY_NAME["F16"], a.shape) for n, a in arrays.items()]
    writer = ShardedWriter(tmp_path, plan, shard_size, {"format": "pt", "k": "v"})
    for name, a in reversed(arrays.items()):  # any order, in two chunks each
        flat = a.reshape(-1)
        half = flat.size // 2
        writer.write(name, half, flat[half:])
        writer.write(name, 0, flat[:half])
    files = writer.close()
    shards = [f for f in files if f.suffix == ".safetensors"]
    if shard_size == 10**9:
        assert [f.name for f in files] == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(arrays)
        assert index["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
        if shard_size == 1:
            assert len(shards) == len(arrays)  # every tensor larger than a shard gets its own
    loaded = {}
    for f in shards:
        loaded.update(load_file(str(f)))
        assert read_header(f)[1]["k"] == "v"
    assert set(loaded) == set(arrays)
    for name, a in arrays.items():
        assert same_bits(loaded[name], a)
    # and nearswap reads its own output back as the same model
    assert list(open_model(tmp_path).tensors) == list(arrays)


def test_sharded_directory_reads_in_shard_order(tmp_path):
    arrays = random_model(3, "bf16")
    write_model(tmp_path / "m", arrays, shards=3)
    model = open_model(tmp_path / "m")
    assert model.kind == "safetensors" and len(model.files) == 3
    assert set(model.tensors) == set(arrays)
    files = [t.file.name for t in model.tensors.values()]
    assert files == sorted(files)
    assert model.num_params == sum(a.size for a in arrays.values())


def _corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[:-10])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge header length":
        path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    elif how == "not json":
        n = struct.unpack("<Q", data[:8])[0]
        path.write_bytes(data[:8] + b"{" * n + data[8 + n:])
    elif how == "bad offsets":
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        first = next(k for k in header if k != "__metadata__")
        header[first]["data_offsets"][1] += 2
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    elif how == "unknown dtype":
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        first = next(k for k in header if k != "__metadata__")
        header[first]["dtype"] = "F8_E9M9"
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("how", ["truncated", "empty", "huge header length", "not json", "bad offsets", "unknown dtype"])
def test_corrupt_files_are_refused_with_the_file_named(tmp_path, how):
    save_file(random_model(4, "f32"), str(tmp_path / "m.safetensors"))
    _corrupt(tmp_path / "m.safetensors", how)
    with pytest.raises(NearswapError) as err:
        open_model(tmp_path / "m.safetensors")
    assert "m.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_index_naming_a_missing_shard(tmp_path):
    write_model(tmp_path / "m", random_model(5), shards=2)
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(NearswapError, match="names shard 'model-00002-of-00002.safetensors', which is missing"):
        open_model(tmp_path / "m")


def test_stale_index(tmp_path):
    write_model(tmp_path / "m", random_model(5), shards=2)
    idx = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    was = data["weight_map"]["model.norm.weight"]
    data["weight_map"]["model.norm.weight"] = shards[1 - shards.index(was)]
    idx.write_text(json.dumps(data))
    with pytest.raises(NearswapError, match="index is stale"):
        open_model(tmp_path / "m")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickles_are_refused(tmp_path, name):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(b"\x80\x04not really")
    for path in (tmp_path / "d", tmp_path / "d" / name):
        with pytest.raises(NearswapError, match="pickle.*safetensors"):
            open_model(path)

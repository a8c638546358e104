"""Fuzzing the parsers of files from strangers (issue 12, item 4): hypothesis mutates valid
safetensors headers, model indexes and GGUF headers — lengths, offsets, dtypes, shapes,
overlapping and out-of-range data, huge counts, deep nesting, invalid UTF-8, index entries
that leave the model directory or are links — and every case must end in a ``NearswapError``
(GGUF's low-level reader: its ``HeaderError``) or a read that agrees with the reference
library; no other exception, no example slower than the deadline, no more than ``BOUND`` bytes
allocated (tracemalloc, which numpy reports to).

The suite runs ``NEARSWAP_FUZZ_EXAMPLES`` (default 150) examples per parser;
``benchmarks/fuzz_parsers.py`` runs 10,000 per parser and prints the counts.
"""

import json
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nearswap.core.errors import NearswapError
from nearswap.formats import open_model
from nearswap.formats.safetensors import read_header as read_safetensors

gguf = pytest.importorskip("gguf")
from nearswap.formats.gguf_header import HeaderError  # noqa: E402
from nearswap.formats.gguf_header import read_header as read_gguf  # noqa: E402

EXAMPLES = int(os.environ.get("NEARSWAP_FUZZ_EXAMPLES", "150"))
BOUND = 64 << 20  # bytes a parser may allocate for a file of a few KB, however hostile
# No deadline (a busy machine is not a bug) and the same examples every run (a suite's outcome may not depend on
# luck); NEARSWAP_FUZZ_RANDOM=1 draws new ones each run, to look for more (benchmarks/fuzz_parsers.py).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("NEARSWAP_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
OUTCOMES: dict[str, dict[str, int]] = {}  # parser -> {"read": n, "refused": n}: benchmarks/fuzz_parsers.py prints it

U64 = st.one_of(st.sampled_from([0, 1, 7, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1]),
                st.integers(0, 2**64 - 1), st.integers(0, 4096))
JSON_ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                                  st.text(max_size=10)),
                        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner,
                                                                                             max_size=4)),
                        max_leaves=12)


def bounded(parse, path: Path, expected: tuple[type[BaseException], ...], parser: str):
    """Run ``parse(path)``: return its result, or None when it refused with one of ``expected``.
    Anything else fails the example; so does allocating more than BOUND."""
    tracemalloc.start()
    try:
        result = parse(path)
        outcome = "read"
    except expected as e:
        assert "\n" not in str(e), str(e)  # a refusal is one line
        result, outcome = None, "refused"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= BOUND, f"{parser} allocated {peak} bytes"
    counts = OUTCOMES.setdefault(parser, {"read": 0, "refused": 0})
    counts[outcome] += 1
    return result


# ---------------------------------------------------------------- safetensors headers

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1, "F64": 8}


@st.composite
def safetensors_file(draw):
    """Bytes of a safetensors file: valid, then (mostly) broken in one or more ways."""
    header: dict = {}
    pos = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        n = int(np.prod(shape)) * DTYPES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "metadata", "name", "extra"]))
        if kind == "metadata":
            header["__metadata__"] = draw(JSON_ANY)
        elif kind == "extra":
            header[draw(st.text(max_size=6))] = draw(JSON_ANY)
        else:
            live = [n for n in names if isinstance(header.get(n), dict)]
            if not live:
                continue
            name = draw(st.sampled_from(live))
            entry = header[name]
            if kind == "dtype":
                entry["dtype"] = draw(st.one_of(st.text(max_size=6), st.sampled_from(sorted(DTYPES)), JSON_ANY))
            elif kind == "shape":
                entry["shape"] = draw(st.one_of(st.lists(st.one_of(st.integers(-(2**65), 2**65), st.booleans(),
                                                                   st.floats()), max_size=5), JSON_ANY))
            elif kind == "offsets":
                entry["data_offsets"] = draw(st.one_of(st.lists(st.integers(-(2**65), 2**65), max_size=3),
                                                       st.lists(st.integers(0, pos + 8), min_size=2, max_size=2),
                                                       JSON_ANY))
            elif kind == "entry":
                header[name] = draw(JSON_ANY)
            else:  # rename: control characters, lone surrogates (JSON allows them, UTF-8 does not)
                header[draw(st.text(max_size=8))] = header.pop(name)
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        depth = draw(st.integers(1, 200_000))
        raw = b'{"__metadata__":' + b"[" * depth + b"]" * depth + b"}"
    if draw(st.integers(0, 9)) == 0 and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b'"', b"{"])) + raw[at:]
    length = len(raw)
    if draw(st.integers(0, 5)) == 0:
        length = draw(U64)
    data = b"\x01" * pos
    blob = struct.pack("<Q", length) + raw + data
    if draw(st.integers(0, 6)) == 0:
        blob = blob[: draw(st.integers(0, len(blob)))]
    if draw(st.integers(0, 6)) == 0:
        blob += b"\x00" * draw(st.integers(1, 64))
    return blob


def library_reads(path: Path):
    """The safetensors library's view (names, dtypes, shapes), or None where it refuses."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception:
        return None


@FUZZ
@given(blob=safetensors_file())
def test_safetensors_header(tmp_path, blob):
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    got = bounded(read_safetensors, path, (NearswapError,), "safetensors header")
    if got is not None:  # read: the library must read it too, the same
        theirs = library_reads(path)
        assert theirs is not None, "nearswap read a file the safetensors library refuses"
        ours = {name: (info.dtype.name, info.shape) for name, info in got[0].items()}
        assert ours == theirs


# ---------------------------------------------------------------- model indexes


def _valid_pair(root: Path) -> dict:
    from safetensors.numpy import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file({"a": np.ones((2, 3), np.float32)}, str(root / "model-00001-of-00002.safetensors"))
    save_file({"b": np.ones((4,), np.float32)}, str(root / "model-00002-of-00002.safetensors"))
    (root / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}


@FUZZ
@given(data=st.data())
def test_model_index(tmp_path, data):
    root = tmp_path / "model"
    if not root.exists():
        weight_map = _valid_pair(root)
        outside = tmp_path / "outside.safetensors"
        outside.write_bytes((root / "model-00002-of-00002.safetensors").read_bytes())
        (root / "link.safetensors").symlink_to(outside)
        (root / "sub").mkdir()
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    hostile = st.one_of(
        st.sampled_from(["../outside.safetensors", str(tmp_path / "outside.safetensors"), "link.safetensors", "sub",
                         "/dev/zero", "/dev/stdin", ".", "", "model-00001-of-00002.safetensors\x00x",
                         "missing.safetensors", "config.json", "sub/../model-00001-of-00002.safetensors"]),
        st.text(max_size=12), JSON_ANY)
    index: object = {"metadata": {"total_size": 28}, "weight_map": dict(weight_map)}
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["entry", "name", "map", "top", "many"]))
        if kind == "entry":
            index["weight_map"][data.draw(st.sampled_from(["a", "b"]))] = data.draw(hostile)
        elif kind == "name":
            index["weight_map"][data.draw(st.text(max_size=8))] = data.draw(hostile)
        elif kind == "map":
            index["weight_map"] = data.draw(JSON_ANY)
        elif kind == "many":
            index["weight_map"].update({f"x{i}": "model-00001-of-00002.safetensors"
                                        for i in range(data.draw(st.integers(0, 50_000)))})
        else:
            index = data.draw(JSON_ANY)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            break
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    model = bounded(open_model, root, (NearswapError,), "model index")
    if model is not None:  # read: every tensor's file is named by a plain name inside the model directory
        # the tensors the index names, and only those ({"b": "link.safetensors"} alone is a model of one tensor);
        # a link there to a file elsewhere is the HF cache layout: fine
        assert set(model.tensors) == set(index["weight_map"]) <= {"a", "b"}
        for info in model.tensors.values():
            assert info.file.parent == root and info.file.name not in ("", ".", "..") and info.file.resolve().is_file()


# ---------------------------------------------------------------- GGUF headers


def _valid_gguf(path: Path) -> list[tuple[int, int]]:
    """Write a small valid GGUF; return (offset, size) of every numeric part of its header
    (lengths, counts, types, dimensions, offsets, values), found with gguf.GGUFReader."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.context_length", 64)
    w.add_uint32("llama.embedding_length", 32)
    w.add_uint32("llama.feed_forward_length", 64)
    w.add_uint32("llama.attention.head_count", 4)
    w.add_string("general.name", "fuzz")
    w.add_array("tokenizer.ggml.scores", [0.5, 1.5, 2.5])
    w.add_tensor("token_embd.weight", np.ones((8, 32), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(np.ones((64, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    parts = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        at = field.offset
        for part in field.parts:
            if part.dtype != np.uint8:  # numbers, not string bytes
                parts += [(at + i * part.itemsize, part.itemsize) for i in range(min(part.size, 4))]
            at += part.nbytes
    return sorted(set(parts))


@FUZZ
@given(data=st.data())
def test_gguf_header(tmp_path, data):
    valid = tmp_path / "valid.gguf"
    if not valid.exists():
        (tmp_path / "parts.json").write_text(json.dumps(_valid_gguf(valid)))
    parts = [tuple(p) for p in json.loads((tmp_path / "parts.json").read_text())]
    blob = bytearray(valid.read_bytes())
    header_end = max(a + s for a, s in parts)
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["number", "number", "number", "byte", "utf8"]))
        if kind == "number":  # a length, count, type, dimension, offset or value set to something hostile
            at, size = data.draw(st.sampled_from(parts))
            value = data.draw(U64) % (1 << (8 * size))
            blob[at: at + size] = value.to_bytes(size, "little")
        elif kind == "byte":
            at = data.draw(st.integers(0, header_end - 1))
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "utf8":  # invalid UTF-8 inside a key or tensor name
            at = data.draw(st.integers(24, header_end - 1))
            blob[at] = data.draw(st.sampled_from([0xFF, 0xC3, 0xED, 0x80]))
    if data.draw(st.integers(0, 4)) == 0:
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(blob))
    header = bounded(read_gguf, path, (HeaderError,), "GGUF header")
    if header is not None:  # read: gguf's own reader must agree on the tensors where it reads the file
        try:
            theirs = [(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes)) for t in gguf.GGUFReader(str(path)).tensors]
        except Exception:
            theirs = None
        if theirs is not None:
            assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in header.tensors] == theirs
    bounded(open_model, path, (NearswapError,), "GGUF model")  # the user's entry point: one line or a model

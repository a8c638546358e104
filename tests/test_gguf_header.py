"""The fast GGUF header reader agrees with gguf.GGUFReader, and refuses bad files in one line."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402
from gguf import quants  # noqa: E402

from nearswap.formats.gguf_header import HeaderError, read_header  # noqa: E402

# value strategies per GGUF scalar type, inside each type's range
SCALAR_VALUES = {
    V.UINT8: st.integers(0, 2**8 - 1), V.INT8: st.integers(-(2**7), 2**7 - 1),
    V.UINT16: st.integers(0, 2**16 - 1), V.INT16: st.integers(-(2**15), 2**15 - 1),
    V.UINT32: st.integers(0, 2**32 - 1), V.INT32: st.integers(-(2**31), 2**31 - 1),
    V.UINT64: st.integers(0, 2**64 - 1), V.INT64: st.integers(-(2**63), 2**63 - 1),
    V.FLOAT32: st.floats(width=32, allow_nan=False), V.FLOAT64: st.floats(allow_nan=False),
    V.BOOL: st.booleans(), V.STRING: st.text(max_size=20),
}


@st.composite
def metadata(draw):
    """Key -> (value, type, element type or None): scalars of every type, arrays of scalars and strings."""
    out = {}
    for i in range(draw(st.integers(0, 12))):
        vtype = draw(st.sampled_from(list(SCALAR_VALUES) + [V.ARRAY] * 4))  # arrays often: they are skipped
        if vtype == V.ARRAY:
            item = draw(st.sampled_from(list(SCALAR_VALUES)))
            # (the writer refuses empty arrays)
            out[f"test.key{i}"] = (draw(st.lists(SCALAR_VALUES[item], min_size=1, max_size=30)), V.ARRAY, item)
        else:
            out[f"test.key{i}"] = (draw(SCALAR_VALUES[vtype]), vtype, None)
    return out


def write_gguf(path, meta, tensors):
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, item) in meta.items():
        w.add_key_value(key, value, vtype, item)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def library_view(path):
    """What gguf.GGUFReader says: scalar metadata, array lengths, tensor infos."""
    reader = gguf.GGUFReader(str(path))
    scalars, arrays = {}, {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or not f.types:  # the reader's own pseudo-fields
            continue
        if f.types[0] == V.ARRAY:
            arrays[key] = len(f.data)
        else:
            scalars[key] = f.contents()
    tensors = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.data_offset), int(t.n_elements),
                int(t.n_bytes)) for t in reader.tensors]
    return scalars, arrays, tensors


def assert_agrees(path):
    scalars, arrays, tensors = library_view(path)
    header = read_header(path)
    assert header.metadata.keys() == scalars.keys()
    for key, value in scalars.items():
        got = header.metadata[key]
        assert type(got) is type(value) and (got == value or (got != got and value != value)), key
    assert header.array_lengths == arrays
    assert [(t.name, t.shape, t.tensor_type, t.data_offset, t.n_elements, t.n_bytes) for t in header.tensors] == tensors


@settings(max_examples=40, deadline=None)
@given(meta=metadata(), qtypes=st.lists(st.sampled_from([Q.F32, Q.F16, Q.Q8_0, Q.Q4_1]), min_size=0, max_size=4))
def test_agrees_with_the_library(tmp_path_factory, meta, qtypes):
    rng = np.random.default_rng(0)
    tensors = {f"blk.{i}.ffn_up.weight": (quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), q), q)
               for i, q in enumerate(qtypes)}
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(path, meta, tensors)
    assert_agrees(path)


def test_vocabulary_arrays_are_skipped(tmp_path):
    """A tokenizer's arrays (strings, floats, ints) between scalars: lengths kept, contents skipped."""
    tokens = [f"tok{i}" + "é" * (i % 3) for i in range(500)]
    write_gguf(tmp_path / "m.gguf", {
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.scores": ([float(i) for i in range(500)], V.ARRAY, V.FLOAT32),
        "tokenizer.ggml.token_type": ([1] * 500, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": ([f"t {i}" for i in range(300)], V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32, None),
    }, {"token_embd.weight": (np.ones((500, 32), np.float32), Q.F32)})
    assert_agrees(tmp_path / "m.gguf")
    header = read_header(tmp_path / "m.gguf")
    assert header.array_lengths["tokenizer.ggml.tokens"] == 500 and header.metadata["tokenizer.ggml.bos_token_id"] == 1


def test_nested_arrays_are_skipped(tmp_path):
    write_gguf(tmp_path / "m.gguf", {"a.nested": ([[1, 2], [3]], V.ARRAY, V.ARRAY), "a.after": ("x", V.STRING, None)}, {})
    header = read_header(tmp_path / "m.gguf")
    assert header.array_lengths["a.nested"] == 2 and header.metadata["a.after"] == "x"


@pytest.mark.parametrize("damage, needle", [
    (lambda b: b[:40], "truncated"),
    (lambda b: b"GGUX" + b[4:], "magic"),
    (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "version 1"),
    (lambda b: b[:-10], "past the end"),
    (lambda b: b"", "empty"),
])
def test_bad_files_raise_header_error(tmp_path, damage, needle):
    write_gguf(tmp_path / "m.gguf", {"a.s": ("hello", V.STRING, None)},
               {"t": (np.ones((4, 32), np.float32), Q.F32)})
    (tmp_path / "bad.gguf").write_bytes(damage((tmp_path / "m.gguf").read_bytes()))
    with pytest.raises(HeaderError, match=needle):
        read_header(tmp_path / "bad.gguf")

"""GGUF in, GGUF out: a merge in GGUF's own names and values, for any architecture.

Inputs are written with gguf's own writer; the output is read with gguf's own reader and
compared byte for byte with the plain formula: dequantize the inputs (gguf.quants), chain
NearSwap in numpy (reference.py), quantize each whole tensor (gguf.quants, or llama.cpp's
quantizer for K-quants)."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from nearswap.formats import gguf_writer  # noqa: E402
from reference import chain as ref_chain  # noqa: E402

ARCH = "starcoder2"  # an architecture nearswap has no HF row for: GGUF-native merges need none
SHAPES = {"token_embd.weight": (40, 256), "blk.0.attn_norm.weight": (256,), "blk.0.attn_q.weight": (256, 256),
          "blk.0.ffn_up.weight": (96, 256), "blk.0.ffn_down.weight": (256, 96), "output_norm.weight": (256,)}
TOKENS = [f"tok{i}" for i in range(40)]


def write_gguf(path, arrays, qtypes, arch=ARCH):
    """``arrays`` (float32, HF-order shapes) as a GGUF of ``arch`` with ``qtypes`` per tensor,
    and a small vocabulary; returns what each tensor dequantizes to."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_chat_template("{{ messages }}")
    stored = {}
    for name, x in arrays.items():
        if gguf_writer.gguf_quantizes(qtypes[name]):
            data = quants.quantize(x, qtypes[name])
        else:  # a K-quant: llama.cpp's quantizer (the llama extra)
            data = gguf_writer.quantize(x.reshape(-1), qtypes[name]).reshape(x.shape[0], -1)
        w.add_tensor(name, data, raw_dtype=qtypes[name])
        stored[name] = quants.dequantize(data, qtypes[name]).astype(np.float32).reshape(x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def family(tmp_path, qtype, n=2, arch=ARCH):
    """A base and ``n`` secondaries (base + Laplace noise on matrices), written by gguf."""
    rng = np.random.default_rng(0)
    base = {k: rng.normal(0, 0.02, s).astype(np.float32) + (1 if len(s) == 1 else 0) for k, s in SHAPES.items()}
    qtypes = {k: Q.F32 if len(s) == 1 else qtype if gguf_writer.gguf_quantizes(qtype) else
              gguf_writer.tensor_type(s, qtype) for k, s in SHAPES.items()}  # (K-quants: whole 256-wide rows)
    paths, stored = [], []
    for i in range(n + 1):
        arrays = {k: v + (rng.laplace(0, 0.0125, v.shape).astype(np.float32) if i and v.ndim == 2 else 0)
                  for k, v in base.items()}
        paths.append(tmp_path / f"m{i}.gguf")
        stored.append(write_gguf(paths[-1], arrays, qtypes, arch))
    return paths, stored, qtypes


def expected_bytes(stored, ts, qtype_of, code):
    """The plain formula: chain the dequantized values, code each whole tensor."""
    out = {}
    for name in SHAPES:
        merged = ref_chain(stored[0][name], [s[name] for s in stored[1:]], ts)
        out[name] = np.asarray(code(merged.astype(np.float32), qtype_of[name])).view(np.uint8).reshape(-1)
    return out


def read_raw(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: (t.tensor_type, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in reader.tensors}


def gguf_code(x, qtype):
    return x if qtype == Q.F32 else x.astype(np.float16) if qtype == Q.F16 else quants.quantize(x, qtype)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.F16])
def test_like_base_is_the_formula_coded_in_the_base_types(tmp_path, run, qtype):
    (base, *secs), stored, qtypes = family(tmp_path, qtype)
    ts = [1e-3, 2e-3]
    result = run("merge", base, *secs, "-t", ts[0], "-t", ts[1], "-o", tmp_path / "out.gguf", "-q")
    assert result.exit_code == 0, result.output
    reader, got = read_raw(tmp_path / "out.gguf")
    want = expected_bytes(stored, ts, qtypes, gguf_code)
    for name in SHAPES:
        assert got[name][0] == qtypes[name], name
        assert np.array_equal(got[name][1], want[name]), name
    # every metadata value of the base kept (vocabulary, chat template), provenance added
    base_reader = gguf.GGUFReader(str(base))
    for key, field in base_reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert reader.fields[key].contents() == field.contents(), key
    assert "nearswap.recipe" in reader.fields and str(secs[1]) in reader.fields["nearswap.recipe"].contents()


@pytest.mark.parametrize("type_name", [None, "q4_1", "f16"])
def test_the_plan_of_a_gguf_merge_counts_the_files_bytes(tmp_path, run, type_name):
    """--plan / the plan line: reads are the input files' tensor bytes (blocks, not the float32
    they decode to), writes the output's in its types; against gguf's own reader of the inputs
    and of the file the merge then writes."""
    from nearswap.merging import recipe
    from nearswap.merging.plan import plan_for

    (base, *secs), _, _ = family(tmp_path, Q.Q8_0, n=2)
    rec = recipe.build({"base": str(base), "steps": [{"model": str(s), "t": 1e-3} for s in secs]}, "test")
    plan = plan_for(rec, tmp_path / "out.gguf", type_name)
    stored = [sum(int(t.n_bytes) for t in gguf.GGUFReader(str(p)).tensors) for p in (base, *secs)]
    assert plan.read_bytes == sum(stored)
    result = run("merge", base, *secs, "-t", 1e-3, "-o", tmp_path / "out.gguf", "-q",
                 *(["--type", type_name] if type_name else []))
    assert result.exit_code == 0, result.output
    assert plan.out_bytes == sum(int(t.n_bytes) for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors)
    assert plan.out_bytes < 4 * sum(t.numel for t in plan.tasks)  # float32, as a directory output's, would be more


def test_chosen_type_codes_matrices_and_keeps_vectors_f32(tmp_path, run):
    (base, sec), stored, _ = family(tmp_path, Q.Q8_0, n=1)
    result = run("merge", base, sec, "-t", 1e-3, "-o", tmp_path / "out.gguf", "--type", "q4_1", "-q")
    assert result.exit_code == 0, result.output
    _, got = read_raw(tmp_path / "out.gguf")
    kinds = {name: Q.F32 if len(s) == 1 else Q.Q4_1 for name, s in SHAPES.items()}
    want = expected_bytes(stored, [1e-3], kinds, gguf_code)
    for name in SHAPES:
        assert got[name][0] == kinds[name] and np.array_equal(got[name][1], want[name]), name


def test_llama_cpp_and_gguf_quantizers_agree_byte_for_byte(monkeypatch):
    assert gguf_writer._ggml() is not None, "llama.cpp (the llama extra, which make setup installs) is missing"
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1 << 16) * rng.choice([1e-4, 1.0, 1e4], 1 << 16)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16):
        ours = gguf_writer.quantize(x, qtype)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        assert np.array_equal(ours.view(np.uint8), quants.quantize(x.reshape(-1, block), qtype).reshape(-1)), qtype


def test_k_quants_go_through_llama_cpp(tmp_path, run, monkeypatch):
    """Q4_K/Q6_K bases: coded by llama.cpp's quantizer (whole rows, as llama-quantize calls it,
    in the reference), or refused in one line naming the extra when it is not installed."""
    (base, sec), stored, _ = family(tmp_path, Q.Q8_0, n=1)
    # a K-quant base: the same values, stored Q4_K by llama.cpp's quantizer (gguf cannot write it)
    lib = gguf_writer._ggml()
    monkeypatch.setattr(gguf_writer, "_ggml", lambda: None)
    result = run("merge", base, sec, "-t", 1e-3, "-o", tmp_path / "x.gguf", "--type", "q4_k", "-q")
    assert result.exit_code == 1 and "nearswap[llama]" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.gguf").exists()
    assert lib is not None, "llama.cpp (the llama extra, which make setup installs) is missing"
    monkeypatch.setattr(gguf_writer, "_ggml", lambda: lib)

    def ggml_code(x, qtype):
        if qtype == Q.F32:
            return x
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, row_len = x.shape
        out = np.empty(rows * row_len // block * size, np.uint8)
        x = np.ascontiguousarray(x, np.float32)
        assert lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, row_len, None) == out.nbytes
        return out

    result = run("merge", base, sec, "-t", 1e-3, "-o", tmp_path / "k.gguf", "--type", "q4_k", "-q")
    assert result.exit_code == 0, result.output
    _, got = read_raw(tmp_path / "k.gguf")
    kinds = {name: Q.F32 if len(s) == 1 else Q.Q4_K if s[-1] % 256 == 0 else Q.F16 for name, s in SHAPES.items()}
    assert Q.Q4_K in kinds.values() and Q.F16 in kinds.values()  # rows of 96 do not fill a K-block
    want = expected_bytes(stored, [1e-3], kinds, lambda x, q: gguf_code(x, q) if q == Q.F16 else ggml_code(x, q))
    for name in SHAPES:
        assert got[name][0] == kinds[name] and np.array_equal(got[name][1], want[name]), name


def test_bad_gguf_merges_are_one_line(tmp_path, run):
    (base, sec), _, _ = family(tmp_path, Q.Q8_0, n=1)
    other = tmp_path / "other"
    other.mkdir()
    (other_base, *_), _, _ = family(other, Q.Q8_0, n=0, arch="qwen2")
    cases = {
        "architecture": [base, other_base],  # GGUFs of two architectures
        "not a GGUF file": [base, tmp_path],  # a directory into a .gguf output
        "not a readable GGUF": [base, tmp_path / "cut.gguf"],  # truncated
    }
    data = sec.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    for why, inputs in cases.items():
        result = run("merge", *inputs, "-t", 1e-3, "-o", tmp_path / "out.gguf", "-q")
        assert result.exit_code == 1 and why in result.stderr, (why, result.output)
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out.gguf").exists()
    result = run("merge", base, sec, "-t", 1e-3, "-o", tmp_path / "dir", "--type", "q8_0", "-q")
    assert result.exit_code == 1 and "--type is for a .gguf output" in result.stderr


def test_secondaries_of_other_types_merge_by_their_values(tmp_path, run):
    """Quant layouts may differ between inputs (a Q8_0 base, a Q4_0 secondary): each is read
    as its values; the output takes the base's types."""
    rng = np.random.default_rng(3)
    base = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in SHAPES.items()}
    sec = {k: v + rng.laplace(0, 0.0125, v.shape).astype(np.float32) for k, v in base.items()}
    t8 = {k: Q.F32 if len(s) == 1 else Q.Q8_0 for k, s in SHAPES.items()}
    t4 = {k: Q.F32 if len(s) == 1 else Q.Q4_0 for k, s in SHAPES.items()}
    stored = [write_gguf(tmp_path / "b.gguf", base, t8), write_gguf(tmp_path / "s.gguf", sec, t4)]
    result = run("merge", tmp_path / "b.gguf", tmp_path / "s.gguf", "-t", 1e-3, "-o", tmp_path / "out.gguf", "-q")
    assert result.exit_code == 0, result.output
    _, got = read_raw(tmp_path / "out.gguf")
    want = expected_bytes(stored, [1e-3], t8, gguf_code)
    for name in SHAPES:
        assert got[name][0] == t8[name] and np.array_equal(got[name][1], want[name]), name


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_K])
def test_changed_counts_the_values_the_gguf_output_stores(tmp_path, qtype):
    """"changed" of a .gguf output kept in the base's types is the count of stored values that
    differ from the base's, as gguf's own reader dequantizes both files (not of the float32
    values before they were coded: most moves of t round back to the base's code)."""
    from nearswap.core.errors import NearswapError

    try:
        gguf_writer.quantizer_for(qtype)
        (base, sec), _, _ = family(tmp_path, qtype, n=1)
    except (NearswapError, NotImplementedError) as e:
        pytest.skip(f"{qtype.name} cannot be written here: {e}")
    import nearswap

    report = nearswap.merge(base, [sec], t=1e-3, out=tmp_path / "out.gguf")
    theirs = {t.name: quants.dequantize(t.data, t.tensor_type).reshape(-1) for t in gguf.GGUFReader(str(base)).tensors}
    mine = {t.name: quants.dequantize(t.data, t.tensor_type).reshape(-1)
            for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    differ = sum(int(np.count_nonzero(mine[n] != theirs[n])) for n in theirs)
    assert report["all_steps"]["changed"] == differ == report["steps"][0]["changed"]
    float32_moves = sum(t["moved"] + t["swapped"] for t in report["steps"][0]["tensors"].values())
    assert 0 < differ < float32_moves  # (what the float32 count said before)

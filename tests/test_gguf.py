"""GGUF input: names, layouts and values against gguf's own dequantizer and llama.cpp's permutation."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

import nearswap  # noqa: E402
from conftest import random_model, write_model  # noqa: E402
from nearswap.core.errors import NearswapError  # noqa: E402
from nearswap.formats import open_model  # noqa: E402
from nearswap.formats.safetensors import FileReader  # noqa: E402
from reference import chain as ref_chain  # noqa: E402
from reference import same_bits  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 96, 40, 2
WRITABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # what gguf.quants can write


def llama_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF layout -> GGUF layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w, n_head):
    """Its inverse, written out here so the test does not lean on nearswap's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_shapes(tied=False):
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


GGUF_NAME = {  # HF -> GGUF, as llama.cpp names them
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    if hf in GGUF_NAME:
        return GGUF_NAME[hf]
    _, _, bid, rest = hf.split(".", 3)
    return f"blk.{bid}.{GGUF_NAME[rest.removesuffix('.weight')]}.weight"


def write_llama_gguf(path, hf, qtype, arch="llama"):
    """Write HF float32 arrays as a llama GGUF (norms F32, the rest ``qtype``).

    Returns the HF-layout float32 arrays a reader must produce: the dequantized values, un-permuted.
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    expected = {}
    for name, x in hf.items():
        heads = HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else None
        g = llama_permute(x, heads) if heads else x
        qt = Q.F32 if x.ndim == 1 else qtype
        data = quants.quantize(g, qt)
        w.add_tensor(gguf_name(name), data, raw_dtype=qt)
        deq = quants.dequantize(data, qt).astype(np.float32)
        expected[name] = llama_unpermute(deq, heads) if heads else deq
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def read_all(model):
    reader = FileReader()
    out = {n: reader.read(t, 0, np.empty(t.numel, np.float32)).reshape(t.shape) for n, t in model.tensors.items()}
    reader.close()
    return out


def test_inverse_permutation_is_an_inverse():
    x = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    assert np.array_equal(llama_permute(llama_unpermute(x, 2), 2), x)
    assert not np.array_equal(llama_permute(x, 2), x)


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda q: q.name)
def test_reads_hf_names_layouts_and_values(tmp_path, qtype):
    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.5)
    expected = write_llama_gguf(tmp_path / "m.gguf", hf, qtype)
    model = open_model(tmp_path / "m.gguf")
    assert list(model.tensors) == list(hf)  # every HF name, in file order
    assert {n: t.shape for n, t in model.tensors.items()} == {n: a.shape for n, a in hf.items()}
    got = read_all(model)
    for name, want in expected.items():
        assert same_bits(got[name], want), name
    if qtype == Q.F32:  # lossless: the original HF tensors come back exactly
        assert all(same_bits(got[n], hf[n]) for n in hf)
    assert model.config["architectures"] == ["LlamaForCausalLM"]
    assert (model.config["num_attention_heads"], model.config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert model.config["vocab_size"] == VOCAB and model.config["tie_word_embeddings"] is False


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_chunked_reads_equal_whole_reads(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    if not path.exists():
        write_llama_gguf(path, random_model(1, "f32", shapes=hf_shapes(), scale=0.5), Q.Q8_0)
    model = open_model(path)
    name = data.draw(st.sampled_from(list(model.tensors)))
    info = model.tensors[name]
    start = data.draw(st.integers(0, info.numel - 1))
    n = data.draw(st.integers(1, info.numel - start))
    reader = FileReader()
    whole = reader.read(info, 0, np.empty(info.numel, np.float32))
    part = reader.read(info, start, np.empty(n, np.float32))
    reader.close()
    assert same_bits(part, whole[start:start + n])


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.IQ4_NL], ids=lambda q: q.name)
def test_k_quants_read_like_gguf_dequantizes_them(tmp_path, qtype):
    """gguf cannot write K-quants from numpy, but any bytes of the right size are a K-quant
    tensor: nearswap must decode them exactly as gguf.quants.dequantize does."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_len = 256
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (8, row_len // block * type_size), dtype=np.uint8)
    raw.view(np.uint8)[:, :2] = 0  # keep a few scales finite, not required for the comparison
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = read_all(open_model(tmp_path / "k.gguf"))["model.layers.0.mlp.up_proj.weight"]
    assert same_bits(got, quants.dequantize(raw, qtype).astype(np.float32))


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_gguf_base_merges_like_its_hf_twin(tmp_path, qtype):
    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.02)
    expected = write_llama_gguf(tmp_path / "base.gguf", hf, qtype)
    write_model(tmp_path / "base_hf", expected)  # the GGUF's own values, in HF layout
    secs = [random_model(i, "f32", shapes=hf_shapes(), like=expected, noise=1e-3) for i in (1, 2)]
    for i, s in enumerate(secs, 1):
        write_model(tmp_path / f"s{i}", s)
    sec_paths = [tmp_path / "s1", tmp_path / "s2"]
    report = nearswap.merge(tmp_path / "base.gguf", sec_paths, t=1e-3, out=tmp_path / "from_gguf")
    nearswap.merge(tmp_path / "base_hf", sec_paths, t=1e-3, out=tmp_path / "from_hf")
    a, b = load_file(str(tmp_path / "from_gguf" / "model.safetensors")), load_file(str(tmp_path / "from_hf" / "model.safetensors"))
    assert set(a) == set(hf)
    for name in a:
        assert same_bits(a[name], b[name]), name
        assert same_bits(a[name], ref_chain(expected[name], [s[name] for s in secs], [1e-3, 1e-3]))
    config = json.loads((tmp_path / "from_gguf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == KV_HEADS
    assert report["steps"][0]["total"] == sum(x.size for x in hf.values())


def test_curve_of_a_gguf_base_equals_its_hf_twin(tmp_path):
    """GGUF tensors are decoded into buffers, safetensors ones mapped: the counts are the same."""
    from nearswap.measure import curve

    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.02)
    expected = write_llama_gguf(tmp_path / "base.gguf", hf, Q.Q8_0)
    write_model(tmp_path / "base_hf", expected)
    write_model(tmp_path / "s1", random_model(1, "f32", shapes=hf_shapes(), like=expected, noise=1e-3))
    ts = [1e-4, 1e-3, 1e-2]
    a = curve.compute(tmp_path / "base.gguf", [tmp_path / "s1"], ts).to_json()
    b = curve.compute(tmp_path / "base_hf", [tmp_path / "s1"], ts).to_json()
    assert a["steps"][0]["swapped"] == b["steps"][0]["swapped"] and a["curve"] == b["curve"]
    assert 0 < a["steps"][0]["swapped"][repr(1e-3)] < a["steps"][0]["total"]


def test_gguf_secondary_merges_into_hf_base(tmp_path):
    base = random_model(0, "f32", shapes=hf_shapes(), scale=0.02)
    write_model(tmp_path / "base", base)
    sec_hf = random_model(1, "f32", shapes=hf_shapes(), like=base, noise=1e-3)
    expected = write_llama_gguf(tmp_path / "s.gguf", sec_hf, Q.Q8_0)
    nearswap.merge(tmp_path / "base", [tmp_path / "s.gguf"], t=1e-3, out=tmp_path / "o")
    merged = load_file(str(tmp_path / "o" / "model.safetensors"))
    for name, b in base.items():
        assert same_bits(merged[name], ref_chain(b, [expected[name]], [1e-3])), name


def test_tied_embeddings_have_no_lm_head(tmp_path):
    write_llama_gguf(tmp_path / "m.gguf", random_model(0, "f32", shapes=hf_shapes(tied=True)), Q.F16)
    model = open_model(tmp_path / "m.gguf")
    assert "lm_head.weight" not in model.tensors and model.config["tie_word_embeddings"] is True


def test_unsupported_architecture_is_named(tmp_path, run):
    write_llama_gguf(tmp_path / "m.gguf", random_model(0, "f32", shapes=hf_shapes()), Q.F32, arch="mamba")
    with pytest.raises(NearswapError, match="GGUF architecture 'mamba' has no HF mapping.*llama.*gemma3.*inspect.*-o merged.gguf"):
        open_model(tmp_path / "m.gguf")
    result = run("inspect", tmp_path / "m.gguf")  # inspect describes any GGUF ...
    assert result.exit_code == 0 and "mamba" in result.stdout, result.output
    info = json.loads(run("inspect", tmp_path / "m.gguf", "--json", "--tensors").stdout)
    assert info["gguf_architecture"] == "mamba" and not info["hf_names"]
    assert {t["name"] for t in info["tensors"]} >= {"token_embd.weight", "blk.0.attn_q.weight"}
    result = run("convert", tmp_path / "m.gguf", "-o", tmp_path / "out")  # ... a conversion needs HF names
    assert result.exit_code == 1 and "mamba" in result.stderr and "Traceback" not in result.output


def test_corrupt_gguf_is_one_line(tmp_path, run):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(20))
    result = run("inspect", tmp_path / "bad.gguf")
    assert result.exit_code == 1 and "not a readable GGUF file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inspect_gguf(tmp_path, run):
    hf = random_model(0, "f32", shapes=hf_shapes())
    write_llama_gguf(tmp_path / "m.gguf", hf, Q.Q4_1)
    info = json.loads(run("inspect", tmp_path / "m.gguf", "--json").stdout)
    assert info["kind"] == "gguf" and info["gguf_architecture"] == "llama" and "Q4_1" in info["dtypes"]
    assert info["parameters"] == sum(a.size for a in hf.values())
    assert info["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q4_1], ids=lambda q: q.name)
def test_convert_writes_the_gguf_values_as_hf(tmp_path, run, qtype):
    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.5)
    expected = write_llama_gguf(tmp_path / "m.gguf", hf, qtype)
    result = run("convert", tmp_path / "m.gguf", "-o", tmp_path / "hf", "-q")
    assert result.exit_code == 0, result.output
    out = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(out) == set(hf) and all(same_bits(out[n], expected[n]) for n in hf)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS and config["intermediate_size"] == FFN
    assert not (tmp_path / "hf" / "merge_report.json").exists()


def test_convert_casts_when_asked(tmp_path, run):
    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.5)
    write_llama_gguf(tmp_path / "m.gguf", hf, Q.F32)
    assert run("convert", tmp_path / "m.gguf", "-o", tmp_path / "hf", "--dtype", "bf16", "-q").exit_code == 0
    out = load_file(str(tmp_path / "hf" / "model.safetensors"))
    import ml_dtypes

    assert all(same_bits(out[n], hf[n].astype(ml_dtypes.bfloat16)) for n in hf)
    bad = run("convert", tmp_path / "m.gguf", "-o", tmp_path / "hf2", "--dtype", "int7")
    assert bad.exit_code == 1 and "unknown dtype" in bad.stderr and not (tmp_path / "hf2").exists()


# ---------------------------------------------------------------- export


def test_hf_to_gguf_f32_to_hf_is_bit_identical(tmp_path, run):
    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.5)
    write_llama_gguf(tmp_path / "vocab.gguf", hf, Q.F32)  # a vocabulary source (this one has none)
    write_model(tmp_path / "hf", hf, config={"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
                                             "intermediate_size": FFN, "num_hidden_layers": LAYERS,
                                             "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                                             "vocab_size": VOCAB, "max_position_embeddings": 128})
    r = run("export", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--type", "f32", "--vocab-from", tmp_path / "vocab.gguf", "-q")
    assert r.exit_code == 0, r.output
    # the GGUF holds llama.cpp's layout: Q/K permuted, names mapped
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    q = "model.layers.1.self_attn.q_proj.weight"
    assert same_bits(stored["blk.1.attn_q.weight"], llama_permute(hf[q], HEADS))
    assert same_bits(stored["blk.0.attn_k.weight"], llama_permute(hf["model.layers.0.self_attn.k_proj.weight"], KV_HEADS))
    assert same_bits(stored["token_embd.weight"], hf["model.embed_tokens.weight"])
    assert reader.fields["llama.attention.head_count_kv"].contents() == KV_HEADS
    # and back
    assert run("convert", tmp_path / "m.gguf", "-o", tmp_path / "back", "-q").exit_code == 0
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(hf) and all(same_bits(back[n], hf[n]) for n in hf)


def test_export_carries_the_vocabulary_gguf_settings_and_license(tmp_path, run):
    """Issue 15 item 7: a GGUF -> HF -> GGUF round trip keeps llama.cpp's pre-tokenizer name,
    add_bos_token, add_space_prefix, the license and the languages of the original, read back
    with gguf's own reader; the new file's name is its own."""
    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.5)
    write_llama_gguf(tmp_path / "plain.gguf", hf, Q.F32)
    w = gguf.GGUFWriter(str(tmp_path / "orig.gguf"), "llama")  # the original: a vocabulary and descriptive keys
    w.add_name("The Original")
    w.add_license("apache-2.0")
    w.add_languages(["en", "fr"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["t 1"])
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    assert run("convert", tmp_path / "plain.gguf", "-o", tmp_path / "hf", "-q").exit_code == 0
    r = run("export", tmp_path / "hf", "-o", tmp_path / "m.gguf", "--type", "q8_0", "--vocab-from", tmp_path / "orig.gguf",
            "-q")
    assert r.exit_code == 0, r.output
    orig, out = gguf.GGUFReader(tmp_path / "orig.gguf"), gguf.GGUFReader(tmp_path / "m.gguf")
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
                "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "general.license", "general.languages"):
        assert out.fields[key].contents() == orig.fields[key].contents(), key
    assert out.fields["general.name"].contents() == "hf"  # the model it holds (its folder), not the file written


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_export_types_store_what_gguf_quantizes(tmp_path, type_name):
    from nearswap.ship.gguf_export import EXPORT_TYPES, export_gguf

    hf = random_model(0, "f32", shapes=hf_shapes(), scale=0.5)
    write_llama_gguf(tmp_path / "src.gguf", hf, Q.F32)
    result = export_gguf(tmp_path / "src.gguf", tmp_path / "m.gguf", type_name)
    qt = Q[EXPORT_TYPES[type_name][0]]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    by_name = {t.name: t for t in reader.tensors}
    for name, x in hf.items():
        t = by_name[gguf_name(name)]
        heads = HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else None
        want_type = Q.F32 if x.ndim == 1 else qt
        assert t.tensor_type == want_type, name
        want = quants.quantize(llama_permute(x, heads) if heads else x, want_type)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1)), name
    assert result["tensors"][qt.name] == sum(1 for x in hf.values() if x.ndim == 2)
    assert not list(tmp_path.glob(".m.gguf.partial"))


def test_export_refusals(tmp_path, run):
    hf = random_model(0, "f32", shapes=hf_shapes())
    write_llama_gguf(tmp_path / "src.gguf", hf, Q.F32)
    bad_type = run("export", tmp_path / "src.gguf", "-o", tmp_path / "o.gguf", "--type", "q3_xyz")
    assert bad_type.exit_code == 1 and "unknown GGUF type 'q3_xyz'" in bad_type.stderr
    assert len(bad_type.stderr.strip().splitlines()) == 1  # no progress bar before the refusal
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    clobber = run("export", tmp_path / "src.gguf", "-o", tmp_path / "exists.gguf")
    assert clobber.exit_code == 1 and "already exists" in clobber.stderr
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    write_model(tmp_path / "novocab", hf, config={"architectures": ["LlamaForCausalLM"]})
    novocab = run("export", tmp_path / "novocab", "-o", tmp_path / "o.gguf")
    assert novocab.exit_code == 1 and "--vocab-from" in novocab.stderr and not (tmp_path / "o.gguf").exists()


def test_k_quant_export_through_llama_cpp(tmp_path, llama_quantizer):
    """export --type q4_k_m: llama.cpp's own whole-file quantizer (its per-tensor type rules),
    here compiled once against the prebuilt llama.cpp (kept in the real cache)."""
    from nearswap.ship.gguf_export import export_gguf

    # two 256-wide tensors, so llama.cpp has rows that fit a K-quant block
    shapes = hf_shapes() | {"model.layers.0.mlp.up_proj.weight": (FFN, 256), "model.layers.0.mlp.gate_proj.weight": (FFN, 256)}
    hf = random_model(0, "f32", shapes=shapes, scale=0.5)
    write_llama_gguf(tmp_path / "src.gguf", hf, Q.F32)
    result = export_gguf(tmp_path / "src.gguf", tmp_path / "m.gguf", "q4_k_m")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert Q.Q4_K in types.values() or Q.Q6_K in types.values()  # the 256-wide rows got K-quants
    assert int(reader.fields["general.file_type"].contents()) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert result["tensors"] == {k.name: list(types.values()).count(k) for k in set(types.values())}
    assert result["type"] == "q4_k_m" and not list(tmp_path.glob(".m.gguf*"))
    got = read_all(open_model(tmp_path / "m.gguf"))
    for name, x in hf.items():  # a lossy copy of the same tensors, in HF layout
        assert np.abs(got[name] - x).max() < 0.35 * np.abs(x).max(), name


def test_k_quant_export_is_quiet_and_keeps_the_models_name(tmp_path, run, llama_quantizer):
    """New-user issue, item 7: `export --type q4_k_m` printed ~260 lines of llama.cpp's quantize
    log and renamed the model inside the file. One line by default, llama.cpp's log with -v,
    and general.name the one nearswap's own export writes (llama.cpp not involved)."""
    shapes = hf_shapes() | {"model.layers.0.mlp.up_proj.weight": (FFN, 256), "model.layers.0.mlp.gate_proj.weight": (FFN, 256)}
    write_llama_gguf(tmp_path / "src.gguf", random_model(0, "f32", shapes=shapes, scale=0.5), Q.F32)
    plain = run("export", tmp_path / "src.gguf", "-o", tmp_path / "f32.gguf", "--type", "f32")
    quiet = run("export", tmp_path / "src.gguf", "-o", tmp_path / "k.gguf", "--type", "q4_k_m")
    loud = run("export", tmp_path / "src.gguf", "-o", tmp_path / "k2.gguf", "--type", "q4_k_m", "-v")
    for result in (plain, quiet, loud):
        assert result.exit_code == 0, result.output
    assert len(quiet.output.strip().splitlines()) == 1 and quiet.output.startswith("wrote ")
    assert "llama_model_quantize" in loud.stderr and len(loud.stderr.splitlines()) > 20

    def name(path):
        return gguf.GGUFReader(path).fields["general.name"].contents()

    assert name(tmp_path / "k.gguf") == name(tmp_path / "f32.gguf") and name(tmp_path / "k.gguf")


def test_llama_cpp_types_without_llama_cpp_say_what_to_install(tmp_path, run, monkeypatch):
    """No llama.cpp at all (no prebuilt library, no llama-quantize, no llama-cpp-python): the
    K-quant and i-quant exports refuse in one line naming what to install, before any work."""
    from nearswap.core import llamacpp

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here")
    monkeypatch.setattr(llamacpp, "library_path", lambda: None)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    write_llama_gguf(tmp_path / "src.gguf", random_model(0, "f32", shapes=hf_shapes(), scale=0.5), Q.F32)
    k = run("export", tmp_path / "src.gguf", "-o", tmp_path / "k.gguf", "--type", "q4_k_m")
    assert k.exit_code == 1 and len(k.stderr.strip().splitlines()) == 1 and "nearswap[llama]" in k.stderr, k.output
    iq = run("export", tmp_path / "src.gguf", "-o", tmp_path / "k.gguf", "--type", "iq2_xs")
    assert iq.exit_code == 1 and "--imatrix" in iq.stderr and len(iq.stderr.strip().splitlines()) == 1, iq.output
    assert not list(tmp_path.glob("*k.gguf*"))


def test_a_quantizer_built_for_another_installation_is_neither_shared_nor_trusted(tmp_path, llama_quantizer,
                                                                                  monkeypatch):
    """CI, stop 28: a cache shared between two checkouts held the quantizer built against the
    first checkout's llama.cpp (found by its run path), so the second loaded that copy too: a
    second llama.cpp, whose log went straight to the terminal. Each installation of the prebuilt
    llama.cpp now has a build of its own, and a build that calls into another copy is refused
    in one line, nothing written."""
    import subprocess
    import sys

    from conftest import CACHE
    from nearswap.core import llamacpp
    from nearswap.core import llamacpp_quantize as lq
    from nearswap.core.errors import NearswapError

    if lq.compiler() is None:
        pytest.skip("no C++ compiler to build llama.cpp's quantizer with (install g++)")
    built_here = lq.built_path()  # (built by the fixture, in the real cache, for this installation)
    real = llamacpp.library_path()
    other = tmp_path / "other-venv" / real.parent.name / real.name  # the same wheel, installed elsewhere
    other.parent.mkdir(parents=True)
    shutil.copy(real, other)
    tree = lq.source()  # (llama.cpp's source, in the real cache: the same for every installation)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEARSWAP_CACHE", str(cache))
    shutil.copytree(tree, cache / tree.relative_to(CACHE))
    ours = lq.built_path()
    with monkeypatch.context() as m:
        m.setattr(llamacpp, "library_path", lambda: other)
        theirs = lq.built_path()
        assert theirs != ours and theirs.name == ours.name
        try:
            lq.build()  # compiled against the copy
        except NearswapError as e:
            pytest.skip(f"could not build llama.cpp's quantizer here: {e}")
    assert theirs.is_file() and not ours.exists()
    ours.parent.mkdir(parents=True)
    shutil.copy(theirs, ours)  # what the shared cache held
    write_llama_gguf(tmp_path / "src.gguf", random_model(0, "f32", shapes=hf_shapes(), scale=0.5), Q.F32)

    def export():  # in a fresh process, as a user runs it
        return subprocess.run([sys.executable, "-m", "nearswap", "export", str(tmp_path / "src.gguf"), "-o",
                               str(tmp_path / "k.gguf"), "--type", "q4_k_m"], capture_output=True, text=True,
                              env={**os.environ, "NEARSWAP_CACHE": str(cache)})

    proc = export()
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "another copy of llama.cpp" in proc.stderr and str(ours) in proc.stderr
    assert not (tmp_path / "k.gguf").exists()
    shutil.copy(built_here, ours)  # and built for this installation, it is the wheel's own llama.cpp that quantizes
    proc = export()
    assert proc.returncode == 0 and proc.stdout.startswith("wrote ") and "llama_model" not in proc.stderr, proc.stderr
    assert gguf.GGUFReader(tmp_path / "k.gguf").fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_gguf_without_vocabulary_converts_without_torch(tmp_path):
    """No tokenizer.ggml.model: there is no tokenizer to build, so nothing imports transformers
    or torch for it (which costs ~300 MB and seconds; the hostile benchmark's RSS limit)."""
    import subprocess
    import sys

    write_llama_gguf(tmp_path / "m.gguf", random_model(0, "f32", shapes=hf_shapes()), Q.F32)
    code = ("import sys, nearswap.merging.convert as c; r = c.convert(sys.argv[1], sys.argv[2]); print(r['output']['copied']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.gguf"), str(tmp_path / "hf")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    copied, imported = proc.stdout.strip().splitlines()[-2:]
    assert imported == "[]" and "the GGUF has no vocabulary" in copied

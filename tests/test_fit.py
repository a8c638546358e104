"""nearswap fit (issue 11 item 2): the card's two claims for its 70B EXL2, the arithmetic against
plain computations (transformers' own parameter count, gguf's own tensor bytes), and the KV
cache per token against what llama.cpp itself allocates for SmolLM2."""

import json
import re

import pytest

from conftest import CACHE
from nearswap.demo.fetch import SMOLLM2, cached
from nearswap.ship import fit

GIB = 1024**3


def test_the_cards_claims_for_its_exl2(run):
    """'Fits in 48GB with 16K of context. Try 8 bit kvcache if you want 32K.' — 4.6 bpw, 8-bit
    head, Miqu-70B's shape, the 48 GB of two 24 GB cards."""
    result = run("fit", "--shape", "miqu-70b", "--bpw", "4.6", "--head-bits", "8", "--vram", "48", "--gpus", "2",
                 "--context", "16K,32K", "--cache", "f16,q8_0", "--json")
    assert result.exit_code == 0, result.output
    rows = {(r["context"], r["cache"]): r for r in json.loads(result.stdout)["rows"]}
    assert rows[16384, "f16"]["fits"]  # 16K with the FP16 cache fits
    assert not rows[32768, "f16"]["fits"] and rows[32768, "q8_0"]["fits"]  # 32K needs the 8-bit cache
    # the same figures by hand: 68,976,648,192 parameters (Llama-2-70B), 262,144,000 in the table and in the head
    embed = 32000 * 8192
    weights = ((68_976_648_192 - 2 * embed) * 4.6 + embed * 8) / 8
    assert rows[16384, "f16"]["weights"] == pytest.approx(weights / GIB) == pytest.approx(36.90, abs=0.005)
    kv_per_token = 2 * 80 * 8 * 128 * 2  # K and V, layers, KV heads, head dim, f16
    assert kv_per_token == 320 * 1024
    assert rows[32768, "f16"]["kv"] == pytest.approx(kv_per_token * 32768 / GIB)
    assert rows[32768, "q8_0"]["kv"] == pytest.approx(kv_per_token * 32768 * 8.5 / 16 / GIB)
    r = rows[32768, "f16"]
    assert r["total"] == pytest.approx(r["weights"] + r["kv"] + r["overhead"]) and r["spare"] == pytest.approx(48 - r["total"])


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_transformers_own(tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    want = sum(p.numel() for p in model.parameters())  # (a tied head is one parameter)
    assert fit.llama_shape("t", 3, 64, 4, 2, 176, 300, tied).params == want
    assert fit.PRESETS["llama2-70b"].params == 68_976_648_192  # Llama-2-70B's published count


def smollm2():
    path = cached(SMOLLM2, CACHE)
    if path is None:
        pytest.skip("SmolLM2 is not in the cache")
    return path


def test_a_ggufs_bytes_on_the_gpu_are_its_own_tensors():
    gguf = pytest.importorskip("gguf")
    path = smollm2()
    shape = fit.shape_of(path)
    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    assert "output.weight" not in sizes and shape.tied  # SmolLM2 ties its head to the table: llama.cpp duplicates it
    assert shape.gpu_bytes == sum(sizes.values())  # all of it: the table on the CPU, its copy as the head on the GPU
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (30, 3, 64)


def test_kv_cache_per_token_equals_what_llama_cpp_allocates():
    from nearswap.core import llamacpp
    from nearswap.runtime.llama_model import LlamaModel

    path = smollm2()
    with LlamaModel(path, n_ctx=1024):
        log = "\n".join(llamacpp.log_lines())
    found = list(re.finditer(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells", log))[-1:]
    assert found, log[-2000:]
    found = found[0]
    mib, cells = float(found.group(1)), int(found.group(2))
    assert fit.kv_bytes_per_token(fit.shape_of(path), "f16") * cells / 2**20 == pytest.approx(mib, abs=0.005)


def test_refusals_are_one_line(run, tmp_path):
    for args, text in ((["--vram", "8"], "give a MODEL or --shape"), (["--shape", "gpt-5"], "unknown --shape"),
                       (["--shape", "llama3-8b", "--cache", "q2"], "unknown cache type"),
                       (["--shape", "llama3-8b"], "give the bits per weight"),
                       (["--shape", "llama3-8b", "--bpw", "4", "--context", "lots"], "--context")):
        result = run("fit", *args)
        assert result.exit_code != 0 and text in result.stderr and "Traceback" not in result.output, (args, result.output)


def test_a_config_without_sizes_is_one_line(tmp_path, run):
    from conftest import random_model, write_model

    write_model(tmp_path / "m", random_model(0, "f32"), config={"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                                             "num_hidden_layers": 2, "num_attention_heads": 4,
                                                             "vocab_size": 100, "head_dim": "wide"})
    result = run("fit", tmp_path / "m", "--bpw", "4")
    assert result.exit_code == 1 and "head_dim" in result.stderr and "internal error" not in result.stderr

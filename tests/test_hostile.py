"""Hostile but fair inputs (issue 14): nothing is lost, nothing wrong is reported as success,
nothing hangs, and every refusal is one line.

Each test names the item of the issue it covers ("item 7"). Inputs that could hang or eat
memory run in a child process with a time limit and an address-space cap, so a regression
fails here instead of taking the machine down.
"""

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import nearswap
from conftest import TINY, random_model, write_model
from nearswap.core.errors import NearswapError
from nearswap.merging import sinks

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

# ---------------------------------------------------------------- helpers


def one_line(result):
    """The refusal contract: non-zero exit, one stderr line starting 'nearswap: error:', no traceback."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    err = result.stderr
    out = result.output if hasattr(result, "output") else result.stdout + result.stderr
    assert code != 0, out
    assert "Traceback" not in out, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nearswap: error: "), err
    return lines[0]


def bounded(*args, timeout=30, memory=2 << 30, stdin=subprocess.DEVNULL, cwd=None, env=None):
    """Run the CLI in a child process capped in time and address space."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    try:
        return subprocess.run([sys.executable, "-m", "nearswap", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, preexec_fn=cap, stdin=stdin, cwd=cwd,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        pytest.fail(f"nearswap {' '.join(map(str, args))} still running after {timeout} s")


def raw_safetensors(path, header, data=b""):
    """A safetensors file with exactly this header (a dict, or raw bytes) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def st_dir(path, header, data=b"", config=None):
    path.mkdir(parents=True, exist_ok=True)
    raw_safetensors(path / "model.safetensors", header, data)
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["LlamaForCausalLM"]}))
    return path


def pair(tmp_path, dtype="f32"):
    base = random_model(0, dtype)
    return (write_model(tmp_path / "base", base),
            write_model(tmp_path / "s1", random_model(1, dtype, like=base, noise=1e-3)))


def nearswap_output(path):
    """A directory that really is an earlier nearswap merge."""
    b, s = path.parent / "_b", path.parent / "_s"
    base = random_model(7)
    write_model(b, base)
    write_model(s, random_model(8, like=base))
    nearswap.merge(b, [s], t=1e-4, out=path)
    return path


# GGUF, byte by byte: an independent little writer for headers the gguf package will not write.
def _s(b):
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return _s(key) + struct.pack("<I", int(vtype)) + payload


def u32(x):
    return struct.pack("<I", x)


def tinfo(name, dims, qtype, offset):
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", int(qtype), offset)


def gguf_raw(path, kvs, infos, data=b"", alignment=32):
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    path.write_bytes(head + b"\0" * (-len(head) % alignment) + data)
    return path


LLAMA_META = {  # a 1-layer llama: hidden 32, 4 heads (2 KV), ffn 64, vocab 16
    "general.architecture": ("llama", V.STRING),
    "llama.block_count": (1, V.UINT32), "llama.embedding_length": (32, V.UINT32),
    "llama.feed_forward_length": (64, V.UINT32), "llama.attention.head_count": (4, V.UINT32),
    "llama.attention.head_count_kv": (2, V.UINT32), "llama.context_length": (64, V.UINT32),
}
LLAMA_TENSORS = {"token_embd.weight": (16, 32), "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32),
                 "blk.0.attn_norm.weight": (32,), "output_norm.weight": (32,)}


def llama_gguf(path, meta=None, drop=(), tensors=None, seed=0):
    """A tiny llama GGUF written by the gguf package, with metadata overridden or dropped."""
    meta = {**LLAMA_META, **(meta or {})}
    w = gguf.GGUFWriter(str(path), meta["general.architecture"][0])
    for key, (value, vtype) in meta.items():
        if key not in drop and key != "general.architecture":
            w.add_key_value(key, value, vtype)
    rng = np.random.default_rng(seed)
    for name, shape in (tensors or LLAMA_TENSORS).items():
        if name not in drop:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_llama(path, seed=0):
    """An HF llama dir with a tokenizer-free config: needs --vocab-from to export."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (16, 32), "model.layers.0.self_attn.q_proj.weight": (32, 32),
              "model.layers.0.self_attn.k_proj.weight": (16, 32), "model.layers.0.input_layernorm.weight": (32,),
              "model.norm.weight": (32,)}
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 16}
    return write_model(path, arrays, config=config)


def no_leftovers(directory, name="out"):
    left = [p.name for p in Path(directory).iterdir() if p.name.startswith(f".{name}")]
    assert not left, f"left behind: {left}"


# ---------------------------------------------------------------- data loss (items 1-5)


def test_item1_directory_created_during_the_merge_is_not_replaced(tmp_path):
    base, s1 = pair(tmp_path)
    out = tmp_path / "out"

    def meanwhile(_n):
        if not out.exists():  # someone else creates OUT while the merge runs
            out.mkdir()
            (out / "precious.txt").write_text("mine")

    with pytest.raises(NearswapError, match="appeared while"):
        nearswap.merge(base, [s1], t=1e-4, out=out, progress=meanwhile, threads=1)
    assert (out / "precious.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["precious.txt"]
    no_leftovers(tmp_path)


def test_item1_empty_directory_created_during_the_merge_is_not_replaced(tmp_path):
    """rename(2) silently replaces an empty directory: the final rename must not."""
    base, s1 = pair(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(NearswapError, match="appeared while"):
        nearswap.merge(base, [s1], t=1e-4, out=out, progress=lambda n: out.mkdir(exist_ok=True), threads=1)
    assert out.is_dir() and os.listdir(out) == []


def test_item2_second_merge_into_the_same_out_refuses_naming_the_first(tmp_path):
    base, s1 = pair(tmp_path)
    out = tmp_path / "out"
    second = {}

    def meanwhile(_n):  # while this merge holds OUT, another process tries to write it
        if not second:
            second["proc"] = bounded("merge", base, s1, "-t", "1e-2", "-o", out)

    nearswap.merge(base, [s1], t=1e-4, out=out, progress=meanwhile, threads=1)
    line = one_line(second["proc"])
    assert "another nearswap run" in line and f"pid {os.getpid()}" in line, line
    assert json.loads((out / "merge_report.json").read_text())["steps"][0]["t"] == 1e-4  # the first one's


def test_item2_racing_merges_never_both_succeed(tmp_path):
    base, s1 = pair(tmp_path)
    for round_ in range(4):
        out = tmp_path / f"out{round_}"
        procs = [subprocess.Popen([sys.executable, "-m", "nearswap", "merge", str(base), str(s1), "-t", t, "-o", str(out), "-q"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in ("1e-4", "1e-2")]
        results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
        winners = [i for i, r in enumerate(results) if r[2] == 0]
        assert len(winners) == 1, results
        loser = results[1 - winners[0]]
        assert loser[1].startswith("nearswap: error: ") and len(loser[1].strip().splitlines()) == 1, loser
        t_written = json.loads((out / "merge_report.json").read_text())["steps"][0]["t"]
        assert t_written == (1e-4, 1e-2)[winners[0]]
        no_leftovers(tmp_path, out.name)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "plain-rename"])
def test_the_final_rename_with_and_without_renameat2(tmp_path, monkeypatch, renameat2):
    """Where renameat2 is missing (or the file system refuses its flags) the same guarantees
    hold, by a check under the lock just before a plain rename."""
    from nearswap.runtime import output

    if not renameat2:
        monkeypatch.setattr(output, "_renameat2", None)
    elif output._libc_renameat2() is None:
        pytest.skip("this system has no renameat2")
    base, s1 = pair(tmp_path)
    out = tmp_path / "out"
    nearswap.merge(base, [s1], t=1e-4, out=out)
    with pytest.raises(NearswapError, match="already exists"):
        nearswap.merge(base, [s1], t=1e-3, out=out)
    nearswap.merge(base, [s1], t=1e-3, out=out, force=True)  # the swap
    assert json.loads((out / "merge_report.json").read_text())["steps"][0]["t"] == 1e-3
    late = tmp_path / "late"
    with pytest.raises(NearswapError, match="appeared while"):
        nearswap.merge(base, [s1], t=1e-4, out=late, progress=lambda n: late.mkdir(exist_ok=True), threads=1)
    assert late.is_dir() and os.listdir(late) == []
    no_leftovers(tmp_path)
    no_leftovers(tmp_path, "late")


def test_item3_force_never_deletes_an_input_reached_through_a_symlink(tmp_path, run):
    out = nearswap_output(tmp_path / "out")
    arrays = random_model(0)
    save_file(arrays, str(out / "blob"))  # the base's real shard lives inside OUT (HF cache layout)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").symlink_to(out / "blob")
    (tmp_path / "base" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    write_model(tmp_path / "s1", random_model(1, like=arrays))
    before = (out / "blob").read_bytes()
    line = one_line(run("merge", tmp_path / "base", tmp_path / "s1", "-t", "1e-4", "-o", out, "--force"))
    assert "base" in line and "blob" in line
    assert (out / "blob").read_bytes() == before


def test_item4_force_refuses_a_folder_that_is_not_a_nearswap_output(tmp_path, run):
    base, s1 = pair(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    line = one_line(run("merge", base, s1, "-t", "1e-4", "-o", docs, "--force"))
    assert "not" in line and "nearswap" in line and "thesis.txt" in line
    assert (docs / "thesis.txt").read_text() == "years of work"
    (tmp_path / "afile").write_text("x")  # a file where a directory would go
    one_line(run("merge", base, s1, "-t", "1e-4", "-o", tmp_path / "afile", "--force"))
    assert (tmp_path / "afile").read_text() == "x"


def test_item4_force_replaces_empty_directories_and_nearswap_outputs(tmp_path, run):
    base, s1 = pair(tmp_path)
    (tmp_path / "empty").mkdir()
    assert run("merge", base, s1, "-t", "1e-4", "-o", tmp_path / "empty", "--force", "-q").exit_code == 0
    earlier = nearswap_output(tmp_path / "earlier")
    assert run("merge", base, s1, "-t", "1e-3", "-o", earlier, "--force", "-q").exit_code == 0
    assert json.loads((earlier / "merge_report.json").read_text())["steps"][0]["t"] == 1e-3
    no_leftovers(tmp_path, "earlier")


def test_item5_sigterm_while_replacing_says_what_is_where(tmp_path):
    """SIGTERM once the new output is in place and the old one is still being removed: the
    message must not claim that nothing was left, and must name what is left."""
    base, s1 = pair(tmp_path)
    out = nearswap_output(tmp_path / "out")
    bulk = out / "bulk"  # a big old output: many files, so removing it takes a while
    bulk.mkdir()
    for i in range(30000):
        (bulk / f"{i}").write_bytes(b"")
    old_report = (out / "merge_report.json").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "nearswap", "merge", str(base), str(s1), "-t", "1e-2", "-o", str(out),
                             "--force", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if (out / "merge_report.json").read_text() != old_report:
                break  # the new output is in place
        except OSError:
            pass
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    new_in_place = json.loads((out / "merge_report.json").read_text())["steps"][0]["t"] == 1e-2
    assert "Traceback" not in err
    if proc.returncode == 0:
        pytest.skip("the merge finished before the signal arrived")
    assert new_in_place, err  # the signal arrived after the swap (that is what the loop waited for)
    assert "no output was left behind" not in err, err
    assert "complete" in err and str(out) in err, err
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    for p in leftovers:
        assert p.name in err, (p, err)


# ---------------------------------------------------------------- wrong results reported as success (items 6-8)


def test_item6_concurrent_exports_to_one_file(tmp_path):
    from nearswap.ship.gguf_export import export_gguf

    a = llama_gguf(tmp_path / "a.gguf", seed=1)
    b = llama_gguf(tmp_path / "b.gguf", seed=2)
    target = tmp_path / "x.gguf"
    other = {}

    def meanwhile(_n):
        if not other:
            other["proc"] = bounded("export", b, "-o", target, "--type", "f32")

    export_gguf(a, target, "f32", progress=meanwhile)
    line = one_line(other["proc"])
    assert "another nearswap run" in line and f"pid {os.getpid()}" in line
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(target).tensors}
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(a).tensors}
    assert got.keys() == want.keys() and all(np.array_equal(got[n], want[n]) for n in want)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.gguf")]


@pytest.mark.parametrize("value, vtype, needle", [
    (-32, V.INT32, "general.alignment"),
    (0, V.UINT32, "general.alignment"),
    (24, V.UINT32, "power of 2"),
    ("32", V.STRING, "general.alignment"),
    (32.0, V.FLOAT32, "general.alignment"),
], ids=["negative", "zero", "not-power-of-2", "string", "float"])
def test_item7_15_bad_alignment_is_refused(tmp_path, run, value, vtype, needle):
    path = llama_gguf(tmp_path / "m.gguf", meta={"general.alignment": (value, vtype)})
    for cmd in (("inspect", path), ("convert", path, "-o", tmp_path / "out")):
        assert needle in one_line(run(*cmd))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("heads, needle", [
    (0, "head_count"), (3, "head_count"), (-4, "head_count"), ("four", "head_count"),
])
def test_item7_bad_head_count_is_refused(tmp_path, run, heads, needle):
    vtype = V.STRING if isinstance(heads, str) else V.INT32
    path = llama_gguf(tmp_path / "m.gguf", meta={"llama.attention.head_count": (heads, vtype)})
    line = one_line(run("convert", path, "-o", tmp_path / "out"))
    assert needle in line and "m.gguf" in line
    assert not (tmp_path / "out").exists()


def test_item7_head_rows_that_do_not_pair_are_refused(tmp_path, run):
    # 4 heads of 4 rows of k: fine; attn_k with 2 KV heads over 6 rows: 3 rows per head, not pairs
    tensors = {**LLAMA_TENSORS, "blk.0.attn_k.weight": (6, 32)}
    path = llama_gguf(tmp_path / "m.gguf", tensors=tensors)
    assert "attn_k" in one_line(run("convert", path, "-o", tmp_path / "out"))


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data, needle", [
    ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, 16, "shape"),
    ({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, 0, "shape"),
    ({"w": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0, "shape"),
    ({"w\ud800": F32_4}, 16, "UTF-8"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [False, 16]}}, 16, "data_offsets"),
    ({"w": F32_4, "__metadata__": {"a": 1}}, 16, "__metadata__"),
    ({"w": F32_4, "__metadata__": ["a"]}, 16, "__metadata__"),
    ({"w": F32_4, "__metadata__": {"a": "\ud800"}}, 16, "UTF-8"),
], ids=["bool-dim", "huge-dim", "overflowing-shape", "surrogate-name", "bool-offset", "metadata-int",
        "metadata-list", "metadata-surrogate"])
def test_item8_14_headers_the_library_would_reject_are_refused(tmp_path, run, header, data, needle):
    st_dir(tmp_path / "base", header, bytes(data))
    st_dir(tmp_path / "s1", header, bytes(data))
    line = one_line(run("merge", tmp_path / "base", tmp_path / "s1", "-t", "1e-4", "-o", tmp_path / "out"))
    assert needle in line and "model.safetensors" in line
    assert not (tmp_path / "out").exists()
    assert "\ud800" not in line


# ---------------------------------------------------------------- hangs and unbounded memory (items 9-12)


# one YAML value: ten x, then nine levels each ten aliases of the one before (10^9 leaves if expanded)
LAUGHS = "[&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]"


@pytest.mark.parametrize("key", ["base", "t", "dtype", "shard_size", "carry_float32"])
def test_item9_billion_laughs_in_a_recipe(tmp_path, key):
    steps = "steps: [{model: s1, t: 1.0e-4}]\n"
    body = {"base": f"base: {LAUGHS}\n" + steps, "t": "base: b\nsteps: [{model: s1, t: " + LAUGHS + "}]\n"}.get(
        key, f"base: b\n{steps}{key}: {LAUGHS}\n")
    (tmp_path / "r.yaml").write_text(body)
    start = time.time()
    line = one_line(bounded("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", timeout=20, memory=1 << 30))
    assert time.time() - start < 15 and "r.yaml" in line
    assert len(line) < 400  # the value is not printed whole


def test_item10_one_d_gguf_tensors_are_read_once(tmp_path, monkeypatch):
    """A 1-D tensor is one row: every chunk used to re-read (and dequantize) all of it."""
    from nearswap.formats import gguf as gguf_format
    from nearswap.formats import open_model
    from nearswap.formats.safetensors import FileReader

    n = 1 << 20
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.add_tensor("output_norm.weight", np.arange(n, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = open_model(tmp_path / "m.gguf").tensors["model.norm.weight"]
    read = []
    real = gguf_format.pread_exact
    monkeypatch.setattr(gguf_format, "pread_exact", lambda fd, view, pos, i: (read.append(len(view)), real(fd, view, pos, i)))
    reader = FileReader()
    chunk = 1 << 14
    got = np.concatenate([reader.read(info, s, np.empty(min(chunk, n - s), np.float32)) for s in range(0, n, chunk)])
    assert np.array_equal(got, np.arange(n, dtype=np.float32))
    assert sum(read) <= 4 * n + 64 * len(read), f"read {sum(read)} bytes for a {4 * n}-byte tensor"


def test_item11_vocab_from_a_gguf_declaring_a_billion_tokens(tmp_path):
    hf_llama(tmp_path / "hf")
    kvs = [kv("general.architecture", V.STRING, _s("llama")),
           kv("tokenizer.ggml.model", V.STRING, _s("gpt2")),
           kv("tokenizer.ggml.tokens", V.ARRAY, u32(V.STRING) + struct.pack("<Q", 10**9) + _s("a") * 100)]
    gguf_raw(tmp_path / "vocab.gguf", kvs, [])
    line = one_line(bounded("export", tmp_path / "hf", "-o", tmp_path / "x.gguf", "--type", "f32", "--vocab-from",
                            tmp_path / "vocab.gguf", timeout=20, memory=1 << 30))
    assert "vocab.gguf" in line
    assert not list(tmp_path.glob("*x.gguf*"))


@pytest.mark.parametrize("entry, needle", [
    ("/dev/stdin", "outside"), ("fifo", "regular file"), ("../elsewhere/model.safetensors", "outside"),
    ("/etc/passwd", "outside"), ("sub/../../x", "outside"),
])
def test_item12_index_entries_that_are_not_shards_of_this_model(tmp_path, entry, needle):
    arrays = random_model(0)
    m = write_model(tmp_path / "m", arrays, shards=2)
    (tmp_path / "elsewhere").mkdir()
    save_file(arrays, str(tmp_path / "elsewhere" / "model.safetensors"))
    if entry == "fifo":
        os.mkfifo(m / "fifo")
    index = json.loads((m / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = entry
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    # stdin stays open and silent: opening /dev/stdin or a FIFO would block forever
    proc = bounded("inspect", m, stdin=subprocess.PIPE, timeout=20)
    line = one_line(proc)
    assert "model.safetensors.index.json" in line and needle in line


def test_item12_a_shard_that_is_a_fifo(tmp_path):
    m = write_model(tmp_path / "m", random_model(0), shards=2)
    shard = m / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    line = one_line(bounded("inspect", m, timeout=20))
    assert "model-00002-of-00002.safetensors" in line and "regular file" in line


def test_item12_a_config_that_is_a_fifo(tmp_path):
    m = write_model(tmp_path / "m", random_model(0))
    (m / "config.json").unlink()
    os.mkfifo(m / "config.json")
    assert "config.json" in one_line(bounded("inspect", m, timeout=20))


def test_hf_cache_layout_symlinked_shards_still_work(tmp_path, run):
    """Shards that are symlinks to blobs outside the directory (the Hugging Face cache) are fine."""
    arrays = random_model(0)
    (tmp_path / "blobs").mkdir()
    save_file(arrays, str(tmp_path / "blobs" / "abc123"))
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc123")
    (snap / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = run("inspect", snap, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parameters"] == sum(a.size for a in arrays.values())


# ---------------------------------------------------------------- tracebacks instead of one line (items 13-16)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs, mounted for the test and removed after it (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _big_pair(tmp_path):
    shapes = {f"layer.{i}.weight": (256, 256) for i in range(8)}  # 2 MiB of float32 per model
    base = random_model(0, "f32", shapes=shapes)
    return (write_model(tmp_path / "base", base),
            write_model(tmp_path / "s1", random_model(1, "f32", shapes=shapes, like=base)))


def test_item13_disk_full_while_writing(tmp_path, small_fs, run, monkeypatch):
    import shutil
    from collections import namedtuple

    base, s1 = _big_pair(tmp_path)
    # the free-space check is told there is room, so the write itself meets ENOSPC
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1 << 40, 0, 1 << 40))
    line = one_line(run("merge", base, s1, "-t", "1e-4", "-o", small_fs / "out"))
    assert "No space left on device" in line and str(small_fs) in line
    kept = os.listdir(small_fs)  # what was written is kept for the next run, hidden, never at OUT
    assert len(kept) == 1 and kept[0].startswith(".out.") and kept[0].endswith(".partial") and kept[0] in line
    assert "continues" in line and "--no-resume" in line
    result = run("merge", base, s1, "-t", "1e-4", "-o", small_fs / "out", "--no-resume")
    assert result.exit_code == 1 and result.stderr.count("\n") == 2  # the earlier partial removed, said so
    assert f"removed {small_fs / kept[0]}" in result.stderr and "No space left on device" in result.stderr
    assert "kept" not in result.stderr and os.listdir(small_fs) == []


def test_item13_free_space_is_measured_where_out_will_be(tmp_path, small_fs, run):
    base, s1 = _big_pair(tmp_path)
    line = one_line(run("merge", base, s1, "-t", "1e-4", "-o", small_fs / "new" / "deeper" / "out"))
    assert "not enough free disk" in line and str(small_fs) in line
    assert os.listdir(small_fs) == []  # and the parents it would have made are not left either


def test_item13_read_only_file_system(tmp_path, small_fs, run):
    base, s1 = pair(tmp_path)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    line = one_line(run("merge", base, s1, "-t", "1e-4", "-o", small_fs / "out"))
    assert "Read-only file system" in line and str(small_fs) in line
    assert "read-only" in one_line(run("convert", base, "-o", small_fs / "out")).lower()


@pytest.mark.parametrize("target", [".", "..", "./"])
def test_item13_current_directory_or_its_parent_as_output(tmp_path, run, monkeypatch, target):
    base, s1 = pair(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep").write_text("x")
    monkeypatch.chdir(work)
    started = time.time()
    line = one_line(run("merge", base, s1, "-t", "1e-4", "-o", target, "--force"))
    assert "current directory" in line
    assert (work / "keep").read_text() == "x" and time.time() - started < 10


def test_item13_longest_legal_output_name(tmp_path, run):
    base, s1 = pair(tmp_path)
    out = tmp_path / ("m" * 245)
    result = run("merge", base, s1, "-t", "1e-4", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert load_file(str(out / "model.safetensors")).keys() == set(TINY)
    out255 = tmp_path / ("n" * 255)
    assert run("merge", base, s1, "-t", "1e-4", "-o", out255, "-q").exit_code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    too_long = one_line(run("merge", base, s1, "-t", "1e-4", "-o", tmp_path / ("x" * 256)))
    assert "too long" in too_long


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where, needle", [
    ("header", "model-00001-of-00002.safetensors"), ("index", "model.safetensors.index.json"),
    ("config", "config.json"), ("config-list", "config.json"), ("weight_map-int", "index.json"),
    ("weight_map-null", "index.json"), ("weight_map-list", "index.json"), ("weight_map-not-dict", "index.json"),
])
def test_item14_json_that_is_not_what_it_claims(tmp_path, run, where, needle):
    m = write_model(tmp_path / "m", random_model(0), shards=2)
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    if where == "header":
        raw_safetensors(m / "model-00001-of-00002.safetensors", ('{"a": ' + DEEP + "}").encode())
    elif where == "index":
        index.write_text('{"weight_map": ' + DEEP + "}")
    elif where == "config":
        (m / "config.json").write_text('{"a": ' + DEEP + "}")
    elif where == "config-list":
        (m / "config.json").write_text("[1, 2]")
    elif where == "weight_map-not-dict":
        data["weight_map"] = [first]
        index.write_text(json.dumps(data))
    else:
        data["weight_map"][first] = {"int": 3, "null": None, "list": ["model-00001-of-00002.safetensors"]}[where[11:]]
        index.write_text(json.dumps(data))
    assert needle in one_line(run("inspect", m))


def test_item14_recipe_metadata_that_is_not_json(tmp_path, run):
    hf = hf_llama(tmp_path / "hf")
    save_file(load_file(str(hf / "model.safetensors")), str(hf / "model.safetensors"),
              metadata={"nearswap_recipe": "{not json", "nearswap_version": "0"})
    result = run("inspect", hf, "--json")  # a description, with the damage said
    assert result.exit_code == 0, result.output
    assert "not valid JSON" in json.loads(result.stdout)["recipe_error"]
    line = one_line(run("export", hf, "-o", tmp_path / "x.gguf", "--type", "f32"))
    assert "nearswap_recipe" in line and not list(tmp_path.glob("*x.gguf*"))


def _gguf_with(tmp_path, extra_kvs=(), infos=None, data=None, meta_base=True):
    kvs = [kv("general.architecture", V.STRING, _s("llama")), kv("llama.attention.head_count", V.UINT32, u32(4)),
           kv("llama.attention.head_count_kv", V.UINT32, u32(2))] if meta_base else []
    kvs += list(extra_kvs)
    if infos is None:
        infos = [tinfo("token_embd.weight", (32, 4), Q.F32, 0)]
        data = bytes(4 * 32 * 4)
    return gguf_raw(tmp_path / "m.gguf", kvs, infos, data or b"")


@pytest.mark.parametrize("case, needle", [
    ("nested-arrays", "nested"),
    ("unknown-element-type", "type 99"),
    ("unknown-value-type", "type 99"),
    ("huge-string", "string"),
    ("huge-array", "array"),
    ("missing-token-embd", "token_embd"),
    ("duplicate-tensor", "twice"),
    ("misaligned-offset", "offset"),
    ("bad-row-length", "block"),
    ("five-dims", "dimensions"),
    ("huge-tensor-count", "tensors"),
])
def test_item15_gguf_headers(tmp_path, run, case, needle):
    f32 = bytes(4 * 32 * 4)
    if case == "nested-arrays":
        path = _gguf_with(tmp_path, [kv("a.deep", V.ARRAY, (u32(V.ARRAY) + struct.pack("<Q", 1)) * 100_000 + u32(V.INT32) + struct.pack("<Q", 0))])
    elif case == "unknown-element-type":
        path = _gguf_with(tmp_path, [kv("a.arr", V.ARRAY, u32(99) + struct.pack("<Q", 1) + u32(0))])
    elif case == "unknown-value-type":
        path = _gguf_with(tmp_path, [kv("a.val", 99, u32(0))])
    elif case == "huge-string":
        path = _gguf_with(tmp_path, [kv("a.s", V.STRING, struct.pack("<Q", 2**63) + b"x")])
    elif case == "huge-array":
        path = _gguf_with(tmp_path, [kv("a.arr", V.ARRAY, u32(V.UINT64) + struct.pack("<Q", 2**62) + bytes(8))])
    elif case == "missing-token-embd":
        path = _gguf_with(tmp_path, infos=[tinfo("output_norm.weight", (32,), Q.F32, 0)], data=bytes(128))
    elif case == "duplicate-tensor":
        path = _gguf_with(tmp_path, infos=[tinfo("token_embd.weight", (32, 4), Q.F32, 0),
                                           tinfo("token_embd.weight", (32, 4), Q.F32, 512)], data=f32 * 2)
    elif case == "misaligned-offset":
        path = _gguf_with(tmp_path, infos=[tinfo("token_embd.weight", (32, 4), Q.F32, 4)], data=f32 + bytes(32))
    elif case == "bad-row-length":
        path = _gguf_with(tmp_path, infos=[tinfo("token_embd.weight", (33, 4), Q.Q8_0, 0)], data=bytes(1024))
    elif case == "five-dims":
        path = _gguf_with(tmp_path, infos=[tinfo("token_embd.weight", (2, 2, 2, 2, 2), Q.F32, 0)], data=bytes(128))
    elif case == "huge-tensor-count":
        path = tmp_path / "m.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 0) + bytes(64))
    result = run("convert", path, "-o", tmp_path / "out") if case == "missing-token-embd" else run("inspect", path)
    line = one_line(result)
    assert needle in line and "m.gguf" in line, line


def test_item15_zero_dim_tensor_is_described_not_crashed(tmp_path, run):
    path = _gguf_with(tmp_path, infos=[tinfo("token_embd.weight", (32, 4), Q.F32, 0), tinfo("output_norm.weight", (), Q.F32, 512)],
                      data=bytes(512) + bytes(4))
    result = run("inspect", path)
    assert "Traceback" not in result.output
    assert result.exit_code == 0 or one_line(result)


def test_item15_missing_head_count(tmp_path, run):
    path = llama_gguf(tmp_path / "m.gguf", drop=("llama.attention.head_count",))
    line = one_line(run("convert", path, "-o", tmp_path / "out"))
    assert "llama.attention.head_count" in line


@pytest.mark.parametrize("key", ["num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size"])
def test_item15_export_with_missing_config_keys(tmp_path, run, key):
    hf = hf_llama(tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    del config[key]
    (hf / "config.json").write_text(json.dumps(config))
    vocab = llama_gguf(tmp_path / "v.gguf")
    line = one_line(run("export", hf, "-o", tmp_path / "x.gguf", "--type", "f32", "--vocab-from", vocab))
    assert key in line and "config.json" in line
    assert not list(tmp_path.glob("*x.gguf*"))


@pytest.mark.parametrize("case, needle", [
    ("deep", "nested"),
    ("utf8", "UTF-8"),
    ("shard_size", "shard_size"),
    ("huge", "too large"),
    ("fifo", "regular file"),
])
def test_item16_recipes(tmp_path, case, needle):
    r = tmp_path / "r.yaml"
    if case == "deep":
        r.write_text("base: " + "[" * 100_000 + "]" * 100_000 + "\nsteps: [{model: s, t: 1e-4}]\n")
    elif case == "utf8":
        r.write_bytes(b"base: b\xff\xfe\nsteps: [{model: s, t: 1e-4}]\n")
    elif case == "shard_size":
        r.write_text("base: b\nsteps: [{model: s, t: 1e-4}]\nshard_size: 1e400\n")
    elif case == "huge":
        r.write_text("# " + "x" * (20 << 20) + "\nbase: b\nsteps: [{model: s, t: 1e-4}]\n")
    elif case == "fifo":
        os.mkfifo(r)
    line = one_line(bounded("merge", r, "-o", tmp_path / "out", timeout=20))
    assert needle in line and "r.yaml" in line


@pytest.mark.parametrize("value", ["1e400", "inf", "-5GB", "1e30"])
def test_item16_shard_size_flag(tmp_path, run, value):
    base, s1 = pair(tmp_path)
    assert "size" in one_line(run("merge", base, s1, "-t", "1e-4", "-o", tmp_path / "out", "--shard-size", value))
    assert "size" in one_line(run("convert", base, "-o", tmp_path / "out", "--shard-size", value))


# ---------------------------------------------------------------- messages (item 17)


def test_item17_values_from_files_are_escaped(tmp_path, run):
    header = {"w": {"dtype": "F32\nnearswap: all good, merged 100%\x1b[2J", "shape": [4], "data_offsets": [0, 16]}}
    st_dir(tmp_path / "base", header, bytes(16))
    st_dir(tmp_path / "s1", header, bytes(16))
    line = one_line(run("merge", tmp_path / "base", tmp_path / "s1", "-t", "1e-4", "-o", tmp_path / "out"))
    assert "\x1b" not in line and "dtype" in line and "\\n" in line


@pytest.mark.parametrize("args, needle", [
    (("merge", "a", "b", "-t", "abc", "-o", "x"), "-t"),
    (("merge", "a", "b", "-t", "1e-4"), "-o"),
    (("curve", "a", "b", "--threads", "0"), "--threads"),
    (("nosuchcommand",), "nosuchcommand"),
    (("merge", "--no-such-flag"), "--no-such-flag"),
])
def test_item17_usage_errors_are_one_line(tmp_path, run, args, needle):
    line = one_line(run(*args))
    assert needle in line and "--help" in line


@pytest.mark.parametrize("restart", [(), ("--restart",)], ids=["continued", "restarted"])
def test_item17_a_killed_merge_is_not_mistaken_for_a_model(tmp_path, run, restart):
    """SIGKILL mid-write: the half-written shard says it is unfinished; the next run of the same
    merge continues it (with --restart: removes it), saying so; a different merge refuses."""
    rng = np.random.default_rng(0)
    shapes = {f"layer.{i}.weight": (512, 1024) for i in range(32)}
    base = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "s", {n: w + np.float32(1e-3) for n, w in base.items()})
    proc = subprocess.Popen([sys.executable, "-m", "nearswap", "merge", str(tmp_path / "b"), str(tmp_path / "s"), "-t",
                             "1e-4", "-o", str(tmp_path / "out"), "--threads", "1", "-q"],
                            env={**os.environ, "NEARSWAP_CHUNK": "4096"})
    shard = None
    deadline = time.time() + 30
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob(".out*/model.safetensors"))
        if found and found[0].stat().st_size > 0:
            shard = found[0]
            break
        time.sleep(0.005)
    time.sleep(0.2)
    proc.kill()
    proc.wait()
    if shard is None or (tmp_path / "out").exists():
        pytest.skip("the merge finished before the kill")
    line = one_line(run("inspect", shard))
    assert "unfinished" in line or "incomplete" in line, line
    changed = run("merge", tmp_path / "b", tmp_path / "s", "-t", "2e-4", "-o", tmp_path / "out", "-q")
    line = one_line(changed)  # a different merge: refused, the dead run's partial output left as it was
    assert shard.parent.name in line and "recipe.steps[1].t was 0.0001, now 0.0002" in line and "--restart" in line
    assert shard.is_file()
    again = run("merge", tmp_path / "b", tmp_path / "s", "-t", "1e-4", "-o", tmp_path / "out", "-q", *restart)
    assert again.exit_code == 0, again.output
    assert shard.parent.name in again.stderr and ("removed" if restart else "continuing") in again.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unexpected_exceptions_say_internal_error_and_keep_the_traceback(tmp_path, run, monkeypatch):
    base, s1 = pair(tmp_path)
    monkeypatch.setattr(sinks, "copy_side_files", lambda *a: (_ for _ in ()).throw(TypeError("a bug")))
    line = one_line(run("merge", base, s1, "-t", "1e-4", "-o", tmp_path / "out"))
    assert "internal error" in line and "please report" in line
    trace = Path(line.rsplit(" ", 1)[-1])
    assert trace.is_file() and "TypeError: a bug" in trace.read_text()
    assert not (tmp_path / "out").exists()


def test_only_what_nearswap_marked_as_its_partial_is_removed(tmp_path, run):
    """A directory or file that merely has a partial's name (or the old output an interrupted
    replacement left) is named in a warning and left alone; it was not made by a run of nearswap's."""
    base, s1 = pair(tmp_path)
    theirs = tmp_path / ".out.abcdefgh.partial"
    theirs.mkdir()
    (theirs / "mine.txt").write_text("keep")
    result = run("merge", base, s1, "-t", "1e-4", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert (theirs / "mine.txt").read_text() == "keep"
    assert "found" in result.stderr and theirs.name in result.stderr and "left as it is" in result.stderr
    assert not (tmp_path / "out" / ".nearswap-partial").exists()  # the marker never reaches an output


def test_a_users_file_with_the_lock_files_name_is_never_truncated(tmp_path, run):
    base, s1 = pair(tmp_path)
    (tmp_path / ".out.lock").write_text("my notes, not a pid")
    line = one_line(run("merge", base, s1, "-t", "1e-4", "-o", tmp_path / "out"))
    assert "not a nearswap lock file" in line
    assert (tmp_path / ".out.lock").read_text() == "my notes, not a pid" and not (tmp_path / "out").exists()


def test_force_never_replaces_an_input_of_curve_plots(tmp_path, run):
    """A merge output is replaceable with --force, but not while it is being read: --plot into
    the base of the curve is refused before the pass."""
    base = nearswap_output(tmp_path / "merged")
    s1 = write_model(tmp_path / "s1", random_model(9))
    arrays = load_file(str(base / "model.safetensors"))
    write_model(s1, {n: a + np.float32(1e-3) for n, a in arrays.items()})
    before = (base / "model.safetensors").read_bytes()
    line = one_line(run("curve", base, s1, "--plot", base, "--force", "-q"))
    assert "holds" in line and (base / "model.safetensors").read_bytes() == before

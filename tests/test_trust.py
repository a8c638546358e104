"""Nothing unchecked is trusted (issue 21): a result reported as success has been checked.

Each test is one item of the issue: a case that was reported as success with a wrong result
(or that crashed, hung or said something misleading), now either the right result or a refusal
in one line with a non-zero exit, nothing partial at OUT and the inputs untouched. The
referees are independent: the safetensors library's reader, gguf's reader and writer,
hashlib for the journal's documented tags, markdown-it for what a card renders to.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import nearswap
from conftest import random_model, write_model
from killer import PRELUDE
from nearswap.runtime.stream import Settings

SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (48, 64) for i in range(8)}
SHAPES["model.embed_tokens.weight"] = (100, 64)
SETTINGS = dict(chunk=1024, threads=2, journal_bytes=8 << 10)
TS = [1e-3, 2e-3]
TOTAL = sum(4 * int(np.prod(s)) for s in SHAPES.values())

KILLER = PRELUDE + r"""
base, out, *secs = sys.argv[3:]
nearswap.merge(base, secs, t=%r, out=out, shard_size="40KB", settings=Settings(**%r))
""" % (TS, SETTINGS)


@pytest.fixture
def inputs(tmp_path):
    base = random_model(0, "f32", shapes=SHAPES)
    paths = [write_model(tmp_path / "in" / "base", base)]
    paths += [write_model(tmp_path / "in" / f"s{i}", random_model(i, "f32", shapes=SHAPES, like=base, noise=2e-3))
              for i in (1, 2)]
    reference = tmp_path / "ref" / "out"
    report = merge(paths, reference)
    return paths, reference, report


def merge(paths, out, **kw):
    return nearswap.merge(paths[0], paths[1:], t=TS, out=out, shard_size="40KB", settings=Settings(**SETTINGS), **kw)


def killed(paths, out, point="collected-journaled", fraction=0.6):
    """A merge into ``out`` SIGKILLed at ``point``; its partial directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", KILLER, point, str(int(TOTAL * fraction)), str(paths[0]), str(out),
                           *map(str, paths[1:])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (partial,) = [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
    return partial


def weights(directory):
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update({k: v.tobytes() for k, v in load_file(str(f)).items()})
    return out


def journal_lines(partial):
    """The journal's lines as (tag, JSON body): the format docs/design.md describes."""
    raw = (partial / ".nearswap-journal").read_bytes()
    return [tuple(line.split(b" ", 1)) for line in raw.split(b"\n") if line]


def tagged(bodies):
    """Lines tagged as documented: the first 32 hex digits of SHA-256 over the previous tag
    (b"nearswap-journal-3" before the first), a newline and the line's JSON."""
    previous, out = b"nearswap-journal-3", b""
    for body in bodies:
        previous = hashlib.sha256(previous + b"\n" + body).hexdigest()[:32].encode()
        out += previous + b" " + body + b"\n"
    return out


def one_line_refusal(result, needle):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- resume keeps only what it checked


def test_item1_an_input_rewritten_in_place_with_its_old_mtime_is_noticed(inputs, tmp_path, run):
    paths, reference, _ = inputs
    out = tmp_path / "run" / "out"
    partial = killed(paths, out)
    shard = paths[2] / "model.safetensors"
    before = os.stat(shard)
    data = bytearray(shard.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()  # the last weight of the last tensor, in place
    with open(shard, "r+b") as f:
        f.write(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # as `touch -r` or `cp -p` would
    after = os.stat(shard)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    result = run("merge", *paths, "-t", "1e-3,2e-3", "-o", out, "--shard-size", "40KB")
    one_line_refusal(result, f"its input {shard.resolve()} changed since")
    assert partial.is_dir() and not out.exists()  # nothing discarded without being asked


def test_item2_a_journal_line_for_a_tensor_never_written_is_not_believed(inputs, tmp_path):
    """A line with a valid tag naming a tensor whose data never reached the disk (a torn write):
    its chunks are read back, their CRCs do not match, and the tensor is merged again."""
    paths, reference, expected = inputs
    # killed where some tensors are journaled and some are not: which ones, at a given share of
    # the work, depends on how the threads interleave (a busy machine spreads them), so the kill
    # point moves on until both kinds exist
    for fraction in (0.3, 0.45, 0.6, 0.75, 0.9):
        out = tmp_path / f"run{fraction}" / "out"
        partial = killed(paths, out, fraction=fraction)
        lines = journal_lines(partial)
        done = {}
        for _, body in lines[1:]:
            done.update(json.loads(body)["done"])
        missing = [name for name in SHAPES if name not in done]
        if missing and done:
            break
    assert missing and done, fraction
    example = next(iter(done.values()))
    numel = int(np.prod(SHAPES[missing[0]]))
    forged = {"done": {missing[0]: {"tallies": example["tallies"], "crc": [0] * -(-numel // SETTINGS["chunk"])}}}
    bodies = [body for _, body in lines] + [json.dumps(forged, separators=(",", ":")).encode()]
    (partial / ".nearswap-journal").write_bytes(tagged(bodies))
    with pytest.warns(nearswap.NearswapWarning, match="1 journaled tensor not as recorded, merged again"):
        report = merge(paths, out)
    assert weights(out) == weights(reference)
    assert report["steps"] == expected["steps"]


def test_item3_bytes_changed_in_a_journaled_region_are_merged_again(inputs, tmp_path):
    paths, reference, expected = inputs
    out = tmp_path / "run" / "out"
    partial = killed(paths, out)
    # a byte in the middle of a tensor the journal says is written (which tensors are depends on the
    # threads' order, so it is looked up, not assumed)
    done = set()
    for line in journal_lines(partial):
        try:
            done |= set(json.loads(line[-1]).get("done", {}))
        except ValueError:  # (a line cut by the kill)
            pass
    assert done, "the kill at 60% left nothing journaled"
    for shard in sorted(partial.glob("*.safetensors")):
        data = bytearray(shard.read_bytes())
        # (a partial shard's header is written last: its layout is the finished merge's, the same recipe's)
        done_shard = (reference / shard.name).read_bytes()
        size = int.from_bytes(done_shard[:8], "little")
        header = json.loads(done_shard[8:8 + size])
        names = [n for n in header if n in done]
        if names:
            begin, end = header[names[0]]["data_offsets"]
            data[8 + size + (begin + end) // 2] ^= 0x40
            shard.write_bytes(bytes(data))
            break
    else:
        raise AssertionError("no journaled tensor is in a shard")
    with pytest.warns(nearswap.NearswapWarning, match="not as recorded, merged again"):
        report = merge(paths, out)
    assert weights(out) == weights(reference) and report["steps"] == expected["steps"]


def test_item4_tallies_edited_in_the_journal_do_not_reach_the_report_or_card(inputs, tmp_path):
    paths, reference, expected = inputs
    out = tmp_path / "run" / "out"
    partial = killed(paths, out)
    path = partial / ".nearswap-journal"
    raw = path.read_bytes()
    at = raw.index(b'"swapped":', raw.index(b"\n")) + len(b'"swapped":')
    path.write_bytes(raw[:at] + b"9" + raw[at:])  # one step's swapped count of one tensor, x10 or so
    report = merge(paths, out)
    assert report["steps"] == expected["steps"]
    card = (out / "README.md").read_text()
    assert card == (reference / "README.md").read_text()  # the same figures (both outputs are named out)


def test_item5_a_file_planted_in_the_partial_directory_does_not_reach_the_output(inputs, tmp_path):
    paths, reference, _ = inputs
    out = tmp_path / "run" / "out"
    partial = killed(paths, out)
    (partial / "planted.txt").write_text("not the merge's")
    (partial / "pytorch_model.bin").write_bytes(b"\x80\x04not a merge")
    (partial / "sub").mkdir()
    (partial / "sub" / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.warns(nearswap.NearswapWarning, match="removed 3 entries besides the weights"):
        merge(paths, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert weights(out) == weights(reference)


def test_item6_a_truncated_gguf_or_a_linked_journal_in_the_partial_is_continued_not_a_loop(tmp_path, run):
    gguf = pytest.importorskip("gguf")
    from test_gguf_merge import family

    paths, _, _ = family(tmp_path, gguf.GGMLQuantizationType.Q8_0, n=2)
    reference = tmp_path / "ref.gguf"
    nearswap.merge(paths[0], paths[1:], t=TS, out=reference, settings=Settings(**SETTINGS))
    for spoil in ("truncate", "link"):
        work = tmp_path / spoil
        work.mkdir()
        out = work / "out.gguf"
        proc = subprocess.run([sys.executable, "-c", PRELUDE + f"\nnearswap.merge({str(paths[0])!r}, "
                               f"{[str(p) for p in paths[1:]]!r}, t={TS!r}, out={str(out)!r}, "
                               f"settings=Settings(**{SETTINGS!r}))", "collected-journaled", "150000"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        (partial,) = [p for p in work.iterdir() if p.name.endswith(".partial")]
        if spoil == "truncate":
            os.truncate(partial / "out.gguf", (partial / "out.gguf").stat().st_size // 2)
        else:
            copy = work / "journal-copy"
            shutil.copyfile(partial / ".nearswap-journal", copy)
            (partial / ".nearswap-journal").unlink()
            (partial / ".nearswap-journal").symlink_to(copy)
        nearswap.merge(paths[0], paths[1:], t=TS, out=out, settings=Settings(**SETTINGS))
        assert out.read_bytes() == reference.read_bytes()
        with pytest.raises(nearswap.NearswapError, match="already exists"):  # done: not the same failure again
            nearswap.merge(paths[0], paths[1:], t=TS, out=out, settings=Settings(**SETTINGS))


# ---------------------------------------------------------------- verify refuses what it did not record


@pytest.mark.parametrize("foreign", ["model.safetensors", "pytorch_model.bin", "sub/model.safetensors",
                                     "consolidated.00.pth"])
def test_item7_a_weight_file_the_merge_did_not_write_is_refused(inputs, tmp_path, run, foreign):
    _, reference, _ = inputs
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    assert run("verify", out).exit_code == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1  # sharded: a loader that finds model.safetensors takes it instead
    (out / foreign).parent.mkdir(exist_ok=True)
    shutil.copyfile(out / shards[0], out / foreign)
    one_line_refusal(run("verify", out), f"{out / foreign} is not a file the merge wrote")


def test_item7_a_changed_index_or_config_and_a_link_are_refused(inputs, tmp_path, run):
    _, reference, _ = inputs
    for name, change in (("model.safetensors.index.json", b" "), ("config.json", b"\n")):
        out = tmp_path / name
        shutil.copytree(reference, out)
        with open(out / name, "ab") as f:
            f.write(change)
        one_line_refusal(run("verify", out), f"{out / name} differs from what the merge wrote")
    out = tmp_path / "linked"
    shutil.copytree(reference, out)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shutil.copyfile(shard, tmp_path / "elsewhere")
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere")
    one_line_refusal(run("verify", out), "is a link or not a regular file")


def test_item9_what_verify_reads_from_the_report_is_bounded(inputs, tmp_path, run):
    _, reference, _ = inputs
    for chunk, needle in ((1, "the recorded chunk size 1 is not one a merge uses"), ("1024", "'1024'"),
                          (1 << 40, "not one a merge uses")):
        out = tmp_path / f"c{chunk}"
        shutil.copytree(reference, out)
        report = json.loads((out / "merge_report.json").read_text())
        report["output"]["checksums"]["chunk"] = chunk
        (out / "merge_report.json").write_text(json.dumps(report))
        one_line_refusal(run("verify", out), needle)
    out = tmp_path / "names"
    shutil.copytree(reference, out)
    report = json.loads((out / "merge_report.json").read_text())
    report["output"]["checksums"]["other"]["../../etc/passwd"] = "0" * 64
    (out / "merge_report.json").write_text(json.dumps(report))
    one_line_refusal(run("verify", out), "its record of the file '../../etc/passwd' is not one nearswap writes")


def test_item10_a_gguf_output_is_verified_by_its_coded_bytes(tmp_path, run):
    gguf = pytest.importorskip("gguf")
    from nearswap.core import checksums
    from test_gguf_merge import family

    paths, _, _ = family(tmp_path, gguf.GGMLQuantizationType.Q4_0, n=2)
    out = tmp_path / "out.gguf"
    report = nearswap.merge(paths[0], paths[1:], t=TS, out=out, settings=Settings(**SETTINGS))
    result = run("verify", out)
    assert result.exit_code == 0 and "as written" in result.stdout, result.output
    # the record is gguf's own metadata, and its digest is of the coded bytes as gguf's reader sees them
    reader = gguf.GGUFReader(str(out))
    record = json.loads(bytes(reader.fields["nearswap.checksums"].parts[-1]).decode())
    assert record == report["output"]["checksums"]
    crcs = []
    for t in sorted(reader.tensors, key=lambda t: t.data_offset):
        raw = np.asarray(t.data).tobytes()
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        step = record["chunk"] // block * size
        crcs.append([checksums.crc(raw[i:i + step]) for i in range(0, len(raw), step)])
    assert checksums.digest(crcs) == record["data"]
    header = out.read_bytes()[: min(t.data_offset for t in reader.tensors)]
    assert result.exit_code == 0 and len(header) > 1000
    data = bytearray(out.read_bytes())
    for where, needle in ((len(data) - 10, "differ from what the merge wrote"),
                          (data.index(b"general.architecture") + 40, "header")):
        spoiled = tmp_path / f"spoiled-{where}.gguf"
        copy = bytearray(data)
        copy[where] ^= 1
        spoiled.write_bytes(bytes(copy))
        one_line_refusal(run("verify", spoiled), needle)
    result = run("verify", out, "--inputs", "--sample", 1000)
    assert result.exit_code == 0 and "recomputed from the inputs: identical" in result.stdout, result.output


# ---------------------------------------------------------------- the card prints only what it can vouch for


HOSTILE = "<script>alert(1)</script> <img src=x onerror=alert(2)> [go](javascript:alert(3)) a|b \x1b[31m\n# Heading"


def test_item12_strangers_strings_in_the_card_render_as_text(tmp_path, run):
    markdown_it = pytest.importorskip("markdown_it")
    base = random_model(0, "f32", shapes=SHAPES)
    paths = [write_model(tmp_path / "base", base), write_model(tmp_path / "s1", random_model(1, "f32", shapes=SHAPES,
                                                                                            like=base))]
    yaml_text = json.dumps(HOSTILE)  # a YAML double-quoted string
    (paths[0] / "README.md").write_text(f"---\nlicense: other\nlicense_name: {yaml_text}\n---\n")
    (paths[1] / "README.md").write_text(f"---\nlicense: {yaml_text}\n---\n")
    assert run("merge", *paths, "-t", "1e-3", "-o", tmp_path / "m", "-q").exit_code == 0
    sweep = {"base": HOSTILE, "secondaries": [HOSTILE], "tasks": [{"name": HOSTILE}],
             "rows": [{"t": 0.001, "swapped": [0.01], "kl_mean": 0.1, "perplexity": 9.5, "verdict": HOSTILE,
                       "decided_by": HOSTILE, "sample": HOSTILE, "tasks": {HOSTILE: {"diff": 0.01, "verdict": HOSTILE}}}]}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    result = run("card", tmp_path / "m", "--sweep", tmp_path / "sweep.json")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "m" / "README.md").read_text()
    body = card.split("\n---\n", 1)[1]
    assert "\x1b" not in body
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(body)
    assert "<script" not in html and "<img" not in html and 'href="javascript:' not in html
    assert html.count("<h1>") == 1  # the card's title; no heading from a stranger's newline
    for table in html.split("<table>")[1:]:
        head = len(re.findall(r"<th[ >]", table.split("</thead>")[0]))
        rows = table.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
        assert rows and all(row.count("<td") == head for row in rows)  # no '|' ended a cell
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the text itself is shown


# ---------------------------------------------------------------- terminal


def test_item13_names_on_stdout_are_escaped(inputs, tmp_path, run):
    paths, _, _ = inputs
    name = "x\nnearswap: ok \x1b[31mred"
    out = tmp_path / name
    for args in (("merge", *paths, "-t", "1e-3,2e-3", "-o", out, "-q"), ("verify", out), ("inspect", out)):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout and "\nnearswap: ok" not in result.stdout, result.stdout
        assert "x\\nnearswap: ok \\x1b[31mred" in result.stdout


# ---------------------------------------------------------------- GGUF structure as llama.cpp checks it


def _llama_gguf(path, **meta):
    gguf = pytest.importorskip("gguf")
    from test_gguf import hf_shapes, write_llama_gguf

    rng = np.random.default_rng(0)
    hf = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in hf_shapes().items()}
    write_llama_gguf(path, hf, gguf.GGMLQuantizationType.F32)
    if meta:  # rewrite with gguf's own reader and writer, one metadata value changed
        reader = gguf.GGUFReader(str(path))
        w = gguf.GGUFWriter(str(path) + ".new", "llama")
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            value = meta.get(field.name, field.contents())
            w.add_key_value(field.name, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
        for t in reader.tensors:
            w.add_tensor(t.name, np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]), raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(str(path) + ".new", path)
    return path


def _tensor_info_at(raw, name):
    """Where tensor ``name``'s info is in the header: (position of its dims, dims, position of its offset)."""
    at = raw.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    dims = struct.unpack_from(f"<{n_dims}Q", raw, at + 4)
    return at + 4, dims, at + 4 + 8 * n_dims + 4


def test_item14_ggufs_llama_cpp_refuses_are_refused(tmp_path, run):
    good = _llama_gguf(tmp_path / "good.gguf")
    assert run("convert", good, "-o", tmp_path / "ok", "-q").exit_code == 0
    raw = good.read_bytes()
    cases = {}
    dims_at, dims, offset_at = _tensor_info_at(raw, "blk.0.attn_q.weight")
    overlap = bytearray(raw)
    overlap[offset_at:offset_at + 8] = struct.pack("<Q", 0)  # its data said to start where the first tensor's does
    cases["overlap"] = (overlap, "the tensors before it end at")
    zero = bytearray(raw)
    zero[dims_at + 8:dims_at + 16] = struct.pack("<Q", 0)
    cases["zero"] = (zero, "has a dimension of 0")
    mistyped = bytearray(raw)  # declared Q4_0 over F32 data: the sizes no longer line up
    mistyped[offset_at - 4:offset_at] = struct.pack("<I", 2)
    cases["type"] = (mistyped, "tensors before it end at")
    for label, (data, needle) in cases.items():
        path = tmp_path / f"{label}.gguf"
        path.write_bytes(bytes(data))
        for command in (("convert", path, "-o", tmp_path / f"out-{label}"), ("inspect", path)):
            one_line_refusal(run(*command), needle)
        assert not (tmp_path / f"out-{label}").exists()
    for key, value, needle in (("llama.block_count", 10**9, "says 1000000000 blocks"),
                               ("llama.embedding_length", 0, "embedding length of 0")):
        path = _llama_gguf(tmp_path / f"{key}.gguf", **{key: value})
        one_line_refusal(run("convert", path, "-o", tmp_path / f"out-{key}"), needle)


def test_item15a_phi3_long_context_rope_is_refused_both_ways(tmp_path, run):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_tensor("rope_factors_long.weight", np.ones(8, np.float32))
    w.add_tensor("rope_factors_short.weight", np.ones(8, np.float32))
    w.add_tensor("token_embd.weight", np.zeros((10, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_line_refusal(run("convert", path, "-o", tmp_path / "hf"), "Phi-3's long-context rope factors")
    transformers = pytest.importorskip("transformers")
    config = transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=100)
    shapes = {"model.embed_tokens.weight": (100, 64), "model.norm.weight": (64,), "lm_head.weight": (100, 64),
              "model.layers.0.input_layernorm.weight": (64,), "model.layers.0.post_attention_layernorm.weight": (64,),
              "model.layers.0.self_attn.qkv_proj.weight": (192, 64), "model.layers.0.self_attn.o_proj.weight": (64, 64),
              "model.layers.0.mlp.gate_up_proj.weight": (256, 64), "model.layers.0.mlp.down_proj.weight": (64, 128)}
    data = config.to_dict()
    data["architectures"] = ["Phi3ForCausalLM"]
    data["rope_scaling"] = {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    model = write_model(tmp_path / "phi3", random_model(0, "f32", shapes=shapes), config=data)
    one_line_refusal(run("export", model, "-o", tmp_path / "phi3-out.gguf", "--type", "f32", "--vocab-from", path),
                     "rope_scaling (Phi-3's long context")


# ---------------------------------------------------------------- tracebacks and hangs


def test_item15_fit_takes_finite_numbers_only(run):
    for option, value in (("--bpw", "nan"), ("--head-bits", "nan"), ("--vram", "nan"), ("--vram", "inf"),
                          ("--per-gpu", "nan")):
        given = {"--bpw": "4.6", "--vram": "48", option: value}
        args = ["fit", "--shape", "miqu-70b", *(x for kv in given.items() for x in kv)]
        one_line_refusal(run(*args), f"{option} {float(value)!r} is not a finite")


def test_item16_a_symlink_loop_is_one_line(tmp_path, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    for args in (("merge", "a", "a", "-t", "1e-3", "-o", "out"), ("inspect", "a"), ("curve", "a", "a")):
        line = one_line_refusal(run(*args), "a is a symbolic link that leads back to itself")
        assert "download" not in line and "internal error" not in line
    (tmp_path / "m").mkdir()
    one_line_refusal(run("merge", "m", "m", "-t", "1e-3", "-o", "a/x"), "symbolic link that leads back to itself")


def test_item17_a_sample_too_small_for_one_block_reads_one(run):
    result = run("curve", "synthetic:tiny?seed=0", "synthetic:tiny?seed=1", "--sample", "1e-12", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sample"]["blocks"] == 1


def test_item18_tokenizer_files_are_checked_before_transformers_parses_them(tmp_path, run):
    pytest.importorskip("transformers")
    model = write_model(tmp_path / "m", random_model(0, "f32"))
    for name, text, needle in (("tokenizer.json", "[" * 100_000 + "]" * 100_000, "nested"),
                               ("tokenizer_config.json", "[1,2,3]", "not a JSON object")):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model / f).write_text("{}")
        (model / name).write_text(text)
        one_line_refusal(run("eval", model, model, "--tasks", "none", "-o", tmp_path / "out"), needle)
        assert not (tmp_path / "out").exists()


def test_item19_a_header_of_a_million_empty_tensors_is_refused_in_bounded_memory(tmp_path):
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(1_000_000))
    header = ("{" + entries + "}").encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    code = ("import re, sys; from nearswap.cli import cli\n"  # VmHWM: this process's peak (ru_maxrss outlives exec)
            "try:\n    cli.main(['inspect', sys.argv[1]])\nfinally:\n"
            "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "    print('maxrss', hwm, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("maxrss")]
    assert proc.returncode == 1 and len(lines) == 1 and "lists 1,000,000 tensors" in lines[0], proc.stderr
    rss_kb = int(proc.stderr.split("maxrss")[1].split()[0])
    assert rss_kb < 300_000, rss_kb  # the 66 MB header read once; before: 891 MB parsed into objects


# ---------------------------------------------------------------- messages


def test_item20_messages_say_what_to_do(inputs, tmp_path, run, monkeypatch):
    paths, reference, _ = inputs
    line = one_line_refusal(run("merge", *paths, "--swap-share", "50", "-o", tmp_path / "o"), "between 0 and 100%")
    assert "a bare number is a fraction: 50 is 5000%; for 50 percent write 50%" in line
    from collections import namedtuple

    import nearswap.runtime.output as output

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**5, 10**5))
    line = one_line_refusal(run("merge", *paths, "-t", "1e-3,2e-3", "-o", tmp_path / "o"), "not enough free disk")
    assert "nearswap keeps 64 MB spare" in line and not (tmp_path / "o").exists()
    gguf = pytest.importorskip("gguf")
    line = one_line_refusal(run("export", _llama_gguf(tmp_path / "v.gguf"), "-o", tmp_path / "o.gguf", "--type", "f32"),
                            "not enough free disk")
    assert "spare" in line and not (tmp_path / "o.gguf").exists() and gguf

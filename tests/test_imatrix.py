"""nearswap imatrix (issue 11 item 3): the importance matrix in llama.cpp's GGUF imatrix format.

Its sums are checked against transformers' own hidden states (each layer's input, through that
layer's own input norm: the q/k/v projections' input), read back with the gguf package as
llama.cpp's loader reads the file; `export --imatrix` hands it to llama.cpp's own quantizer
(and where llama-quantize is on PATH, that program's output is compared; the perplexity
comparison on SmolLM2 is benchmarks/bench_imatrix.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

TEXT = " ".join(f"The river runs past the mill number {i}, and the miller counts the sacks of flour." for i in range(60))


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(TEXT)
    return path


def test_sums_are_the_squared_inputs_transformers_computes(tiny_llm, calibration, tmp_path, run):
    torch = pytest.importorskip("torch")
    import gguf
    import transformers

    result = run("imatrix", tiny_llm / "base", "--text", calibration, "-o", tmp_path / "imatrix.gguf",
                 "--chunk-tokens", "64", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    reader = gguf.GGUFReader(str(tmp_path / "imatrix.gguf"))
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(reader.fields["imatrix.chunk_size"].parts[-1][0]) == 64
    chunks = int(reader.fields["imatrix.chunk_count"].parts[-1][0])
    assert chunks == summary["chunks"] >= 2
    tensors = {t.name: t for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    assert {"blk.0.attn_q.weight.in_sum2", "blk.1.ffn_down.weight.counts", "output.weight.in_sum2"} <= set(tensors)
    assert len(tensors) == 2 * (2 * 7 + 1)  # 7 projections a layer, 2 layers, the (untied) head

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llm / "base"), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_llm / "base"))
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    want = {}
    with torch.no_grad():
        for k in range(chunks):
            out = model(ids[k * 64:(k + 1) * 64].unsqueeze(0), output_hidden_states=True)
            for i, layer in enumerate(model.model.layers):
                x = layer.input_layernorm(out.hidden_states[i])[0].double()
                want[i] = want.get(i, 0) + (x * x).sum(0)
            x = out.hidden_states[-1][0].double()  # the final norm's output: the head's input
            want["head"] = want.get("head", 0) + (x * x).sum(0)
    for i in range(2):
        for proj in ("attn_q", "attn_k", "attn_v"):
            got = tensors[f"blk.{i}.{proj}.weight.in_sum2"].data.reshape(-1)
            assert np.allclose(got, want[i].numpy(), rtol=1e-4), (i, proj)
            assert tensors[f"blk.{i}.{proj}.weight.counts"].data.reshape(-1)[0] == chunks * 64
    assert np.allclose(tensors["output.weight.in_sum2"].data.reshape(-1), want["head"].numpy(), rtol=1e-4)


def test_bad_inputs_are_one_line(tiny_llm, tmp_path, run):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    result = run("imatrix", tiny_llm / "base", "--text", short, "-o", tmp_path / "i.gguf")
    assert result.exit_code == 1 and "fewer than one chunk of 512" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "i.gguf").exists()
    taken = tmp_path / "taken.gguf"
    taken.write_text("a file of someone's")
    result = run("imatrix", tiny_llm / "base", "--text", short, "-o", taken)  # refused before the text is read
    assert result.exit_code == 1 and "already exists" in result.stderr and taken.read_text() == "a file of someone's"
    not_imatrix = tmp_path / "x.gguf"
    shutil.copy(tiny_llm / "base" / "config.json", not_imatrix)
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q.gguf", "--type", "iq4_xs", "--imatrix", not_imatrix)
    assert result.exit_code == 1 and "--imatrix" in result.stderr and "not a GGUF file" in result.stderr
    assert not (tmp_path / "q.gguf").exists()
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q.gguf", "--type", "iq2_xxs")
    assert result.exit_code == 1 and "iq2_xxs needs an importance matrix" in result.stderr


@pytest.mark.parametrize("kind", ["missing", "fifo", "binary", "no tokenizer"])
def test_a_bad_text_or_model_is_one_line_that_names_it(tiny_llm, tmp_path, run, kind):
    """Calibration text goes through the reader of files from strangers: a FIFO is refused, not
    waited on forever; the model is called "model" (not the judge's "reference")."""
    import os

    text, model = tmp_path / "t.txt", tiny_llm / "base"
    if kind == "fifo":
        os.mkfifo(text)
    elif kind == "binary":
        text.write_bytes(b"ok \xff\xfe")
    elif kind == "no tokenizer":
        text.write_text(TEXT)
        model = tmp_path / "m"
        shutil.copytree(tiny_llm / "base", model)
        for f in model.glob("tokenizer*"):
            f.unlink()
    result = run("imatrix", model, "--text", text, "-o", tmp_path / "i.gguf")
    want = {"missing": f"--text: cannot open {text}: No such file", "fifo": f"--text: {text} is a FIFO",
            "binary": f"--text: {text} is not UTF-8 text (byte 3)", "no tokenizer": f"model: {model} has no tokenizer"}
    assert result.exit_code == 1 and want[kind] in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "i.gguf").exists()


def test_llama_cpp_quantizes_with_it(tiny_llm, calibration, tmp_path, run, llama_quantizer, monkeypatch):
    """llama.cpp's quantizer (compiled against the prebuilt llama.cpp) accepts the file and uses
    it: an i-quant is made, and the keys llama-quantize records of a matrix are in the output.
    Where llama.cpp's own llama-quantize is on PATH, its output from the same files is the same,
    tensor for tensor and key for key."""
    import gguf

    program = llama_quantizer  # (llama.cpp's own llama-quantize where the developer has it)
    assert run("imatrix", tiny_llm / "base", "--text", calibration, "-o", tmp_path / "i.gguf", "--chunk-tokens", "64",
               "-q").exit_code == 0
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q.gguf", "--type", "iq4_nl", "--imatrix",
                 tmp_path / "i.gguf", "--json")  # (the tiny model's rows of 64 fit IQ4_NL's 32-element blocks)
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    assert "IQ4_NL" in {t.tensor_type.name for t in reader.tensors}
    field = reader.fields["quantize.imatrix.entries_count"]  # what llama-quantize records of the matrix it used
    assert int(field.parts[-1][0]) == json.loads(result.stdout)["imatrix"]["entries"] == 15
    assert int(reader.fields["quantize.imatrix.chunks_count"].parts[-1][0]) > 0
    if program:
        monkeypatch.setenv("PATH", str(Path(program).parent) + ":/usr/bin:/bin")
        theirs = run("export", tiny_llm / "base", "-o", tmp_path / "p.gguf", "--type", "iq4_nl", "--imatrix",
                     tmp_path / "i.gguf", "-q")
        assert theirs.exit_code == 0, theirs.output
        other = gguf.GGUFReader(str(tmp_path / "p.gguf"))
        assert {t.name: bytes(t.data) for t in other.tensors} == {t.name: bytes(t.data) for t in reader.tensors}
        for key in ("quantize.imatrix.entries_count", "quantize.imatrix.chunks_count", "quantize.imatrix.dataset"):
            assert other.fields[key].contents() == reader.fields[key].contents(), key

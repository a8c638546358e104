"""export --format awq (issue 11 item 5): llm-compressor's AWQ into a compressed-tensors
checkpoint. The refusals run everywhere; the quantization itself runs where llm-compressor is
installed (`make setup-awq`, then `.venv-awq/bin/python -m pytest tests/test_awq.py`; it is not part of
`make test`'s environment: it pins transformers).
SmolLM2's measured figures are in docs/benchmarks.md (benchmarks/bench_awq.py)."""

import json

import numpy as np
import pytest


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text("\n\n".join(f"Passage {i}: the quick brown fox jumps over the lazy dog, and then it rests for "
                                f"{i} minutes by the river before running home." for i in range(8)))
    return path


def test_a_group_size_that_does_not_divide_the_columns_names_one_that_does(tiny_llm, calibration, tmp_path, run):
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q", "--format", "awq", "--text", calibration)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "hidden_size (q/k/v, gate/up inputs) is 64, not a multiple of --group-size 128; pass --group-size 64" in lines[0]
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args,text", [
    ([], "--format awq needs calibration text: --text FILE"),
    (["--text", "{cal}", "--bits", "3"], "--bits 3: AWQ here writes 4 or 8 bits"),
    (["--text", "{missing}"], "--text: cannot open {missing}: No such file or directory"),
])
def test_bad_arguments_are_one_line(tiny_llm, calibration, tmp_path, run, args, text):
    args = [a.format(cal=calibration, missing=tmp_path / "nope.txt") for a in args]
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q", "--format", "awq", "--group-size", "32", *args)
    text = text.format(missing=tmp_path / "nope.txt")
    assert result.exit_code == 1 and text in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_awq_options_with_another_format_are_refused(tiny_llm, calibration, tmp_path, run):
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q.gguf", "--text", calibration)
    assert result.exit_code == 2 and "are for --format awq" in result.stderr
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("args,text", [
    (["--format", "awq", "--imatrix", "i.gguf"], "--imatrix and --vocab-from are for GGUF outputs"),
    (["--format", "exl2", "--bpw", "4", "--vocab-from", "v.gguf"], "--imatrix and --vocab-from are for GGUF outputs"),
    (["--format", "awq", "--bpw", "4"], "AWQ takes --bits and --group-size"),
])
def test_options_of_other_formats_are_refused_not_ignored(tiny_llm, tmp_path, run, args, text):
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q", *args)
    assert result.exit_code == 2 and text in result.stderr and not (tmp_path / "q").exists()


def test_without_llm_compressor_one_line_says_how_to_install_it(tiny_llm, calibration, tmp_path, run):
    try:
        import llmcompressor  # noqa: F401
        pytest.skip("llm-compressor is installed here: the refusal cannot happen")
    except ImportError:
        pass
    result = run("export", tiny_llm / "base", "-o", tmp_path / "q", "--format", "awq", "--group-size", "32",
                 "--text", calibration)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "pip install 'nearswap[awq]'" in lines[0]
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))


def test_awq_checkpoint_loads_in_transformers_and_stays_close(tiny_llm, calibration, tmp_path, run):
    """The real quantization on a tiny Llama (SmolLM2's tokenizer): a compressed-tensors
    checkpoint of 4-bit groups that transformers loads; its logits stay near the original's."""
    pytest.importorskip("llmcompressor")
    torch = pytest.importorskip("torch")
    import transformers
    from safetensors import safe_open

    result = run("export", tiny_llm / "base", "-o", tmp_path / "q", "--format", "awq", "--group-size", "32",
                 "--text", calibration, "--samples", "4", "--seq-len", "32", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["passages"] == 4 and report["bits"] == 4
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 32, "group")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    assert "model.layers.0.self_attn.q_proj.weight_scale" in names and packed.dtype == torch.int32
    assert packed.numel() * 8 == 64 * 128  # eight 4-bit values per int32: down_proj is 64 x 128
    ids = transformers.AutoTokenizer.from_pretrained(str(tiny_llm / "base"))("The fox rests by the river",
                                                                             return_tensors="pt").input_ids
    with torch.no_grad():
        a = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llm / "base"), dtype=torch.float32)(ids).logits
        b = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)(ids).logits
    rel = float((a - b).norm() / a.norm())
    print(f"tiny llama, AWQ w4 g32: relative logit error {rel:.4f}")
    assert 0 < rel < 0.2 and np.isfinite(rel)

"""export --format exl2/exl3 (issue 11 item 4): on a machine without CUDA, one line saying so,
before any work, and nothing at OUT; bad arguments likewise. (The conversion itself needs an
NVIDIA GPU: see the README.)"""

import pytest

from conftest import random_model, write_model


@pytest.fixture
def hf_model(tmp_path):
    return write_model(tmp_path / "m", random_model(0, "f32"), config={"architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize("fmt,library", [("exl2", "exllamav2"), ("exl3", "exllamav3")])
def test_no_cuda_is_one_line_before_any_work(hf_model, tmp_path, run, fmt, library):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the refusal cannot happen here")
    result = run("export", hf_model, "-o", tmp_path / "q", "--format", fmt, "--bpw", "4.6", "--head-bits", "8")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output
    assert f"{library}'s converter, which needs an NVIDIA GPU with CUDA" in lines[0]
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))


@pytest.mark.parametrize("args,text", [
    (["--format", "exl2"], "--format exl2 needs --bpw"),
    (["--format", "exl2", "--bpw", "9"], "2-8 bits per weight"),
    (["--format", "exl3", "--bpw", "4", "--head-bits", "7"], "--head-bits 7"),
    (["--format", "awq2"], "unknown --format 'awq2'"),
    (["--bpw", "4.6"], "--bpw and --head-bits are for --format exl2/exl3"),
])
def test_bad_arguments_are_one_line(hf_model, tmp_path, run, args, text):
    result = run("export", hf_model, "-o", tmp_path / "q", *args)
    assert result.exit_code in (1, 2) and text in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "q").exists()


def test_a_gguf_source_is_sent_to_convert_first(tmp_path, run):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    result = run("export", tmp_path / "m.gguf", "-o", tmp_path / "q", "--format", "exl2", "--bpw", "4.6")
    assert result.exit_code == 1 and "nearswap convert m.gguf -o m-hf" in result.stderr

"""The README followed as a new user would (the new-user issue): what ships holds no path of
this machine that the user did not type, and a saved recipe re-run from elsewhere records its
inputs as a person writes them."""

import os
from pathlib import Path

import pytest

from nearswap.demo import synthetic

SHAPE = synthetic.LlamaShape(64, 2, 128, 49152, 4, 2)  # SmolLM2's vocabulary size: its GGUF gives the export's


def every_file(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())


def test_no_shipped_file_holds_an_absolute_path_the_user_did_not_type(tmp_path, monkeypatch, run, smollm2):
    """From a working folder, with relative paths as a user types them: merge, the saved recipe
    re-run from another folder, card, export and curve's plots. No file written holds the
    working folder's absolute path, the home directory or the cache's; the re-run's report names
    its inputs normalized (``../work/base``, not ``../work/merged/../base``)."""
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    monkeypatch.chdir(work)
    synthetic.make_base(Path("base"), SHAPE, "float32", seed=0)
    synthetic.make_secondary(Path("base"), Path("s1"), 0.0125, seed=1)
    os.symlink(os.path.relpath(smollm2), "vocab.gguf")  # (a path as the user would type it)
    for args in (["merge", "base", "s1", "-t", "1e-3", "-o", "merged", "-q"],
                 ["card", "merged"],
                 ["export", "merged", "-o", "merged.q8_0.gguf", "--type", "q8_0", "--vocab-from", "vocab.gguf", "-q"],
                 ["curve", "base", "s1", "--plot", "plots"]):
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    monkeypatch.chdir(other)
    rerun = run("merge", "../work/merged/nearswap_recipe.yaml", "-o", "m2", "-q")
    assert rerun.exit_code == 0, rerun.output
    import json

    report = json.loads((other / "m2" / "merge_report.json").read_text())
    assert report["base"] == os.path.join("..", "work", "base")
    assert [s["model"] for s in report["steps"]] == [os.path.join("..", "work", "s1")]
    written = every_file(work / "merged", work / "plots", other / "m2", work / "merged.q8_0.gguf")
    assert len(written) >= 8
    secrets = {str(tmp_path), str(tmp_path.resolve()), os.environ["HOME"], str(Path(os.environ["XDG_CACHE_HOME"]))}
    found = {str(p.relative_to(tmp_path)): s for p in written for s in secrets if s.encode() in p.read_bytes()}
    assert found == {}
    # the export names the model it holds, not the file (item 7: it was renamed "merged.q8_0")
    import gguf

    assert gguf.GGUFReader(work / "merged.q8_0.gguf").fields["general.name"].contents() == "merged"


def test_the_lm_eval_line_names_a_gguf_as_given_with_its_conversion():
    """An eval whose reference is a GGUF is scored on its HF twin in nearswap's cache; the report's
    lm_eval line names the GGUF as the user gave it and the command that makes the twin, not the
    cache's path of this machine."""
    pytest.importorskip("yaml")
    from nearswap.judge import harness, tasks

    selected = tasks.select("arc_easy:0")
    cache = Path("/home/someone/.cache/nearswap/eval/converted/base-0123456789abcdef")
    line = harness.cli_command(selected, Path("report/tasks"), cache, 20, Path("models/base.gguf"))
    assert line.startswith("nearswap convert models/base.gguf base_hf && lm_eval --model hf ")
    assert "pretrained=base_hf," in line and str(cache) not in line and "--limit 20" in line
    plain = harness.cli_command(selected, Path("report/tasks"), Path("merged"), 20)
    assert plain.startswith("lm_eval --model hf --model_args pretrained=merged,")


def test_a_long_eval_in_a_log_says_where_it_is(monkeypatch, capsys):
    """eval's progress where stderr is a log (new-user issue, item 6: 35 silent minutes): a line
    when a phase starts, one per LOG_EVERY seconds with counts, time spent and time left, one
    when it ends — computed here from the same clock."""
    from nearswap.cli import progress

    clock = [100.0]
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    monkeypatch.setattr(progress, "_stderr_is_a_terminal", lambda: False)
    phases = progress._Phases(quiet=False)
    phases("base: benchmarks", 0, 400)
    for done in range(1, 401):
        clock[0] += 0.5  # 2 requests a second: 200 s for the phase
        phases("base: benchmarks", done, 400)
    phases("base: stories", 0, 6)
    phases("base: stories", 6, 6)
    lines = capsys.readouterr().err.splitlines()
    every = progress._Phases.LOG_EVERY
    ticks = [int(k * every / 0.5) for k in range(1, int(200 // every) + 1) if k * every < 200]
    expected = ["base: benchmarks: 0/400"]
    for done in ticks:
        spent = done * 0.5
        expected.append(f"base: benchmarks: {done}/400 ({100 * done / 400:.0f}%) in {progress._duration(spent)}, "
                        f"about {progress._duration(spent / done * (400 - done))} left")
    expected += [f"base: benchmarks: 400/400 (100%) in {progress._duration(200)}", "base: stories: 0/6", "base: stories: 6/6 (100%) in 0 s"]
    assert lines == expected
    quiet = progress._Phases(quiet=True)
    quiet("x", 1, 2)
    assert capsys.readouterr().err == ""


def test_the_readme_walkthrough_runs_on_a_small_stand_in(tiny_llm, quick_data, tmp_path, monkeypatch, run):
    """The README's walkthrough, command by command, on a faithful small stand-in for the demo's
    files: a GGUF base with SmolLM2's vocabulary and secondaries derived from it as the demo
    derives them (HF directories without tokenizer files). Each command exits 0 — the sweep
    included, which failed after 7 minutes on the demo's files ("s1 has no tokenizer"). Limits
    are small (a stand-in); the commands and their order are the README's."""
    import re

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEARSWAP_CACHE", str(quick_data))
    assert run("export", tiny_llm / "base", "-o", "base.gguf", "--type", "f32", "-q").exit_code == 0
    for i in (1, 2, 3):
        synthetic.make_secondary(Path("base.gguf"), Path(f"s{i}"), 0.0125, seed=i)
    assert not any(Path("s1").glob("tokenizer*"))  # (as the demo's: the base's tokenizer is used)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    walkthrough = readme[readme.index("## Walkthrough"):]
    walkthrough = walkthrough[: walkthrough.index("\n## ", 3)]
    commands = [line.strip()[2:].split("  #")[0].split() for line in walkthrough.splitlines()
                if line.startswith("    $ nearswap ")]
    assert [c[1] for c in commands] == ["merge", "curve", "eval", "verify", "export", "card", "fit"]
    small = {"eval": ["--tasks", "arc_easy", "--limit", "8", "--no-writing"]}
    for command in commands:
        args = command[1:] + small.get(command[1], [])
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    sweep_line = re.search(r"`(nearswap sweep base\.gguf s1 -o sweep)`", readme).group(1).split()
    swept = run(*sweep_line[1:], "--t", "1e-2", "--tasks", "none", "--jobs", "1")
    assert swept.exit_code == 0, swept.output
    carded = run("card", "merged", "--eval", "report", "--sweep", "sweep", "--quants", "merged.q8_0.gguf")
    assert carded.exit_code == 0, carded.output


def _loads_in_llama_cpp(path: Path) -> None:
    """llama.cpp's own loader on ``path``, and a few greedy tokens from it."""
    from nearswap.runtime.llama_model import LlamaModel

    with LlamaModel(path, n_ctx=64) as llm:
        text = llm.greedy(llm.tokenize("The capital of France is", add_special=llm.adds_bos), 4)
    assert isinstance(text, str) and text.strip()


def test_demo_on_a_base_of_ones_own(tiny_llm, tmp_path, run):
    """`nearswap demo --base DIR` (new-user issue, item 9): the card's workflow on the user's own
    model — three derived secondaries, the merge, the curve, the GGUF export — without Python.
    The export is read back by gguf's own reader: every tensor of the merge is there."""
    gguf = pytest.importorskip("gguf")
    result = run("demo", "--base", tiny_llm / "base", "--workdir", tmp_path, "--no-eval", "-q")
    assert result.exit_code == 0, result.output
    work = tmp_path / "base"
    assert sorted(p.name for p in work.iterdir()) == ["merged", "merged.q8_0.gguf", "s1", "s2", "s3"]
    assert "step 3" in result.output and "what other t would swap" in result.output
    from nearswap.formats import open_model

    merged = open_model(work / "merged", "merged")
    reader = gguf.GGUFReader(work / "merged.q8_0.gguf")
    assert len(reader.tensors) == len(merged.tensors)
    bad = run("demo", "--base", tmp_path / "nothing", "--workdir", tmp_path / "w")
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1 and "no such file" in bad.stderr


def test_demo_on_gemma3_when_fetched(tmp_path, monkeypatch, run):
    """`nearswap demo --base gemma3-270m`: the workflow on Gemma-3-270M Q4_K_M to a GGUF that
    llama.cpp loads (skipped unless Gemma is in the cache: `nearswap fetch gemma3-270m`)."""
    from conftest import CACHE
    from nearswap.demo import fetch

    if fetch.cached(fetch.GEMMA3, cache=CACHE) is None:
        pytest.skip("Gemma-3-270M is not in the cache: run `nearswap fetch gemma3-270m` to include this test")
    monkeypatch.setenv("NEARSWAP_CACHE", str(CACHE))
    result = run("demo", "--base", "gemma3-270m", "--workdir", tmp_path, "--no-eval", "-q")
    assert result.exit_code == 0, result.output
    exported = tmp_path / "gemma3-270m" / "merged.q8_0.gguf"
    gguf = pytest.importorskip("gguf")
    assert gguf.GGUFReader(exported).fields["general.architecture"].contents() == "gemma3"
    _loads_in_llama_cpp(exported)

"""One of each thing (the layout issue): one recipe builder, one GGUF type rule, one word
pattern, one list of tokenizer files, one default thread count and cache directory, one report
key for the output's type — each checked where it is used, not only where it is defined."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import nearswap
from conftest import random_model, write_model

SRC = Path(__file__).resolve().parent.parent / "src" / "nearswap"


def definitions(name: str) -> list[str]:
    """Every module that defines ``name`` (a function, or a module-level assignment)."""
    found = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                found.append(str(path.relative_to(SRC)))
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                found.append(str(path.relative_to(SRC)))
    return found


@pytest.mark.parametrize("name,where", [("default_threads", "core/paths.py"), ("cache_dir", "core/paths.py"),
                                        ("TOKENIZER_FILES", "formats/__init__.py"),
                                        ("VOCABULARY_FILES", "formats/__init__.py"), ("WORD", "judge/writing.py"),
                                        ("tensor_type", "formats/gguf_writer.py"), ("from_inputs", "merging/recipe.py")])
def test_defined_once(name, where):
    assert definitions(name) == [where]


@pytest.mark.parametrize("mistake", [
    (["-t", "1e-4", "-t", "1e-3"], dict(t=[1e-4, 1e-3])),  # two thresholds for three secondaries
    ([], dict()),  # no threshold
    (["-t", "-1"], dict(t=-1.0)),
    (["-t", "1e-4", "--dtype", "float8"], dict(t=1e-4, dtype="float8")),
    (["-t", "1e-4", "--shard-size", "5 lightyears"], dict(t=1e-4, shard_size="5 lightyears")),
])
def test_the_command_line_and_the_library_refuse_a_mistake_in_the_same_words(make_quartet, tmp_path, run, mistake):
    paths, _ = make_quartet(n=3)
    args, kwargs = mistake
    result = run("merge", *paths, *args, "-o", tmp_path / "cli")
    assert result.exit_code != 0
    said = result.stderr.strip().removeprefix("nearswap: error: ")
    with pytest.raises(nearswap.NearswapError) as caught:
        nearswap.merge(paths[0], paths[1:], out=tmp_path / "lib", **{"t": None, **kwargs})
    assert str(caught.value) == said
    assert not (tmp_path / "cli").exists() and not (tmp_path / "lib").exists()


def test_a_recipe_with_fields_set_is_one_thing_for_both(make_quartet, tmp_path, run):
    """A saved recipe re-run with --dtype: the command line and nearswap.merge(recipe, dtype=...)
    write the same weights and say the same override."""
    paths, _ = make_quartet(n=1)
    assert run("merge", *paths, "-t", "1e-3", "--dtype", "bfloat16", "-o", tmp_path / "m", "-q").exit_code == 0
    recipe = nearswap.load_recipe(tmp_path / "m" / "nearswap_recipe.yaml")
    result = run("merge", tmp_path / "m" / "nearswap_recipe.yaml", "--dtype", "float32", "-o", tmp_path / "a", "-q")
    assert result.exit_code == 0
    with pytest.warns(nearswap.NearswapWarning) as said:
        nearswap.merge(recipe, dtype="float32", out=tmp_path / "b")
    cli_warning = [line.removeprefix("nearswap: warning: ") for line in result.stderr.splitlines()
                   if "overrides" in line]
    assert [str(w.message) for w in said if "overrides" in str(w.message)] == cli_warning
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_one_gguf_type_rule_for_a_merge_and_an_export(tmp_path, monkeypatch):
    """A 3-D tensor (a stack of expert matrices) in a merge into .gguf gets the requested type, as
    llama.cpp's quantizer gives it; export decides every tensor's type by the same function."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q

    from nearswap.formats import gguf_writer
    from test_gguf_merge import write_gguf

    rng = np.random.default_rng(0)
    arrays = {"token_embd.weight": rng.normal(0, 0.02, (40, 256)).astype(np.float32),
              "blk.0.ffn_up_exps.weight": rng.normal(0, 0.02, (4, 64, 256)).astype(np.float32),
              "blk.0.attn_norm.weight": np.ones(256, np.float32)}
    qtypes = {k: Q.F32 for k in arrays}
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.gguf")
        write_gguf(paths[-1], {k: v + (0.001 * i if v.ndim > 1 else 0) for k, v in arrays.items()}, qtypes)
    nearswap.merge(paths[0], [paths[1]], t=1e-3, out=tmp_path / "out.gguf", gguf_type="q8_0")
    written = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    assert written == {name: gguf_writer.tensor_type(a.shape, Q.Q8_0) for name, a in arrays.items()}
    assert written["blk.0.ffn_up_exps.weight"] == Q.Q8_0
    seen = []
    rule = gguf_writer.tensor_type
    monkeypatch.setattr(gguf_writer, "tensor_type", lambda shape, q: seen.append(tuple(shape)) or rule(shape, q))
    from nearswap.ship.gguf_export import export_gguf
    from test_trust import _llama_gguf

    source = _llama_gguf(tmp_path / "llama.gguf")
    export_gguf(source, tmp_path / "exported.gguf", "q8_0")
    exported = gguf.GGUFReader(str(tmp_path / "exported.gguf")).tensors
    assert len(seen) == len(exported)  # every tensor's type decided by the rule
    by_shape = {tuple(int(d) for d in reversed(t.shape)): t.tensor_type for t in exported}
    assert all(by_shape[s] == rule(s, Q.Q8_0) for s in seen)


@pytest.mark.parametrize("text", [
    "The cat sat on the mat. The cat sat on the mat again!",
    "Don’t stop — it's 42 o'clock; naïve café, the the the end",
    "Über straße 3rd_place x-ray e-mail",
])
def test_a_sweep_row_and_an_eval_report_score_a_text_alike(text):
    from nearswap.judge import sweep, writing

    vocabulary = {"the", "cat", "sat", "on", "mat", "don't", "stop", "it's", "end"}
    row = sweep.degeneration(text, vocabulary)
    report = writing.score([writing.Story("p", 0, text)], {}, vocabulary)
    assert row["distinct2"] == report["distinct2"] and row["nondict"] == report["nondict"]
    assert row["words"] == report["words"]


def test_every_sink_names_the_output_type_with_one_key(tmp_path):
    base = random_model(0, "f32")
    paths = [write_model(tmp_path / "base", base), write_model(tmp_path / "s1", random_model(1, "f32", like=base))]
    reports = [nearswap.merge(paths[0], [paths[1]], t=1e-3, out=tmp_path / "d"),
               nearswap.merge(paths[0], [paths[1]], t=1e-3, out="null:")]
    gguf = pytest.importorskip("gguf")
    from test_gguf_merge import family

    (g0, g1), _, _ = family(tmp_path, gguf.GGMLQuantizationType.Q8_0, n=1)
    reports.append(nearswap.merge(g0, [g1], t=1e-3, out=tmp_path / "g.gguf"))
    assert [r["output_type"] for r in reports] == ["as base", "as base", "like-base"]
    assert not any("output_dtype" in r for r in reports)
    assert json.loads((tmp_path / "d" / "merge_report.json").read_text())["output_type"] == "as base"
    assert sorted(reports[0]) == sorted(reports[1]) == sorted(reports[2])  # one builder: the same keys


def _calls(path: Path, attribute: str) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute]


def test_the_judge_has_one_loader_and_one_check_of_its_extras():
    """Every judge entry (eval, sweep, the demo's stories, the imatrix) loads through
    ``judge.models.load`` and checks its extras with ``judge.models.require``: no other module
    defines either, and no other judge module calls transformers' ``from_pretrained``."""
    assert [w for w in definitions("load") if w.startswith("judge/")] == ["judge/models.py"]
    assert definitions("require") == ["judge/models.py"]
    elsewhere = {str(p.relative_to(SRC)): _calls(p, "from_pretrained") for p in (SRC / "judge").glob("*.py")
                 if p.name != "models.py"}
    assert {k: v for k, v in elsewhere.items() if v} == {}
    assert _calls(SRC / "judge" / "models.py", "from_pretrained")  # (the check above looks at the right call)


@pytest.mark.parametrize("command", [["eval", "M1", "M2", "-o", "OUT"], ["sweep", "M1", "M2", "-o", "OUT"],
                                     ["imatrix", "M1", "--text", "TEXT", "-o", "OUT.gguf"]])
def test_a_missing_extra_is_one_line_naming_it_from_every_judge_entry(tmp_path, command):
    """With torch hidden (as on a machine without the extra), each command that needs it says
    which extra to install, in the same words, in one line and before any work."""
    import subprocess
    import sys

    model = tmp_path / "m"
    write_model(model, random_model(seed=0))
    (tmp_path / "text.txt").write_text("Some calibration text. " * 50)
    args = [{"M1": str(model), "M2": str(model), "OUT": str(tmp_path / "out"), "OUT.gguf": str(tmp_path / "o.gguf"),
             "TEXT": str(tmp_path / "text.txt")}.get(a, a) for a in command]
    code = ("import sys; sys.modules['torch'] = None; from nearswap.cli import main; "
            f"sys.argv = ['nearswap', *{args!r}]; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    extra = "judge" if command[0] == "eval" else "eval"
    assert lines[0] == (f"nearswap: error: this needs the {extra} extra (torch missing): "
                        f"pip install 'nearswap[{extra}]' (torch==2.13.0 is the CPU build)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.gguf").exists()

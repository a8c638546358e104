"""eval's llama.cpp backend: a GGUF scored as llama.cpp computes it, against the torch backend
(transformers on the HF twin of the same weights, an independent implementation), and its
one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from nearswap.core import llamacpp  # noqa: E402
from nearswap.core.errors import NearswapError  # noqa: E402

TOLERANCE = 0.1  # nats per request (what was measured on the quick preset: docs/judging.md)


@pytest.fixture(scope="module")
def smol_f32(smollm2, tmp_path_factory):
    """SmolLM2 as an HF directory (transformers) and as an F32 GGUF (llama.cpp): the same weights."""
    from nearswap.merging.convert import convert
    from nearswap.ship.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("smol_f32")
    convert(smollm2, root / "hf")
    export_gguf(root / "hf", root / "m.f32.gguf", "f32")
    return root


def test_llama_cpp_backend_scores_like_torch_on_the_same_weights(smol_f32, quick_data, tmp_path):
    from nearswap.judge import harness, tasks
    from nearswap.judge.run import per_request

    limit = 5
    selected = tasks.select("hellaswag:0,arc_easy:0,winogrande:0,lambada:0")  # quick but PIQA: each kind of request
    harness.write_configs(selected, tmp_path / "tasks", limit, cache=quick_data)
    torch_ll, torch_res = per_request(smol_f32 / "hf", "torch", selected, tmp_path / "tasks", limit)
    llama_ll, llama_res = per_request(smol_f32 / "m.f32.gguf", "llama.cpp", selected, tmp_path / "tasks", limit)
    assert set(torch_ll) == set(llama_ll) and len(torch_ll) >= 50
    deltas = np.array([abs(torch_ll[k][0] - llama_ll[k][0]) for k in torch_ll])
    assert deltas.max() <= TOLERANCE, deltas.max()
    assert 0 < np.median(deltas) < TOLERANCE / 10  # the same weights, other arithmetic: close, not bit-equal
    for name, res in torch_res.items():
        assert llama_res[name].n == res.n == limit
        # a decision can flip only where the torch backend's own margin is under twice the tolerance
        close = _near_ties(torch_ll, 2 * TOLERANCE)
        flipped = [k for k in res.items if res.items[k] != llama_res[name].items[k]]
        assert len(flipped) <= close, (name, flipped)


def _near_ties(ll, within):
    """Requests sharing a context or a continuation whose log-likelihoods are within ``within``
    of each other: an upper bound on the decisions arithmetic can flip."""
    by = {}
    for (context, continuation), (score, _) in ll.items():
        by.setdefault(("c", context), []).append(score)
        by.setdefault(("x", continuation), []).append(score)
    return sum(1 for scores in by.values() if len(scores) > 1 and
               min(abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1:]) < within)


def test_eval_of_ggufs_runs_llama_cpp_by_default(smollm2, quick_data, tmp_path, run):
    """`nearswap eval a.gguf b.gguf`: llama.cpp runs both (recorded per model), drift from
    llama.cpp's logits (a model against itself: KL 0, top-1 1.0)."""
    import json

    from nearswap.judge.quick import fixed_text

    (tmp_path / "text.txt").write_text(fixed_text()[:1500])  # (the tasks are test_llama_cpp_backend_scores_...'s)
    result = run("eval", smollm2, smollm2, "--tasks", "none", "--no-writing", "--drift-text", tmp_path / "text.txt",
                 "-o", tmp_path / "r", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [m["backend"] for m in report["models"]] == ["llama.cpp", "llama.cpp"]
    drift = report["drift"][1]
    assert drift["kl_mean"] == 0.0 and drift["top1_agreement"] == 1.0 and drift["tokens"] > 250
    assert drift["perplexity"] == drift["reference_perplexity"] < 100
    tensors = gguf.GGUFReader(str(smollm2)).tensors  # gguf's own count: the tensors' bytes over their elements
    want = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    assert report["models"][0]["bits_per_weight"] == pytest.approx(want, abs=1e-3)
    size = f"{smollm2.stat().st_size / 2**20:,.1f} MiB"
    assert f"| llama.cpp | {size} | {want:.2f} |" in (tmp_path / "r" / "report.md").read_text()
    assert f"<td>llama.cpp</td><td>{size}</td><td>{want:.2f}</td>" in (tmp_path / "r" / "report.html").read_text()


def test_llama_cpp_stories_are_seeded(smollm2):
    """Stories from llama.cpp's logits: the same seed gives the same text, another seed another."""
    from nearswap.judge import writing
    from nearswap.runtime.llama_model import LlamaModel

    with LlamaModel(smollm2, n_ctx=256) as m:
        one = writing.generate(m, m, prompts=writing.PROMPTS[:1], seeds=(0, 0, 1), new_tokens=24)
    assert one[0].text == one[1].text and one[0].text != one[2].text and one[0].text.strip()


def test_auto_compares_like_for_like(smollm2, tiny_llm):
    """auto: llama.cpp only when every model is a GGUF, else torch for all (the same arithmetic
    on both sides of a comparison); per-file: each GGUF in llama.cpp, the rest in torch."""
    from nearswap.judge import models

    assert [c.backend for c in models.check([smollm2, smollm2], backend="auto")] == ["llama.cpp", "llama.cpp"]
    assert [c.backend for c in models.check([tiny_llm / "base", smollm2], backend="auto")] == ["torch", "torch"]
    assert [c.backend for c in models.check([tiny_llm / "base", smollm2], backend="per-file")] == ["torch", "llama.cpp"]
    with pytest.raises(NearswapError, match="runs GGUF files.*--backend per-file"):
        models.check([tiny_llm / "base", smollm2], backend="llama.cpp")


def test_refusals_are_one_line(smollm2, tmp_path, run, monkeypatch):
    from nearswap.judge.llama_lm import make_llama_lm
    from nearswap.runtime.llama_model import LlamaModel

    # a task longer than the context llama.cpp runs the model with
    with LlamaModel(smollm2, n_ctx=64) as m:  # (llama.cpp rounds a context up: 256 here)
        lm = make_llama_lm(m)
        n = m.n_ctx + 10
        with pytest.raises(NearswapError, match=f"a request of {n} tokens is longer than the context of {m.n_ctx}"):
            lm._loglikelihood_tokens([(None, list(range(10, 10 + n)), [5])])
        assert lm._loglikelihood_tokens([(None, list(range(10, 10 + m.n_ctx)), [5])])[0][0] < 0  # the longest that fits
    # a GGUF llama.cpp cannot load: llama.cpp's reason in the line (a tensor taken out)
    reader = gguf.GGUFReader(str(smollm2))
    writer = gguf.GGUFWriter(str(tmp_path / "broken.gguf"), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", "general.architecture")):
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name != "blk.0.ffn_up.weight":
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(NearswapError, match=r"llama.cpp cannot load it \(.*blk\.0\.ffn_up"):
        LlamaModel(tmp_path / "broken.gguf")
    # the backend not installed: one line naming the extra
    monkeypatch.setattr(llamacpp, "library", lambda: None)
    result = run("eval", smollm2, "--tasks", "none", "--no-writing", "-o", tmp_path / "r")
    assert result.exit_code == 1 and "nearswap[llama]" in result.stderr and "--backend torch" in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_which_quant_to_ship(tiny_llm, quick_data, tmp_path, run, monkeypatch):
    """eval FLOAT QUANT... --against BASE_QUANT...: each quant of a model with its size, bits per
    weight and drift from the float reference, and its task scores paired item by item with
    the base's same quant; a pair of different quants, or a count that does not match, is one
    line before any work."""
    import json
    import shutil

    from nearswap.demo import synthetic
    from nearswap.ship.gguf_export import export_gguf

    monkeypatch.setenv("NEARSWAP_CACHE", str(quick_data))
    merged = run("merge", tiny_llm / "base", tiny_llm / "s1", "-t", "1e-2", "-o", tmp_path / "s1")
    assert merged.exit_code == 0, merged.output
    files = {}
    for model, source in (("base", tiny_llm / "base"), ("s1", tmp_path / "s1")):
        for kind in ("f32", "q8_0", "q4_0")[model == "base":]:
            files[model, kind] = tmp_path / f"{model}.{kind}.gguf"
            export_gguf(source, files[model, kind], kind)
    common = ["--tasks", "arc_easy,piqa", "--limit", "6", "--no-writing", "-q"]
    refused = run("eval", files["s1", "f32"], files["s1", "q8_0"], files["s1", "q4_0"], "--against", files["base", "q4_0"],
                  "--against", files["base", "q8_0"], *common, "-o", tmp_path / "bad")
    assert refused.exit_code == 1 and "(Q8_0) is paired with" in refused.stderr and "(Q4_0)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    other = tmp_path / "other"  # a model of another shape (three layers), with the same vocabulary
    synthetic.make_base(other, synthetic.LlamaShape(64, 3, 128, 49152, 4, 2), "float32", seed=5)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llm / "base" / name, other / name)
    export_gguf(other, tmp_path / "other.q8_0.gguf", "q8_0")
    stranger = run("eval", files["s1", "f32"], files["s1", "q8_0"], "--against", tmp_path / "other.q8_0.gguf",
                   *common, "-o", tmp_path / "bad")
    assert stranger.exit_code == 1 and "a model of other tensors" in stranger.stderr, stranger.output
    assert "blk.2" in stranger.stderr or "layers.2" in stranger.stderr  # (the layer only the other model has)
    assert len(stranger.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    short = run("eval", files["s1", "f32"], files["s1", "q8_0"], "--against", files["base", "q8_0"], "--against",
                files["base", "q4_0"], *common, "-o", tmp_path / "bad")
    assert short.exit_code == 1 and "1 model(s) to pair, 2 given" in short.stderr

    result = run("eval", files["s1", "f32"], files["s1", "q8_0"], files["s1", "q4_0"], "--against", files["base", "q8_0"],
                 "--against", files["base", "q4_0"], *common, "-o", tmp_path / "r")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["s1.f32.gguf", "s1.q8_0.gguf", "s1.q4_0.gguf"]
    assert [m["name"] for m in report["against"]] == ["base.q8_0.gguf", "base.q4_0.gguf"]
    drift = {d["model"]: d for d in report["drift"]}
    assert set(drift) == {m["name"] for m in report["models"]}  # the --against models: tasks only
    rows = report["quants"]
    assert [(r["model"], r["against"], r["quant"], r["against_quant"]) for r in rows] == [
        ("s1.q8_0.gguf", "base.q8_0.gguf", "Q8_0", "Q8_0"), ("s1.q4_0.gguf", "base.q4_0.gguf", "Q4_0", "Q4_0")]
    for r in rows:
        path = tmp_path / r["model"]
        tensors = gguf.GGUFReader(str(path)).tensors  # size and bits per weight by gguf's own reader
        assert r["bytes"] == path.stat().st_size
        assert r["bits_per_weight"] == pytest.approx(8 * sum(int(t.n_bytes) for t in tensors)
                                                     / sum(int(t.n_elements) for t in tensors), abs=1e-3)
        assert r["kl_mean"] == drift[r["model"]]["kl_mean"] > 0
        assert r["top1_agreement"] == drift[r["model"]]["top1_agreement"]
        per_task = []
        for t, entry in zip(r["tasks"], report["tasks"]):
            mine, theirs = entry["items"][r["model"]], entry["items"][r["against"]]
            assert mine.keys() == theirs.keys() and len(mine) == 6
            d = np.array([mine[k] - theirs[k] for k in mine])  # the difference, computed here
            per_task.append(d)
            assert t["diff"] == pytest.approx(d.mean()) and t["low"] <= t["diff"] <= t["high"]
            assert t["against"] == pytest.approx(np.mean(list(theirs.values())))
            assert t["verdict"] == ("better" if t["low"] > 0 else "worse" if t["high"] < 0 else "no detectable difference")
        assert r["average"]["diff"] == pytest.approx(np.mean([d.mean() for d in per_task]))
    assert rows[0]["kl_mean"] < rows[1]["kl_mean"]  # Q8_0 is nearer the float model than Q4_0
    from nearswap.core.markup import md

    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Which quant to ship" in text and f"| {md('s1.q4_0.gguf')} | {md('base.q4_0.gguf')} | {md('Q4_0')} |" in text
    assert "dequantized" not in text  # (llama.cpp ran the quants' own blocks)
    assert "<h2>Which quant to ship</h2>" in (tmp_path / "r" / "report.html").read_text()

    # the merge's card: each quant's row with the figures of the eval that measured that file
    card = run("card", tmp_path / "s1", "--quants", files["s1", "q4_0"], "--quants", files["s1", "q8_0"],
               "--quant-eval", tmp_path / "r")
    assert card.exit_code == 0, card.output
    text = (tmp_path / "s1" / "README.md").read_text()
    for r in rows:
        d = r["average"]
        cell = f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}] {d['verdict']}"
        line = next(x for x in text.splitlines() if x.startswith(f"| {md(r['model'])} |"))
        assert f"| {r['kl_mean']:.4g} | {100 * r['top1_agreement']:.2f}% | {md(r['against'])} | {cell} |" in line, line
    assert "KL to s1.f32.gguf" in text and "Quality was not evaluated" not in text
    other = run("card", tmp_path / "s1", "--quants", files["base", "q8_0"], "--quant-eval", tmp_path / "r")
    assert other.exit_code == 1 and "evaluates none of the --quants files" in other.stderr

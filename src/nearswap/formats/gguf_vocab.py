"""A GGUF's vocabulary as HF tokenizer files, built with the ``tokenizers`` package alone.

Converting or merging from a GGUF must give a directory that transformers loads with the same
tokenizer the GGUF describes — without transformers (and torch) installed. Both vocabulary
types merge authors meet are built exactly as transformers' own GGUF conversion builds them
(the tests compare token ids):

- byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM, Llama 3, Qwen 2/3, ...): the
  vocabulary (tokens spelled in the byte alphabet, others re-spelled byte by byte), the file's
  merges, a byte-level pre-tokenizer (or the split regex of the file's ``tokenizer.ggml.pre``);
- SentencePiece-style BPE (``"llama"``: Llama 1/2, Mistral, Gemma): byte fallback, merges
  recovered from the vocabulary ranked by the token scores (Gemma: by file order, and runs of
  spaces spelled with "▁"), Llama's Metaspace pre-tokenizer or Gemma's space normalizer;

control tokens become special tokens, user-defined ones added tokens, and BOS/EOS are added
as the file's ``add_bos_token``/``add_eos_token`` say. Other types (t5's unigram, ...) are left
to transformers when it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import NearswapError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# tokenizer.ggml.pre -> the regex its merges were learned with (as transformers' GGUF conversion
# maps them); a pre-tokenizer not listed splits as GPT-2 does.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "falcon3": _LLAMA3, "dbrx": _LLAMA3,
          "smaug-bpe": _LLAMA3, "pixtral": _LLAMA3, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2, "megrez": _QWEN2}
SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
           "pad_token": "padding_token_id"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def supported(metadata: dict[str, Any]) -> bool:
    return metadata.get("tokenizer.ggml.model") in ("gpt2", "llama")


def generate_merges(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a token into two
    tokens, best-ranked token first (ties: shorter left piece, then shorter right piece) —
    the rule transformers' ``generate_merges`` applies."""
    found = []
    for token, rank in ranks.items():
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _special_config(metadata: dict[str, Any], tokens: list[str], add_bos_default: bool) -> dict[str, Any]:
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000}
    for name, key in SPECIAL.items():
        index = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(tokens):
            config[name] = tokens[index]
    for key, default in (("add_bos_token", add_bos_default), ("add_eos_token", False)):
        value = metadata.get(f"tokenizer.ggml.{key}")
        config[key] = value if isinstance(value, bool) else default
    return config


def _post_processor(config: dict[str, Any], vocab: dict[str, int]) -> Any:
    """BOS/EOS added as the config says (transformers' ``update_post_processor`` rule)."""
    from tokenizers import processors

    bos = config.get("bos_token") if config.get("add_bos_token") else None
    eos = config.get("eos_token") if config.get("add_eos_token") else None
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, vocab[t]) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def build_sentencepiece(metadata: dict[str, Any], arrays: dict[str, list[Any]]) -> tuple[str, dict[str, Any], str | None]:
    """(tokenizer.json text, tokenizer_config.json data, chat template or None) for a
    SentencePiece-style vocabulary (``tokenizer.ggml.model == "llama"``)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    tokens = list(arrays.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise NearswapError("the GGUF has no tokenizer.ggml.tokens")
    types = arrays.get("tokenizer.ggml.token_type") or []
    gemma = str(metadata.get("general.architecture", "")).startswith("gemma")
    if gemma:  # runs of spaces are stored as spaces; the tokenizer spells them "▁"
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if gemma:  # Gemma's scores do not follow its merge order; the file order does
        ranks: dict[str, float] = {t: float(-i) for i, t in enumerate(tokens)}
    else:
        scores = arrays.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise NearswapError("the GGUF's SentencePiece vocabulary has no scores for its tokens")
        ranks = dict(zip(tokens, scores))
    merges = generate_merges(vocab, ranks)
    config = _special_config(metadata, tokens, add_bos_default=True)
    unk = config.get("unk_token")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                               **({"unk_token": unk} if gemma and unk else {})))
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    tok.post_processor = _post_processor(config, vocab)
    template = metadata.get("tokenizer.chat_template")
    return tok.to_str(), config, template if isinstance(template, str) else None


def build(metadata: dict[str, Any], arrays: dict[str, list[Any]]) -> tuple[str, dict[str, Any], str | None]:
    """(tokenizer.json text, tokenizer_config.json data, chat template or None) for a byte-level
    BPE vocabulary; ``metadata`` and ``arrays`` as ``gguf_header.read_header`` gives them."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    tokens = arrays.get("tokenizer.ggml.tokens")
    if not tokens:
        raise NearswapError("the GGUF has no tokenizer.ggml.tokens")
    types = arrays.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in arrays.get("tokenizer.ggml.merges") or []]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = SPLITS.get(str(metadata.get("tokenizer.ggml.pre")))
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                         if split else pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == CONTROL and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    if user:
        tok.add_tokens(user)
    config = {k: v for k, v in _special_config(metadata, tokens, add_bos_default=False).items()
              if not k.startswith("add_") or isinstance(metadata.get(f"tokenizer.ggml.{k}"), bool)}
    template = metadata.get("tokenizer.chat_template")
    return tok.to_str(), config, template if isinstance(template, str) else None


FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def write(path: Path, dest: Path) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja) for the GGUF at
    ``path`` into ``dest``; returns what was written. The files are built once per version of
    the file (its path, size and modification time) and kept in the cache: reading a large
    vocabulary and building its tokenizer costs more than the rest of a small merge, so a merge
    from the same base pays it once.
    Raises NearswapError for a vocabulary type this module does not build."""
    import hashlib
    import os
    import shutil
    import tempfile

    from .._version import __version__
    from ..core.paths import cache_dir

    st = path.stat()
    key = hashlib.sha256(f"{__version__}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = cache_dir() / "tokenizers" / key
    if not (cached / "tokenizer.json").is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{key}."))
        try:
            _build_into(path, tmp)
            os.replace(tmp, cached)
        except OSError:  # another run cached it first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    written = []
    for name in FILES:
        if (cached / name).is_file():
            shutil.copyfile(cached / name, dest / name)
            written.append(f"{name} (from GGUF {'metadata' if name.startswith('chat') else 'vocabulary'})")
    return written


def _build_into(path: Path, dest: Path) -> None:
    from .gguf_header import HeaderError, read_header

    try:
        header = read_header(path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                                           "tokenizer.ggml.scores"))
    except (HeaderError, OSError) as e:
        raise NearswapError(f"{path}: not a readable GGUF file: {e}") from None
    if not supported(header.metadata):
        raise NearswapError(f"{path}: vocabulary type {header.metadata.get('tokenizer.ggml.model')!r} is built by "
                            "transformers (install the judge extra), not by nearswap yet")
    kind = header.metadata.get("tokenizer.ggml.model")
    text, config, template = (build if kind == "gpt2" else build_sentencepiece)(header.metadata, header.arrays)
    (dest / "tokenizer.json").write_text(text)
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if template:
        (dest / "chat_template.jinja").write_text(template)

"""GGUF input: llama.cpp checkpoints presented under HF names, in HF layouts, as float32.

The header is read with the ``gguf`` package (imported only when a GGUF file is opened);
tensor rows are fetched with positional reads and dequantized chunk by chunk with
``gguf.quants.dequantize``, which knows every common type (K-quants and i-quants included),
so memory stays bounded. llama.cpp stores each attention head's Q and K rows permuted for
its RoPE; those rows are put back in HF order here, a whole head at a time. Architecture
facts (names, which tensors are permuted, the HF config) live in the ``ARCHITECTURES`` table.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gguf import GGML_QUANT_SIZES

from ..dtypes import BY_NAME
from ..errors import NearswapError, shown
from .safetensors import TensorInfo, pread_exact

# ---------------------------------------------------------------- architecture tables


@dataclass(frozen=True)
class Arch:
    """How one GGUF architecture maps onto its HF counterpart."""

    hf_architecture: str
    names: dict[str, str]  # GGUF name pattern -> HF name pattern ({bid}: block number)
    permuted: dict[str, str]  # GGUF tensor (without blk.N.) -> metadata key holding its head count
    ignored: tuple[str, ...]  # GGUF tensors with no HF counterpart (recomputed by HF code)
    config: Callable[[dict[str, Any], dict[str, TensorInfo]], dict[str, Any]]

    @cached_property
    def to_hf(self) -> list[tuple[re.Pattern[str], str]]:  # compiled once per architecture
        return [(_pattern(g), h) for g, h in self.names.items()]

    @cached_property
    def to_gguf(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_pattern(h), g) for g, h in self.names.items()]


LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.attn_q.weight": "model.layers.{bid}.self_attn.q_proj.weight",
    "blk.{bid}.attn_k.weight": "model.layers.{bid}.self_attn.k_proj.weight",
    "blk.{bid}.attn_v.weight": "model.layers.{bid}.self_attn.v_proj.weight",
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj.weight",
    "blk.{bid}.ffn_up.weight": "model.layers.{bid}.mlp.up_proj.weight",
    "blk.{bid}.ffn_down.weight": "model.layers.{bid}.mlp.down_proj.weight",
}


def meta_number(meta: dict[str, Any], key: str, default: Any = None, kind: type = int) -> Any:
    """A metadata value the reader relies on, of the right type (an integer, or a float where
    ``kind`` is float), or ``default`` when absent; anything else is refused by name."""
    if key not in meta:
        return default
    value = meta[key]
    ok = (type(value) is int) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise MetadataError(f"metadata {key} is {shown(value)}, not {'an integer' if kind is int else 'a number'}")
    return value


class MetadataError(ValueError):
    """A GGUF metadata value the reader needs is missing or wrong; the caller names the file."""


def _llama_config(meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    a = "llama."
    if "model.embed_tokens.weight" not in tensors:
        raise MetadataError("it has no token_embd.weight (the token embeddings), so it is not a complete llama model")
    embed = tensors["model.embed_tokens.weight"].shape
    if len(embed) != 2:
        raise MetadataError(f"token_embd.weight has shape {list(embed)}; a 2-D matrix is expected")
    num = functools.partial(meta_number, meta)
    heads = num(a + "attention.head_count")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": num(a + "embedding_length", embed[1]),
        "intermediate_size": num(a + "feed_forward_length"),
        "num_hidden_layers": num(a + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": num(a + "attention.head_count_kv", heads),
        "max_position_embeddings": num(a + "context_length", 2048),
        "rms_norm_eps": num(a + "attention.layer_norm_rms_epsilon", 1e-5, float),
        "rope_theta": num(a + "rope.freq_base", 10000.0, float),
        "vocab_size": embed[0],
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = num(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key] = value
    return {k: v for k, v in config.items() if v is not None}


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(
        hf_architecture="LlamaForCausalLM",
        names=LLAMA_NAMES,
        permuted={"attn_q.weight": "llama.attention.head_count", "attn_k.weight": "llama.attention.head_count_kv"},
        ignored=("rope_freqs.weight",),
        config=_llama_config,
    ),
}


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{bid}"), r"(?P<bid>\d+)") + "$")


def _rename(table: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.format(**m.groupdict())
    return None


def hf_name(arch: Arch, name: str) -> str | None:
    """The HF name of GGUF tensor ``name`` (``blk.3.attn_q.weight`` -> ``model.layers.3...``)."""
    return _rename(arch.to_hf, name)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class GGUFSource:
    """Where a GGUF tensor's blocks are, and how to turn them into HF float32 elements."""

    qtype: Any  # gguf.GGMLQuantizationType
    block: int  # elements per quantization block (1 for plain types)
    type_size: int  # bytes per block
    row_len: int  # elements per row (GGML ne0, the HF last dimension)
    heads: int | None  # rows come permuted in this many heads (llama Q/K), or None

    def read(self, fd: int, info: TensorInfo, start: int, out: Any) -> Any:
        """Fill ``out`` (float32 array, or a byte buffer) with HF-layout elements from ``start`` on.
        Reads only the blocks that hold them (whole heads for permuted Q/K rows)."""
        target = out if hasattr(out, "dtype") else np.frombuffer(out, np.float32)
        n = len(target)
        if n == 0:
            return out
        if self.heads:  # a permuted head's rows are spread over the head: read whole heads
            rows = info.numel // self.row_len
            per_head = rows // self.heads
            r0, r1 = start // self.row_len, -(-(start + n) // self.row_len)
            r0, r1 = r0 // per_head * per_head, -(-r1 // per_head) * per_head
            e0, e1 = r0 * self.row_len, r1 * self.row_len
        else:  # any run of elements: the blocks that hold it (rows are whole blocks)
            e0, e1 = start // self.block * self.block, -(-(start + n) // self.block) * self.block
        nblocks = (e1 - e0) // self.block
        raw = bytearray(nblocks * self.type_size)
        pread_exact(fd, memoryview(raw), info.offset + e0 // self.block * self.type_size, info)
        blocks = np.frombuffer(raw, np.uint8).reshape(nblocks, self.type_size)
        if not self.heads and e0 == start and e1 - e0 == n:  # whole blocks: straight into the caller's buffer
            dequantize(blocks, self.qtype, out=target)
            return out
        block = dequantize(blocks, self.qtype).reshape(-1)
        if self.heads:
            per_head = info.numel // self.row_len // self.heads
            block = block.reshape(-1, per_head // 2, 2, self.row_len).swapaxes(1, 2).reshape(-1)
        first = start - e0
        target[:] = block[first:first + n]
        return out



try:  # the compiled dequantizer; gguf's numpy code computes the same bits, slower (README)
    from .. import _dequant
except ImportError:  # pragma: no cover - depends on the build
    _dequant = None


@functools.lru_cache(maxsize=1)
def _half_table() -> np.ndarray:
    """Every float16 bit pattern as numpy converts it to float32 on this machine (NaN payloads
    and subnormals included): the C dequantizer looks its scales up here."""
    return np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


def dequantize(raw: np.ndarray, qtype: Any, out: np.ndarray | None = None) -> np.ndarray:
    """Blocks of ``qtype`` (a uint8 array of whole blocks, rows of them or flat) as float32,
    bit-identical to ``gguf.quants.dequantize``: the C kernel for the common types (GIL
    released), gguf's own code for the rest. ``out``: a flat float32 array to fill instead."""
    block, size = GGML_QUANT_SIZES[qtype]
    shape = (*raw.shape[:-1], raw.shape[-1] // size * block)
    if _dequant is not None and int(qtype) in DEQUANT_TYPES:
        dest = np.empty(raw.size // size * block, np.float32) if out is None else out
        _dequant.dequantize(int(qtype), np.ascontiguousarray(raw).reshape(-1), dest, _half_table())
        return dest.reshape(shape)
    if qtype.name == "F32":
        values = raw.view(np.float32)
    else:
        from gguf import quants

        values = quants.dequantize(raw, qtype).astype(np.float32, copy=False)
    if out is not None:
        out[:] = values.reshape(-1)
        return out.reshape(shape)
    return values


DEQUANT_TYPES = frozenset(_dequant.types()) if _dequant is not None else frozenset()


def _head_count(meta: dict[str, Any], key: str, name: str, rows: int) -> int:
    """The head count that un-permutes ``name``'s rows: a positive integer dividing them into
    heads of whole row pairs (llama.cpp's permutation swaps the two halves of each head)."""
    heads = meta_number(meta, key)
    if heads is None:
        raise MetadataError(f"metadata {key} is missing (needed to put {name}'s rows back in HF order)")
    if heads <= 0 or rows % heads or (rows // heads) % 2:
        raise MetadataError(f"metadata {key} is {heads}, which does not split {name}'s {rows} rows into heads "
                            "of whole row pairs")
    return heads


def open_gguf(path: Path, label: str) -> tuple[str, dict[str, TensorInfo], dict[str, Any], dict[str, Any]]:
    """Read a GGUF header. Returns (format description, HF-named tensors, HF config, metadata)."""
    from .gguf_header import HeaderError, read_header

    try:
        header = read_header(path)  # scalars and tensor infos; the vocabulary arrays are skipped
    except (HeaderError, OSError) as e:
        raise NearswapError(f"{label}: {path}: not a readable GGUF file: {e}; re-download it") from None
    meta = header.metadata
    arch_name = meta.get("general.architecture", "?")
    arch = ARCHITECTURES.get(arch_name) if isinstance(arch_name, str) else None
    if arch is None:
        raise NearswapError(f"{label}: {path}: GGUF architecture {shown(arch_name)} is not supported yet "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    f32 = BY_NAME["F32"]
    tensors: dict[str, TensorInfo] = {}
    qtypes: dict[str, int] = {}
    try:
        for t in sorted(header.tensors, key=lambda t: t.data_offset):
            if t.name in arch.ignored:
                continue
            name = hf_name(arch, t.name)
            if name is None:
                raise MetadataError(f"GGUF tensor {shown(t.name)} has no HF name in the {arch_name} table; "
                                    "this variant is not supported yet")
            shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists dimensions innermost first
            row_len = shape[-1] if shape else 1
            short = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
            heads = None
            if short in arch.permuted:
                if len(shape) != 2:
                    raise MetadataError(f"{t.name} has shape {list(shape)}; a 2-D matrix is expected")
                heads = _head_count(meta, arch.permuted[short], t.name, shape[0])
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            source = GGUFSource(t.tensor_type, block, type_size, row_len, heads)
            tensors[name] = TensorInfo(name, f32, shape, path, int(t.data_offset), source)
            qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1
        config = arch.config(meta, tensors)
    except MetadataError as e:
        raise NearswapError(f"{label}: {path}: {e}; the file is corrupt or of a variant nearswap does not read") from None
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(qtypes.items(), key=lambda kv: -kv[1]))
    return f"GGUF ({arch_name}; {kinds}; dequantized to F32)", tensors, config, meta


def write_side_files(path: Path, config: dict[str, Any], dest: Path, skip_tokenizer: bool = False,
                     vocabulary: str | None = None) -> list[str]:
    """config.json and generation_config.json from the GGUF metadata; tokenizer files from its
    vocabulary (``vocabulary``: its tokenizer.ggml.model): built by nearswap for byte-level
    BPE vocabularies, by transformers (when installed) for the others. Returns what was written."""
    import json

    written = ["config.json (from GGUF metadata)"]
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    if generation:
        (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        written.append("generation_config.json (from GGUF metadata)")
    if skip_tokenizer:
        return written
    from . import gguf_vocab

    if vocabulary == "gpt2":  # byte-level BPE: built here, no transformers needed
        return written + gguf_vocab.write(path, dest)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return written + ["no tokenizer: this vocabulary type needs transformers (the judge extra) to be built"]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers may not know this vocabulary type
        return written + [f"no tokenizer: transformers could not build it ({type(e).__name__}: {e})"]
    saved = tokenizer.save_pretrained(str(dest))
    return written + [f"{Path(f).name} (from GGUF vocabulary)" for f in saved]


# ---------------------------------------------------------------- writing (export)

# --type -> (GGML type of 2-D weights, GGUF file type). Norms and other 1-D tensors stay F32.
EXPORT_TYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
# --type -> llama.cpp file type, for the quantizers only llama.cpp has (K-quants, i-quants that
# need no importance matrix); used through llama-cpp-python when that optional extra is installed.
LLAMA_CPP_TYPES = {
    "q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K", "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS",
}
# HF architectures exported as a GGUF architecture of ARCHITECTURES.
HF_TO_GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}


def gguf_name(arch: Arch, name: str) -> str | None:
    """The GGUF name of HF tensor ``name`` (the inverse of ``hf_name``)."""
    return _rename(arch.to_gguf, name)


REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _export_config(model: Any) -> dict[str, Any]:
    """The config.json values the GGUF metadata needs, checked: positive integers for the
    shapes, numbers for the rest; vocab_size from the embeddings when config.json omits it."""
    config = model.config or {}
    where = str(model.path)
    out: dict[str, Any] = {}
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise NearswapError(f"{where}: config.json has no {key}, which the GGUF metadata needs; add it")
    embed = model.tensors.get("model.embed_tokens.weight")
    defaults = {"num_key_value_heads": config["num_attention_heads"], "max_position_embeddings": 2048,
                "vocab_size": embed.shape[0] if embed is not None else None, "head_dim": None}
    for key in (*REQUIRED_CONFIG, "num_key_value_heads", "max_position_embeddings", "vocab_size", "head_dim"):
        value = config.get(key, defaults.get(key))
        if value is None and key == "head_dim":
            continue
        if type(value) is not int or value <= 0:
            raise NearswapError(f"{where}: config.json {key} is {shown(value)}; a positive integer is needed")
        out[key] = value
    for key, default in (("rope_theta", 10000.0), ("rms_norm_eps", 1e-5)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NearswapError(f"{where}: config.json {key} is {shown(value)}; a number is needed")
        out[key] = float(value)
    if out["hidden_size"] % out["num_attention_heads"] and "head_dim" not in out:
        raise NearswapError(f"{where}: config.json hidden_size {out['hidden_size']} is not a multiple of "
                            f"num_attention_heads {out['num_attention_heads']}; give head_dim")
    return out


def _llama_metadata(w: Any, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])


def _gguf_vocab(source: Path) -> Callable[[Any], None]:
    """Every tokenizer.* field of another GGUF, as it is, read now (with nearswap's bounded
    header reader: a file declaring a billion tokens is refused, not allocated) and returned
    as a function that adds them to a writer."""
    from .gguf_header import HeaderError, read_header

    try:
        header = read_header(source, arrays=("tokenizer.",))
    except (HeaderError, OSError) as e:
        raise NearswapError(f"vocabulary source {source}: not a readable GGUF file: {e}") from None

    def add(w: Any) -> None:
        for key, (vtype, item) in header.types.items():
            if key.startswith("tokenizer."):
                value = header.arrays[key] if key in header.arrays else header.metadata[key]
                w.add_key_value(key, value, vtype, item)

    return add


def _hf_vocab(directory: Path) -> Callable[[Any], None]:
    """A BPE vocabulary from tokenizer.json (gguf.vocab): tokens, types, merges, special ids;
    read now, added to a writer by the function returned."""
    from gguf.vocab import BpeVocab, SpecialVocab

    from ..files import read_json_object

    read_json_object(directory / "tokenizer.json", "vocabulary")  # bounded: a regular file of sane JSON
    try:
        vocab = BpeVocab(directory)
        tokens, types = [], []
        for text, _score, toktype in vocab.all_tokens():
            tokens.append(text)
            types.append(toktype)
        special = SpecialVocab(directory, load_merges=True, n_vocab=len(tokens))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise NearswapError(f"{directory / 'tokenizer.json'}: cannot build a GGUF vocabulary from it "
                            f"({type(e).__name__}: {shown(str(e), 120)}); pass --vocab-from MODEL.gguf") from None

    def add(w: Any) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        special.add_to_gguf(w)

    return add


def _vocab_source(model: Any, vocab_from: Path | None) -> tuple[str, Path]:
    """Where the exported file's vocabulary comes from (see ``export_gguf``)."""
    from ..files import parse_json

    if vocab_from is not None:
        return "gguf", Path(vocab_from)
    if model.path.suffix.lower() == ".gguf":
        return "gguf", model.path
    origin = model.metadata.get("nearswap_converted_from")
    if origin is None and model.metadata.get("nearswap_recipe"):
        recipe = parse_json(model.metadata["nearswap_recipe"], f"{model.path}: its nearswap_recipe metadata")
        if not isinstance(recipe, dict):
            raise NearswapError(f"{model.path}: its nearswap_recipe metadata is not a recipe; pass --vocab-from")
        origin = recipe.get("base")
    if isinstance(origin, str) and origin.lower().endswith(".gguf") and Path(origin).is_file():
        return "gguf", Path(origin)
    if model.directory is not None and (model.directory / "tokenizer.json").is_file():
        return "hf", model.directory
    raise NearswapError(f"{model.path}: no vocabulary to put in the GGUF (no tokenizer.json, no GGUF origin); "
                        "pass --vocab-from MODEL.gguf")


def export_gguf(source: str | Path, out: str | Path, type_name: str = "q8_0", *, vocab_from: str | Path | None = None,
                force: bool = False, progress: Callable[[int], None] | None = None,
                on_start: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Write a llama-family model (HF dir, safetensors or GGUF) as a GGUF file of ``type_name``.

    2-D weights become ``type_name`` (quantized with gguf.quants; F16 where a row does not
    fit the quant block), 1-D tensors (norms) stay F32, Q/K rows get llama.cpp's RoPE
    permutation. The vocabulary comes from ``vocab_from`` (a GGUF), else the source itself
    if it is a GGUF, else the GGUF the source was merged or converted from (recorded in its
    metadata), else its tokenizer.json (BPE). Written into a hidden sibling of ``out`` (one
    run per ``out`` at a time) and renamed when complete; ``force`` replaces a GGUF file.
    """
    from ..output import atomic_file

    out = Path(out)
    if type_name not in EXPORT_TYPES and type_name not in LLAMA_CPP_TYPES:
        raise NearswapError(f"unknown GGUF type {type_name!r}; nearswap writes {', '.join(EXPORT_TYPES)}, "
                            f"and with llama-cpp-python installed {', '.join(LLAMA_CPP_TYPES)}")
    llama_cpp = _llama_cpp(type_name) if type_name in LLAMA_CPP_TYPES else None
    with atomic_file(out, force) as part:
        if llama_cpp is None:
            result = _write_gguf(source, out, part, type_name, vocab_from, progress, on_start)
        else:
            f32 = part.with_name(part.name + ".f32")
            try:
                result = _write_gguf(source, out, f32, "f32", vocab_from, progress, on_start)
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_TYPES[type_name]}")
                params.nthread = os.cpu_count() or 1
                if llama_cpp.llama_model_quantize(str(f32).encode(), str(part).encode(), params) != 0:
                    raise NearswapError(f"llama.cpp could not quantize {source} to {type_name}")
            finally:
                f32.unlink(missing_ok=True)
            from .gguf_header import read_header

            kinds: dict[str, int] = {}
            for t in read_header(part).tensors:  # what llama.cpp chose, fallbacks included
                kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            result["tensors"] = kinds
    return {**result, "output": str(out), "type": type_name, "bytes": out.stat().st_size}


def _llama_cpp(type_name: str) -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise NearswapError(f"--type {type_name} uses llama.cpp's quantizer: install llama-cpp-python "
                            "(CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" pip install llama-cpp-python builds it in ~5 min)") from None
    return llama_cpp


def _write_gguf(source: str | Path, out: Path, part: Path, type_name: str, vocab_from: str | Path | None,
                progress: Callable[[int], None] | None, on_start: Callable[[Any], None] | None) -> dict[str, Any]:
    """The export itself, into ``part``: plan every tensor, then write metadata and data."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from . import open_model
    from .safetensors import FileReader

    model = open_model(source, "model")
    vocab = Path(vocab_from) if vocab_from else None
    for f in [model.path, *model.files, *([vocab] if vocab else [])]:
        if f.resolve() == out.resolve():
            raise NearswapError(f"the output {out} is an input of the export; write it somewhere else")
    hf_arch = ((model.config or {}).get("architectures") or ["?"])[0]
    arch_name = HF_TO_GGUF_ARCH.get(hf_arch)
    if arch_name is None:
        raise NearswapError(f"{model.path}: exporting {shown(hf_arch)} to GGUF is not supported yet "
                            f"(supported: {', '.join(HF_TO_GGUF_ARCH)})")
    arch = ARCHITECTURES[arch_name]
    vocab_kind, vocab_path = _vocab_source(model, vocab)
    add_vocab = _gguf_vocab(vocab_path) if vocab_kind == "gguf" else _hf_vocab(vocab_path)
    config = _export_config(model)
    qtype = Q[EXPORT_TYPES[type_name][0]]
    head_counts = {"attn_q.weight": config["num_attention_heads"], "attn_k.weight": config["num_key_value_heads"]}

    plan = []  # (hf name, gguf name, ggml type, permute heads)
    for name, info in model.tensors.items():
        target = gguf_name(arch, name)
        if target is None:
            raise NearswapError(f"{model.path}: tensor {shown(name)} has no GGUF name in the {arch_name} table")
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        tq = qtype if len(info.shape) == 2 and info.shape[-1] % block == 0 else Q.F32 if len(info.shape) < 2 else Q.F16
        short = target.split(".", 2)[-1] if target.startswith("blk.") else target
        heads = head_counts.get(short)
        if heads and (len(info.shape) != 2 or info.shape[0] % heads or (info.shape[0] // heads) % 2):
            raise NearswapError(f"{model.path}: {name} has shape {list(info.shape)}, which config.json's head count "
                                f"{heads} does not split into heads of whole row pairs; check config.json")
        plan.append((name, target, tq, heads))

    if on_start:
        on_start(model)
    w = gguf.GGUFWriter(str(part), arch_name)
    try:
        w.add_name(out.stem)
        _llama_metadata(w, config)
        w.add_file_type(int(getattr(gguf.LlamaFileType, EXPORT_TYPES[type_name][1])))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(w)
        for name, target, tq, _ in plan:
            shape = model.tensors[name].shape
            byte_shape = quants.quant_shape_to_byte_shape(shape, tq) if tq not in (Q.F32, Q.F16) else shape
            np_dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(tq, np.uint8)
            nbytes = int(np.prod(byte_shape)) * np.dtype(np_dtype).itemsize
            w.add_tensor_info(target, byte_shape, np.dtype(np_dtype), nbytes, raw_dtype=tq)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        reader = FileReader()
        counts: dict[str, int] = {}
        try:
            for name, target, tq, heads in plan:  # one tensor in memory at a time
                info = model.tensors[name]
                x = reader.read(info, 0, np.empty(info.numel, info.dtype.np)).reshape(info.shape).astype(np.float32)
                if heads:
                    x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
                w.write_tensor_data(quants.quantize(x, tq))
                counts[tq.name] = counts.get(tq.name, 0) + 1
                if progress:
                    progress(info.nbytes)
        finally:
            reader.close()
    except OSError as e:
        raise NearswapError(f"cannot write {part}: {e.strerror}") from None
    finally:
        w.close()
    return {"tensors": counts, "vocabulary": f"{vocab_kind}: {vocab_path}", "in_bytes": model.nbytes}

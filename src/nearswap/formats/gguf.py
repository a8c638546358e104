"""GGUF input and output: llama.cpp checkpoints presented under HF names, in HF layouts, as float32.

The header is read with nearswap's bounded reader (``gguf_header``); tensor rows are fetched
with positional reads and dequantized chunk by chunk (the C kernel, or ``gguf.quants``), so
memory stays bounded. What differs per architecture (names, llama's permuted Q/K rows,
Gemma's +1 norms, the HF config) is a row of ``architectures.ARCHITECTURES``. A GGUF can also
be opened under its own names and values (``native``): what a GGUF-to-GGUF merge reads, for
any architecture.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gguf import GGML_QUANT_SIZES

from ..dtypes import BY_NAME
from ..errors import NearswapError, shown
from .safetensors import pread_exact
from .types import TensorInfo, role

from .architectures import (ARCHITECTURES, BY_HF_CLASS, Arch, MetadataError, add_metadata, gguf_name, hf_config,
                            hf_name, llama3_rope_factors, meta_number, rope_scaling_of, short_name, unsupported)

# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class GGUFSource:
    """Where a GGUF tensor's blocks are, and how to turn them into HF float32 elements."""

    qtype: Any  # gguf.GGMLQuantizationType
    block: int  # elements per quantization block (1 for plain types)
    type_size: int  # bytes per block
    row_len: int  # elements per row (GGML ne0, the HF last dimension)
    heads: int | None  # rows come permuted in this many heads (llama Q/K), or None
    offset: float = 0.0  # subtracted from every value (Gemma's norms are stored +1)

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
        else:
            block = dequantize(blocks, self.qtype).reshape(-1)
            if self.heads:
                per_head = info.numel // self.row_len // self.heads
                block = block.reshape(-1, per_head // 2, 2, self.row_len).swapaxes(1, 2).reshape(-1)
            first = start - e0
            target[:] = block[first:first + n]
        if self.offset:  # float32 arithmetic, as transformers' GGUF loader does it
            np.subtract(target, np.float32(self.offset), out=target)
        return out



try:  # the compiled dequantizer; gguf's numpy code computes the same bits, slower (docs/benchmarks.md)
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


HEAD_KEYS = {"num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv"}


def read_gguf_header(path: Path, label: str) -> Any:
    """The header (scalars and tensor infos; vocabulary arrays skipped), or one line."""
    from .gguf_header import HeaderError, read_header

    try:
        return read_header(path)
    except (HeaderError, OSError) as e:
        raise NearswapError(f"{role(label)}: {path}: not a readable GGUF file: {e}; re-download it") from None


def open_gguf(path: Path, label: str, native: bool = False
              ) -> tuple[str, dict[str, TensorInfo], dict[str, Any] | None, dict[str, Any]]:
    """Read a GGUF header. Returns (format description, tensors, HF config, metadata): under HF
    names and values with the config of its architecture's row, or (``native``) under its own
    names and stored values with no config, for any architecture."""
    header = read_gguf_header(path, label)
    meta = header.metadata
    arch_name = meta.get("general.architecture", "?")
    arch = ARCHITECTURES.get(arch_name) if isinstance(arch_name, str) else None
    if arch is None and not native:
        raise unsupported(arch_name, f"{role(label)}: {path}")
    f32 = BY_NAME["F32"]
    tensors: dict[str, TensorInfo] = {}
    qtypes: dict[str, int] = {}
    try:
        for t in sorted(header.tensors, key=lambda t: t.data_offset):
            shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists dimensions innermost first
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1
            if native:
                source = GGUFSource(t.tensor_type, block, type_size, shape[-1] if shape else 1, None)
                tensors[t.name] = TensorInfo(t.name, f32, shape, path, int(t.data_offset), source)
                continue
            if t.name in arch.ignored:
                if t.name.startswith("rope_factors_"):  # Phi-3's long-context rope: not mapped, never dropped silently
                    raise MetadataError("it carries Phi-3's long-context rope factors (rope_factors_long/short), "
                                        "which nearswap does not map to config.json's rope_scaling (a conversion would "
                                        "load with the wrong rope); merge it GGUF to GGUF (-o merged.gguf), which keeps them")
                continue
            name = hf_name(arch, t.name)
            if name is None:
                raise MetadataError(f"GGUF tensor {shown(t.name)} has no HF name in the {arch_name} row; "
                                    "this variant is not mapped yet (a merge into -o merged.gguf needs no mapping)")
            heads = None
            key = arch.permuted_heads(short_name(t.name))
            if key:
                if len(shape) != 2:
                    raise MetadataError(f"{t.name} has shape {list(shape)}; a 2-D matrix is expected")
                heads = _head_count(meta, f"{arch_name}.{HEAD_KEYS[key]}", t.name, shape[0])
            source = GGUFSource(t.tensor_type, block, type_size, shape[-1] if shape else 1, heads, arch.offset(t.name))
            tensors[name] = TensorInfo(name, f32, shape, path, int(t.data_offset), source)
        config = None if native else hf_config(arch, meta, {n: i.shape for n, i in tensors.items()})
        rope = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
        if config is not None and rope is not None and arch.gguf == "llama":  # Llama 3.x rope scaling
            config["rope_scaling"] = _llama3_scaling(path, rope, config, meta)
    except MetadataError as e:
        raise NearswapError(f"{role(label)}: {path}: {e}; the file is corrupt or of a variant nearswap does not read") from None
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(qtypes.items(), key=lambda kv: -kv[1]))
    names = "GGUF names" if native else "dequantized to F32"
    return f"GGUF ({shown(arch_name) if not isinstance(arch_name, str) else arch_name}; {kinds}; {names})", tensors, config, meta


def _llama3_scaling(path: Path, rope: Any, config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """config.json's rope_scaling from a llama GGUF's rope_freqs tensor (a few hundred floats)."""
    from .architectures import llama3_rope_scaling

    block, size = GGML_QUANT_SIZES[rope.tensor_type]
    n = int(rope.n_elements)
    if n > 65536 or n % block:
        raise MetadataError(f"rope_freqs.weight has {n} elements; a short vector is expected")
    raw = bytearray(n // block * size)
    fd = os.open(path, os.O_RDONLY)
    try:
        pread_exact(fd, memoryview(raw), int(rope.data_offset), TensorInfo("rope_freqs.weight", BY_NAME["F32"], (n,), path,
                                                                           int(rope.data_offset)))
    finally:
        os.close(fd)
    values = dequantize(np.frombuffer(raw, np.uint8).reshape(-1, size), rope.tensor_type).reshape(-1)
    dim = meta_number(meta, "llama.rope.dimension_count") or config.get("head_dim") or \
        config["hidden_size"] // config["num_attention_heads"]
    if dim != 2 * n:
        raise MetadataError(f"rope_freqs.weight has {n} factors for a rope dimension of {dim}")
    return llama3_rope_scaling(values, config.get("rope_theta", 10000.0), dim)


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

    if vocabulary in ("gpt2", "llama"):  # byte-level and SentencePiece-style BPE: built here, no transformers
        return written + gguf_vocab.write(path, dest)
    if not isinstance(vocabulary, str) or not vocabulary:  # nothing to build: torch is not imported for it
        return written + ["no tokenizer: the GGUF has no vocabulary (no tokenizer.ggml.model)"]
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
# Types only llama.cpp's quantizer writes, and only with an importance matrix (``--imatrix``)
IMATRIX_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m")
LLAMA_QUANTIZE = "llama-quantize"  # llama.cpp's quantizer program: the one that reads an imatrix file
REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _config_value(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, also where transformers 5 keeps it (``rope_parameters``, per attention
    kind for Gemma 3: the full-attention layers' theta is the one GGUF stores)."""
    if key == "rope_theta" and config.get("rope_theta") is None and isinstance(config.get("rope_parameters"), dict):
        params = config["rope_parameters"]
        params = params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params
        return params.get("rope_theta")
    return config.get(key)


def export_config(model: Any, arch: Arch) -> dict[str, Any]:
    """The config.json values the GGUF metadata of ``arch`` needs, checked: positive integers
    for the shapes, numbers for the rest; vocab_size from the embeddings when config.json
    omits it; optional values (head_dim, sliding_window, softcaps) only when set."""
    from .architectures import CONFIG_KEYS

    config = model.config or {}
    where = str(model.path)
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise NearswapError(f"{where}: config.json has no {key}, which the GGUF metadata needs; add it")
    embed = model.tensors.get("model.embed_tokens.weight")
    defaults = {"num_key_value_heads": config["num_attention_heads"], "max_position_embeddings": 2048,
                "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
    out: dict[str, Any] = {}
    for key, _template, kind in CONFIG_KEYS:
        if key not in arch.keys:
            continue
        value = _config_value(config, key)
        if value is None:
            value = defaults.get(key)
        if value is None:
            continue
        if kind is int and (type(value) is not int or value <= 0):
            raise NearswapError(f"{where}: config.json {key} is {shown(value)}; a positive integer is needed")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise NearswapError(f"{where}: config.json {key} is {shown(value)}; a number is needed")
        out[key] = kind(value)
    vocab = config.get("vocab_size", embed.shape[0] if embed is not None else None)
    if type(vocab) is not int or vocab <= 0:
        raise NearswapError(f"{where}: config.json vocab_size is {shown(vocab)}; a positive integer is needed")
    out["vocab_size"] = vocab
    if config.get("head_dim") is None and out["hidden_size"] % out["num_attention_heads"]:
        raise NearswapError(f"{where}: config.json hidden_size {out['hidden_size']} is not a multiple of "
                            f"num_attention_heads {out['num_attention_heads']}; give head_dim")
    if isinstance(config.get("head_dim"), int):
        out["head_dim"] = config["head_dim"]
    return out


def carried_general_keys() -> tuple[str, ...]:
    """The ``general.*`` values an export takes from its vocabulary's GGUF: what the weights
    inherit whatever was done to them (the license terms, the languages). Its name, size
    label and file type describe the new file and are written afresh."""
    from gguf import Keys

    g = Keys.General
    return (g.LICENSE, g.LICENSE_NAME, g.LICENSE_LINK, g.LANGUAGES)


def _gguf_vocab(source: Path) -> Callable[[Any], None]:
    """Every tokenizer.* field of another GGUF, as it is, and its license and languages
    (``carried_general_keys``), read now (with nearswap's bounded header reader: a file
    declaring a billion tokens is refused, not allocated) and returned as a function that
    adds them to a writer."""
    from .gguf_header import HeaderError
    from .gguf_writer import metadata_of

    try:
        _, kv = metadata_of(source, prefix="tokenizer.")
        _, general = metadata_of(source, prefix="general.")
    except (HeaderError, OSError) as e:
        raise NearswapError(f"vocabulary source {source}: not a readable GGUF file: {e}") from None
    carried = carried_general_keys()
    kv += [item for item in general if item[0] in carried]

    def add(w: Any) -> None:
        for key, value, vtype, item in kv:
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

    import warnings

    from ..errors import NearswapWarning

    warnings.warn(f"the GGUF vocabulary is rebuilt from {directory / 'tokenizer.json'}: llama.cpp's pre-tokenizer "
                  "name cannot be derived from HF files and is written as 'default', and GGUF-only settings "
                  "(add_space_prefix, general.license) are not carried; pass --vocab-from THE_ORIGINAL.gguf to keep "
                  "them", NearswapWarning)

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
                on_start: Callable[[Any], None] | None = None, threads: int | None = None,
                imatrix: str | Path | None = None) -> dict[str, Any]:
    """Write a llama-family model (HF dir, safetensors or GGUF) as a GGUF file of ``type_name``.

    2-D weights become ``type_name`` (quantized with gguf.quants; F16 where a row does not
    fit the quant block), 1-D tensors (norms) stay F32, Q/K rows get llama.cpp's RoPE
    permutation. The vocabulary comes from ``vocab_from`` (a GGUF), else the source itself
    if it is a GGUF, else the GGUF the source was merged or converted from (recorded in its
    metadata), else its tokenizer.json (BPE). Written into a hidden sibling of ``out`` (one
    run per ``out`` at a time) and renamed when complete; ``force`` replaces a GGUF file.
    ``imatrix``: an importance matrix file (``nearswap imatrix``), given with the f32 export to
    llama.cpp's ``llama-quantize`` program (on PATH), which weighs each column's rounding by it.
    """
    from ..output import atomic_file
    from .gguf_header import read_header

    out = Path(out)
    if imatrix is not None:
        quantize = _llama_quantize_program(type_name, Path(imatrix), threads)
    elif type_name in IMATRIX_TYPES:
        raise NearswapError(f"{type_name} needs an importance matrix: make one with `nearswap imatrix MODEL --text "
                            f"FILE -o imatrix.gguf` and pass --imatrix imatrix.gguf")
    elif type_name not in EXPORT_TYPES and type_name not in LLAMA_CPP_TYPES:
        raise NearswapError(f"unknown GGUF type {type_name!r}; nearswap writes {', '.join(EXPORT_TYPES)}, "
                            f"and with llama-cpp-python installed {', '.join(LLAMA_CPP_TYPES)}")
    else:
        quantize = _llama_cpp_quantizer(type_name, threads) if type_name in LLAMA_CPP_TYPES else None
    with atomic_file(out, force) as part:
        if quantize is None:
            result = _write_gguf(source, out, part, type_name, vocab_from, progress, on_start)
        else:  # llama.cpp quantizes the f32 export
            f32 = part.with_name(part.name + ".f32")
            try:
                result = _write_gguf(source, out, f32, "f32", vocab_from, progress, on_start)
                result.update(quantize(source, f32, part))
            finally:
                f32.unlink(missing_ok=True)
            kinds: dict[str, int] = {}
            for t in read_header(part).tensors:  # what llama.cpp chose, fallbacks included
                kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            result["tensors"] = kinds
    return {**result, "output": str(out), "type": type_name, "bytes": out.stat().st_size}


Quantize = Callable[[Any, Path, Path], dict[str, Any]]  # (source, f32 GGUF, output) -> what to report


def _llama_cpp_quantizer(type_name: str, threads: int | None) -> Quantize:
    """llama.cpp's quantizer through llama-cpp-python (``llama_model_quantize``)."""
    llama_cpp = _llama_cpp(type_name)

    def quantize(source: Any, f32: Path, part: Path) -> dict[str, Any]:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_TYPES[type_name]}")
        params.nthread = threads or os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(part).encode(), params) != 0:
            raise NearswapError(f"llama.cpp could not quantize {source} to {type_name}")
        return {}

    return quantize


def _llama_quantize_program(type_name: str, imatrix: Path, threads: int | None) -> Quantize:
    """llama.cpp's ``llama-quantize`` program with an importance matrix (llama-cpp-python's
    ``llama_model_quantize`` takes one only as a C++ map); checked before any work."""
    import shutil
    import subprocess

    from ..imatrix import read as read_imatrix

    if type_name not in LLAMA_CPP_TYPES and type_name not in IMATRIX_TYPES:
        raise NearswapError(f"--imatrix is for llama.cpp's quantizer types ({', '.join([*LLAMA_CPP_TYPES, *IMATRIX_TYPES])}), "
                            f"not {type_name!r}")
    entries = read_imatrix(imatrix)  # refuses a file that is no importance matrix
    program = shutil.which(LLAMA_QUANTIZE)
    if program is None:
        raise NearswapError(f"--imatrix runs llama.cpp's {LLAMA_QUANTIZE}, which is not on PATH (llama-cpp-python does "
                            f"not ship it): build it from llama.cpp (cmake -B build && cmake --build build --target "
                            f"{LLAMA_QUANTIZE}) and add build/bin to PATH")

    def quantize(source: Any, f32: Path, part: Path) -> dict[str, Any]:
        proc = subprocess.run([program, "--imatrix", str(imatrix), str(f32), str(part), type_name.upper(),
                               str(threads or os.cpu_count() or 1)], capture_output=True, text=True)
        if proc.returncode != 0:
            last = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-1:] or ["no output"]
            raise NearswapError(f"{LLAMA_QUANTIZE} could not quantize {source} to {type_name} with {imatrix} "
                                f"(exit {proc.returncode}): {last[0][:200]}")
        return {"imatrix": {"file": str(imatrix), "entries": len(entries)}}

    return quantize


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
    arch = BY_HF_CLASS.get(hf_arch)
    if arch is None:
        raise NearswapError(f"{model.path}: exporting {shown(hf_arch)} to GGUF is not supported yet "
                            f"(supported: {', '.join(BY_HF_CLASS)})")
    arch_name = arch.gguf
    vocab_kind, vocab_path = _vocab_source(model, vocab)
    add_vocab = _gguf_vocab(vocab_path) if vocab_kind == "gguf" else _hf_vocab(vocab_path)
    config = export_config(model, arch)
    qtype = Q[EXPORT_TYPES[type_name][0]]

    plan = []  # (hf name, gguf name, ggml type, permute heads, offset)
    for name, info in model.tensors.items():
        target = gguf_name(arch, name)
        if target is None:
            if name == "lm_head.weight" and arch.tied:  # tied: the embeddings serve as the output
                continue
            raise NearswapError(f"{model.path}: tensor {shown(name)} has no GGUF name in the {arch_name} row")
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        tq = qtype if len(info.shape) == 2 and info.shape[-1] % block == 0 else Q.F32 if len(info.shape) < 2 else Q.F16
        key = arch.permuted_heads(short_name(target))
        heads = config[key] if key else None
        if heads and (len(info.shape) != 2 or info.shape[0] % heads or (info.shape[0] // heads) % 2):
            raise NearswapError(f"{model.path}: {name} has shape {list(info.shape)}, which config.json's head count "
                                f"{heads} does not split into heads of whole row pairs; check config.json")
        plan.append((name, target, tq, heads, arch.offset(target)))

    if arch_name == "phi3" and isinstance((model.config or {}).get("rope_scaling"), dict):
        raise NearswapError(f"{model.path}: config.json has a rope_scaling (Phi-3's long context, rope_factors_long/"
                            "short in GGUF), which nearswap does not write yet: the GGUF would load with the wrong "
                            "rope; use llama.cpp's convert_hf_to_gguf.py for this model")
    generated: dict[str, np.ndarray] = {}  # GGUF tensors made from config.json, not from a weight
    scaling = rope_scaling_of(model.config or {}) if arch_name == "llama" else None
    if scaling is not None:
        dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        generated["rope_freqs.weight"] = llama3_rope_factors(config["rope_theta"], dim, scaling)
    from ..output import check_free_space
    from .gguf_writer import coded_bytes

    check_free_space(out, sum(coded_bytes(model.tensors[name].numel, tq) for name, _, tq, _, _ in plan)
                     + sum(values.nbytes for values in generated.values()))
    if on_start:
        on_start(model)
    w = gguf.GGUFWriter(str(part), arch_name)
    try:
        w.add_name(out.stem)
        add_metadata(w, arch, config)
        w.add_file_type(int(getattr(gguf.LlamaFileType, EXPORT_TYPES[type_name][1])))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(w)
        for target, values in generated.items():  # written first, so their data comes first
            w.add_tensor_info(target, values.shape, values.dtype, values.nbytes, raw_dtype=Q.F32)
        for name, target, tq, _, _ in plan:
            shape = model.tensors[name].shape
            byte_shape = quants.quant_shape_to_byte_shape(shape, tq) if tq not in (Q.F32, Q.F16) else shape
            np_dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(tq, np.uint8)
            nbytes = int(np.prod(byte_shape)) * np.dtype(np_dtype).itemsize
            w.add_tensor_info(target, byte_shape, np.dtype(np_dtype), nbytes, raw_dtype=tq)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for values in generated.values():
            w.write_tensor_data(values)
        reader = FileReader()
        counts: dict[str, int] = {}
        try:
            for name, target, tq, heads, offset in plan:  # one tensor in memory at a time
                info = model.tensors[name]
                x = reader.read(info, 0, np.empty(info.numel, info.dtype.np)).reshape(info.shape).astype(np.float32)
                if offset:
                    x += np.float32(offset)
                if heads:
                    x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
                w.write_tensor_data(quants.quantize(x, tq))
                counts[tq.name] = counts.get(tq.name, 0) + 1
                if progress:
                    progress(info.nbytes)
        finally:
            reader.close()
    except OSError as e:
        raise NearswapError(f"cannot write {part}: {e.strerror or e}") from None
    finally:
        w.close()
    return {"tensors": counts, "vocabulary": f"{vocab_kind}: {vocab_path}", "in_bytes": model.nbytes}

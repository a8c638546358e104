"""GGUF input: llama.cpp checkpoints presented under HF names, in HF layouts, as float32.

The header is read with the ``gguf`` package (imported only when a GGUF file is opened);
tensor rows are fetched with positional reads and dequantized chunk by chunk with
``gguf.quants.dequantize``, which knows every common type (K-quants and i-quants included),
so memory stays bounded. llama.cpp stores each attention head's Q and K rows permuted for
its RoPE; those rows are put back in HF order here, a whole head at a time. Architecture
facts (names, which tensors are permuted, the HF config) live in the ``ARCHITECTURES`` table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..dtypes import BY_NAME
from ..errors import NearswapError
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


def _llama_config(meta: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    a = "llama."
    embed = tensors["model.embed_tokens.weight"].shape
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": meta.get(a + "embedding_length", embed[1]),
        "intermediate_size": meta.get(a + "feed_forward_length"),
        "num_hidden_layers": meta.get(a + "block_count"),
        "num_attention_heads": meta.get(a + "attention.head_count"),
        "num_key_value_heads": meta.get(a + "attention.head_count_kv", meta.get(a + "attention.head_count")),
        "max_position_embeddings": meta.get(a + "context_length", 2048),
        "rms_norm_eps": meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.get(a + "rope.freq_base", 10000.0),
        "vocab_size": embed[0],
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "torch_dtype": "float32",
    }
    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[hf] = meta[f"tokenizer.ggml.{key}"]
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


# Plain float types read without dequantization; everything else goes through gguf.quants.
_PLAIN = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16)}


@dataclass(frozen=True)
class GGUFSource:
    """Where a GGUF tensor's rows are, and how to turn them into HF float32 rows."""

    qtype: Any  # gguf.GGMLQuantizationType
    row_len: int  # elements per row (GGML ne0, the HF last dimension)
    row_bytes: int
    heads: int | None  # rows come permuted in this many heads (llama Q/K), or None

    def read(self, fd: int, info: TensorInfo, start: int, out: Any) -> Any:
        """Fill ``out`` (float32 array, or a byte buffer) with HF-layout elements from ``start`` on."""
        target = out if hasattr(out, "dtype") else np.frombuffer(out, np.float32)
        n = len(target)
        rows = info.numel // self.row_len
        r0, r1 = start // self.row_len, -(-(start + n) // self.row_len)
        if self.heads:  # a permuted head's rows are spread over the head: read whole heads
            per_head = rows // self.heads
            r0, r1 = r0 // per_head * per_head, -(-r1 // per_head) * per_head
        raw = bytearray((r1 - r0) * self.row_bytes)
        pread_exact(fd, memoryview(raw), info.offset + r0 * self.row_bytes, info)
        block = self._dequantize(np.frombuffer(raw, np.uint8).reshape(r1 - r0, self.row_bytes))
        if self.heads:
            per_head = rows // self.heads
            block = block.reshape(-1, per_head // 2, 2, self.row_len).swapaxes(1, 2).reshape(-1, self.row_len)
        first = start - r0 * self.row_len
        target[:] = block.reshape(-1)[first:first + n]
        return out

    def _dequantize(self, raw: np.ndarray) -> np.ndarray:
        plain = _PLAIN.get(self.qtype.name)
        if plain is not None:
            return raw.view(plain).astype(np.float32)
        from gguf import quants

        return quants.dequantize(raw, self.qtype).astype(np.float32, copy=False)


def open_gguf(path: Path, label: str) -> tuple[str, dict[str, TensorInfo], dict[str, Any], dict[str, Any]]:
    """Read a GGUF header. Returns (format description, HF-named tensors, HF config, metadata)."""
    from .gguf_header import HeaderError, read_header

    try:
        header = read_header(path)  # scalars and tensor infos; the vocabulary arrays are skipped
    except (HeaderError, OSError) as e:
        raise NearswapError(f"{label}: {path}: not a readable GGUF file: {e}; re-download it") from None
    meta = header.metadata
    arch_name = meta.get("general.architecture", "?")
    arch = ARCHITECTURES.get(arch_name)
    if arch is None:
        raise NearswapError(f"{label}: {path}: GGUF architecture {arch_name!r} is not supported yet "
                            f"(supported: {', '.join(ARCHITECTURES)})")
    f32 = BY_NAME["F32"]
    tensors: dict[str, TensorInfo] = {}
    qtypes: dict[str, int] = {}
    for t in sorted(header.tensors, key=lambda t: t.data_offset):
        if t.name in arch.ignored:
            continue
        name = hf_name(arch, t.name)
        if name is None:
            raise NearswapError(f"{label}: {path}: GGUF tensor {t.name!r} has no HF name in the {arch_name} table; "
                                "this variant is not supported yet")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGML lists dimensions innermost first
        row_len = shape[-1]
        rows = int(t.n_elements) // row_len
        heads = None
        short = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        if short in arch.permuted:
            heads = int(meta[arch.permuted[short]])
        source = GGUFSource(t.tensor_type, row_len, int(t.n_bytes) // rows, heads)
        tensors[name] = TensorInfo(name, f32, shape, path, int(t.data_offset), source)
        qtypes[t.tensor_type.name] = qtypes.get(t.tensor_type.name, 0) + 1
    config = arch.config(meta, tensors)
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(qtypes.items(), key=lambda kv: -kv[1]))
    return f"GGUF ({arch_name}; {kinds}; dequantized to F32)", tensors, config, meta


def write_side_files(path: Path, config: dict[str, Any], dest: Path, skip_tokenizer: bool = False) -> list[str]:
    """config.json and generation_config.json from the GGUF metadata; tokenizer files from its
    vocabulary when transformers (the ``eval`` extra) is installed. Returns what was written."""
    import json

    written = ["config.json (from GGUF metadata)"]
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    if generation:
        (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        written.append("generation_config.json (from GGUF metadata)")
    if skip_tokenizer:
        return written
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return written + ["no tokenizer: install the eval extra (transformers) to build it from the GGUF vocabulary"]
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


def _llama_metadata(w: Any, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(config.get("num_key_value_heads", heads)))
    w.add_rope_dimension_count(int(config.get("head_dim") or config["hidden_size"] // heads))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(int(config["vocab_size"]))


def _copy_vocab(w: Any, source: Path) -> None:
    """Every tokenizer.* field of another GGUF, as it is."""
    import gguf

    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or not field.types:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)


def _hf_vocab(w: Any, directory: Path) -> None:
    """A BPE vocabulary from tokenizer.json (gguf.vocab): tokens, types, merges, special ids."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    vocab = BpeVocab(directory)
    tokens, types = [], []
    for text, _score, toktype in vocab.all_tokens():
        tokens.append(text)
        types.append(toktype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)
    del gguf


def _vocab_source(model: Any, vocab_from: Path | None) -> tuple[str, Path]:
    """Where the exported file's vocabulary comes from (see ``export_gguf``)."""
    if vocab_from is not None:
        return "gguf", Path(vocab_from)
    if model.path.suffix.lower() == ".gguf":
        return "gguf", model.path
    origin = model.metadata.get("nearswap_converted_from")
    if origin is None and model.metadata.get("nearswap_recipe"):
        import json

        origin = json.loads(model.metadata["nearswap_recipe"]).get("base")
    if origin and str(origin).lower().endswith(".gguf") and Path(origin).is_file():
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
    metadata), else its tokenizer.json (BPE). Written beside ``out`` and renamed when complete.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from . import open_model
    from .safetensors import FileReader
    from ..output import refuse_existing

    out = Path(out)
    if type_name in LLAMA_CPP_TYPES:
        return _export_with_llama_cpp(source, out, type_name, vocab_from=vocab_from, force=force, progress=progress,
                                      on_start=on_start)
    if type_name not in EXPORT_TYPES:
        raise NearswapError(f"unknown GGUF type {type_name!r}; nearswap writes {', '.join(EXPORT_TYPES)}, "
                            f"and with llama-cpp-python installed {', '.join(LLAMA_CPP_TYPES)}")
    refuse_existing(out, force)
    model = open_model(source, "model")
    hf_arch = (model.config or {}).get("architectures", ["?"])[0]
    arch_name = HF_TO_GGUF_ARCH.get(hf_arch)
    if arch_name is None:
        raise NearswapError(f"{model.path}: exporting {hf_arch} to GGUF is not supported yet "
                            f"(supported: {', '.join(HF_TO_GGUF_ARCH)})")
    arch = ARCHITECTURES[arch_name]
    vocab_kind, vocab_path = _vocab_source(model, Path(vocab_from) if vocab_from else None)
    qtype = Q[EXPORT_TYPES[type_name][0]]
    config = model.config
    head_counts = {"attn_q.weight": config["num_attention_heads"],
                   "attn_k.weight": config.get("num_key_value_heads", config["num_attention_heads"])}

    plan = []  # (hf name, gguf name, ggml type, permute heads)
    for name, info in model.tensors.items():
        target = gguf_name(arch, name)
        if target is None:
            raise NearswapError(f"{model.path}: tensor {name!r} has no GGUF name in the {arch_name} table")
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        tq = qtype if len(info.shape) == 2 and info.shape[-1] % block == 0 else Q.F32 if len(info.shape) < 2 else Q.F16
        short = target.split(".", 2)[-1] if target.startswith("blk.") else target
        plan.append((name, target, tq, head_counts.get(short)))

    if on_start:
        on_start(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.partial")
    w = gguf.GGUFWriter(str(part), arch_name)
    try:
        w.add_name(out.stem)
        _llama_metadata(w, config)
        w.add_file_type(int(getattr(gguf.LlamaFileType, EXPORT_TYPES[type_name][1])))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if vocab_kind == "gguf":
            _copy_vocab(w, vocab_path)
        else:
            _hf_vocab(w, vocab_path)
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
        for name, target, tq, heads in plan:  # one tensor in memory at a time
            info = model.tensors[name]
            x = reader.read(info, 0, np.empty(info.numel, info.dtype.np)).reshape(info.shape).astype(np.float32)
            if heads:
                x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
            w.write_tensor_data(quants.quantize(x, tq))
            counts[tq.name] = counts.get(tq.name, 0) + 1
            if progress:
                progress(info.nbytes)
        reader.close()
        w.close()
        os.replace(part, out)
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
    return {"output": str(out), "type": type_name, "tensors": counts, "bytes": out.stat().st_size,
            "vocabulary": f"{vocab_kind}: {vocab_path}", "in_bytes": model.nbytes}


def _export_with_llama_cpp(source: str | Path, out: Path, type_name: str, **options: Any) -> dict[str, Any]:
    """K-quants and friends: an f32 export, quantized by llama.cpp's own quantizer."""
    try:
        import llama_cpp
    except ImportError:
        raise NearswapError(f"--type {type_name} uses llama.cpp's quantizer: install llama-cpp-python "
                            "(CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" pip install llama-cpp-python builds it in ~5 min)") from None
    from ..output import refuse_existing

    refuse_existing(out, options.get("force", False))
    f32 = out.with_name(f".{out.name}.f32.partial")
    part = out.with_name(f".{out.name}.partial")
    try:
        result = export_gguf(source, f32, "f32", vocab_from=options.get("vocab_from"), force=True,
                             progress=options.get("progress"), on_start=options.get("on_start"))
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_TYPES[type_name]}")
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(part).encode(), params) != 0:
            raise NearswapError(f"llama.cpp could not quantize {source} to {type_name}")
        os.replace(part, out)
    finally:
        f32.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    import gguf

    kinds: dict[str, int] = {}
    for t in gguf.GGUFReader(out).tensors:  # what llama.cpp chose, fallbacks included
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return {**result, "output": str(out), "type": type_name, "tensors": kinds, "bytes": out.stat().st_size}

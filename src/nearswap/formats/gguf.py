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
from typing import Any, cast

import numpy as np
from gguf import GGML_QUANT_SIZES

from ..core.dtypes import BY_NAME
from ..core.errors import NearswapError, shown
from .architectures import (
    ARCHITECTURES,
    Arch,
    MetadataError,
    hf_config,
    hf_name,
    meta_number,
    short_name,
    unsupported,
)
from .safetensors import pread_exact
from .types import TensorInfo, role

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
    mapped = cast(Arch, arch)  # (None only for a native read, which maps no names)
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
            if t.name in mapped.ignored:
                if t.name.startswith("rope_factors_"):  # Phi-3's long-context rope: not mapped, never dropped silently
                    raise MetadataError("it carries Phi-3's long-context rope factors (rope_factors_long/short), "
                                        "which nearswap does not map to config.json's rope_scaling (a conversion would "
                                        "load with the wrong rope); merge it GGUF to GGUF (-o merged.gguf), which keeps them")
                continue
            name = hf_name(mapped, t.name)
            if name is None:
                raise MetadataError(f"GGUF tensor {shown(t.name)} has no HF name in the {arch_name} row; "
                                    "this variant is not mapped yet (a merge into -o merged.gguf needs no mapping)")
            heads = None
            key = mapped.permuted_heads(short_name(t.name))
            if key:
                if len(shape) != 2:
                    raise MetadataError(f"{t.name} has shape {list(shape)}; a 2-D matrix is expected")
                heads = _head_count(meta, f"{arch_name}.{HEAD_KEYS[key]}", t.name, shape[0])
            source = GGUFSource(t.tensor_type, block, type_size, shape[-1] if shape else 1, heads, mapped.offset(t.name))
            tensors[name] = TensorInfo(name, f32, shape, path, int(t.data_offset), source)
        config = None if native else hf_config(mapped, meta, {n: i.shape for n, i in tensors.items()})
        rope = next((t for t in header.tensors if t.name == "rope_freqs.weight"), None)
        if config is not None and rope is not None and mapped.gguf == "llama":  # Llama 3.x rope scaling
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

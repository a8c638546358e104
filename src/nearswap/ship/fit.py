"""`nearswap fit`: will a model fit in so much GPU memory, at which context, with which KV cache?

The figure is weights + KV cache + overhead, each computed, none guessed:

- **weights on the GPU**: every tensor but the input embedding table, which both llama.cpp
  (``dev_input`` is the CPU: "very little benefit to offloading the input layer") and
  exllamav2 (``embed_cpu``) keep in system memory; a model whose head is tied to the embeddings
  gets the table once more as its head, as llama.cpp duplicates it. The bytes are a GGUF's own
  tensors' when the model is one, else elements × ``bpw`` for the body and × ``head_bits``
  for the head (an EXL2 quant's bits per weight and head bits).
- **KV cache**: 2 (K and V) × layers × KV heads × head dim × bytes per element × context. The
  cache types are llama.cpp's, with their block scales: f16 16 bits, q8_0 8.5, q4_0 4.5.
- **overhead**: ``per_gpu`` GiB per card (CUDA context and library workspaces: a stated
  assumption, 0.5 GiB by default) and the activations of one prompt chunk of ``chunk`` tokens
  (float32 logits over the vocabulary, the MLP's two intermediates and the hidden states in
  float16), computed from the shape.

GPU memory is sold in GiB ("24 GB" cards hold 24 GiB): ``vram`` is in GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import NearswapError

GIB = 1024**3
CACHE_BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}  # llama.cpp's cache types, block scales included


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs of a decoder: its sizes and where its parameters are."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    params: int  # all of them, the embedding table included
    embed_params: int  # the input embedding table (kept in system memory)
    head_params: int  # the output head (the table again when tied)
    tied: bool = False
    gpu_bytes: int | None = None  # a GGUF's real bytes on the GPU (None: from bits per weight)
    source: str = ""


def llama_shape(name: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                tied: bool = False) -> Shape:
    """A Llama-family decoder's exact parameter count from its sizes (q, k, v, o, gate, up, down,
    two norms per layer; embeddings, head, final norm)."""
    head_dim = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn + 2 * hidden
    embed = vocab * hidden
    params = layers * per_layer + embed + (0 if tied else embed) + hidden
    return Shape(name, layers, kv_heads, head_dim, hidden, ffn, vocab, params, embed, embed, tied, source="preset")


PRESETS = {  # published configs (config.json of each)
    "llama2-70b": llama_shape("Llama-2-70B / Miqu-70B", 80, 8192, 64, 8, 28672, 32000),
    "llama3-70b": llama_shape("Llama-3-70B", 80, 8192, 64, 8, 28672, 128256),
    "llama3-8b": llama_shape("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256),
    "mistral-7b": llama_shape("Mistral-7B", 32, 4096, 32, 8, 14336, 32000),
}
PRESETS["miqu-70b"] = PRESETS["llama2-70b"]


def shape_of(path: str | Path) -> Shape:
    """A model's shape from its files: config.json and tensor shapes, or a GGUF's metadata and
    tensors (with their real stored bytes)."""
    from ..formats import open_model

    model = open_model(path, "model")
    config = model.config or {}

    def need(key: str) -> int:
        value = config.get(key)
        if type(value) is not int or value <= 0:
            raise NearswapError(f"{path}: config.json has no positive integer {key}; fit needs the model's sizes "
                                "(or give --shape)")
        return value

    def optional(key: str, default: int) -> int:
        return need(key) if config.get(key) is not None else default

    layers, hidden, heads = need("num_hidden_layers"), need("hidden_size"), need("num_attention_heads")
    kv_heads = optional("num_key_value_heads", heads)
    head_dim = optional("head_dim", hidden // heads)
    embed_name = next((n for n in model.tensors if n.endswith("embed_tokens.weight")), None)
    if embed_name is None:
        raise NearswapError(f"{path}: no embed_tokens tensor: fit knows decoder LLMs (llama, qwen, gemma, phi3 rows)")
    embed = model.tensors[embed_name].numel
    head = model.tensors.get("lm_head.weight")
    tied = head is None
    params = sum(info.numel for info in model.tensors.values())
    gpu_bytes = None
    if model.kind == "gguf":  # the stored bytes: the embedding table stays on the CPU (and is the head again if tied)
        stored = {name: info.numel // info.source.block * info.source.type_size for name, info in model.tensors.items()}
        gpu_bytes = sum(stored.values()) - stored[embed_name] + (stored[embed_name] if tied else 0)
    return Shape(str(Path(path).name), layers, kv_heads, head_dim, hidden, optional("intermediate_size", 4 * hidden),
                 need("vocab_size"), params, embed, embed if tied else head.numel, tied, gpu_bytes, str(path))


@dataclass(frozen=True)
class Row:
    context: int
    cache: str
    weights: float  # GiB
    kv: float
    overhead: float
    total: float
    spare: float  # vram - total

    @property
    def fits(self) -> bool:
        return self.spare >= 0


def weights_bytes(shape: Shape, bpw: float | None, head_bits: float | None) -> float:
    """Bytes of weights on the GPU (see the module docstring)."""
    if bpw is None and shape.gpu_bytes is not None:
        return float(shape.gpu_bytes)
    if bpw is None:
        raise NearswapError(f"{shape.name} is not a GGUF: give the bits per weight of the quant (--bpw 4.6)")
    body = shape.params - shape.embed_params - (0 if shape.tied else shape.head_params)
    return body * bpw / 8 + shape.head_params * (head_bits if head_bits is not None else bpw) / 8


def kv_bytes_per_token(shape: Shape, cache: str) -> float:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * CACHE_BITS[cache] / 8


def overhead_bytes(shape: Shape, gpus: int, per_gpu: float, chunk: int) -> float:
    activations = chunk * (shape.vocab * 4 + 2 * shape.ffn * 2 + 4 * shape.hidden * 2)
    return gpus * per_gpu * GIB + activations


def table(shape: Shape, vram: float, contexts: list[int], caches: list[str], bpw: float | None = None,
          head_bits: float | None = None, gpus: int = 1, per_gpu: float = 0.5, chunk: int = 2048) -> list[Row]:
    """A row per context and cache type: GiB of weights, KV cache, overhead, total, and spare
    against ``vram`` GiB (spread over ``gpus`` cards). Every number must be finite: a NaN
    compares false with every bound and would print a table of "nan"; infinite memory fits all."""
    import math

    for what, value, zero in (("--vram", vram, False), ("--bpw", bpw, False), ("--head-bits", head_bits, False),
                              ("--per-gpu", per_gpu, True)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0 or (value == 0 and not zero)):
            raise NearswapError(f"{what} {value!r} is not a finite {'' if zero else 'positive '}number of "
                                f"{'GiB' if what in ('--vram', '--per-gpu') else 'bits'}; give one such as "
                                f"{ {'--vram': '24', '--bpw': '4.6', '--head-bits': '8', '--per-gpu': '0.5'}[what] }")
    for cache in caches:
        if cache not in CACHE_BITS:
            raise NearswapError(f"unknown cache type {cache!r}; one of {', '.join(CACHE_BITS)}")
    w = weights_bytes(shape, bpw, head_bits) / GIB
    o = overhead_bytes(shape, gpus, per_gpu, chunk) / GIB
    rows = []
    for context in contexts:
        for cache in caches:
            kv = kv_bytes_per_token(shape, cache) * context / GIB
            rows.append(Row(context, cache, w, kv, o, w + kv + o, vram - (w + kv + o)))
    return rows


def format_rows(shape: Shape, rows: list[Row], vram: float, gpus: int, bpw: float | None, head_bits: float | None) -> str:
    how = (f"{bpw:g} bits per weight" + (f", head {head_bits:g} bits" if head_bits is not None else "")
           if bpw is not None else "the GGUF's own tensor types")
    lines = [f"{shape.name}: {shape.params / 1e9:.2f}B parameters, {shape.layers} layers, {shape.kv_heads} KV heads x "
             f"{shape.head_dim}; weights at {how}, the embedding table in system memory; {vram:g} GiB on {gpus} GPU(s)",
             "KV cache per token: " + ", ".join(f"{c} {kv_bytes_per_token(shape, c) / 1024:,.1f} KiB" for c in CACHE_BITS),
             "", "| context | cache | weights GiB | KV cache GiB | overhead GiB | total GiB | spare GiB | fits |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.context:,} | {r.cache} | {r.weights:.2f} | {r.kv:.2f} | {r.overhead:.2f} | {r.total:.2f} | "
                     f"{r.spare:+.2f} | {'yes' if r.fits else 'no'} |")
    return "\n".join(lines)


def parse_contexts(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            value = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise NearswapError(f"--context {text!r}: give token counts like 4096,16K,32K") from None
        if value <= 0:
            raise NearswapError(f"--context {text!r}: counts must be positive")
        out.append(value)
    return out


def as_json(shape: Shape, rows: list[Row]) -> dict[str, Any]:
    return {"model": shape.name, "parameters": shape.params, "layers": shape.layers, "kv_heads": shape.kv_heads,
            "head_dim": shape.head_dim, "rows": [{**r.__dict__, "fits": r.fits} for r in rows]}

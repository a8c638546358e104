"""Architectures as data: how a GGUF architecture maps onto its transformers counterpart.

One row per architecture. A row lists the tensor names the transformers model class has (HF
names, ``{bid}`` for the block number); the GGUF name of each comes from the ``gguf``
package's own ``TensorNameMap`` for that architecture, so nearswap agrees with llama.cpp's
converter by construction (the tests compare them). The value transforms are the ones
llama.cpp's ``convert_hf_to_gguf.py`` applies: llama's Q/K rows permuted for its RoPE, Gemma's
norm weights stored with +1. The ``config.json`` <-> GGUF metadata correspondence is one table
(``CONFIG_KEYS``) read in both directions; what a row adds is its fixed values and defaults.
Adding an architecture is adding a row (and a tiny-model test).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import Keys

from ..core.errors import NearswapError

# ---------------------------------------------------------------- HF tensor names

_LAYER = "model.layers.{bid}."
HEAD = ("lm_head.weight",)
DECODER = (  # what every llama-style decoder has (an lm_head unless its embeddings are tied)
    "model.embed_tokens.weight", "model.norm.weight",
    _LAYER + "input_layernorm.weight", _LAYER + "post_attention_layernorm.weight",
    _LAYER + "self_attn.o_proj.weight", _LAYER + "mlp.down_proj.weight",
)
SPLIT_QKV = tuple(_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv")
SPLIT_GATE_UP = (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight")
QK_NORM = (_LAYER + "self_attn.q_norm.weight", _LAYER + "self_attn.k_norm.weight")
QKV_BIAS = tuple(_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv")
SANDWICH_NORMS = (_LAYER + "pre_feedforward_layernorm.weight", _LAYER + "post_feedforward_layernorm.weight")
FUSED = (_LAYER + "self_attn.qkv_proj.weight", _LAYER + "mlp.gate_up_proj.weight")

# ---------------------------------------------------------------- config.json <-> GGUF metadata

# (config.json key, GGUF key template from gguf.Keys, kind). Read: present GGUF keys fill the
# config; written: present config values become GGUF keys (for the rows that list them).
CONFIG_KEYS: tuple[tuple[str, str, type], ...] = (
    ("max_position_embeddings", Keys.LLM.CONTEXT_LENGTH, int),
    ("hidden_size", Keys.LLM.EMBEDDING_LENGTH, int),
    ("intermediate_size", Keys.LLM.FEED_FORWARD_LENGTH, int),
    ("num_hidden_layers", Keys.LLM.BLOCK_COUNT, int),
    ("num_attention_heads", Keys.Attention.HEAD_COUNT, int),
    ("num_key_value_heads", Keys.Attention.HEAD_COUNT_KV, int),
    ("head_dim", Keys.Attention.KEY_LENGTH, int),
    ("rms_norm_eps", Keys.Attention.LAYERNORM_RMS_EPS, float),
    ("rope_theta", Keys.Rope.FREQ_BASE, float),
    ("sliding_window", Keys.Attention.SLIDING_WINDOW, int),
    ("attn_logit_softcapping", Keys.LLM.ATTN_LOGIT_SOFTCAPPING, float),
    ("final_logit_softcapping", Keys.LLM.FINAL_LOGIT_SOFTCAPPING, float),
)
BASE_KEYS = ("max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta")


@dataclass(frozen=True)
class Arch:
    """How one GGUF architecture maps onto its transformers counterpart."""

    gguf: str  # general.architecture
    hf_classes: tuple[str, ...]  # config.json architectures read as (first) and exported from (all)
    model_type: str
    hf_tensors: tuple[str, ...]  # the transformers model's tensor names ({bid}: block number)
    keys: tuple[str, ...] = BASE_KEYS  # the CONFIG_KEYS this architecture has
    fixed: dict[str, Any] = field(default_factory=dict)  # config.json values GGUF does not store
    rope_permuted: bool = False  # llama.cpp stores Q/K rows permuted for its RoPE (llama)
    norm_offset: float = 0.0  # GGUF norm weights are HF + this (Gemma)
    tied: bool | None = None  # embeddings always tied (Gemma), or None: tied when there is no output.weight
    ignored: tuple[str, ...] = ()  # GGUF tensors recomputed by the HF code (no HF counterpart)
    head_dim_is_scalar: bool = False  # query_pre_attn_scalar = head_dim (Gemma 3, as llama.cpp does)

    @functools.cached_property
    def names(self) -> dict[str, str]:
        """GGUF name template -> HF name template, by ``gguf.TensorNameMap`` of this architecture."""
        import gguf

        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.gguf]
        tmap = gguf.get_tensor_name_map(arch, 1)
        out = {}
        for hf in self.hf_tensors:
            name = tmap.get_name(hf.format(bid=0), try_suffixes=(".weight", ".bias"))
            if name is None:  # a row naming a tensor llama.cpp does not know: a bug in the row
                raise AssertionError(f"{self.gguf}: gguf's TensorNameMap has no name for {hf}")
            out[name.replace("blk.0.", "blk.{bid}.")] = hf
        return out

    @functools.cached_property
    def to_hf(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_pattern(g), h) for g, h in self.names.items()]

    @functools.cached_property
    def to_gguf(self) -> list[tuple[re.Pattern[str], str]]:
        return [(_pattern(h), g) for g, h in self.names.items()]

    def permuted_heads(self, short: str) -> str | None:
        """The config key with the head count that permutes GGUF tensor ``short`` (without
        ``blk.N.``), or None."""
        if not self.rope_permuted:
            return None
        return {"attn_q.weight": "num_attention_heads", "attn_k.weight": "num_key_value_heads"}.get(short)

    def offset(self, gguf_name: str) -> float:
        """What GGUF adds to this tensor's HF values."""
        return self.norm_offset if gguf_name.endswith("norm.weight") else 0.0


GEMMA_FIXED = {"hidden_activation": "gelu_pytorch_tanh"}
ROWS = (
    Arch("llama", ("LlamaForCausalLM", "MistralForCausalLM"), "llama", DECODER + HEAD + SPLIT_QKV + SPLIT_GATE_UP,
         keys=BASE_KEYS + ("head_dim",), fixed={"hidden_act": "silu"}, rope_permuted=True, ignored=("rope_freqs.weight",)),
    Arch("qwen2", ("Qwen2ForCausalLM",), "qwen2", DECODER + HEAD + SPLIT_QKV + SPLIT_GATE_UP + QKV_BIAS,
         fixed={"hidden_act": "silu"}),
    Arch("qwen3", ("Qwen3ForCausalLM",), "qwen3", DECODER + HEAD + SPLIT_QKV + SPLIT_GATE_UP + QK_NORM,
         keys=BASE_KEYS + ("head_dim",), fixed={"hidden_act": "silu"}),
    Arch("gemma2", ("Gemma2ForCausalLM",), "gemma2", DECODER + SPLIT_QKV + SPLIT_GATE_UP + SANDWICH_NORMS,
         keys=BASE_KEYS + ("head_dim", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping"),
         fixed=GEMMA_FIXED, norm_offset=1.0, tied=True, head_dim_is_scalar=True),
    Arch("gemma3", ("Gemma3ForCausalLM",), "gemma3_text", DECODER + SPLIT_QKV + SPLIT_GATE_UP + SANDWICH_NORMS + QK_NORM,
         keys=BASE_KEYS + ("head_dim", "sliding_window", "final_logit_softcapping"),
         fixed=GEMMA_FIXED, norm_offset=1.0, tied=True, head_dim_is_scalar=True),
    Arch("phi3", ("Phi3ForCausalLM",), "phi3", DECODER + HEAD + FUSED,
         fixed={"hidden_act": "silu"}, ignored=("rope_factors_long.weight", "rope_factors_short.weight")),
)
ARCHITECTURES: dict[str, Arch] = {row.gguf: row for row in ROWS}
BY_HF_CLASS: dict[str, Arch] = {cls: row for row in ROWS for cls in row.hf_classes}


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


def gguf_name(arch: Arch, name: str) -> str | None:
    """The GGUF name of HF tensor ``name`` (the inverse of ``hf_name``)."""
    return _rename(arch.to_gguf, name)


def short_name(gguf_name_: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q.weight`` (other names as they are)."""
    return gguf_name_.split(".", 2)[-1] if gguf_name_.startswith("blk.") else gguf_name_


def unsupported(arch_name: object, what: str) -> NearswapError:
    """The one line for a GGUF architecture without a row, naming what does work."""
    from ..core.errors import shown

    return NearswapError(f"{what}: GGUF architecture {shown(arch_name)} has no HF mapping in nearswap "
                         f"(mapped: {', '.join(ARCHITECTURES)}); `nearswap inspect` reads any GGUF, and a merge of "
                         "GGUFs of one architecture into a .gguf output (-o merged.gguf) needs no mapping")


# ---------------------------------------------------------------- config.json from GGUF metadata


class MetadataError(ValueError):
    """A GGUF metadata value the reader needs is missing or wrong; the caller names the file."""


def meta_number(meta: dict[str, Any], key: str, default: Any = None, kind: type = int) -> Any:
    """A metadata value the reader relies on, of the right type (an integer, or a float where
    ``kind`` is float), or ``default`` when absent; anything else is refused by name."""
    if key not in meta:
        return default
    value = meta[key]
    ok = (type(value) is int) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise MetadataError(f"metadata {key} is {value!r:.60}, not {'an integer' if kind is int else 'a number'}")
    return value


def hf_config(arch: Arch, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """config.json for a GGUF of ``arch``: its metadata through ``CONFIG_KEYS``, the row's fixed
    values, vocabulary size and tying from the tensors themselves (``shapes``: HF names)."""
    embed = shapes.get("model.embed_tokens.weight")
    if embed is None:
        raise MetadataError("it has no token_embd.weight (the token embeddings), so it is not a complete model")
    if len(embed) != 2:
        raise MetadataError(f"token_embd.weight has shape {list(embed)}; a 2-D matrix is expected")
    config: dict[str, Any] = {"architectures": [arch.hf_classes[0]], "model_type": arch.model_type}
    for key, template, kind in CONFIG_KEYS:
        if key in arch.keys:
            value = meta_number(meta, template.format(arch=arch.gguf), kind=kind)
            if value is not None:  # GGUF floats are float32: the shortest decimal that is that float
                config[key] = float(str(np.float32(value))) if kind is float else value
    config.setdefault("hidden_size", embed[1])
    blocks = {int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.")}
    config.setdefault("num_hidden_layers", max(blocks) + 1 if blocks else 0)
    layers = max(blocks) + 1 if blocks else 0
    if config["num_hidden_layers"] != layers:
        raise MetadataError(f"its metadata says {config['num_hidden_layers']} blocks ({arch.gguf}.block_count), its "
                            f"tensors hold {layers}; the file is inconsistent (llama.cpp refuses it too)")
    if config["hidden_size"] != embed[1]:
        raise MetadataError(f"its metadata says an embedding length of {config['hidden_size']} "
                            f"({arch.gguf}.embedding_length), token_embd.weight rows have {embed[1]}; the file is "
                            "inconsistent (llama.cpp refuses it too)")
    if "num_attention_heads" in config:
        config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.update(arch.fixed)
    config["vocab_size"] = embed[0]
    config["tie_word_embeddings"] = arch.tied if arch.tied is not None else "lm_head.weight" not in shapes
    if arch.head_dim_is_scalar and "head_dim" in config:
        config["query_pre_attn_scalar"] = config["head_dim"]
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta_number(meta, f"tokenizer.ggml.{key}")
        if value is not None:
            config["pad_token_id" if key == "padding_token_id" else key] = value
    config["torch_dtype"] = "float32"
    return config


# ---------------------------------------------------------------- Llama 3 rope scaling
# llama.cpp stores Llama 3.x's rope scaling as a tensor of per-frequency factors (rope_freqs),
# computed from config.json's rope_scaling by its converter; these two functions go both ways.

LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def llama3_rope_factors(theta: float, dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """The rope_freqs tensor for ``scaling`` (the converter's formula, float32 frequencies)."""
    p = {**LLAMA3_DEFAULTS, **{k: v for k, v in scaling.items() if k in LLAMA3_DEFAULTS}}
    freqs = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    old, low, high, factor = (p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"],
                              p["factor"])
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def llama3_rope_scaling(values: np.ndarray, theta: float, dim: int) -> dict[str, Any]:
    """config.json's rope_scaling that gives these rope_freqs factors: Llama 3.x's published
    values if they do, else the ones fitted to the factors (the tensor fixes the parameters
    only up to a common scale of the three; low_freq_factor is taken as 1). Checked by
    recomputing the tensor; MetadataError if nothing reproduces it."""
    values = np.asarray(values, np.float32)
    factor = float(values.max())
    candidates = [dict(LLAMA3_DEFAULTS, factor=factor)]
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv_wavelen = freqs.astype(np.float64) / (2 * np.pi)
    smooth = (values != 1) & (values != np.float32(factor))
    s = (1 / values[smooth].astype(np.float64) - 1 / factor) / (1 - 1 / factor) if factor != 1 else np.array([])
    # s = (old / wavelen - low) / (high - low), linear in 1 / wavelen; with low = 1:
    if len(s) >= 2:  # the line through the smoothed band fixes high and old
        a, b = np.polyfit(inv_wavelen[smooth], s, 1)
        if b < 0:
            high = 1 - 1 / b
            candidates.append({"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
                               "original_max_position_embeddings": int(round(a * (high - 1)))})
    for high in (4.0, 2.0, 8.0, 3.0, 16.0):  # one point (or none): a usual high_freq_factor, old from it
        olds = [int(round((s[0] * (high - 1) + 1) / inv_wavelen[smooth][0]))] if len(s) else [2 ** k for k in range(10, 21)]
        candidates += [{"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": high,
                        "original_max_position_embeddings": old} for old in olds]
    for c in candidates:
        if np.allclose(llama3_rope_factors(theta, dim, c), values, rtol=1e-5, atol=0):
            return {"rope_type": "llama3", **c}
    raise MetadataError("its rope_freqs.weight matches no Llama 3 rope scaling; this variant is not mapped")


def rope_scaling_of(config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's Llama 3 rope scaling (``rope_scaling``, or transformers 5's ``rope_parameters``)."""
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict):
            params = params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params
            if str(params.get("rope_type", params.get("type", ""))).lower() == "llama3":
                return params
    return None


def add_metadata(w: Any, arch: Arch, config: dict[str, Any]) -> None:
    """The GGUF metadata of ``config`` (checked values, see gguf.export_config) on writer ``w``."""
    from gguf import GGUFValueType

    for key, template, kind in CONFIG_KEYS:
        if key in arch.keys and config.get(key) is not None:
            vtype = GGUFValueType.UINT32 if kind is int else GGUFValueType.FLOAT32
            w.add_key_value(template.format(arch=arch.gguf), kind(config[key]), vtype)
    heads = config["num_attention_heads"]
    w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    if "head_dim" in config:
        w.add_value_length(config["head_dim"])
    w.add_vocab_size(config["vocab_size"])

"""Tensor dtypes: safetensors names, numpy dtypes, kernel codes and sizes, in one table."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # safetensors spelling ("BF16")
    np: np.dtype
    kernel_code: int | None  # code understood by the C kernel; None: numpy path only
    is_float: bool
    hf_name: str | None = None  # config.json's torch_dtype spelling

    @property
    def itemsize(self) -> int:
        return self.np.itemsize


_TABLE = [
    DType("F64", np.dtype(np.float64), None, True, "float64"),
    DType("F32", np.dtype(np.float32), 0, True, "float32"),
    DType("BF16", np.dtype(ml_dtypes.bfloat16), 1, True, "bfloat16"),
    DType("F16", np.dtype(np.float16), 2, True, "float16"),
    DType("I64", np.dtype(np.int64), None, False),
    DType("I32", np.dtype(np.int32), None, False),
    DType("I16", np.dtype(np.int16), None, False),
    DType("I8", np.dtype(np.int8), None, False),
    DType("U8", np.dtype(np.uint8), None, False),
    DType("BOOL", np.dtype(np.bool_), None, False),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_NUMPY: dict[np.dtype, DType] = {d.np: d for d in _TABLE}

# Spellings accepted for an output dtype (CLI, recipe).
ALIASES: dict[str, str] = {
    "float64": "F64", "f64": "F64",
    "float32": "F32", "f32": "F32", "fp32": "F32",
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "f16": "F16", "fp16": "F16", "half": "F16",
}


def by_name(name: str) -> DType:
    """Look up a dtype by safetensors name or a common alias (``"bfloat16"``, ``"fp16"``)."""
    key = ALIASES.get(name.lower(), name.upper())
    try:
        return BY_NAME[key]
    except KeyError:
        raise KeyError(f"unknown dtype {name!r}; expected one of {', '.join(sorted(ALIASES))}") from None


def compute_dtype(*dtypes: DType) -> np.dtype:
    """float64 if any input is float64, float32 otherwise (bf16/f16 widen exactly)."""
    return np.dtype(np.float64) if any(d.name == "F64" for d in dtypes) else np.dtype(np.float32)

"""Tensor dtypes: safetensors names, numpy dtypes, kernel codes and sizes, in one table.

numpy is imported only when a numpy dtype is asked for: the merge path moves bytes between
files and the C kernel and does not need it to start.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .errors import InvalidValue


@dataclass(frozen=True)
class DType:
    name: str  # safetensors spelling ("BF16")
    numpy_name: str  # numpy/ml_dtypes spelling
    itemsize: int
    kernel_code: int | None  # code understood by the C kernel; None: numpy path only
    is_float: bool
    hf_name: str | None = None  # config.json's torch_dtype spelling

    @property
    def np(self) -> Any:
        """The numpy dtype (imports numpy, and ml_dtypes for bfloat16)."""
        return _numpy_dtype(self.numpy_name)


@lru_cache(maxsize=None)
def _numpy_dtype(name: str) -> Any:
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


_TABLE = [
    DType("F64", "float64", 8, None, True, "float64"),
    DType("F32", "float32", 4, 0, True, "float32"),
    DType("BF16", "bfloat16", 2, 1, True, "bfloat16"),
    DType("F16", "float16", 2, 2, True, "float16"),
    DType("I64", "int64", 8, None, False),
    DType("I32", "int32", 4, None, False),
    DType("I16", "int16", 2, None, False),
    DType("I8", "int8", 1, None, False),
    DType("U8", "uint8", 1, None, False),
    DType("BOOL", "bool", 1, None, False),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}

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
        raise InvalidValue(f"unknown dtype {name!r}; expected one of {', '.join(sorted(ALIASES))}") from None


@lru_cache(maxsize=1)
def _by_numpy() -> dict[Any, DType]:
    return {d.np: d for d in _TABLE}


def __getattr__(name: str) -> Any:  # BY_NUMPY: numpy dtype -> DType, built (with numpy) on first use
    if name == "BY_NUMPY":
        return _by_numpy()
    raise AttributeError(f"module 'nearswap.core.dtypes' has no attribute {name!r}")

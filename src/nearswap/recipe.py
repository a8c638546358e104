"""The merge recipe: what to merge with what, at which t. Loaded from YAML or built from CLI flags.

Example (see also ``examples/quartet.yaml``)::

    base: ./miqu-70b
    steps:
      - {model: ./s1, t: 1.0e-4}
      - model: ./s2
        t: 1.0e-4
        rules:                       # first matching glob wins
          - {match: "*.mlp.*", t: 2.0e-4}
      - {model: ./s3, t: 1.0e-4}
    dtype: bfloat16                  # output dtype; default: the base tensor's own
    shard_size: 5GB
    tokenizer_source: base           # or a model path
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import dtypes
from .errors import NearswapError
from .kernels import check_t

DEFAULT_SHARD_SIZE = 5 * 1000**3

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(value: str | int) -> int:
    """Parse a byte size: ``5GB`` (decimal, as HF uses), ``200MiB``, ``1e9``, ``4096``.

    >>> parse_size("5GB"), parse_size("1.5MiB")
    (5000000000, 1572864)
    """
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"bad size {value!r}; use e.g. 5GB, 500MB, 2GiB")
        try:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        except ValueError:
            raise ValueError(f"bad size {value!r}; use e.g. 5GB, 500MB, 2GiB") from None
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


def _t(value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"t must be a number, got {value!r}") from None
    return check_t(value)


class Rule(BaseModel):
    """Tensors whose name matches the glob ``match`` use ``t`` in this step."""

    model_config = ConfigDict(extra="forbid")
    match: str
    t: float

    _check_t = field_validator("t", mode="before")(_t)


class Step(BaseModel):
    """One pass of the chain: merge ``model`` into the running result at threshold ``t``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    t: float
    rules: list[Rule] = Field(default_factory=list)

    _check_t = field_validator("t", mode="before")(_t)

    def t_for(self, tensor: str) -> float:
        """The threshold this step applies to ``tensor``: the first matching rule, else ``t``."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(tensor, rule.match):
                return rule.t
        return self.t


class Recipe(BaseModel):
    """A sequential NearSwap merge: r0 = base; r_k = nearswap(t_k, r_{k-1}, steps[k].model)."""

    model_config = ConfigDict(extra="forbid")
    base: str
    steps: list[Step] = Field(min_length=1, max_length=64)
    dtype: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    tokenizer_source: str = "base"
    carry_float32: bool = False
    allow_nonfinite: bool = False

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            d = dtypes.by_name(v)
        except KeyError:
            d = None
        if d is None or not d.is_float:
            raise ValueError(f"unknown output dtype {v!r}; use bfloat16, float16, float32 or float64")
        return d.name

    def resolve_paths(self, root: Path) -> "Recipe":
        """Make relative model paths relative to ``root`` (the recipe file's folder)."""
        def fix(p: str) -> str:
            return str(p) if Path(p).is_absolute() else str(root / p)

        data = self.model_dump()
        data["base"] = fix(self.base)
        for step in data["steps"]:
            step["model"] = fix(step["model"])
        if self.tokenizer_source != "base":
            data["tokenizer_source"] = fix(self.tokenizer_source)
        return Recipe.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=False), sort_keys=False)


def _explain(err: ValidationError, source: str) -> NearswapError:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = f"unknown key (allowed here: {_allowed(first['loc'])})"
    more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    return NearswapError(f"{source}: {where}: {msg}{more}")


def _allowed(loc: tuple) -> str:
    model: type[BaseModel] = Recipe
    if "rules" in loc:
        model = Rule
    elif "steps" in loc:
        model = Step
    return ", ".join(model.model_fields)


def build(data: dict, source: str = "recipe") -> Recipe:
    """Validate recipe data (a dict), turning pydantic's errors into one clear line."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise _explain(e, source) from None


def load(path: str | Path) -> Recipe:
    """Load and validate a YAML recipe; relative paths are taken from the recipe's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise NearswapError(f"cannot read recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise NearswapError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise NearswapError(f"{path}: a recipe is a mapping with keys base, steps, ...")
    return build(data, str(path)).resolve_paths(path.parent)

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

Validation is explicit (a few dataclasses and checks, no schema library: a merge starts
sooner), and every problem becomes one line naming the key: ``step 1.t: ...`` (steps
counted from 1, as every output counts them).
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core import dtypes
from ..core.errors import NearswapError, shown
from ..formats.generated import is_generated

DEFAULT_SHARD_SIZE = 5 * 1000**3
MAX_STEPS = 64

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


MAX_SIZE = 2**62  # bytes: far beyond any disk, still exact as an integer


def parse_size(value: str | int) -> int:
    """Parse a byte size: ``5GB`` (decimal, as HF uses), ``200MiB``, ``1e9``, ``4096``.

    >>> parse_size("5GB"), parse_size("1.5MiB")
    (5000000000, 1572864)
    """
    bad = f"bad size {shown(value)}; use e.g. 5GB, 500MB, 2GiB"
    if isinstance(value, bool):
        raise ValueError(bad)
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(bad)
        try:
            x = float(m.group(1)) * _UNITS[m.group(2).lower()]
        except ValueError:
            raise ValueError(bad) from None
        if not math.isfinite(x) or x > MAX_SIZE:
            raise ValueError(f"size {shown(value)} is too large (at most {MAX_SIZE:.3g} bytes)")
        n = int(x)
    else:
        raise ValueError(bad)
    if n <= 0:
        raise ValueError(f"size must be positive, got {shown(value)}")
    if n > MAX_SIZE:
        raise ValueError(f"size {shown(value)} is too large (at most {MAX_SIZE:.3g} bytes)")
    return n


def _t(value: Any) -> float:
    """A threshold: a finite number >= 0 (YAML 1.1 reads "1e-4" as a string: accepted)."""
    from ..core.kernels import check_t

    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"t must be a number, got {shown(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"t must be a number, got {shown(value)}")
    return check_t(value)


@dataclass(frozen=True)
class Rule:
    """Tensors whose name matches the glob ``match`` use ``t`` in this step."""

    match: str
    t: float


@dataclass(frozen=True)
class Step:
    """One pass of the chain: merge ``model`` into the running result at threshold ``t``."""

    model: str
    t: float
    rules: list[Rule] = field(default_factory=list)
    id: str | None = None  # its Hugging Face Hub id (org/name), for the card's base_model

    def t_for(self, tensor: str) -> float:
        """The threshold this step applies to ``tensor``: the first matching rule, else ``t``."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(tensor, rule.match):
                return rule.t
        return self.t


@dataclass(frozen=True)
class Recipe:
    """A sequential NearSwap merge: r0 = base; r_k = nearswap(t_k, r_{k-1}, steps[k].model)."""

    base: str
    steps: list[Step]
    dtype: str | None = None  # safetensors name ("BF16"), or None: each base tensor's own
    shard_size: int = DEFAULT_SHARD_SIZE
    tokenizer_source: str = "base"
    carry_float32: bool = False
    allow_nonfinite: bool = False
    base_id: str | None = None  # the base's Hugging Face Hub id (org/name), for the card's base_model

    def to_dict(self) -> dict[str, Any]:
        """The recipe's fields; the Hub ids only where given (they name the inputs for the card
        and change nothing that is merged)."""
        data = asdict(self)
        if data["base_id"] is None:
            del data["base_id"]
        for step in data["steps"]:
            if step["id"] is None:
                del step["id"]
        return data

    def resolve_paths(self, root: Path) -> "Recipe":
        """Make relative model paths relative to ``root`` (the recipe file's folder)."""
        def fix(p: str) -> str:
            if Path(p).is_absolute() or is_generated(p):
                return str(p)
            joined = os.path.join(root, p)
            short = os.path.normpath(joined)  # merged/../base -> base, as a person writes it ...
            # ... unless a link on the way makes ".." lead elsewhere: then the path as joined
            return short if os.path.realpath(short) == os.path.realpath(joined) else joined

        data = self.to_dict()
        data["base"] = fix(self.base)
        for step in data["steps"]:
            step["model"] = fix(step["model"])
        if self.tokenizer_source != "base":
            data["tokenizer_source"] = fix(self.tokenizer_source)
        return build(data, "recipe")

    def to_yaml(self, relative_to: str | Path | None = None) -> str:
        """The recipe as a person would write it: defaults left out, ``bfloat16`` and ``5GB``
        spelled so. ``relative_to``: write model paths relative to that folder (where the
        recipe file will live), so that it re-runs from any working directory."""
        import os

        import yaml

        from ..core.dtypes import BY_NAME

        def path(p: str) -> str:
            if relative_to is None or is_generated(p):
                return p
            return os.path.relpath(Path(p).resolve(), Path(relative_to).resolve())

        out: dict[str, Any] = {"base": path(self.base), "steps": []}
        for step in self.steps:
            item: dict[str, Any] = {"model": path(step.model), "t": step.t}
            if step.rules:
                item["rules"] = [{"match": r.match, "t": r.t} for r in step.rules]
            if step.id:
                item["id"] = step.id
            out["steps"].append(item)
        if self.base_id:
            out = {"base": out["base"], "base_id": self.base_id, "steps": out["steps"]}
        if self.dtype:
            out["dtype"] = BY_NAME[self.dtype].hf_name or self.dtype
        if self.shard_size != DEFAULT_SHARD_SIZE:
            size = self.shard_size
            out["shard_size"] = next((f"{size // u}{n}" for u, n in ((1000**3, "GB"), (1000**2, "MB"), (1000, "KB"))
                                      if size % u == 0), size)
        if self.tokenizer_source != "base":
            out["tokenizer_source"] = path(self.tokenizer_source)
        for key in ("carry_float32", "allow_nonfinite"):
            if getattr(self, key):
                out[key] = True
        return yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


class _Invalid(Exception):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")


def _mapping(value: Any, where: str, cls: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected a mapping with keys {', '.join(f.name for f in fields(cls))}")
    allowed = [f.name for f in fields(cls)]
    for key in value:
        if key not in allowed:
            name = key if isinstance(key, str) and re.fullmatch(r"[\w.-]{1,64}", key) else shown(key)
            raise _Invalid(f"{where}.{name}" if where else name, f"unknown key (allowed here: {', '.join(allowed)})")
    return value


def _required(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise _Invalid(f"{where}.{key}" if where else key, "missing (required)")
    return data[key]


def _text(value: Any, where: str) -> str:
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value:
        raise _Invalid(where, f"expected a path or name, got {shown(value)}")
    return value


def _check(fn, value: Any, where: str) -> Any:
    try:
        return fn(value)
    except (ValueError, KeyError) as e:
        raise _Invalid(where, str(e).strip("'\"")) from None


def _dtype(value: Any) -> str | None:
    if value is None:
        return None
    try:
        d = dtypes.by_name(value) if isinstance(value, str) else None
    except ValueError:
        d = None
    if d is None or not d.is_float:
        raise ValueError(f"unknown output dtype {shown(value)}; use bfloat16, float16, float32 or float64")
    return d.name


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # org/name, as the Hub's repo ids


def hub_id(value: Any) -> str | None:
    """A Hugging Face Hub model id (``org/name``), or None when not given."""
    if value is None:
        return None
    if not isinstance(value, str) or not HUB_ID.fullmatch(value) or "--" in value or ".." in value \
            or value.endswith((".git", ".")):
        raise ValueError(f"expected a Hugging Face Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, got {shown(value)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {shown(value)}")
    return value


def _step(data: Any, where: str) -> Step:
    data = _mapping(data, where, Step)
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise _Invalid(f"{where}.rules", "expected a list of {match, t}")
    parsed = []
    for j, rule in enumerate(rules, 1):
        rw = f"{where}.rule {j}"
        rule = _mapping(rule, rw, Rule)
        parsed.append(Rule(_text(_required(rule, "match", rw), f"{rw}.match"),
                           _check(_t, _required(rule, "t", rw), f"{rw}.t")))
    return Step(_text(_required(data, "model", where), f"{where}.model"),
                _check(_t, _required(data, "t", where), f"{where}.t"), parsed,
                _check(hub_id, data.get("id"), f"{where}.id"))


def _recipe(data: Any) -> Recipe:
    data = _mapping(data, "", Recipe)
    steps = _required(data, "steps", "")
    if not isinstance(steps, list) or not 1 <= len(steps) <= MAX_STEPS:
        raise _Invalid("steps", f"expected a list of 1 to {MAX_STEPS} steps")
    return Recipe(
        base=_text(_required(data, "base", ""), "base"),
        steps=[_step(s, f"step {i}") for i, s in enumerate(steps, 1)],  # counted from 1, as the output counts them
        dtype=_check(_dtype, data.get("dtype"), "dtype"),
        shard_size=_check(parse_size, data.get("shard_size", DEFAULT_SHARD_SIZE), "shard_size"),
        tokenizer_source=_text(data.get("tokenizer_source", "base"), "tokenizer_source"),
        carry_float32=_check(_bool, data.get("carry_float32", False), "carry_float32"),
        allow_nonfinite=_check(_bool, data.get("allow_nonfinite", False), "allow_nonfinite"),
        base_id=_check(hub_id, data.get("base_id"), "base_id"),
    )


def build(data: dict, source: str = "recipe") -> Recipe:
    """Validate recipe data (a dict) into a ``Recipe``; any problem is one clear line."""
    try:
        return _recipe(data)
    except _Invalid as e:
        raise NearswapError(f"{source}: {e}") from None


ARGUMENTS = "the merge's arguments"  # where build() says a command line's or a library call's mistakes are


def from_inputs(base: Any, secondaries: Any, ts: Any, fields: dict[str, Any] | None = None) -> Recipe:
    """The recipe of a merge given as arguments — ``nearswap merge BASE S1 ... -t T`` and
    ``nearswap.merge(base, [s1, ...], t=T)`` alike, with the same checks and the same words:
    ``ts`` is one threshold for every step or one per secondary; ``fields`` the recipe's other
    fields (dtype, shard_size, ...)."""
    if isinstance(secondaries, (str, bytes)) or hasattr(secondaries, "__fspath__"):
        secondaries = [secondaries]
    secondaries = [str(m) for m in secondaries]
    if not secondaries:
        raise NearswapError("give a base and at least one secondary (or a recipe .yaml)")
    if ts is None or (isinstance(ts, (list, tuple)) and not ts):
        raise NearswapError("missing t (-t): give one threshold for all steps, or one per secondary")
    ts = list(ts) if isinstance(ts, (list, tuple)) else [ts]
    if len(ts) not in (1, len(secondaries)):
        raise NearswapError(f"{len(ts)} thresholds (-t) for {len(secondaries)} secondaries; give one, or one per "
                            "secondary")
    per_step = ts if len(ts) > 1 else ts * len(secondaries)
    steps = [{"model": m, "t": t} for m, t in zip(secondaries, per_step)]
    return build({"base": str(base), "steps": steps, **(fields or {})}, ARGUMENTS)


def with_fields(rec: Recipe, fields: dict[str, Any]) -> tuple[Recipe, list[str]]:
    """``rec`` with ``fields`` (dtype, shard_size, ...) set over the recipe's own, and a sentence
    for each value the recipe set that they change (for a warning)."""
    if not fields:
        return rec, []
    import dataclasses

    written = rec.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    new = build({**written, **fields}, ARGUMENTS)
    said = [f"--{key.replace('_', '-')} overrides the recipe's {key} ({shown(written.get(key))} -> {shown(value)})"
            for key, value in new.to_dict().items()
            if key in fields and written.get(key) != value and written.get(key) != defaults.get(key)]
    return new, said


MAX_RECIPE_FILE = 1 << 20  # bytes; a recipe is a few lines
MAX_NESTING = 32  # YAML levels; a recipe uses four
MAX_NODES = 100_000  # values once aliases are expanded (a "billion laughs" file expands to 10^9)


def _bounded_loader() -> type:
    """A SafeLoader that refuses nesting deeper than MAX_NESTING levels while composing (before
    Python's own recursion limit could be met)."""
    import yaml

    class Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_NESTING:
                    raise yaml.YAMLError(f"nested more than {MAX_NESTING} levels deep")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            """A key given twice is refused (YAML loaders otherwise keep the last, silently)."""
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.YAMLError(f"{shown(key)} is given twice (line {key_node.start_mark.line + 1}); "
                                         "keep one")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def _check_expanded_size(data: Any) -> None:
    """Count values as if aliases were copies, stopping at MAX_NODES: shared references make a
    'billion laughs' recipe small in memory but huge to anything that walks it."""
    budget = MAX_NODES
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise NearswapError("expands to more than 100,000 values through YAML aliases; a recipe is a few lines: "
                                "write it out")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def load(path: str | Path) -> Recipe:
    """Load and validate a YAML recipe; relative paths are taken from the recipe's folder."""
    import yaml

    from ..core.files import read_bytes

    path = Path(path)
    raw = read_bytes(path, MAX_RECIPE_FILE, "recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NearswapError(f"{path}: not valid UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_bounded_loader())  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise NearswapError(f"{path}: not valid YAML: {shown(str(e).splitlines()[0], 160)}") from None
    except RecursionError:
        raise NearswapError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(data, dict):
        raise NearswapError(f"{path}: a recipe is a mapping with keys base, steps, ...")
    try:
        _check_expanded_size(data)
    except NearswapError as e:
        raise NearswapError(f"{path}: {e}") from None
    try:
        return _recipe(data).resolve_paths(path.parent)
    except _Invalid as e:
        raise NearswapError(f"{path}: {e}") from None

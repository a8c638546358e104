"""Checkpoints generated on the fly: ``synthetic:SHAPE[?seed=N&noise=B&dtype=D]``.

A stand-in for a checkpoint larger than this disk (Miqu-70B: 69B parameters, 138 GB in
bfloat16) that the real engine streams end to end: the tensor names and shapes of a Llama
(``shapes.SHAPES``, ``miqu-70b`` among them), values made while they are read.

Element ``i`` of tensor ``T`` is ``pool[(offset(T) + i) mod PERIOD]``: a pool of PERIOD values
drawn once per process from the seed, ``offset(T)`` a hash of the tensor's name (the same in
every model, so the base and its secondaries line up element by element). Reading a chunk
is a copy out of the pool, far faster than any disk, so a merge of generated inputs measures
the engine itself. Every statistic of a whole merge is a sum over pool positions weighted by
how often each is visited (``visits``): exact, not estimated.

- ``seed=0`` (the default) is the base: N(0, 0.02) weights, norms 1 + N(0, 0.05), the
  distributions of ``synthetic.make_base`` (not its numbers: Python's generator draws these).
- ``seed=k`` for k >= 1 is a derived secondary, as ``synthetic.make_secondary`` makes one:
  the base's stored values + Laplace(``noise``, default 0.0125) noise drawn from seed k on
  every weight but the norms (norms are the base's).

The values repeat with period PERIOD along a tensor: this is a stand-in for I/O and
statistics, not for a model's behaviour (no one should evaluate one).
"""

from __future__ import annotations

import math
import random
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from ..core.dtypes import BY_NAME, by_name
from ..core.errors import NearswapError, shown
from .types import Model, TensorInfo, role

SCHEME = "synthetic:"
PERIOD = (1 << 16) + 1  # pool elements: 128 KiB of bfloat16 per pool; prime, so no row length divides it
DEFAULT_NOISE = 0.0125  # Laplace scale: P(|noise| <= 1e-4) = 0.80%, the card's share per pass
NORM_SEED = 10_007  # the norms' pool: one for every model (secondaries keep the base's norms)
OPTIONS = ("seed", "noise", "dtype")


def is_generated(path: str | Path) -> bool:
    return str(path).startswith(SCHEME)


@dataclass(frozen=True)
class Spec:
    shape: str
    seed: int = 0
    noise: float = DEFAULT_NOISE
    dtype: str = "BF16"

    @classmethod
    def parse(cls, text: str, label: str = "model") -> "Spec":
        from .shapes import SHAPES

        body = text[len(SCHEME):]
        shape, _, query = body.partition("?")
        if shape not in SHAPES:
            raise NearswapError(f"{role(label)}: {shown(text)}: unknown generated shape {shown(shape)}; "
                                f"known: {', '.join(SHAPES)} (e.g. synthetic:miqu-70b?seed=1)")
        values: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)) if query else []:
            if key not in OPTIONS:
                raise NearswapError(f"{role(label)}: {shown(text)}: unknown option {shown(key)}; "
                                    f"options: {', '.join(OPTIONS)} (e.g. ?seed=1&noise=0.0125&dtype=bfloat16)")
            try:
                values[key] = (int(value) if key == "seed" else float(value) if key == "noise"
                               else by_name(value).name)
            except (ValueError, NearswapError):
                raise NearswapError(f"{role(label)}: {shown(text)}: {key}={shown(value)} is not valid "
                                    "(seed: a whole number >= 0; noise: a number > 0; dtype: bfloat16, float16, float32)") from None
        spec = cls(shape, **values)
        if spec.seed < 0 or not spec.noise > 0 or not BY_NAME[spec.dtype].is_float or BY_NAME[spec.dtype].itemsize > 4:
            raise NearswapError(f"{role(label)}: {shown(text)}: seed must be >= 0, noise > 0, dtype a float of at most 32 bits")
        return spec


_pools: dict[tuple, memoryview] = {}
_lock = threading.Lock()


def pool(spec: Spec, norm: bool) -> memoryview:
    """The PERIOD stored values that ``spec``'s weights (``norm``: its norms) cycle through, as
    raw bytes; drawn once per process."""
    key = (spec.seed, spec.noise, spec.dtype, norm) if not norm else (spec.dtype, True)
    found = _pools.get(key)
    if found is None:
        with _lock:
            found = _pools.get(key)
            if found is None:
                found = _pools[key] = memoryview(_encode(_draw(spec, norm), spec.dtype)).toreadonly()
    return found


def _draw(spec: Spec, norm: bool) -> list[float]:
    """The pool's values before storing: Python's own generator (a merge of generated inputs
    imports no numpy, as a merge of files does not), Laplace noise by its inverse CDF."""
    if norm:
        rng = random.Random(NORM_SEED)
        return [1.0 + 0.05 * rng.gauss(0.0, 1.0) for _ in range(PERIOD)]
    rng = random.Random(0)
    base = _decode(_encode([0.02 * rng.gauss(0.0, 1.0) for _ in range(PERIOD)], spec.dtype), spec.dtype)
    if spec.seed == 0:
        return base
    rng = random.Random(spec.seed)
    return [w + _laplace(rng.random() - 0.5, spec.noise) for w in base]


def _laplace(u: float, b: float) -> float:
    """Laplace(0, b) from u uniform on [-0.5, 0.5): -b sgn(u) ln(1 - 2|u|) (|u| = 0.5 held just inside)."""
    return -b * math.copysign(1.0, u) * math.log1p(max(-2.0 * abs(u), TINY - 1.0))


TINY = 2.0 ** -53


def _encode(values: list[float], dtype: str) -> bytes:
    """``values`` stored as ``dtype``, rounded to nearest even (bfloat16: to float32 first)."""
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    f32 = struct.pack(f"<{len(values)}f", *values)
    if dtype == "F32":
        return f32
    bits = struct.unpack(f"<{len(values)}I", f32)
    return struct.pack(f"<{len(values)}H", *((u + 0x7FFF + ((u >> 16) & 1)) >> 16 for u in bits))


def _decode(data: bytes, dtype: str) -> list[float]:
    n = len(data) // BY_NAME[dtype].itemsize
    if dtype == "BF16":
        return list(struct.unpack(f"<{n}f", struct.pack(f"<{n}I", *(h << 16 for h in struct.unpack(f"<{n}H", data)))))
    return list(struct.unpack(f"<{n}{'e' if dtype == 'F16' else 'f'}", data))


def offset(name: str) -> int:
    """Where tensor ``name`` starts in the pool: the same in every model."""
    return zlib.crc32(name.encode()) % PERIOD


@dataclass(frozen=True)
class GeneratedSource:
    """A ``Source`` that needs no file: copies a tensor's elements out of its pool."""

    spec: Spec
    norm: bool
    first: int  # the tensor's start in the pool (``offset``)
    fileless = True  # (types.Source)

    def read(self, fd: int, info: TensorInfo, start: int, out: Any) -> Any:
        from .safetensors import byte_view

        size = info.dtype.itemsize
        data, dest = pool(self.spec, self.norm), byte_view(out)
        pos, done = (self.first + start) % PERIOD * size, 0
        while done < len(dest):
            n = min(len(dest) - done, len(data) - pos)
            dest[done:done + n] = data[pos:pos + n]
            done, pos = done + n, 0
        return out


def open_generated(text: str, label: str) -> Model:
    from .shapes import SHAPES, is_norm

    spec = Spec.parse(text, label)
    shape, dtype = SHAPES[spec.shape], BY_NAME[spec.dtype]
    pool(spec, False), pool(spec, True)  # drawn now, as a file is opened: not counted in the merge's time
    tensors = {name: TensorInfo(name, dtype, dims, Path(text), 0, GeneratedSource(spec, is_norm(name), offset(name)))
               for name, dims in shape.tensors()}
    what = "a base" if spec.seed == 0 else f"the base + Laplace({spec.noise:g}) noise, seed {spec.seed}"
    config = shape.config(dtype.name)

    def side_files(dest: Path, skip_tokenizer: bool = False) -> list[str]:  # a config; no tokenizer exists
        import json

        (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ["config.json"]

    return Model(Path(text), label, f"generated {spec.shape} ({what}, {dtype.name})", [], tensors, config,
                 side_files=side_files, kind="generated")


def visits(numels_offsets: list[tuple[int, int]]) -> Any:
    """How many times each pool position is read by tensors of these (element count, offset):
    the weights that turn per-position results into a whole model's statistics."""
    import numpy as np

    counts = np.zeros(PERIOD + 1, np.int64)
    for numel, first in numels_offsets:
        whole, rest = divmod(numel, PERIOD)
        counts[0] += whole
        counts[PERIOD] -= whole
        end = first + rest
        counts[first] += 1
        if end <= PERIOD:
            counts[end] -= 1
        else:
            counts[PERIOD] -= 1
            counts[0] += 1
            counts[end - PERIOD] -= 1
    return np.cumsum(counts)[:PERIOD]

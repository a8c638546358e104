"""Generated Llama-shaped checkpoints: the demo's embedded default, test fixtures, benchmark inputs.

A base has N(0, 0.02) weights and norms near 1. A secondary is the base plus Laplace noise
of scale ``b`` on every weight except norms: a stand-in for a fine-tune. For Laplace noise
P(|noise| <= t) = 1 - exp(-t/b), so b = 0.0125 swaps 1 - exp(-0.008) = 0.80% of weights per
pass at t = 0.0001 in float32 -- the model card's figure. Files are written with the
``safetensors`` library itself, so tests read inputs that nearswap's writer did not make.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from .._version import __version__
from ..core.dtypes import by_name
from ..formats.safetensors import INDEX_NAME, shard_names
from ..formats.shapes import (  # noqa: F401  (the table, kept importable from here)
    SHAPES,
    LlamaShape,
    is_norm,
)


def _write(directory: Path, arrays: dict[str, np.ndarray], shards: int, config: dict | None) -> None:
    """Write ``arrays`` as an HF checkpoint in ``shards`` files (in order), with index and config."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(arrays)
    sizes = np.cumsum([arrays[n].nbytes for n in names])
    bounds = np.searchsorted(sizes, sizes[-1] * np.arange(1, shards) / shards)
    groups = np.split(np.arange(len(names)), bounds)
    groups = [g for g in groups if len(g)]
    files = shard_names(len(groups))
    weight_map = {}
    for group, fname in zip(groups, files):
        save_file({names[i]: arrays[names[i]] for i in group}, str(directory / fname),
                  metadata={"format": "pt", "nearswap_version": __version__})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(directory / fname, 0o666 & ~mask)  # (safetensors writes 0600) as any new file
        weight_map.update({names[i]: fname for i in group})
    if len(files) > 1:
        total = int(sizes[-1])
        (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))


def make_base(directory: str | Path, shape: LlamaShape | str, dtype: str = "bfloat16", seed: int = 0,
              shards: int = 1) -> Path:
    """Write a random Llama-shaped base model to ``directory``."""
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    dt = by_name(dtype)
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, s in shape.tensors():
        if is_norm(name):
            w = 1.0 + 0.05 * rng.standard_normal(s, dtype=np.float32)
        else:
            w = 0.02 * rng.standard_normal(s, dtype=np.float32)
        arrays[name] = w.astype(dt.np)
    _write(Path(directory), arrays, shards, shape.config(dt.name))
    return Path(directory)


def _rewrite(base: str | Path, directory: str | Path, transform: Callable[[str, np.ndarray], np.ndarray],
             dtype: str | None = None, shards: int = 1) -> Path:
    """Read every tensor of ``base`` (any format nearswap opens), pass it through ``transform``,
    write the results as an HF directory with the base's config."""
    from ..formats import open_model
    from ..formats.safetensors import FileReader

    model = open_model(base, "base")
    reader = FileReader()
    arrays = {}
    for name, info in model.tensors.items():
        w = reader.read(info, 0, np.empty(info.numel, info.dtype.np)).reshape(info.shape)
        arrays[name] = transform(name, w).astype(by_name(dtype).np if dtype else w.dtype)
    reader.close()
    config = dict(model.config) if model.config else None
    if config is not None and dtype:
        config["torch_dtype"] = by_name(dtype).hf_name
    _write(Path(directory), arrays, shards, config)
    return Path(directory)


NOISE_CHUNK = 1 << 20  # elements of noise drawn at once


def make_secondary(base: str | Path, directory: str | Path, scale: float = 0.0125, seed: int = 1,
                   shards: int = 1, dtype: str | None = None, title: str | None = None) -> Path:
    """Write ``base`` + Laplace(``scale``) noise on every non-norm weight to ``directory``.

    ``base`` is any model nearswap opens (HF directory, safetensors or GGUF file); the
    secondary is an HF directory with the base's dtypes (float32 for a GGUF base) unless
    ``dtype`` says otherwise. ``title``: the card's title (default: the directory's name; give
    the final name when writing into a partial directory).
    """
    rng = np.random.default_rng(seed)

    def noised(name: str, w: np.ndarray) -> np.ndarray:
        if is_norm(name):
            return w
        out = w.astype(np.float32)
        flat = out.reshape(-1)
        for i in range(0, flat.size, NOISE_CHUNK):  # the same draws in the same order as one call, without a
            n = min(NOISE_CHUNK, flat.size - i)  # float64 array the size of the tensor
            flat[i:i + n] += rng.laplace(0.0, scale, n).astype(np.float32)
        return out

    _rewrite(base, directory, noised, dtype, shards)
    _derived_card(base, Path(directory), f"`{Path(base).name}` plus Laplace noise of scale {scale} (seed {seed}) on "
                  "every weight but the norms: a synthetic stand-in for a fine-tune of it", title)
    return Path(directory)


def _derived_card(base: str | Path, directory: Path, how: str, title: str | None = None) -> None:
    """A model card for a model derived from ``base``: what it is, and the base's license
    (noise does not change whose weights they are)."""
    import yaml

    from ..core.markup import md
    from ..ship.provenance import hub_license, origin_of

    origin = origin_of(base)
    meta: dict = {"base_model": [origin.id], "tags": ["nearswap-synthetic"]}
    if origin.license:
        meta["license"], name = hub_license(origin.license)
        if name:
            meta["license_name"] = name
    (directory / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"
                                         f"# {md(title or directory.name)}\n\n{how}.\n")


def make_secondary_gguf(base: str | Path, path: str | Path, scale: float = 0.0125, seed: int = 1) -> Path:
    """``make_secondary`` for a GGUF of any architecture, written as a GGUF: the base's own
    tensor names, stored values + Laplace(``scale``) noise (norms kept), each tensor in the
    base's own type, every metadata value of the base. Chunk by chunk: bounded memory."""
    from ..formats import open_model
    from ..formats.gguf_writer import GGUFStreamWriter, metadata_of, quantizer_for
    from ..formats.safetensors import FileReader
    from ..runtime.output import atomic_file

    model = open_model(base, "base", native=True)
    arch, kv = metadata_of(model.path)
    plan = [(name, info.shape, info.source.qtype) for name, info in model.tensors.items()]
    for qtype in {q for _, _, q in plan}:
        quantizer_for(qtype)  # a type nothing here can write (K-quants without llama.cpp): one line, up front
    rng = np.random.default_rng(seed)
    with atomic_file(path) as part:  # a hidden sibling, renamed when complete; never over an existing file
        # (atomic_file made ``part``, empty, with mkstemp: opened as it is, without following a link)
        writer = GGUFStreamWriter(part, arch, kv, plan, resume=True)
        reader = FileReader()
        try:
            for name, info in model.tensors.items():
                for start in range(0, info.numel, 1 << 20):
                    w = reader.read(info, start, np.empty(min(1 << 20, info.numel - start), np.float32))
                    if not is_norm(name):
                        w += rng.laplace(0.0, scale, w.shape).astype(np.float32)
                    writer.write(name, start, w)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
    return Path(path)


def make_broken(base: str | Path, directory: str | Path, seed: int = 0) -> Path:
    """Write ``base`` with every weight matrix replaced by Gaussian noise of its own mean and
    standard deviation (norms and other 1-D tensors kept): same shapes and scales, no knowledge.
    The other end of the sweep's verdict rule: such a model must be judged garbage."""
    rng = np.random.default_rng(seed)

    def noise(name: str, w: np.ndarray) -> np.ndarray:
        if w.ndim < 2:
            return w
        x = w.astype(np.float32)
        return x.mean() + x.std() * rng.standard_normal(w.shape, dtype=np.float32)

    return _rewrite(base, directory, noise)

"""The plan of a merge: every input opened and checked, one task per output tensor, before the
first tensor byte is read (``plan``), and what it will cost (``describe_plan``). A merge into a
.gguf file adds each tensor's GGML type (``gguf_plan``: the one type policy is
``formats.gguf_writer.tensor_type``)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

from ..core.dtypes import BY_NAME, DType
from ..core.errors import (
    NearswapError,
    NearswapWarning,
    shown,
)
from ..formats import TOKENIZER_FILES, Model, open_model
from ..formats import safetensors as st
from ..formats.null import is_null
from ..formats.types import TensorInfo
from .recipe import Recipe
from .report import StepReport

EMBEDDING_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out", "output.weight", "token_embd")


@dataclass
class TensorTask:
    """One output tensor: where its inputs are and the t of each step."""

    name: str
    shape: tuple[int, ...]
    out_dtype: DType
    base: TensorInfo
    secondaries: list[TensorInfo]
    ts: list[float]

    @property
    def merged(self) -> bool:  # integer/bool tensors are copied from the base
        return self.base.dtype.is_float

    @property
    def numel(self) -> int:
        return self.base.numel

    @property
    def in_bytes(self) -> int:  # as read out (decoded): the progress bar's units
        return self.base.nbytes + (sum(s.nbytes for s in self.secondaries) if self.merged else 0)

    @property
    def read_bytes(self) -> int:  # from the input files
        return self.base.stored_bytes + (sum(s.stored_bytes for s in self.secondaries) if self.merged else 0)


@dataclass
class Plan:
    """Everything the merge will do, checked before the first tensor byte is read."""

    recipe: Recipe
    base: Model
    secondaries: list[Model]
    tasks: list[TensorTask]
    stored: dict[str, int] | None = None  # bytes per tensor where the output codes it in blocks (GGUF types)

    @property
    def out_bytes(self) -> int:
        return self.out_bytes_of(None)

    def out_bytes_of(self, names: Any) -> int:
        """Output bytes of the tensors in ``names`` (all of them for None)."""
        size = (lambda t: self.stored[t.name]) if self.stored else (lambda t: t.numel * t.out_dtype.itemsize)
        return sum(size(t) for t in self.tasks if names is None or t.name in names)

    @property
    def in_bytes(self) -> int:
        return sum(t.in_bytes for t in self.tasks)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)



def plan(recipe: Recipe, native: bool = False) -> Plan:
    """Open every input and check that they can be merged. Raises ``NearswapError``.
    ``native``: GGUF inputs under their own names and values (a merge into a .gguf file)."""
    base = open_model(recipe.base, "base", native)
    secondaries = [open_model(step.model, f"s{i}", native) for i, step in enumerate(recipe.steps, 1)]
    for sec in secondaries:
        _check_compatible(base, sec)
    if recipe.tokenizer_source != "base":
        src = Path(recipe.tokenizer_source)
        if not src.is_dir():
            raise NearswapError(f"tokenizer_source {src} is not a model directory")
        if not any((src / name).is_file() for name in TOKENIZER_FILES):
            raise NearswapError(f"tokenizer_source {src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...): "
                                "the output would have no tokenizer; point it at a model directory that has one")
    out_dtype = BY_NAME[recipe.dtype] if recipe.dtype else None
    tasks = []
    for name, info in base.tensors.items():
        tasks.append(TensorTask(
            name=name,
            shape=info.shape,
            out_dtype=(out_dtype or info.dtype) if info.dtype.is_float else info.dtype,
            base=info,
            secondaries=[sec.tensors[name] for sec in secondaries],
            ts=[step.t_for(name) for step in recipe.steps],
        ))
    _warn_unmatched_rules(recipe, [t.name for t in tasks])
    return Plan(recipe, base, secondaries, tasks)


def _warn_unmatched_rules(recipe: Recipe, names: list[str]) -> None:
    """A per-tensor rule whose glob matches no tensor of the base does nothing: say so (a typo
    such as ``*.mpl.*`` would otherwise merge those tensors at the step's t, silently)."""
    import fnmatch
    import warnings


    for k, step in enumerate(recipe.steps, 1):
        for rule in step.rules:
            if not any(fnmatch.fnmatchcase(name, rule.match) for name in names):
                warnings.warn(f"step {k}: rule {shown(rule.match)} matches no tensor of the base; it does nothing "
                              "(check the glob against `nearswap inspect BASE --tensors`)", NearswapWarning)


def warn_no_ops(steps: list[StepReport]) -> None:
    """A secondary identical to the running result (every element the same) changed nothing:
    say so (the wrong folder, or a secondary saved from the base)."""

    from ..core.errors import NearswapWarning

    for k, step in enumerate(steps, 1):
        total = step.totals
        if total.total and total.identical == total.total:
            warnings.warn(f"step {k} ({step.label}: {step.model}) changed nothing: it is identical to "
                          f"{'the base' if k == 1 else 'the result of step ' + str(k - 1)}", NearswapWarning)


def _check_compatible(base: Model, sec: Model) -> None:
    arch = "general.architecture"
    if base.metadata.get(arch) != sec.metadata.get(arch) and (base.metadata.get(arch) or sec.metadata.get(arch)) \
            and base.kind == sec.kind == "gguf":
        raise NearswapError(f"{sec.describe()} is a GGUF of architecture {shown(sec.metadata.get(arch))} but the base "
                            f"is {shown(base.metadata.get(arch))}; NearSwap merges models of one architecture")
    missing = [n for n in base.tensors if n not in sec.tensors]
    extra = [n for n in sec.tensors if n not in base.tensors]
    shapes = [n for n in base.tensors if n in sec.tensors and base.tensors[n].shape != sec.tensors[n].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} base tensors missing (first: {shown(missing[0])})")
        if extra:
            parts.append(f"{len(extra)} tensors not in the base (first: {shown(extra[0])})")
        if shapes:
            n = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (first: {shown(n)}: base {list(base.tensors[n].shape)} vs {sec.label} {list(sec.tensors[n].shape)})")
        vocab = [n for n in shapes if any(h in n for h in EMBEDDING_HINTS)
                 and base.tensors[n].shape[1:] == sec.tensors[n].shape[1:]]
        hint = "NearSwap needs the same architecture and tensor names in every model"
        if vocab:
            n = vocab[0]
            hint = (f"the vocabulary sizes differ ({base.tensors[n].shape[0]} vs {sec.tensors[n].shape[0]} rows in {shown(n)}): "
                    "NearSwap needs the same vocabulary; resize the secondary's embeddings to the base tokenizer first")
        raise NearswapError(f"{sec.describe()} does not match the base: {'; '.join(parts)}; {hint}")
    if base.architectures and sec.architectures and base.architectures != sec.architectures:
        raise NearswapError(f"{sec.describe()} is a {shown(str(sec.architectures))} but the base is a "
                            f"{shown(str(base.architectures))}; "
                            "NearSwap merges models of one architecture")


def input_files(model: Model) -> list[Path]:
    """Every file of ``model`` that a merge reads or copies: weights, index, side files."""
    from ..formats import side_files

    files = [model.path, *model.files]
    if model.directory is not None:
        files += [model.directory / st.INDEX_NAME] + [path for _, path in side_files(model.directory)[0]]
    return files


def check_output_not_input(out: Path, models: list[Model], extra: Sequence[Path] = ()) -> None:
    """Refuse an output that would replace or sit inside an input. Files are compared after
    resolving symlinks: an input whose shard is a link into the output directory (the Hugging
    Face cache layout) would lose its data when ``--force`` replaces that directory."""
    target = out.resolve()
    for model in models:
        for f in [*input_files(model), *extra]:
            if not os.path.lexists(f):
                continue
            real = f.resolve()
            if real == target or target in real.parents:
                via = f" (through {f})" if real != f.absolute() else ""
                raise NearswapError(f"the output {out} holds {real}, a file of {model.describe()}{via}; "
                                    "replacing the output would delete it: write the merge somewhere else")
        if model.directory is not None and model.directory.resolve() in target.parents:
            raise NearswapError(f"the output {out} is inside {model.describe()}; write the merge somewhere else")


def describe_plan(plan_: Plan) -> list[str]:
    """What a merge will read, write and need on disk, fused (this run) and as the separate
    two-model passes other tools run, one per secondary (each intermediate written, then read
    back by the next pass)."""
    out, n = plan_.out_bytes, len(plan_.secondaries)
    reads = plan_.read_bytes
    gb = 1e9
    lines = [f"plan: {plan_.base.label} + {n} secondar{'y' if n == 1 else 'ies'}, {plan_.base.num_params / 1e9:.2f}B "
             f"parameters each; fused chain (this run): reads {reads / gb:.1f} GB, writes {out / gb:.1f} GB, "
             f"needs {out / gb:.1f} GB of disk"]
    if n > 1:
        lines.append(f"  as {n} separate passes: reads {(reads + (n - 1) * out) / gb:.1f} GB, writes {n * out / gb:.1f} GB "
                     f"({n - 1} intermediate{'s' if n > 2 else ''}), needs {2 * out / gb:.1f} GB of disk at once")
    return lines



def gguf_types(plan_: Plan, type_name: str) -> list[Any]:
    """The GGML type of each output tensor: the base's own (``like-base``), or ``type_name``
    for matrices (F16 where a row does not fill whole blocks) and F32 for the rest, as
    llama.cpp's quantizer does."""
    from gguf import GGMLQuantizationType as Q

    from ..formats.gguf_writer import tensor_type

    if type_name == "like-base":
        return [cast(Any, t.base.source).qtype for t in plan_.tasks]  # (GGUF inputs: a GGUFSource each)
    try:
        qtype = Q[type_name.upper()]
    except KeyError:
        raise NearswapError(f"unknown GGUF type {type_name!r}; give like-base or a GGML type such as "
                            "f16, bf16, q8_0, q4_0, q4_k, q6_k") from None
    return [tensor_type(t.shape, qtype) for t in plan_.tasks]


def gguf_plan(recipe: Recipe, type_name: str = "like-base") -> tuple[Plan, list[Any]]:
    """The plan of a merge into a .gguf file (inputs kept in their own types) and each tensor's
    GGUF type; the plan's output bytes are the file's tensor bytes in those types."""
    from ..formats.gguf_writer import coded_bytes

    plan_ = plan(recipe, native=True)
    types = gguf_types(plan_, type_name)
    plan_.stored = {t.name: coded_bytes(t.numel, q) for t, q in zip(plan_.tasks, types)}
    return plan_, types


def plan_for(recipe: Recipe, out: str | Path, gguf_type: str | None = None) -> Plan:
    """The plan of a merge into ``out``: a directory, a .gguf file (its types' sizes) or null:."""
    if not is_null(out) and Path(out).suffix.lower() == ".gguf":
        return gguf_plan(recipe, gguf_type or "like-base")[0]
    return plan(recipe)



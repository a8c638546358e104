"""The models an evaluation reads: any path nearswap opens, as a transformers model on the CPU.

An HF directory is loaded as it is. A GGUF file is first converted by ``nearswap convert``
(the same conversion a merge uses: its tensors dequantized to float32, config and tokenizer
from its metadata) into the cache, once per file version; a lone ``.safetensors`` file has no
config, so it is refused with what to pass instead. Every check happens before any model is
loaded: a missing path, an unreadable model, a model without a tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import NearswapError, shown
from ..core.files import read_json_shallow
from ..core.paths import cache_dir
from ..formats import VOCABULARY_FILES, open_model

JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Candidate:
    """One model of an evaluation: what the user named and the HF directory that is loaded."""

    name: str  # as the report shows it
    given: Path
    hf_dir: Path | None  # None until a GGUF is converted
    format: str
    parameters: int
    model: Any = None  # the opened header (formats.Model): its files must not be overwritten by the report
    backend: str = "torch"  # "torch" (transformers on the HF directory) or "llama.cpp" (the GGUF itself)
    tasks_only: bool = False  # an --against model: its task scores pair with a model's, no drift or stories
    quant: str | None = None  # a GGUF's file type (Q4_K_M, Q8_0, F16...), None for an HF directory


BACKENDS = ("auto", "llama.cpp", "torch", "per-file")


def _is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def resolve_backend(paths: list[Path], asked: str) -> str:
    """``auto``: llama.cpp when every model is a GGUF, else torch for all (a comparison is
    like for like: the same arithmetic on both sides); ``per-file``: llama.cpp for each GGUF
    and torch for the rest (an HF base against GGUF quants, the backends' difference included)."""
    if asked not in BACKENDS:
        raise NearswapError(f"--backend must be one of {', '.join(BACKENDS)}, not {asked!r}")
    if asked == "auto":
        return "llama.cpp" if paths and all(_is_gguf(p) for p in paths) else "torch"
    return asked


def backend_for(path: Path, asked: str) -> str:
    """The backend that runs ``path`` (``asked`` already resolved: llama.cpp, torch or
    per-file); llama.cpp is refused for what is not a GGUF file."""
    is_gguf = _is_gguf(path)
    if asked == "per-file":
        return "llama.cpp" if is_gguf else "torch"
    if asked == "llama.cpp" and not is_gguf:
        raise NearswapError(f"{path}: the llama.cpp backend runs GGUF files; convert it (nearswap export {path} -o "
                            f"{path.name}.gguf), or pass --backend torch (every model in torch) or --backend per-file")
    return asked


def check(paths: list[str | Path], labels: list[str] | None = None, tokenizer: bool = True,
          backend: str = "torch") -> list[Candidate]:
    """Open every model's header (no weights) and refuse what cannot be evaluated; without
    ``tokenizer``, a directory may lack tokenizer files (it is read with another model's).
    ``backend``: "auto", "llama.cpp", "torch" or "per-file" (``resolve_backend``)."""
    out = []
    backend = resolve_backend([Path(p) for p in paths], backend)
    names: dict[str, int] = {}
    for i, p in enumerate(paths):
        label = labels[i] if labels else "reference" if i == 0 else f"model {i + 1}"
        path = Path(p)
        if not path.exists():
            hint = " (a Hub id? download the model first: nearswap reads local files)" if "/" in str(p) and not str(p).startswith((".", "/")) else ""
            raise NearswapError(f"{label}: {path} does not exist{hint}")
        model = open_model(path, label)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            raise NearswapError(f"{label}: {path} is a lone .safetensors file without config.json; evaluate the "
                                "model directory that holds it")
        if path.is_dir():
            if model.config is None:
                raise NearswapError(f"{label}: {path} has no config.json; transformers cannot build the model")
            if tokenizer and not any((path / f).exists() for f in VOCABULARY_FILES):
                raise NearswapError(f"{label}: {path} has no tokenizer (none of {', '.join(VOCABULARY_FILES)}); copy "
                                    "the base model's tokenizer files into it (a nearswap merge does this itself)")
            for name in JSON_FILES:  # parsed again by transformers and tokenizers, whose parsers recurse
                if os.path.lexists(path / name):
                    read_json_shallow(path / name, label)
        name = path.name if path.name else str(path)
        names[name] = names.get(name, 0) + 1
        if names[name] > 1:
            name = f"{name} ({names[name]})"
        chosen = backend_for(path, backend)
        if chosen == "llama.cpp":
            from ..core import llamacpp

            llamacpp.required(f"{label}: evaluating {path.name} with llama.cpp (or pass --backend torch)")
        # (llama.cpp runs a GGUF's own blocks: not "dequantized to F32", as nearswap reads it for torch)
        described = model.format.replace("; dequantized to F32", "") if chosen == "llama.cpp" else model.format
        out.append(Candidate(name, path, path if path.is_dir() else None, described, model.num_params, model,
                             chosen, quant=_quant_of(path)))
    return out


def _quant_of(path: Path) -> str | None:
    if not _is_gguf(path):
        return None
    from ..formats.gguf_header import file_type_name, read_header

    return file_type_name(read_header(path))


def check_pairs(models: list[Candidate], against: list[Candidate]) -> None:
    """Each model and its --against model are the same quant of two models of one shape (a merge
    and its base): a Q4_K_M merge paired with the base's Q8_0 would measure the quants'
    difference, not the merge's, and a model of other tensors is not this merge's base. Refused in
    one line where both files say their type and the types differ, or where the tensors' names
    or shapes differ. (Which model an --against file was made from, its bytes cannot say: the
    report names it as given.)"""
    for m, a in zip(models, against):
        if m.quant and a.quant and "?" not in (m.quant, a.quant) and m.quant != a.quant:
            raise NearswapError(f"{m.given} ({m.quant}) is paired with {a.given} ({a.quant}): --against takes, for each "
                                "model after the reference, the same quant of the model to compare it with, in order")
        ours, theirs = ({n: t.shape for n, t in c.model.tensors.items()} for c in (m, a))
        if ours != theirs:
            name = next((n for n in ours if theirs.get(n) != ours[n]), None) or next(n for n in theirs if n not in ours)
            why = (f"{shown(name)} is {list(ours[name])} in one, {list(theirs[name])} in the other"
                   if name in ours and name in theirs else f"{shown(name)} is in only one of them")
            raise NearswapError(f"{m.given} is paired with {a.given}, a model of other tensors ({why}): --against "
                                "takes the same quant of the model the merge is compared with (its base), of the same "
                                "architecture and size")


def open_for_eval(cand: Candidate, threads: int | None, echo: Callable[[str], None] = lambda s: None,
                  n_ctx: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of one candidate on its backend: transformers' pair, or for llama.cpp
    the ``LlamaModel`` twice (it tokenizes as well)."""
    if cand.backend == "llama.cpp":
        from ..runtime.llama_model import LlamaModel

        m = LlamaModel(cand.given, n_ctx=n_ctx or LLAMA_CONTEXT, threads=threads)
        return m, m
    return load(hf_directory(cand, echo), threads)


LLAMA_CONTEXT = 4096  # llama.cpp's context for an evaluation (or the model's own, when shorter)


def hf_directory(candidate: Candidate, echo: Callable[[str], None] = lambda s: None) -> Path:
    """The HF directory to load: the model's own, or its GGUF converted once into the cache."""
    if candidate.hf_dir is not None:
        return candidate.hf_dir
    from ..merging.convert import convert

    st = candidate.given.stat()
    key = hashlib.sha256(f"{candidate.given.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "eval" / "converted" / f"{candidate.given.stem}-{key}"
    if not (target / "config.json").exists():
        echo(f"converting {candidate.given.name} to an HF checkpoint for transformers (once, cached in {target.parent})")
        convert(candidate.given, target, force=True)
    if not any((target / f).exists() for f in VOCABULARY_FILES):
        raise NearswapError(f"{candidate.given}: its GGUF vocabulary could not be turned into a tokenizer by transformers; "
                            "evaluate its HF twin instead")
    candidate.hf_dir = target
    return target


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and bars off while nearswap loads a model, and back afterwards."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load(path: str | Path, threads: int | None = None, tokenizer: str | Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF directory: float32, CPU, evaluation mode; the tokenizer
    from ``tokenizer`` when given (a merge without tokenizer files takes its base's). The one
    loader of the judge, the sweep, the demo's stories and the imatrix."""
    torch, transformers = require(lm_eval=False)
    if threads:
        torch.set_num_threads(threads)
    try:
        with quiet_transformers():
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer or path))
    except (OSError, ValueError, KeyError) as e:
        raise NearswapError(f"{path}: transformers cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    model.eval()
    return model, tok


def require(lm_eval: bool = True) -> tuple[Any, Any]:
    """torch and transformers (and lm-eval, which scores the tasks, unless ``lm_eval`` is
    False), or one line naming the extra that holds them and how to install it. Returns
    (torch, transformers). The one check of the judge's extras."""
    import importlib.util

    def installed(module: str) -> bool:  # (without importing it: transformers warns on import without torch)
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    missing = [m for m in ("torch", "transformers", *(("lm_eval",) if lm_eval else ())) if not installed(m)]
    if missing:
        extra = "judge" if lm_eval else "eval"
        raise NearswapError(f"this needs the {extra} extra ({', '.join(missing)} missing): "
                            f"pip install 'nearswap[{extra}]' (torch==2.13.0 is the CPU build)")
    import torch
    import transformers

    return torch, transformers

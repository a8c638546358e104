"""GGUF export: an HF checkpoint (or any model nearswap reads) written as a GGUF file for
llama.cpp, in the types nearswap codes itself (``formats.gguf_writer``) or through llama.cpp's
own whole-file quantizer, ``llama_model_quantize`` (``llama_quantizer``: the one place that
chooses which llama.cpp runs it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..core.errors import NearswapError, shown
from ..formats.architectures import (
    BY_HF_CLASS,
    Arch,
    add_metadata,
    gguf_name,
    llama3_rope_factors,
    rope_scaling_of,
    short_name,
)

if TYPE_CHECKING:
    from .imatrix import Matrix

# ---------------------------------------------------------------- writing (export)

# --type -> (GGML type of 2-D weights, GGUF file type). Norms and other 1-D tensors stay F32.
EXPORT_TYPES = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
# --type -> llama.cpp file type, for the quantizers only llama.cpp has (K-quants, i-quants that
# need no importance matrix): llama.cpp's whole-file quantizer (``llama_quantizer``).
LLAMA_CPP_TYPES = {
    "q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K", "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS",
}
# Types only llama.cpp's quantizer writes, and only with an importance matrix (``--imatrix``)
IMATRIX_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m")
IMATRIX_FTYPES = {t: f"MOSTLY_{t.upper()}" for t in IMATRIX_TYPES}  # (gguf's LlamaFileType names)
LLAMA_QUANTIZE = "llama-quantize"  # llama.cpp's quantizer program: the one that reads an imatrix file
REQUIRED_CONFIG = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _config_value(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, also where transformers 5 keeps it (``rope_parameters``, per attention
    kind for Gemma 3: the full-attention layers' theta is the one GGUF stores)."""
    if key == "rope_theta" and config.get("rope_theta") is None and isinstance(config.get("rope_parameters"), dict):
        params = config["rope_parameters"]
        params = params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params
        return params.get("rope_theta")
    return config.get(key)


def export_config(model: Any, arch: Arch) -> dict[str, Any]:
    """The config.json values the GGUF metadata of ``arch`` needs, checked: positive integers
    for the shapes, numbers for the rest; vocab_size from the embeddings when config.json
    omits it; optional values (head_dim, sliding_window, softcaps) only when set."""
    from ..formats.architectures import CONFIG_KEYS

    config = model.config or {}
    where = str(model.path)
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise NearswapError(f"{where}: config.json has no {key}, which the GGUF metadata needs; add it")
    embed = model.tensors.get("model.embed_tokens.weight")
    defaults = {"num_key_value_heads": config["num_attention_heads"], "max_position_embeddings": 2048,
                "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
    out: dict[str, Any] = {}
    for key, _template, kind in CONFIG_KEYS:
        if key not in arch.keys:
            continue
        value = _config_value(config, key)
        if value is None:
            value = defaults.get(key)
        if value is None:
            continue
        if kind is int and (type(value) is not int or value <= 0):
            raise NearswapError(f"{where}: config.json {key} is {shown(value)}; a positive integer is needed")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise NearswapError(f"{where}: config.json {key} is {shown(value)}; a number is needed")
        out[key] = kind(value)
    vocab = config.get("vocab_size", embed.shape[0] if embed is not None else None)
    if type(vocab) is not int or vocab <= 0:
        raise NearswapError(f"{where}: config.json vocab_size is {shown(vocab)}; a positive integer is needed")
    out["vocab_size"] = vocab
    if config.get("head_dim") is None and out["hidden_size"] % out["num_attention_heads"]:
        raise NearswapError(f"{where}: config.json hidden_size {out['hidden_size']} is not a multiple of "
                            f"num_attention_heads {out['num_attention_heads']}; give head_dim")
    if isinstance(config.get("head_dim"), int):
        out["head_dim"] = config["head_dim"]
    return out


def carried_general_keys() -> tuple[str, ...]:
    """The ``general.*`` values an export takes from its vocabulary's GGUF: what the weights
    inherit whatever was done to them (the license terms, the languages). Its name, size
    label and file type describe the new file and are written afresh."""
    from gguf import Keys

    g = Keys.General
    return (g.LICENSE, g.LICENSE_NAME, g.LICENSE_LINK, g.LANGUAGES)


def model_name(model: Any) -> str:
    """``general.name`` of an export: the name of the model it holds, not of the file it is
    written to (``merged.q4_k_m.gguf`` holds "merged"): a GGUF's own ``general.name``, else the
    model's folder (or file) name as given."""
    name = model.metadata.get("general.name") if model.kind == "gguf" else None
    if isinstance(name, str) and name.strip():
        return name
    from ..formats.identity import name_of

    path = Path(model.path)
    return name_of(path) if path.is_dir() else path.stem


def _gguf_vocab(source: Path) -> Callable[[Any], None]:
    """Every tokenizer.* field of another GGUF, as it is, and its license and languages
    (``carried_general_keys``), read now (with nearswap's bounded header reader: a file
    declaring a billion tokens is refused, not allocated) and returned as a function that
    adds them to a writer."""
    from ..formats.gguf_header import HeaderError
    from ..formats.gguf_writer import metadata_of

    try:
        _, kv = metadata_of(source, prefix="tokenizer.")
        _, general = metadata_of(source, prefix="general.")
    except (HeaderError, OSError) as e:
        raise NearswapError(f"vocabulary source {source}: not a readable GGUF file: {e}") from None
    carried = carried_general_keys()
    kv += [item for item in general if item[0] in carried]

    def add(w: Any) -> None:
        for key, value, vtype, item in kv:
            w.add_key_value(key, value, vtype, item)

    return add


def _hf_vocab(directory: Path) -> Callable[[Any], None]:
    """A BPE vocabulary from tokenizer.json (gguf.vocab): tokens, types, merges, special ids;
    read now, added to a writer by the function returned."""
    from gguf.vocab import BpeVocab, SpecialVocab

    from ..core.files import read_json_object

    read_json_object(directory / "tokenizer.json", "vocabulary")  # bounded: a regular file of sane JSON
    try:
        vocab = BpeVocab(directory)
        tokens, types = [], []
        for text, _score, toktype in vocab.all_tokens():
            tokens.append(text)
            types.append(toktype)
        special = SpecialVocab(directory, load_merges=True, n_vocab=len(tokens))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise NearswapError(f"{directory / 'tokenizer.json'}: cannot build a GGUF vocabulary from it "
                            f"({type(e).__name__}: {shown(str(e), 120)}); pass --vocab-from MODEL.gguf") from None

    import warnings

    from ..core.errors import NearswapWarning

    warnings.warn(f"the GGUF vocabulary is rebuilt from {directory / 'tokenizer.json'}: llama.cpp's pre-tokenizer "
                  "name cannot be derived from HF files and is written as 'default', and GGUF-only settings "
                  "(add_space_prefix, general.license) are not carried; pass --vocab-from THE_ORIGINAL.gguf to keep "
                  "them", NearswapWarning)

    def add(w: Any) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        special.add_to_gguf(w)

    return add


def _vocab_source(model: Any, vocab_from: Path | None) -> tuple[str, Path]:
    """Where the exported file's vocabulary comes from (see ``export_gguf``)."""
    from ..core.files import parse_json

    if vocab_from is not None:
        return "gguf", Path(vocab_from)
    if model.path.suffix.lower() == ".gguf":
        return "gguf", model.path
    origin = model.metadata.get("nearswap_converted_from")
    if origin is None and model.metadata.get("nearswap_recipe"):
        recipe = parse_json(model.metadata["nearswap_recipe"], f"{model.path}: its nearswap_recipe metadata")
        if not isinstance(recipe, dict):
            raise NearswapError(f"{model.path}: its nearswap_recipe metadata is not a recipe; pass --vocab-from")
        origin = recipe.get("base")
    if isinstance(origin, str) and origin.lower().endswith(".gguf") and Path(origin).is_file():
        return "gguf", Path(origin)
    if model.directory is not None and (model.directory / "tokenizer.json").is_file():
        return "hf", model.directory
    raise NearswapError(f"{model.path}: no vocabulary to put in the GGUF (no tokenizer.json, no GGUF origin); "
                        "pass --vocab-from MODEL.gguf")


def export_gguf(source: str | Path, out: str | Path, type_name: str = "q8_0", *, vocab_from: str | Path | None = None,
                force: bool = False, progress: Callable[[int], None] | None = None,
                on_start: Callable[[Any], None] | None = None, threads: int | None = None,
                imatrix: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write a llama-family model (HF dir, safetensors or GGUF) as a GGUF file of ``type_name``.

    2-D weights become ``type_name`` (quantized with gguf.quants; F16 where a row does not
    fit the quant block), 1-D tensors (norms) stay F32, Q/K rows get llama.cpp's RoPE
    permutation. The vocabulary comes from ``vocab_from`` (a GGUF), else the source itself
    if it is a GGUF, else the GGUF the source was merged or converted from (recorded in its
    metadata), else its tokenizer.json (BPE). Written into a hidden sibling of ``out`` (one
    run per ``out`` at a time) and renamed when complete; ``force`` replaces a GGUF file.
    The K-quant and i-quant types are llama.cpp's own quantizer's, from the f32 export
    (``llama_quantizer``). ``imatrix``: an importance matrix file (``nearswap imatrix``) given to
    it, which weighs each column's rounding.
    """
    from ..formats.gguf_header import read_header
    from ..runtime.output import atomic_file

    out = Path(out)
    if imatrix is None and type_name in IMATRIX_TYPES:
        raise NearswapError(f"{type_name} needs an importance matrix: make one with `nearswap imatrix MODEL --text "
                            f"FILE -o imatrix.gguf` and pass --imatrix imatrix.gguf")
    if type_name not in EXPORT_TYPES and type_name not in LLAMA_CPP_TYPES and type_name not in IMATRIX_TYPES:
        raise NearswapError(f"unknown GGUF type {type_name!r}; nearswap writes {', '.join(EXPORT_TYPES)}, and "
                            f"llama.cpp's quantizer {', '.join(LLAMA_CPP_TYPES)} (and, with --imatrix, "
                            f"{', '.join(IMATRIX_TYPES)})")
    own = type_name in EXPORT_TYPES and imatrix is None
    quantize = None if own else llama_quantizer(type_name, Path(imatrix) if imatrix is not None else None, threads, log)
    with atomic_file(out, force) as part:
        if quantize is None:
            result = _write_gguf(source, out, part, type_name, vocab_from, progress, on_start)
        else:  # llama.cpp quantizes the f32 export
            f32 = part.with_name(part.name + ".f32")
            try:
                result = _write_gguf(source, out, f32, "f32", vocab_from, progress, on_start)
                result.update(quantize(source, f32, part))
            finally:
                f32.unlink(missing_ok=True)
            kinds: dict[str, int] = {}
            for t in read_header(part).tensors:  # what llama.cpp chose, fallbacks included
                kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
            result["tensors"] = kinds
    return {**result, "output": str(out), "type": type_name, "bytes": out.stat().st_size}


Quantize = Callable[[Any, Path, Path], dict[str, Any]]  # (source, f32 GGUF, output) -> what to report


def llama_quantizer(type_name: str, imatrix: Path | None, threads: int | None,
                    log: Callable[[str], None] | None = None) -> Quantize:
    """llama.cpp's whole-file quantizer, ``llama_model_quantize`` (its per-tensor type rules),
    chosen and checked usable before any work; the same function whichever is here, in this order:

    1. llama.cpp's ``llama-quantize`` program on PATH (a llama.cpp the user built);
    2. the function compiled once against the prebuilt llama.cpp (the ``llama`` extra, in every
       ``make setup``; ``core.llamacpp_quantize``), where it is built or a C++ compiler can build it;
    3. llama-cpp-python's binding (the ``llama-export`` extra), without an importance matrix
       (it takes one only as a C++ map).

    Quiet: llama.cpp's log is kept for a failure's one line, and goes to ``log`` (``-v``)."""
    import importlib.util
    import shutil

    from ..core import llamacpp, llamacpp_quantize
    from .imatrix import read as read_imatrix

    if type_name not in LLAMA_CPP_TYPES and type_name not in IMATRIX_TYPES:
        raise NearswapError(f"--imatrix is for llama.cpp's quantizer types ({', '.join([*LLAMA_CPP_TYPES, *IMATRIX_TYPES])}), "
                            f"not {type_name!r}")
    matrix = read_imatrix(imatrix) if imatrix is not None else None  # refuses a file that is no importance matrix
    program = shutil.which(LLAMA_QUANTIZE)
    if program is not None:
        return _program_quantizer(program, type_name, matrix, threads, log)
    binding = matrix is None and importlib.util.find_spec("llama_cpp") is not None
    if llamacpp.library_path() is not None and (llamacpp_quantize.buildable() or not binding):
        return _wheel_quantizer(type_name, matrix, threads, log)  # (without a compiler: one line, what to install)
    if binding:
        return _binding_quantizer(type_name, threads, log)
    raise NearswapError(f"--type {type_name} uses llama.cpp's whole-file quantizer (llama_model_quantize): pip install "
                        "'nearswap[llama]' (prebuilt; nearswap compiles the quantizer once against it), or put "
                        f"llama.cpp's {LLAMA_QUANTIZE} on PATH (docs/llama-cpp.md)")


def _imatrix_report(matrix: Matrix | None) -> dict[str, Any]:
    return {"imatrix": {"file": str(matrix.path), "entries": len(matrix.entries)}} if matrix is not None else {}


def _program_quantizer(program: str, type_name: str, matrix: Matrix | None, threads: int | None,
                       log: Callable[[str], None] | None) -> Quantize:
    """llama.cpp's ``llama-quantize`` program, its output captured (quoted where it fails)."""
    import subprocess

    with_matrix = ["--imatrix", str(matrix.path)] if matrix is not None else []

    def quantize(source: Any, f32: Path, part: Path) -> dict[str, Any]:
        proc = subprocess.run([program, *with_matrix, str(f32), str(part), type_name.upper(),
                               str(threads or os.cpu_count() or 1)], capture_output=True, text=True)
        if log is not None:
            log(proc.stderr + proc.stdout)
        if proc.returncode != 0:
            last = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-1:] or ["no output"]
            raise NearswapError(f"{LLAMA_QUANTIZE} could not quantize {source} to {type_name}"
                                f"{f' with {matrix.path}' if matrix is not None else ''} (exit {proc.returncode}): {last[0][:200]}")
        return _imatrix_report(matrix)

    return quantize


def _wheel_quantizer(type_name: str, matrix: Matrix | None, threads: int | None,
                     log: Callable[[str], None] | None) -> Quantize:
    """``llama_model_quantize`` compiled against the prebuilt llama.cpp (built before any work),
    with an importance matrix where given (its per-column values and the keys llama-quantize
    records of it)."""
    import gguf

    from ..core import llamacpp, llamacpp_quantize
    from .imatrix import importance

    llamacpp_quantize.library(lambda m: None)
    ftype = gguf.LlamaFileType[(LLAMA_CPP_TYPES | IMATRIX_FTYPES)[type_name]].value
    columns = importance(matrix.entries) if matrix is not None else None

    def quantize(source: Any, f32: Path, part: Path) -> dict[str, Any]:
        llamacpp.echo_log(log)  # (-v: llama.cpp's log as it comes; else only kept for a failure's line)
        try:
            llamacpp_quantize.quantize(f32, part, ftype, threads, columns, matrix.records if matrix else None)
        finally:
            llamacpp.echo_log(None)
        return _imatrix_report(matrix)

    return quantize


def _binding_quantizer(type_name: str, threads: int | None, log: Callable[[str], None] | None) -> Quantize:
    """llama-cpp-python's ``llama_model_quantize``; its logger (which prints llama.cpp's log to
    stderr) silenced unless ``log`` is given."""
    import logging

    import llama_cpp

    def quantize(source: Any, f32: Path, part: Path) -> dict[str, Any]:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_TYPES[type_name]}")
        params.nthread = threads or os.cpu_count() or 1
        logger = logging.getLogger("llama-cpp-python")
        level = logger.level
        logger.setLevel(logging.NOTSET if log is not None else logging.CRITICAL + 1)
        try:
            failed = llama_cpp.llama_model_quantize(str(f32).encode(), str(part).encode(), params) != 0
        finally:
            logger.setLevel(level)
        if failed:
            raise NearswapError(f"llama.cpp could not quantize {source} to {type_name}")
        return {}

    return quantize


def _write_gguf(source: str | Path, out: Path, part: Path, type_name: str, vocab_from: str | Path | None,
                progress: Callable[[int], None] | None, on_start: Callable[[Any], None] | None) -> dict[str, Any]:
    """The export itself, into ``part``: plan every tensor, then write metadata and data."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    from ..formats import open_model
    from ..formats.gguf_writer import coded_bytes, file_type, tensor_type
    from ..formats.safetensors import FileReader
    from ..runtime.output import check_free_space

    model = open_model(source, "model")
    vocab = Path(vocab_from) if vocab_from else None
    for f in [model.path, *model.files, *([vocab] if vocab else [])]:
        if f.resolve() == out.resolve():
            raise NearswapError(f"the output {out} is an input of the export; write it somewhere else")
    hf_arch = ((model.config or {}).get("architectures") or ["?"])[0]
    arch = BY_HF_CLASS.get(hf_arch)
    if arch is None:
        raise NearswapError(f"{model.path}: exporting {shown(hf_arch)} to GGUF is not supported yet "
                            f"(supported: {', '.join(BY_HF_CLASS)})")
    arch_name = arch.gguf
    vocab_kind, vocab_path = _vocab_source(model, vocab)
    add_vocab = _gguf_vocab(vocab_path) if vocab_kind == "gguf" else _hf_vocab(vocab_path)
    config = export_config(model, arch)
    qtype = Q[EXPORT_TYPES[type_name][0]]

    plan = []  # (hf name, gguf name, ggml type, permute heads, offset)
    for name, info in model.tensors.items():
        target = gguf_name(arch, name)
        if target is None:
            if name == "lm_head.weight" and arch.tied:  # tied: the embeddings serve as the output
                continue
            raise NearswapError(f"{model.path}: tensor {shown(name)} has no GGUF name in the {arch_name} row")
        tq = tensor_type(info.shape, qtype)  # the one rule, a merge into .gguf's too
        key = arch.permuted_heads(short_name(target))
        heads = config[key] if key else None
        if heads and (len(info.shape) != 2 or info.shape[0] % heads or (info.shape[0] // heads) % 2):
            raise NearswapError(f"{model.path}: {name} has shape {list(info.shape)}, which config.json's head count "
                                f"{heads} does not split into heads of whole row pairs; check config.json")
        plan.append((name, target, tq, heads, arch.offset(target)))

    if arch_name == "phi3" and isinstance((model.config or {}).get("rope_scaling"), dict):
        raise NearswapError(f"{model.path}: config.json has a rope_scaling (Phi-3's long context, rope_factors_long/"
                            "short in GGUF), which nearswap does not write yet: the GGUF would load with the wrong "
                            "rope; use llama.cpp's convert_hf_to_gguf.py for this model")
    generated: dict[str, np.ndarray] = {}  # GGUF tensors made from config.json, not from a weight
    scaling = rope_scaling_of(model.config or {}) if arch_name == "llama" else None
    if scaling is not None:
        dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        generated["rope_freqs.weight"] = llama3_rope_factors(config["rope_theta"], dim, scaling)
    check_free_space(out, sum(coded_bytes(model.tensors[name].numel, tq) for name, _, tq, _, _ in plan)
                     + sum(values.nbytes for values in generated.values()))
    if on_start:
        on_start(model)
    w = gguf.GGUFWriter(str(part), arch_name)
    try:
        w.add_name(model_name(model))
        add_metadata(w, arch, config)
        w.add_file_type(file_type(qtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(w)
        for target, values in generated.items():  # written first, so their data comes first
            w.add_tensor_info(target, values.shape, values.dtype, values.nbytes, raw_dtype=Q.F32)
        for name, target, tq, _, _ in plan:
            shape = model.tensors[name].shape
            byte_shape = quants.quant_shape_to_byte_shape(shape, tq) if tq not in (Q.F32, Q.F16) else shape
            np_dtype = {Q.F32: np.float32, Q.F16: np.float16}.get(tq, np.uint8)
            nbytes = int(np.prod(byte_shape)) * np.dtype(np_dtype).itemsize
            w.add_tensor_info(target, byte_shape, np.dtype(np_dtype), nbytes, raw_dtype=tq)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for values in generated.values():
            w.write_tensor_data(values)
        reader = FileReader()
        counts: dict[str, int] = {}
        try:
            for name, target, tq, heads, offset in plan:  # one tensor in memory at a time
                info = model.tensors[name]
                x = reader.read(info, 0, np.empty(info.numel, info.dtype.np)).reshape(info.shape).astype(np.float32)
                if offset:
                    x += np.float32(offset)
                if heads:
                    x = x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
                w.write_tensor_data(quants.quantize(x, tq))
                counts[tq.name] = counts.get(tq.name, 0) + 1
                if progress:
                    progress(info.nbytes)
        finally:
            reader.close()
    except OSError as e:
        raise NearswapError(f"cannot write {part}: {e.strerror or e}") from None
    finally:
        w.close()
    return {"tensors": counts, "vocabulary": f"{vocab_kind}: {vocab_path}", "in_bytes": model.nbytes}

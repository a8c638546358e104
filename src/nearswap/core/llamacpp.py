"""llama.cpp's own library, loaded once: the one place nearswap finds and declares it.

Which build: the ``xllamacpp`` wheel (the ``llama`` extra), a prebuilt llama.cpp for CPUs that
runs on glibc 2.17 and later, built for portability (AVX2, no AVX-512/AMX kernels). It is a
Python extension whose one shared object also exports llama.cpp's C API (``llama_*``,
``ggml_*``); nearswap calls that API with ``ctypes``, for what the wheel's own Python API
(a server) does not give: every position's logits, the KV cache kept between requests, and
ggml's quantizer. Nothing of xllamacpp's Python side is imported.

Why not llama-cpp-python: it ships as source only and compiles for many minutes, and built
natively on an AVX-512/AMX Xeon it crashed in decode at its default batch size (docs/llama-cpp.md says what was found). Its ``llama_model_quantize`` (a whole file with
llama.cpp's per-tensor type rules, ``export --type q4_k_m``) is the one thing the prebuilt
wheel does not export; ``llamacpp_quantize`` compiles it once against this library.

The C structures below are those of llama.h at the pinned version (``VERSION``); another
version may lay them out differently, so the library is used only when its defaults read
through these structures are llama.cpp's documented defaults (``_layout_holds``) — otherwise
one line says which version to install.
"""

from __future__ import annotations

import ctypes as C
import functools
import importlib.util
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .errors import NearswapError

PACKAGE = "xllamacpp"
VERSION = "2026.10.11549"  # llama.cpp build 11549; pyproject's `llama` extra pins it
INSTALL = f"pip install 'nearswap[llama]' (the prebuilt {PACKAGE}=={VERSION})"


class ModelParams(C.Structure):
    _fields_ = [("devices", C.c_void_p), ("tensor_buft_overrides", C.c_void_p), ("n_gpu_layers", C.c_int32),
                ("split_mode", C.c_int), ("load_mode", C.c_int), ("lazy_mode", C.c_int), ("main_gpu", C.c_int32),
                ("tensor_split", C.c_void_p), ("progress_callback", C.c_void_p),
                ("progress_callback_user_data", C.c_void_p), ("kv_overrides", C.c_void_p),
                ("vocab_only", C.c_bool), ("check_tensors", C.c_bool), ("use_extra_bufts", C.c_bool),
                ("no_host", C.c_bool), ("no_alloc", C.c_bool), ("load_mtp", C.c_bool)]


class ContextParams(C.Structure):
    _fields_ = [*[(n, C.c_uint32) for n in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq", "n_outputs_max",
                                             "n_outputs_max_per_seq")],
                ("n_threads", C.c_int32), ("n_threads_batch", C.c_int32),
                *[(n, C.c_int) for n in ("ctx_type", "rope_scaling_type", "pooling_type", "attention_type",
                                          "flash_attn_type")],
                *[(n, C.c_float) for n in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor",
                                            "yarn_beta_fast", "yarn_beta_slow")],
                ("yarn_orig_ctx", C.c_uint32), ("defrag_thold", C.c_float),
                ("cb_eval", C.c_void_p), ("cb_eval_user_data", C.c_void_p),
                ("type_k", C.c_int), ("type_v", C.c_int), ("moe_cache_size", C.c_size_t),
                ("abort_callback", C.c_void_p), ("abort_callback_data", C.c_void_p),
                *[(n, C.c_bool) for n in ("embeddings", "offload_kqv", "no_perf", "op_offload", "swa_full",
                                           "kv_unified")],
                ("samplers", C.c_void_p), ("n_samplers", C.c_size_t), ("ctx_other", C.c_void_p)]


class Batch(C.Structure):
    _fields_ = [("n_tokens", C.c_int32), ("token", C.POINTER(C.c_int32)), ("embd", C.c_void_p),
                ("pos", C.POINTER(C.c_int32)), ("n_seq_id", C.POINTER(C.c_int32)),
                ("seq_id", C.POINTER(C.POINTER(C.c_int32))), ("logits", C.POINTER(C.c_int8))]


LOG_CALLBACK = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)
_P = C.c_void_p
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [LOG_CALLBACK, _P]),
    "llama_print_system_info": (C.c_char_p, []),
    "llama_model_default_params": (ModelParams, []),
    "llama_context_default_params": (ContextParams, []),
    "llama_model_load_from_file": (_P, [C.c_char_p, ModelParams]),
    "llama_model_free": (None, [_P]),
    "llama_init_from_model": (_P, [_P, ContextParams]),
    "llama_free": (None, [_P]),
    "llama_model_get_vocab": (_P, [_P]),
    "llama_model_n_ctx_train": (C.c_int32, [_P]),
    "llama_model_desc": (C.c_int32, [_P, C.c_char_p, C.c_size_t]),
    "llama_model_size": (C.c_uint64, [_P]),
    "llama_n_ctx": (C.c_uint32, [_P]),
    "llama_vocab_n_tokens": (C.c_int32, [_P]),
    "llama_vocab_bos": (C.c_int32, [_P]),
    "llama_vocab_eos": (C.c_int32, [_P]),
    "llama_vocab_get_add_bos": (C.c_bool, [_P]),
    "llama_vocab_is_eog": (C.c_bool, [_P, C.c_int32]),
    "llama_tokenize": (C.c_int32, [_P, C.c_char_p, C.c_int32, C.POINTER(C.c_int32), C.c_int32, C.c_bool, C.c_bool]),
    "llama_token_to_piece": (C.c_int32, [_P, C.c_int32, C.c_char_p, C.c_int32, C.c_int32, C.c_bool]),
    "llama_batch_init": (Batch, [C.c_int32, C.c_int32, C.c_int32]),
    "llama_batch_free": (None, [Batch]),
    "llama_decode": (C.c_int32, [_P, Batch]),
    "llama_get_logits_ith": (C.POINTER(C.c_float), [_P, C.c_int32]),
    "llama_get_memory": (_P, [_P]),
    "llama_memory_clear": (None, [_P, C.c_bool]),
    "llama_memory_seq_rm": (C.c_bool, [_P, C.c_int32, C.c_int32, C.c_int32]),
    "llama_memory_seq_cp": (None, [_P, C.c_int32, C.c_int32, C.c_int32, C.c_int32]),
    "ggml_quantize_chunk": (C.c_size_t, [C.c_int, _P, _P, C.c_int64, C.c_int64, C.c_int64, _P]),
    "ggml_quantize_requires_imatrix": (C.c_bool, [C.c_int]),
}

LOG_LINES = 400  # llama.cpp's last log lines, kept for the one-line refusals (its reason is in them)
_log: deque[str] = deque(maxlen=LOG_LINES)
_log_lock = threading.Lock()
_echo: list[Callable[[str], None]] = []  # where llama.cpp's log goes besides the buffer (verbose)


DEBUG, CONT = 1, 5  # ggml_log_level: a debug line (not kept), the continuation of the line before
_skipping = [False]
_written = [0]  # lines appended so far (a mark for ``last_error``)


@LOG_CALLBACK
def _on_log(level: int, text: bytes | None, user_data: Any) -> None:
    line = (text or b"").decode("utf-8", "replace")
    with _log_lock:
        if level == CONT and _skipping[0]:
            return
        _skipping[0] = level == DEBUG
        if level == DEBUG:
            return
        if _log and (level == CONT or not _log[-1].endswith("\n")):
            _log[-1] += line  # llama.cpp logs a line in pieces
        else:
            _log.append(line)
            _written[0] += 1
    for echo in _echo:
        echo(line)


def log_lines() -> list[str]:
    """llama.cpp's recent log, one entry per line (its messages end in a newline)."""
    with _log_lock:
        return [line.rstrip("\n") for line in _log]


def mark() -> int:
    """Where llama.cpp's log stands now: ``last_error(mark)`` reads only what came after."""
    with _log_lock:
        return _written[0]


def last_error(since: int = 0) -> str:
    """The last line llama.cpp logged (after ``since``, a ``mark``) that gives a reason (an
    error; else a failure), or ''."""
    with _log_lock:
        new = min(_written[0] - since, len(_log))
    lines = log_lines()[-new:] if new > 0 else []
    for words in (("error",), ("failed", "invalid", "unknown", "unsupported", "not supported")):
        for line in reversed(lines):
            if any(w in line.lower() for w in words):
                return line.strip()
    return ""


def echo_log(echo: Callable[[str], None] | None) -> None:
    """Also send llama.cpp's log to ``echo`` (``-v``); None: only into the buffer."""
    _echo.clear()
    if echo is not None:
        _echo.append(echo)


def library_path() -> Path | None:
    """The shared object of the installed ``xllamacpp`` (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("xllamacpp*.so")) + sorted(folder.glob("xllamacpp*.pyd"))
    return found[0] if found else None


def installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def _layout_holds(lib: Any) -> bool:
    """Whether llama.cpp's defaults read through this module's structures are its documented
    ones (a batch of 2048, micro-batches of 512, one sequence, an F16 KV cache, layers on the
    GPU when there is one): a library laid out otherwise would be called with wrong fields."""
    m, c = lib.llama_model_default_params(), lib.llama_context_default_params()
    return (m.n_gpu_layers == -1 and m.devices is None and c.n_batch == 2048 and c.n_ubatch == 512
            and c.n_seq_max == 1 and c.type_k == 1 and c.type_v == 1 and c.offload_kqv and c.samplers is None
            and c.n_samplers == 0 and c.ctx_other is None)


@functools.lru_cache(maxsize=1)
def library() -> Any:
    """llama.cpp's library with its functions declared, or None where the ``llama`` extra is
    not installed. Raises (one line) where it is installed at a version laid out otherwise."""
    path = library_path()
    if path is None:
        return None
    lib = C.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise NearswapError(f"{path}: llama.cpp's library lacks {name}; install {PACKAGE}=={VERSION} "
                                f"(found {installed_version()})")
        fn.restype, fn.argtypes = restype, argtypes
    lib.llama_log_set(_on_log, None)
    lib.llama_backend_init()
    if not _layout_holds(lib):
        raise NearswapError(f"{path}: this llama.cpp ({PACKAGE} {installed_version()}) lays out its parameters "
                            f"otherwise than nearswap knows; install {PACKAGE}=={VERSION}")
    return lib


def required(what: str) -> Any:
    """The library, or one line saying that ``what`` needs it and how to install it."""
    lib = library()
    if lib is None:
        raise NearswapError(f"{what} needs llama.cpp: {INSTALL}")
    return lib


def system_info() -> str:
    """What llama.cpp's CPU kernels use here (AVX2, FMA, ...), as llama.cpp prints it."""
    lib = library()
    return "" if lib is None else lib.llama_print_system_info().decode().strip()

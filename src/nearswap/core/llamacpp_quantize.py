"""llama.cpp's whole-file quantizer, ``llama_model_quantize``, for the prebuilt llama.cpp.

``export --type q4_k_m`` (and the other K-quant and i-quant mixes) is llama.cpp's per-tensor
type policy — Q6_K for some ``attn_v``/``ffn_down`` rows, the output head, and so on — applied
by ``llama_model_quantize``. The prebuilt ``xllamacpp`` wheel (``core.llamacpp``) exports
llama.cpp's C API but not that function. Its source is one file of llama.cpp,
``src/llama-quant.cpp``, and every other symbol it needs is exported by the wheel: so nearswap
compiles that file, from the same llama.cpp build (the wheel's own sdist, its sha256 checked),
once, into a small library beside nearswap's cache, linked against the wheel (which was built
with the old C++ string ABI, ``_GLIBCXX_USE_CXX11_ABI=0``), and calls it with ``ctypes``.
Needs a C++ compiler (``$CXX``, else ``g++`` or ``c++``; seconds, once: docs/llama-cpp.md); where there is none, or
the download fails, one line says so and what else to install (the ``llama-export`` extra, or
llama.cpp's ``llama-quantize`` on PATH). Nothing here writes a quantization rule of its own.
"""

from __future__ import annotations

import ctypes as C
import functools
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

from . import llamacpp
from .errors import NearswapError
from .paths import cache_dir

SDIST_SHA256 = "c17ee1163006f70726abb9f72137830818f3d8cb60bfc34cb232d08428eaa22b"  # xllamacpp-<VERSION>.tar.gz
SDIST_MB = 38
LLAMA_CPP = "thirdparty/llama.cpp"  # llama.cpp's source inside the sdist
SOURCE = "src/llama-quant.cpp"
HEADERS = ("src/", "include/", "ggml/include/")  # what it includes (headers only)
LIBRARY = "libnearswap_llama_quantize.so"


class QuantizeParams(C.Structure):
    """``llama_model_quantize_params`` of llama.h at ``llamacpp.VERSION``."""

    _fields_ = [("nthread", C.c_int32), ("ftype", C.c_int), ("output_tensor_type", C.c_int),
                ("token_embedding_type", C.c_int),
                *[(n, C.c_bool) for n in ("allow_requantize", "quantize_output_tensor", "only_copy", "pure",
                                           "keep_split", "dry_run")],
                ("imatrix", C.c_void_p), ("kv_overrides", C.c_void_p), ("tt_overrides", C.c_void_p),
                ("prune_layers", C.c_void_p), ("max_buf_size", C.c_size_t)]


class ImatrixData(C.Structure):
    """``llama_model_imatrix_data``: one tensor's per-column importance (a name of None ends the list)."""

    _fields_ = [("name", C.c_char_p), ("data", C.POINTER(C.c_float)), ("size", C.c_size_t)]


class KvOverride(C.Structure):
    """``llama_model_kv_override``: a key written into the output (an empty key ends the list)."""

    class _Value(C.Union):
        _fields_ = [("val_i64", C.c_int64), ("val_f64", C.c_double), ("val_bool", C.c_bool), ("val_str", C.c_char * 128)]

    _anonymous_ = ("value",)
    _fields_ = [("tag", C.c_int), ("key", C.c_char * 128), ("value", _Value)]


KV_INT, KV_STR = 0, 3  # llama_model_kv_override_type

Q8_0_FTYPE, GGML_TYPE_COUNT = 7, 43  # the defaults' llama_ftype and "no type" (ggml.h at VERSION)


def built_path() -> Path:
    """Where the quantizer built against *this* installed wheel lives. The library finds the
    wheel by its folder (its run path), so each installation has a build of its own: one built
    against another virtual environment's copy would load that copy, a second llama.cpp with a
    log, a state and maybe a version of its own (how CI first met it: a cache shared between
    checkouts)."""
    import hashlib

    wheel = llamacpp.library_path()
    where = hashlib.sha256(str(wheel.resolve() if wheel else "none").encode()).hexdigest()[:12]
    return cache_dir() / "llama.cpp" / f"{llamacpp.PACKAGE}-{llamacpp.VERSION}" / where / LIBRARY


def compiler() -> str | None:
    """The C++ compiler that builds the quantizer: $CXX, else g++ or c++; None where there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def buildable() -> bool:
    """Whether the quantizer is built for this installation, or a C++ compiler is here to build it."""
    return built_path().is_file() or compiler() is not None


def source(echo: Callable[[str], None] = lambda s: None) -> Path:
    """llama.cpp's tree of the wheel's build, holding only what the quantizer compiles from (its
    file and the headers): from the wheel's sdist (sha256 checked), kept in the cache for every
    installation's build of this version."""
    from .pypi import download

    tree = cache_dir() / "llama.cpp" / f"{llamacpp.PACKAGE}-{llamacpp.VERSION}" / "source"
    if (tree / SOURCE).is_file():
        return tree
    tree.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tree.parent, prefix=".source.") as tmp:
        work = Path(tmp)
        echo(f"llama.cpp's quantizer: its source from {llamacpp.PACKAGE} {llamacpp.VERSION} ({SDIST_MB} MB from PyPI)")
        archive = download(llamacpp.PACKAGE, llamacpp.VERSION, SDIST_SHA256, work)
        root = f"{llamacpp.PACKAGE}-{llamacpp.VERSION}/{LLAMA_CPP}/"
        with tarfile.open(archive) as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(root)
                      and (m.name == root + SOURCE or (m.name.endswith(".h") and m.name[len(root):].startswith(HEADERS)))]
            tar.extractall(work / "src", members=wanted, filter="data")
        try:
            os.rename(work / "src" / root, tree)  # (complete, or not there)
        except OSError:  # something is there already: another process's copy, or not llama.cpp's source
            if not (tree / SOURCE).is_file():
                raise NearswapError(f"{tree} exists but holds no {SOURCE}; remove it and run again") from None
    return tree


def build(echo: Callable[[str], None] = lambda s: None) -> Path:
    """The quantizer library, compiled once for this installation of the prebuilt llama.cpp
    (kept in the cache)."""
    target = built_path()
    if target.is_file():
        return target
    wheel = llamacpp.library_path()
    if wheel is None:
        raise NearswapError(f"llama.cpp's quantizer is built against the prebuilt llama.cpp: {llamacpp.INSTALL}")
    cxx = compiler()
    if cxx is None:
        raise NearswapError("compiling llama.cpp's quantizer (llama-quant.cpp, once) needs a C++ compiler: install g++ "
                            "(or set CXX), or pip install 'nearswap[llama-export]', or put llama-quantize on PATH")
    tree = source(echo)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build.") as tmp:
        work = Path(tmp)
        echo("building llama.cpp's quantizer once: one file compiled against the installed library")
        part = work / LIBRARY
        cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-D_GLIBCXX_USE_CXX11_ABI=0",
               *(f"-I{tree / h}" for h in HEADERS), str(tree / SOURCE), "-o", str(part),
               f"-L{wheel.parent}", f"-l:{wheel.name}", f"-Wl,-rpath,{wheel.parent}", "-Wl,--no-undefined", "-pthread"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no output"]
            raise NearswapError(f"compiling llama.cpp's quantizer failed ({cxx}: {last[0][:200]}); "
                                "pip install 'nearswap[llama-export]', or put llama-quantize on PATH")
        os.replace(part, target)  # (another process may have built it meanwhile: the same file)
    return target


@functools.lru_cache(maxsize=1)
def library(echo: Callable[[str], None] = lambda s: None) -> Any:
    """``llama_model_quantize`` and its defaults, declared; built first where needed. The
    defaults read through ``QuantizeParams`` must be llama.cpp's (a check of the layout)."""
    wheel = llamacpp.required("quantizing with llama.cpp")  # the wheel first: the quantizer resolves its symbols there
    path = build(echo)
    lib = C.CDLL(str(path))
    if not same_llama(lib, wheel):
        raise NearswapError(f"{path} calls into another copy of llama.cpp than {llamacpp.library_path()} (its run "
                            f"path, or LD_LIBRARY_PATH, finds another {llamacpp.PACKAGE}); remove that file to rebuild "
                            f"it, and unset LD_LIBRARY_PATH")
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    lib.llama_model_quantize_default_params.argtypes = []
    lib.llama_model_quantize.restype = C.c_uint32
    lib.llama_model_quantize.argtypes = [C.c_char_p, C.c_char_p, C.POINTER(QuantizeParams)]
    p = lib.llama_model_quantize_default_params()
    if not (p.nthread == 0 and p.ftype == Q8_0_FTYPE and p.output_tensor_type == GGML_TYPE_COUNT
            and p.quantize_output_tensor and not p.pure and p.imatrix is None and p.max_buf_size > 0):
        raise NearswapError(f"{built_path()}: llama.cpp's quantizer lays out its parameters otherwise than nearswap "
                            f"knows; remove that file and install {llamacpp.PACKAGE}=={llamacpp.VERSION}")
    return lib


def same_llama(quantizer: Any, wheel: Any) -> bool:
    """Whether ``quantizer``'s llama.cpp functions are ``wheel``'s own (the same address of
    ``llama_log_set``, as each library resolves it), not those of a second copy loaded beside it."""
    return C.cast(quantizer.llama_log_set, C.c_void_p).value == C.cast(wheel.llama_log_set, C.c_void_p).value


def quantize(source: Path, out: Path, ftype: int, threads: int | None,
             importance: dict[str, Any] | None = None, records: dict[str, int | str] | None = None) -> None:
    """``source`` (a GGUF) quantized by llama.cpp to the file type ``ftype`` (``llama_ftype``)
    at ``out``; llama.cpp's reason in one line where it refuses. ``importance``: tensor name ->
    per-column importance (float32), for the i-quants; ``records``: keys written into the
    output as llama-quantize writes them (``quantize.imatrix.*``)."""
    import numpy as np

    lib = library()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    keep: list[Any] = []  # (what the C side points into, alive until it returns)
    if importance:
        entries = (ImatrixData * (len(importance) + 1))()
        for entry, (name, values) in zip(entries, importance.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(array)
            entry.name, entry.size = name.encode(), array.size
            entry.data = array.ctypes.data_as(C.POINTER(C.c_float))
        params.imatrix = C.cast(entries, C.c_void_p)
        keep.append(entries)
    if records:
        kvs = (KvOverride * (len(records) + 1))()
        for kv, (key, value) in zip(kvs, records.items()):
            kv.key = key.encode()[:127]
            if isinstance(value, int):
                kv.tag, kv.val_i64 = KV_INT, value
            else:
                kv.tag, kv.val_str = KV_STR, str(value).encode()[:127]
        params.kv_overrides = C.cast(kvs, C.c_void_p)
        keep.append(kvs)
    since = llamacpp.mark()
    if lib.llama_model_quantize(str(source).encode(), str(out).encode(), C.byref(params)) != 0:
        raise NearswapError(f"llama.cpp could not quantize {source} ({llamacpp.last_error(since) or 'no reason given'})")

"""GGUF output written in chunks, in place: what a GGUF-to-GGUF merge streams into.

The header (every metadata value of the base, tensor infos) is written with the ``gguf``
package's own writer; the file is then sized to its full length and each chunk of float32
values is quantized and written at its block's offset (``os.pwrite``), by any thread, in any
order — the same streaming the safetensors writer does, so memory stays bounded by the
chunk. Chunks start on block boundaries (the merge's chunk size is a multiple of every block
size), and the quantizers used here code each block on its own, so a tensor written in
chunks has the bytes it would have written whole.

Which quantizer codes a type: llama.cpp's own ``ggml_quantize_chunk`` when the ``llama``
extra is installed (``core.llamacpp``) (every type that needs no importance matrix; the reference, and far faster
than numpy: docs/design.md), else ``gguf.quants`` for the types it implements (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, BF16; the two agree byte for byte, tested). F32 and F16 are plain casts.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterable, cast

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..core.errors import NearswapError, WriteFailed
from ..core.llamacpp import INSTALL


@functools.lru_cache(maxsize=None)
def gguf_quantizes(qtype: GGMLQuantizationType) -> bool:
    """Whether the ``gguf`` package can code ``qtype`` itself (asked, not listed)."""
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return True
    from gguf import quants

    block = GGML_QUANT_SIZES[qtype][0]
    try:
        quants.quantize(np.zeros((1, block), np.float32), qtype)
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return False
    return True


def _ggml() -> Any:
    """llama.cpp's library (its ggml quantizer), or None where the ``llama`` extra is not installed."""
    from ..core import llamacpp

    return llamacpp.library()


PLAIN = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


def quantizer_for(qtype: GGMLQuantizationType) -> str:
    """``"numpy"``, ``"llama.cpp"`` or ``"gguf"``: who codes ``qtype`` here; a one-line error
    if nobody can."""
    if qtype in PLAIN:
        return "numpy"
    lib = _ggml()
    if lib is None and gguf_quantizes(qtype):
        return "gguf"
    if lib is None:
        raise NearswapError(f"writing {qtype.name} tensors needs llama.cpp's quantizer: {INSTALL} "
                            "(the gguf package codes only Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16, F16, F32), "
                            "or pass --type q8_0")
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise NearswapError(f"{qtype.name} needs an importance matrix, which a merge does not have; "
                            "pass --type q8_0 (or another type) and quantize with llama-quantize --imatrix")
    return "llama.cpp"


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Whole blocks of float32 ``values`` coded as ``qtype`` (a flat uint8/float array)."""
    if qtype == GGMLQuantizationType.F32:
        return values
    if qtype == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    block, size = GGML_QUANT_SIZES[qtype]
    if _ggml() is None:
        from gguf import quants

        return quants.quantize(values.reshape(-1, block), qtype).reshape(-1)
    values = np.ascontiguousarray(values, np.float32)
    out = np.empty(len(values) // block * size, np.uint8)
    # rows of one block: every type here codes a block on its own without an importance matrix
    n = _ggml().ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, len(values) // block, block,
                                    None)
    if n != out.nbytes:
        raise NearswapError(f"llama.cpp's quantizer wrote {n} bytes for {qtype.name}, {out.nbytes} expected")
    return out


def metadata_of(path: Path, drop: tuple[str, ...] = (), prefix: str = "") -> tuple[Any, list[tuple[str, Any, Any, Any]]]:
    """The architecture and the metadata values of the GGUF at ``path`` whose key starts with
    ``prefix`` (all by default; arrays included, read by the bounded header reader) as (key,
    value, type, item type), but ``drop``."""
    from .gguf_header import read_header

    header = read_header(path, arrays=(prefix,))
    kv = [(key, header.arrays[key] if key in header.arrays else header.metadata[key], vtype, item)
          for key, (vtype, item) in header.types.items() if key.startswith(prefix) and key not in drop]
    return header.metadata.get("general.architecture"), kv


def tensor_type(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The one rule for the GGML type of a tensor written when ``qtype`` is asked for (a merge
    into .gguf and ``export`` alike), as llama.cpp's quantizer has it: vectors in F32, matrices
    and stacks of them (3-D expert tensors) in ``qtype`` where their rows fill whole blocks,
    else F16."""
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else GGMLQuantizationType.F16


def file_type(qtype: GGMLQuantizationType) -> int | None:
    """``general.file_type`` of a file whose matrices are ``qtype`` (llama.cpp's ``LlamaFileType``),
    or None for a type that has no file type of its own."""
    from gguf import LlamaFileType

    found = getattr(LlamaFileType, "ALL_F32" if qtype == GGMLQuantizationType.F32 else f"MOSTLY_{qtype.name}", None)
    return int(found) if found is not None else None


def coded_bytes(numel: int, qtype: GGMLQuantizationType) -> int:
    """Bytes of ``numel`` elements coded as ``qtype`` (whole blocks)."""
    block, size = GGML_QUANT_SIZES[qtype]
    return numel // block * size


CHECKSUM_KEY = "nearswap.checksums"  # the file's own record of its bytes (``seal``), read by ``nearswap verify``
CHECKSUM_LEN = 256  # bytes of its value: written as a placeholder with the header, filled in at the end
PLACEHOLDER = "nearswap: checksums not yet written".ljust(CHECKSUM_LEN)


class GGUFStreamWriter:
    """A GGUF file at ``path`` with ``kv`` metadata and ``plan`` tensors (name, HF-order shape,
    type), its data written by ``write`` in chunks of float32 values.

    The header is always the one this run computes (built with the ``gguf`` package into
    memory, never read from an earlier run's file), written over the start of the file, which
    is sized to its full length; with ``resume`` an earlier run's file is opened as it is (never
    through a link), so that tensors it completed can be re-checked and kept. ``kv`` gets
    ``nearswap.checksums``, a fixed-size placeholder that ``seal`` replaces with the CRC of
    the header and the digest of every chunk's coded bytes."""

    def __init__(self, path: Path, arch: str, kv: Iterable[tuple[str, Any, Any, Any]],
                 plan: list[tuple[str, tuple[int, ...], GGMLQuantizationType]], resume: bool = False) -> None:
        import stat

        import gguf

        from .gguf_header import read_header

        self.path = path
        scratch = path.with_name(path.name + ".header")
        w = gguf.GGUFWriter(str(scratch), arch)
        try:
            for key, value, vtype, item in kv:
                if key == "general.alignment":
                    w.add_custom_alignment(int(value))
                elif key not in ("general.architecture", CHECKSUM_KEY):  # (a merge of a merge has one)
                    w.add_key_value(key, value, vtype, item)
            w.add_key_value(CHECKSUM_KEY, PLACEHOLDER, gguf.GGUFValueType.STRING)
            for name, shape, qtype in plan:
                block, size = GGML_QUANT_SIZES[qtype]
                numel = int(np.prod(shape)) if shape else 1
                byte_shape = (*shape[:-1], shape[-1] // block * size) if shape else (size,)
                dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)
                w.add_tensor_info(name, byte_shape if dtype is np.uint8 else shape, np.dtype(dtype),
                                  coded_bytes(numel, qtype), raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        finally:
            w.close()
        try:
            header = scratch.read_bytes()
        finally:
            scratch.unlink()
        align = w.data_alignment
        header += bytes(-len(header) % align)  # the data section starts aligned
        total = len(header) + sum(-(-(ti.nbytes) // align) * align for ti in w.tensors[0].values())
        if header.count(PLACEHOLDER.encode()) != 1:
            raise NearswapError(f"{path}: the checksum placeholder is not unique in the header (a metadata value "
                                "holds its text); rename that value")
        self.header, self.seal_at = header, header.index(PLACEHOLDER.encode())
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_CREAT | (os.O_NOFOLLOW | os.O_NONBLOCK if resume else os.O_EXCL)
        try:
            self.fd = os.open(path, flags, 0o644)
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.close(self.fd)
                raise NearswapError(f"{path} is not a regular file (something put it there while nearswap ran); run the merge again")
            os.ftruncate(self.fd, total)
            os.pwrite(self.fd, header, 0)
        except OSError as e:
            raise WriteFailed(f"cannot write {path}: {e.strerror}") from None
        found = read_header(path)  # where a reader will look: the offsets written, read back
        self.tensors = {t.name: (int(t.data_offset), t.tensor_type) for t in found.tensors}
        self.total_size = total

    def span(self, name: str, start: int, n: int) -> tuple[Path, int, int]:
        """Where elements ``start`` .. ``start + n`` of ``name`` are coded: (file, byte offset, bytes)."""
        offset, qtype = self.tensors[name]
        block, size = GGML_QUANT_SIZES[qtype]
        return self.path, offset + start // block * size, n // block * size

    def seal(self, chunk: int, crcs: dict[str, list[int]]) -> dict[str, Any]:
        """Fill ``nearswap.checksums`` in: the CRC-32C of the header (with the placeholder) and the
        digest of each tensor's chunk CRCs (of the coded bytes), in file order. Returns it."""
        import json

        from ..core import checksums

        order = sorted(self.tensors, key=lambda name: self.tensors[name][0])
        value = {"method": checksums.METHOD, "chunk": chunk, "header": checksums.crc(self.header),
                 "data": checksums.digest(crcs.get(name, []) for name in order)}
        text = json.dumps(value, separators=(",", ":")).ljust(CHECKSUM_LEN)
        try:
            os.pwrite(self.fd, text.encode(), self.seal_at)
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror}") from None
        return value

    requantizes = True  # what it stores differs from the float32 values it is given (``write_coded``)

    def write(self, name: str, start: int, data: Any) -> int:
        """Code float32 ``data`` at element ``start`` of ``name``; returns the CRC-32C of the coded bytes."""
        return self.write_coded(name, start, data)[0]

    def write_coded(self, name: str, start: int, data: Any) -> tuple[int, np.ndarray, GGMLQuantizationType]:
        """``write``, returning also the coded values as stored (a flat array) and their type."""
        from ..core import checksums

        offset, qtype = self.tensors[name]
        values = np.frombuffer(data, np.float32)
        block, size = GGML_QUANT_SIZES[qtype]
        stored = quantize(values, qtype)
        coded = memoryview(cast(Any, stored)).cast("B")
        try:
            os.pwrite(self.fd, coded, offset + start // block * size)
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror}") from None
        return checksums.crc(coded), stored, qtype

    def sync(self) -> None:
        """What was written is on disk (the journal's condition for recording it)."""
        os.fdatasync(self.fd)

    def close(self) -> list[Path]:
        os.fsync(self.fd)
        os.close(self.fd)
        return [self.path]

    def abort(self) -> None:
        os.close(self.fd)

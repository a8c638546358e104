"""Reading files that strangers made: regular files only, bounded sizes, bounded parsers.

Model files come from downloads. Everything nearswap opens for reading goes through here so
that a FIFO or a device named as a shard cannot block it forever, a 100,000-deep JSON
document cannot crash it, and a file cannot make it allocate more than its size allows.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import NearswapError, shown

MAX_JSON_FILE = 64 << 20  # config.json, index files: real ones are kilobytes


def open_regular(path: str | Path, what: str = "") -> int:
    """Open ``path`` read-only and return its descriptor, refusing anything but a regular file
    (following symlinks). Opening never blocks: a FIFO or device is refused, not waited on."""
    prefix = f"{what}: " if what else ""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise NearswapError(f"{prefix}cannot open {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise NearswapError(f"{prefix}{path} is {kind}, not a regular file; point nearswap at the model's files")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: str | Path, what: str = "") -> None:
    """Refuse ``path`` unless it is a regular file (after symlinks), without opening it."""
    prefix = f"{what}: " if what else ""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise NearswapError(f"{prefix}cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise NearswapError(f"{prefix}{path} is not a regular file; point nearswap at the model's files")


def read_bytes(path: str | Path, limit: int, what: str = "") -> bytes:
    """The whole of a small regular file, refused if it holds more than ``limit`` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise NearswapError(f"{what + ': ' if what else ''}{path} is too large ({size:,} bytes; "
                                f"at most {limit:,} expected for this kind of file)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(size + 1)[:limit]  # (read(limit) would allocate all of limit for a 100-byte file)
    finally:
        os.close(fd)


def read_text(path: str | Path, what: str, limit: int = 256 << 20) -> str:
    """A text file a user named (calibration or drift text): a regular file of at most ``limit``
    bytes, UTF-8; anything else is one line naming the option, the file and what is wrong."""
    raw = read_bytes(path, limit, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NearswapError(f"{what}: {path} is not UTF-8 text (byte {e.start:,}); give a plain text file") from None


def parse_json(raw: bytes | str, where: str) -> Any:
    """JSON from untrusted bytes: any failure (bad UTF-8, syntax, nesting too deep for the
    parser, an integer of more digits than Python converts) is one ``NearswapError`` line."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise NearswapError(f"{where}: JSON nested too deeply to be a real file; the file is corrupt") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits
        raise NearswapError(f"{where}: not valid JSON ({shown(str(e), 120)}); the file is corrupt") from None


def read_json(path: str | Path, what: str = "", limit: int = MAX_JSON_FILE) -> Any:
    """Parse a small JSON file (a regular file under ``limit`` bytes)."""
    where = f"{what}: {path}" if what else str(path)
    return parse_json(read_bytes(path, limit, what), where)


def read_json_object(path: str | Path, what: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, an index)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise NearswapError(f"{what + ': ' if what else ''}{path} holds {shown(data)}, not a JSON object; "
                            "the file is corrupt")
    return data


MAX_DEPTH = 64  # nesting of a JSON file a model ships (a real tokenizer.json: under 10)


def read_json_shallow(path: str | Path, what: str = "", depth: int = MAX_DEPTH) -> dict[str, Any]:
    """A JSON object file that other libraries will parse again (transformers, tokenizers),
    refused in one line unless it is an object nested at most ``depth`` deep: their parsers
    recurse, and a 100,000-deep file crashes or stalls them."""
    data = read_json_object(path, what)
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if level > depth:
            raise NearswapError(f"{what + ': ' if what else ''}{path} is nested more than {depth} deep, which no real "
                                "file of its kind is; the file is corrupt")
        if isinstance(value, dict):
            stack.extend((v, level + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, level + 1) for v in value)
    return data

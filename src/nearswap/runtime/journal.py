"""The journal of a partial output: what an unfinished merge has durably written, so that the
next run of the same merge continues where it stopped (after SIGKILL, an OOM kill, a reboot,
a full disk).

It is one file, ``.nearswap-journal``, in the hidden partial directory. Its first line is the
run's fingerprint: the recipe (input paths resolved), the output layout, nearswap's version
and every input file's identity (size, modification and change times, inode and device: what
git's index compares; an input rewritten in place and given its old mtime back still gets a
new ctime, a copy with ``cp -p`` a new inode). Each later line lists tensors whose data were
fsynced before the line was written, with their per-step tallies and chunk CRCs, so that a
resumed merge reports the statistics and checksums of an uninterrupted one.

Nothing in it is trusted as it stands. Every line starts with a tag chaining it to the lines
before it (the first 32 hex digits of SHA-256 over the previous tag and the line): reading
stops at the first line whose tag is wrong, so a line cut short by a kill, a flipped byte, an
edited tally or a line moved or deleted ends what is adopted there (the tensors after it are
merged again: writes are idempotent). What is adopted is then re-checked against the partial
output itself (``recheck``: every chunk read back and its CRC compared), and the journal is
rewritten with only what passed. The tags guard against damage and careless edits; someone
who recomputes them on purpose can still lie about the tallies (not the data: those are read
back), which only running the merge again would catch.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import WriteFailed

JOURNAL_NAME = ".nearswap-journal"
SYNC_BYTES = 64 << 20  # sync and journal after this many output bytes (stream.Settings.journal_bytes) ...
SYNC_SECONDS = 10.0  # ... or this long, whichever comes first
MAX_JOURNAL = 1 << 30  # a 70B merge's journal is a few MB
FORMAT = 3  # 3: tagged lines; 2: per-tensor tallies as {"steps": [...], "changed": the chain's net change}
FIRST_TAG = b"nearswap-journal-3"
TAG_HEX = 32  # hex digits of each line's tag


def fingerprint(recipe: dict[str, Any], inputs: list[Path], layout: dict[str, Any], version: str) -> dict[str, Any]:
    """What must be unchanged for an earlier run's data to be reused: the recipe, the output
    layout, the tool's version and every input file (resolved path; size, mtime, ctime, inode,
    device)."""
    files = {}
    for path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        files[str(Path(path).resolve())] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    return {"version": version, "journal": FORMAT, "recipe": recipe, "layout": layout, "inputs": files}


def difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first thing that differs between two fingerprints, in words; None when equal."""
    if old == new:
        return None
    if old.get("version") != new.get("version"):
        return f"it was written by nearswap {old.get('version')}, this is {new.get('version')}"
    if old.get("journal") != new.get("journal"):
        return "its journal was written by another nearswap (an older format)"
    found = _first_change(old.get("recipe"), new.get("recipe"), "recipe")
    if found:
        return found
    old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
    for path in sorted(set(old_in) | set(new_in)):
        if path not in new_in:
            return f"its input {path} is no longer an input (or is gone)"
        if path not in old_in:
            return f"{path} is a new input"
        if old_in[path] != new_in[path]:
            return f"its input {path} changed since (size, modification or change time, or it is another file now)"
    return _first_change(old.get("layout"), new.get("layout"), "output layout") or "its fingerprint differs"


def _first_change(a: Any, b: Any, where: str) -> str | None:
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            found = _first_change(a.get(key), b.get(key), f"{where}.{key}")
            if found:
                return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b), 1):
            found = _first_change(x, y, f"{where}[{i}]")
            if found:
                return found
    return f"{where} was {json.dumps(a)}, now {json.dumps(b)}"


@dataclass
class Journal:
    """What an earlier run left: its fingerprint and the tensors it completed (name ->
    {"tallies": {"steps": the per-step tallies as JSON, "changed": the chain's net change}, or None
    for a copied tensor, "crc": its chunk CRCs})."""

    path: Path
    fingerprint: dict[str, Any]
    chunk: int | None = None  # elements per work item of that run (its CRCs and tallies are per chunk)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)


def tag(previous: bytes, line: bytes) -> bytes:
    """The tag of ``line`` (its JSON) after a line tagged ``previous``."""
    return hashlib.sha256(previous + b"\n" + line).hexdigest()[:TAG_HEX].encode()


def read(directory: Path) -> Journal | None:
    """The journal in ``directory``: its lines up to the first whose tag is wrong (a torn or
    altered line ends it); None when there is none or its first line is not intact."""
    from ..core.errors import NearswapError
    from ..core.files import read_bytes

    path = directory / JOURNAL_NAME
    if not os.path.lexists(path) or os.path.islink(path):
        return None
    try:  # a regular file only (a FIFO put there would block a plain read), of bounded size
        raw = read_bytes(path, MAX_JOURNAL, "journal")
    except NearswapError:
        return None
    previous = FIRST_TAG
    entries = []
    for line in raw.split(b"\n"):
        mark, _, body = line.partition(b" ")
        if mark != tag(previous, body):
            break  # cut short by a kill, or altered: what follows was never acknowledged
        try:
            entries.append(json.loads(body))
        except ValueError:
            break
        previous = mark
    if not entries or not isinstance(entries[0], dict) or not isinstance(entries[0].get("fingerprint"), dict):
        return None
    head = entries[0]
    chunk = head.get("chunk")
    journal = Journal(path, head["fingerprint"], chunk if type(chunk) is int and chunk > 0 else None)
    for entry in entries[1:]:
        if isinstance(entry, dict) and isinstance(entry.get("done"), dict):
            journal.done.update(entry["done"])
    return journal


def recheck(done: dict[str, Any], expected: dict[str, tuple[Path, list[tuple[int, int]], bool]],
            threads: int, tallies_ok: Callable[[Any], bool]) -> tuple[dict[str, Any], int]:
    """What of ``done`` (a journal's tensors) the partial output still holds: ``expected`` maps
    each tensor of this run to (its file, the byte span of each chunk, whether it has tallies);
    an entry is kept only if it has that form (``tallies_ok``: the pass's own check of its
    tallies) and every chunk read back from the file has the CRC it recorded. Returns the kept
    entries and how many were dropped."""
    from concurrent.futures import ThreadPoolExecutor

    from ..core.checksums import crc_of_span

    def good(item: tuple[str, Any]) -> bool:
        name, entry = item
        if name not in expected or not isinstance(entry, dict):
            return False
        path, spans, merged = expected[name]
        crcs, tallies = entry.get("crc"), entry.get("tallies")
        if not isinstance(crcs, list) or len(crcs) != len(spans) or not all(type(c) is int for c in crcs):
            return False
        if (tallies is not None) != merged or (merged and not tallies_ok(tallies)):
            return False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            return all(crc_of_span(fd, offset, size) == want for (offset, size), want in zip(spans, crcs))
        except OSError:
            return False
        finally:
            os.close(fd)

    items = list(done.items())
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items) or 1))) as pool:
        verdicts = list(pool.map(good, items))
    kept = {name: entry for (name, entry), ok in zip(items, verdicts) if ok}
    return kept, len(items) - len(kept)


class JournalWriter:
    """Appends completed tensors to the journal once their data are on disk: ``done(name,
    record, nbytes)`` queues a tensor; every ``SYNC_BYTES`` of output (or ``SYNC_SECONDS``) the
    queued tensors go to a background thread, which runs ``sync()`` (the writer's fsync of its
    shards), appends them and fsyncs the journal, while the merge goes on (a sync waits for
    the disk: on the thread that hands out work it would stall the pipeline). ``flush()``
    waits for that and writes what is queued; a failure there is raised by the next call.

    The journal is written anew (a new file renamed over the old one, which may be anything):
    its fingerprint, then ``adopted`` (an earlier run's tensors, re-checked) in one line."""

    def __init__(self, directory: Path, fingerprint_: dict[str, Any], sync: Callable[[], None],
                 every_bytes: int = SYNC_BYTES, every_seconds: float = SYNC_SECONDS,
                 adopted: dict[str, dict[str, Any]] | None = None, chunk: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.path = directory / JOURNAL_NAME
        self.sync_data = sync
        self.every_bytes, self.every_seconds = every_bytes, every_seconds
        self.queued: dict[str, dict[str, Any]] = {}
        self.queued_bytes = 0
        self.last = time.monotonic()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nearswap-journal")
        self.running: Any = None  # the background flush in progress
        self.lock = threading.Lock()
        self.tag = FIRST_TAG
        new = self.path.with_name(JOURNAL_NAME + ".new")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT | os.O_TRUNC
        try:
            if os.path.lexists(new):
                os.unlink(new)
            self.fd: int | None = os.open(new, flags, 0o644)
        except OSError as e:
            raise WriteFailed(f"cannot write {new}: {e.strerror}") from None
        self._append({"fingerprint": fingerprint_, "chunk": chunk})
        if adopted:
            self._append({"done": adopted})
        try:
            os.replace(new, self.path)
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror}") from None

    def _append(self, entry: dict[str, Any]) -> None:
        body = json.dumps(entry, separators=(",", ":")).encode()
        mark = tag(self.tag, body)
        data = mark + b" " + body + b"\n"
        if self.fd is None:
            raise WriteFailed(f"cannot write {self.path}: the journal was closed")
        try:
            os.write(self.fd, data)
            os.fsync(self.fd)
        except OSError as e:
            raise WriteFailed(f"cannot write {self.path}: {e.strerror}") from None
        self.tag = mark

    def _write(self, batch: dict[str, dict[str, Any]]) -> None:
        self.sync_data()
        self._append({"done": batch})

    def done(self, name: str, record: dict[str, Any], nbytes: int) -> None:
        with self.lock:  # (the driver calls it; a lock lets any thread flush meanwhile)
            self._done(name, record, nbytes)

    def _done(self, name: str, record: dict[str, Any], nbytes: int) -> None:
        self.queued[name] = record
        self.queued_bytes += nbytes
        if self.queued_bytes >= self.every_bytes or time.monotonic() - self.last >= self.every_seconds:
            if self.running is not None:
                if not self.running.done():
                    return  # the last one is still syncing: this batch grows and goes next
                self.running.result()  # raise its failure, if any
            self.running = self.pool.submit(self._write, self.queued)
            self.queued, self.queued_bytes, self.last = {}, 0, time.monotonic()

    def flush(self) -> None:
        """Wait for the background write; write what is queued."""
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if self.running is not None:
            running, self.running = self.running, None
            running.result()
        if self.queued:
            self._write(self.queued)
        self.queued, self.queued_bytes, self.last = {}, 0, time.monotonic()

    def close(self) -> None:
        """Stop (waiting for a background write, whose failure no longer matters); close the file."""
        self.pool.shutdown(wait=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

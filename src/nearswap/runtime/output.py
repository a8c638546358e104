"""Atomic outputs: a result appears whole at its path or not at all, and nothing is clobbered.

Every output (a merged model, a plot folder, a GGUF file) is written into a hidden sibling of
its path and renamed into place once complete. Around that rename:

- **One writer per path.** A lock file beside the output (``.NAME.lock``, ``flock``-ed for the
  whole run) makes a second nearswap run into the same path refuse at once, naming the first
  run's pid.
- **Nothing that appears meanwhile is replaced.** The final rename is ``renameat2`` with
  ``RENAME_NOREPLACE``: a directory or file created at the path while nearswap worked (even
  an empty directory, which plain ``rename`` replaces silently) stays, and nearswap says so.
- **``--force`` replaces only nearswap's own outputs.** An empty directory, a directory whose
  files say nearswap wrote them (``nearswap_version`` in a report or in the safetensors
  metadata), or, for a file output, a file of the same format — never a folder of documents.
  The old output is swapped out in one step (``RENAME_EXCHANGE``) and removed only then; an
  interruption during that removal says that the new output is complete, and what is left.
- **Partial outputs of killed runs are found.** A run that was SIGKILLed leaves its hidden
  ``.NAME.<random>.partial`` directory, marked as nearswap's while unfinished; the next run into
  the same path removes it and warns. Anything else by such a name is only named, never removed.
  A run of the same job may instead continue it (``adopt``): merges keep a journal there, and a
  merge into a file writes the file inside such a directory (``resumable_file``).

Names of these siblings stay within the file system's 255-byte limit however long NAME is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..core.errors import InterruptedAfterCommit, NearswapError, NearswapWarning, shown

NAME_MAX = 255
RANDOM_PART = 8  # characters tempfile adds
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2: object = "unresolved"  # libc's renameat2, looked up on first use (keeps ctypes off start-up)


def _libc_renameat2() -> object:
    global _renameat2
    if _renameat2 == "unresolved":
        import ctypes

        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
            _renameat2 = None
    return _renameat2


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- names beside the output


def sibling_stem(target: Path) -> str:
    """The hidden stem of every sibling of ``target``: ``.NAME``, or for a name too long to
    take a suffix, a shortened name plus a hash of the whole one."""
    name = target.name
    if len(os.fsencode(name)) + 2 + RANDOM_PART + len(".partial") <= NAME_MAX:
        return f".{name}"
    import hashlib

    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return f".{os.fsdecode(os.fsencode(name)[:100])}~{digest}"


def _is_partial_of(stem: str, entry: str) -> bool:
    return (entry.startswith(stem + ".") and entry.endswith(".partial")
            and len(entry) == len(stem) + 1 + RANDOM_PART + len(".partial"))


# ---------------------------------------------------------------- renames that never clobber


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the system or file system does not offer it."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:  # type: ignore[operator]
        return True
    import ctypes

    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if anything is at ``dst`` (an empty
    directory included). Atomic where renameat2 works; elsewhere checked just before a plain
    rename (callers hold the output's lock, so only a foreign process could race it)."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


def exchange(src: Path, dst: Path) -> None:
    """Swap ``src`` and ``dst`` in one step (both exist); where the system cannot, move ``dst``
    aside to ``src``'s name in two renames."""
    if _rename2(src, dst, _RENAME_EXCHANGE):
        return
    aside = src.with_name(src.name + ".swap")
    os.rename(dst, aside)
    os.rename(src, dst)
    os.rename(aside, src)


# ---------------------------------------------------------------- what --force may replace


def _nearswap_json(path: Path) -> bool:
    from ..core.files import read_json

    try:
        data = read_json(path, limit=64 << 20)
    except NearswapError:
        return False
    return isinstance(data, dict) and "nearswap_version" in data


def _nearswap_safetensors(path: Path) -> bool:
    from ..formats.safetensors import read_header

    try:
        return "nearswap_version" in read_header(path)[1]
    except NearswapError:
        return False


REPORT_FILES = ("merge_report.json", "sweep.json", "report.json", "curve.json")


def written_by_nearswap(path: Path) -> bool:
    """Whether ``--force`` may replace the directory ``path``: empty, or holding a report or
    a safetensors file that nearswap wrote (its ``nearswap_version``)."""
    entries = os.listdir(path)
    if not entries:
        return True
    for name in REPORT_FILES:
        if name in entries and _nearswap_json(path / name):
            return True
    shards = sorted(e for e in entries if e.endswith(".safetensors"))
    return bool(shards) and _nearswap_safetensors(path / shards[0])


def gguf_file(path: Path) -> bool:
    """Whether ``--force`` may replace the file ``path`` with a GGUF: it is a GGUF file."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _describe(path: Path) -> str:
    try:
        entries = sorted(os.listdir(path))
    except OSError:
        return ""
    sample = ", ".join(shown(e, 40) for e in entries[:3])
    return f" (it holds {len(entries)} entries: {sample}{', ...' if len(entries) > 3 else ''})"


def check_replaceable(target: Path, force: bool, kind: str = "dir",
                      replaceable: Callable[[Path], bool] | None = None) -> None:
    """Refuse to clobber ``target``: without ``force`` anything there is refused; with it, only
    what nearswap could have written (``replaceable``; by default ``written_by_nearswap`` for a
    directory output and ``gguf_file`` for a file output). Cheap: run it before any work."""
    if not os.path.lexists(target):
        return
    if not force:
        raise NearswapError(f"{target} already exists; choose another output path or pass --force to replace it")
    if target.is_symlink():
        raise NearswapError(f"{target} is a symbolic link; give the real path of the output to replace")
    if kind == "dir":
        if not target.is_dir():
            raise NearswapError(f"{target} is a file, and the output is a directory; --force does not replace "
                                "files with directories: remove it yourself or choose another path")
        if not (replaceable or written_by_nearswap)(target):
            raise NearswapError(f"{target} exists and does not look like nearswap's output{_describe(target)}; "
                                "--force only replaces nearswap's outputs and empty directories: remove it "
                                "yourself or choose another path")
    else:
        if not target.is_file():
            raise NearswapError(f"{target} is not a file; --force replaces only a file of the same kind")
        if not (replaceable or gguf_file)(target):
            raise NearswapError(f"{target} exists and is not a file of the kind nearswap writes there; "
                                "--force will not replace it: remove it yourself or choose another path")


# ---------------------------------------------------------------- free space

SPARE_BYTES = 64 << 20  # left free beyond what an output needs (the journal, metadata, the file system's own)


def check_free_space(out: Path, nbytes: int) -> None:
    """Refuse, before any work, an output of ``nbytes`` where the file system holding ``out``
    has less free than that and ``SPARE_BYTES``."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # measure where OUT will be, not here
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < nbytes + SPARE_BYTES:
        raise NearswapError(f"not enough free disk for {out}: it writes {nbytes / 1e9:.2f} GB and nearswap keeps "
                            f"{SPARE_BYTES >> 20} MB spare, but {free / 1e9:.2f} GB are free on {parent}; free space "
                            "or choose another output path")


# ---------------------------------------------------------------- claiming an output path


def check_name(target: Path) -> None:
    """Refuse an output name no file system takes, or that is (or contains) the current directory;
    and ``null:``, merge's sink that stores nothing, where an output must be stored."""
    if str(target) == "null:":
        raise NearswapError("null: (a sink that stores nothing) is an output of merge only; this command's "
                            "output is kept: give a path (a directory named null: needs an absolute path)")
    if len(os.fsencode(target.name)) > NAME_MAX:
        raise NearswapError(f"the output name {shown(target.name, 60)} is too long "
                            f"({len(os.fsencode(target.name))} bytes; file systems allow {NAME_MAX})")
    try:
        resolved, cwd = target.resolve(), Path.cwd().resolve()
    except (RuntimeError, OSError):  # Python's resolve() raises RuntimeError on a symlink loop
        raise NearswapError(f"the output {target} is, or lies under, a symbolic link that leads back to itself (a loop); "
                            "choose another output path") from None
    if resolved == cwd or resolved in cwd.parents:
        raise NearswapError(f"the output {target} is the current directory or contains it; "
                            "choose a new directory for the output")
    if target.name in ("", ".", ".."):
        raise NearswapError(f"{target} is not a name for a new output; give a new directory or file name")


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p; returns the directories it created, innermost last."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            raise NearswapError(f"cannot create {d}: {e.strerror}") from None
    return list(reversed(missing))


class _Lock:
    """An flock on ``.NAME.lock`` beside the output, holding the writer's pid."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.parent / f"{sibling_stem(target)}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
            except OSError as e:
                raise NearswapError(f"cannot write in {self.target.parent}: {e.strerror}; "
                                    "choose an output path on a writable file system") from None
            if not self._is_ours(fd):  # a file of the user's that happens to have this name: untouched
                os.close(fd)
                raise NearswapError(f"{self.path} exists and is not a nearswap lock file; move it away or choose "
                                    "another output path")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise NearswapError(f"{self.target} is being written by another nearswap run (pid {holder}); "
                                    "wait for it to finish or choose another output path") from None
            # The run that held the lock may have removed the file just before we locked it.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return

    @staticmethod
    def _is_ours(fd: int) -> bool:
        """A regular file that is empty or holds a pid: what this class writes, nothing else."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 32:
            return False
        return os.pread(fd, 32, 0).strip().isdigit() or st.st_size == 0

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


@contextmanager
def claimed(target: Path, force: bool, kind: str = "dir", replaceable: Callable[[Path], bool] | None = None,
            adopt: Callable[[Path], bool] | None = None) -> Iterator[Path | None]:
    """Hold ``target`` for one run: name checked, parents made, lock taken, an existing
    output checked against ``force``, partial outputs of killed runs removed (with a warning),
    but the one ``adopt`` accepts (it may also refuse them all by raising), which is yielded.
    On failure the parents it made are removed again."""
    target = Path(target)
    check_name(target)
    created = _make_parents(target.parent)
    lock = _Lock(target)
    try:
        lock.acquire()
        try:
            check_replaceable(target, force, kind, replaceable)
            yield _remove_stale_partials(target, adopt)
        finally:
            lock.release()
    except BaseException:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                break
        raise


PARTIAL_MARKER = ".nearswap-partial"  # in a partial directory until it is committed: "nearswap made this"


def _remove_stale_partials(target: Path, adopt: Callable[[Path], bool] | None = None) -> Path | None:
    """We hold the lock, so no live run is writing these: they belong to runs that were killed.
    Only a directory nearswap marked as its own partial output is removed (or, the first that
    ``adopt`` accepts, kept and returned, to be continued); anything else with such a name (an
    old output left by an interrupted replacement, a partial file of an export, whatever else)
    is named and left as it is."""
    stem = sibling_stem(target)
    try:
        entries = sorted(os.listdir(target.parent))
    except OSError:
        return None
    adopted = None
    for entry in entries:
        if not _is_partial_of(stem, entry):
            continue
        path = target.parent / entry
        if path.is_dir() and not path.is_symlink() and (path / PARTIAL_MARKER).is_file():
            marked = not (path / PARTIAL_MARKER).is_symlink()  # (a link there is not what nearswap writes)
            if adopted is None and adopt is not None and marked and adopt(path):
                adopted = path
                continue
            _remove(path)
            warnings.warn(f"removed {path}, the unfinished output of an earlier run into {target}",
                          NearswapWarning, stacklevel=4)
        else:
            warnings.warn(f"found {path}, left by an earlier run into {target}; it was left as it is: "
                          "remove it if you do not need it", NearswapWarning, stacklevel=4)
    return adopted


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def remove_entry(path: Path) -> None:
    """Remove a file, link or folder (a link, never what it points to); raises ``NearswapError``
    if it cannot be removed."""
    _remove(path)
    if os.path.lexists(path):
        raise NearswapError(f"cannot remove {path}, which an earlier run did not write there; remove it yourself")


def _same(a: Path, st: os.stat_result) -> bool:
    try:
        now = os.lstat(a)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _commit(tmp: Path, target: Path, force: bool, kind: str, replaceable: Callable[[Path], bool] | None) -> Path | None:
    """Put ``tmp`` at ``target``. Returns where the replaced old output now is (to remove), or None."""
    if force and os.path.lexists(target):
        check_replaceable(target, force, kind, replaceable)  # what is there now, not what was at the start
        if kind == "dir":
            exchange(tmp, target)
            return tmp  # the old output, now under the partial name
        os.replace(tmp, target)
        return None
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        raise NearswapError(f"{target} appeared while nearswap was writing it; it was left as it is and the new "
                            "output discarded: move it away and run again (or pass --force)") from None
    return None


@contextmanager
def atomic_directory(target: str | Path, force: bool = False, replaceable: Callable[[Path], bool] | None = None,
                     adopt: Callable[[Path], bool] | None = None,
                     keep: Callable[[BaseException], bool] | None = None, scratch: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a new hidden sibling directory of ``target`` to fill; put it at ``target`` when the
    block ends without an exception. See the module docstring for every guarantee.

    On any exception (Ctrl-C included) the temporary directory is removed and ``target`` is
    left as it was, unless ``keep(exception)`` says to keep it (hidden and still marked as
    partial: a later run may continue it); files named in ``scratch`` (the run's own records) are
    removed just before the rename. ``adopt(partial)`` may accept the partial directory
    of an earlier, killed run into ``target``: it is yielded instead of a new one. With
    ``force`` an existing nearswap output at ``target`` is replaced only after the new one is
    complete.
    """
    target = Path(target)
    with claimed(target, force, "dir", replaceable, adopt) as adopted:
        tmp = adopted if adopted is not None else _new_partial_directory(target)
        new = os.lstat(tmp)
        try:
            (tmp / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
            yield tmp
            for name in scratch:
                if (tmp / name).is_file():
                    (tmp / name).unlink()
            (tmp / PARTIAL_MARKER).unlink()
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a result should look like any new folder
            fsync_dir(tmp)
            old = _commit(tmp, target, force, "dir", replaceable)
            fsync_dir(target.parent)
        except BaseException as e:
            if not _same(target, new):  # not committed: nothing of this run may stay, but what it may resume
                if not (keep is not None and keep(e) and (tmp / PARTIAL_MARKER).is_file()):
                    _remove(tmp)
                raise
            _raise_after_commit(e, target, tmp)
        if old is not None:
            try:
                _remove(old)
            except KeyboardInterrupt:
                raise InterruptedAfterCommit(f"interrupted after {target} was complete: the new output is whole and "
                                             f"in place{_leftover(old)}") from None


@contextmanager
def resumable_file(target: str | Path, force: bool = False, adopt: Callable[[Path], bool] | None = None,
                   keep: Callable[[BaseException], bool] | None = None) -> Iterator[Path]:
    """A file output that a killed run may continue: written as ``DIR / target.name`` inside a
    hidden partial directory marked as nearswap's (which also holds the run's journal); yields
    DIR. When the block ends without an exception the file is fsynced and renamed to
    ``target`` (never over anything that appeared meanwhile; with ``force``, over a GGUF file),
    then DIR is removed. On an exception DIR is removed unless ``keep(exception)``; ``adopt``
    may accept the directory of an earlier, killed run into ``target``, yielded instead of a
    new one (it must check that the file is there: a run killed right after its rename leaves
    the directory without it)."""
    target = Path(target)
    with claimed(target, force, "file", None, adopt) as adopted:
        tmp = adopted if adopted is not None else _new_partial_directory(target)
        data, committed = tmp / target.name, False
        try:
            (tmp / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
            yield tmp
            _publish_file(data, target, force, None)
            committed = True
            fsync_dir(target.parent)
        except BaseException as e:
            if not committed:
                if not (keep is not None and keep(e) and (tmp / PARTIAL_MARKER).is_file()):
                    _remove(tmp)
                raise
            _remove(tmp)  # only the run's records are left there
            _raise_after_commit(e, target, tmp)
        _remove(tmp)  # the marker and the journal: the file is in place


def _publish_file(data: Path, target: Path, force: bool, replaceable: Callable[[Path], bool] | None) -> None:
    """A complete file output: the permissions of a new file, on disk, then at ``target``."""
    os.chmod(data, 0o666 & ~_umask())
    fd = os.open(data, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _commit(data, target, force, "file", replaceable)


def _new_partial_directory(target: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f"{sibling_stem(target)}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise NearswapError(f"cannot write in {target.parent}: {e.strerror}") from None


def _raise_after_commit(e: BaseException, target: Path, left: Path) -> None:
    """An exception once the output is in place: Ctrl-C says the output is whole (and what is left)."""
    if isinstance(e, KeyboardInterrupt):
        raise InterruptedAfterCommit(f"interrupted after {target} was complete: the new output is whole and "
                                     "in place" + _leftover(left)) from None
    raise e


def _leftover(path: Path) -> str:
    return f"; the old output it replaced is left in {path}: remove it" if os.path.lexists(path) else ""


@contextmanager
def atomic_file(target: str | Path, force: bool = False,
                replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a new hidden sibling file path of ``target`` to write; move it to ``target`` when
    the block ends without an exception (never over anything that appeared meanwhile; with
    ``force``, over a file ``replaceable`` accepts, by default a GGUF file)."""
    target = Path(target)
    with claimed(target, force, "file", replaceable):
        try:
            fd, name = tempfile.mkstemp(prefix=f"{sibling_stem(target)}.", suffix=".partial", dir=target.parent)
        except OSError as e:
            raise NearswapError(f"cannot write in {target.parent}: {e.strerror}") from None
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _publish_file(tmp, target, force, replaceable)
            fsync_dir(target.parent)
        except BaseException:
            if os.path.lexists(tmp):
                _remove(tmp)
            raise


"""Passes on a Ray cluster: the same pass objects, their work items run as Ray tasks.

``run(pass_, settings, address)`` sends the pass (pickled: readers and file handles are
reopened where it lands) to the cluster once, cuts its work items into groups of about
``settings.group_bytes`` of input (256 MB by default), runs each group as a Ray task on whichever node has a free CPU, and
hands every result to ``pass_.collect`` on the driver, as ``stream.run`` does. Inputs and the
output's partial directory must be on storage every node sees (a shared POSIX path); a task
checks that first and says which path it cannot see, on which host. Tasks write fixed bytes
at fixed offsets, so a task that dies with its worker is simply run again (``max_retries``):
the output is bit-identical to a local run whatever the number of nodes or failures.

``address``: a Ray cluster address (``HOST:PORT``), ``auto`` (the cluster ``ray start``
made on this machine, or ``RAY_ADDRESS``), or ``local`` (a private Ray instance for this run).
Ray is the optional ``ray`` extra; nothing here is imported without ``--ray``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.errors import NearswapError
from .stream import Pass, Settings

MAX_RETRIES = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise NearswapError("--ray needs Ray: pip install 'nearswap[ray]'") from None
    return ray


def _connect(ray: Any, address: str) -> bool:
    """Join the cluster at ``address``; True when this call started Ray (and must stop it)."""
    if ray.is_initialized():
        return False
    if address not in ("auto", "local"):  # Ray retries an unreachable address for minutes: ask first
        host, _, port = address.rpartition(":")
        if address.startswith("ray://") or not port.isdigit():
            raise NearswapError(f"--ray {address!r}: give HOST:PORT of the cluster's head (as `ray start --head` "
                                "prints it), auto, or local")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except OSError as e:
            raise NearswapError(f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}); start one with "
                                "`ray start --head`, or pass --ray local") from None
    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address != "local" and AUTH_MODE not in os.environ and token_available():
        _use_token(ray)
    with _stderr_kept() as said:  # Ray's C++ client retries with a warning line each time: one line, ours
        try:
            if address == "local":
                ray.init(include_dashboard=False, **options)
            else:
                ray.init(address=address, **options)
            error = None
        except Exception as e:  # (ConnectionError, RuntimeError, ray.exceptions.AuthenticationError, ...)
            error = e
    if error is not None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if any(word in said[0] for word in ("Unauthenticated", "InvalidAuthToken")) or "uthenticat" in first:
            raise NearswapError(
                f"the Ray cluster at {address!r} refused this client: it runs with token authentication "
                f"({AUTH_MODE}={os.environ.get(AUTH_MODE, 'unset')} here, and "
                f"{'a token that is not the cluster' + chr(39) + 's' if token_available() else 'no token'} in "
                f"{_token_source()}); give this process the cluster's token (RAY_AUTH_TOKEN, or the head's "
                "~/.ray/auth_token) with RAY_AUTH_MODE=token, or start the cluster with RAY_AUTH_MODE=disabled") from None
        if not isinstance(error, (ConnectionError, RuntimeError, ValueError)):
            raise error
        raise NearswapError(f"cannot reach the Ray cluster at {address!r} ({first[:160]}); start one with "
                            "`ray start --head`, or pass --ray local") from None
    return True


AUTH_MODE = "RAY_AUTH_MODE"


def _use_token(ray: Any) -> None:
    """What `ray start --head` does on a machine with a token (Ray 2.60 turns token
    authentication on for that cluster), so that this client sends it too: Ray's own rule,
    which also refreshes the configuration Ray read at import (setting RAY_AUTH_MODE alone
    would not reach it); the environment variable where Ray has no such function."""
    try:
        from ray._private.authentication import authentication_token_setup as setup
    except ImportError:
        os.environ[AUTH_MODE] = "token"
        return
    log = logging.getLogger(setup.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # (its warning says what this function's docstring says)
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        log.setLevel(level)


def _token_source() -> str:
    return ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else
            os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token"))


def token_available() -> bool:
    """Whether this process has a Ray token where Ray looks for one: ``RAY_AUTH_TOKEN``, the
    file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    return Path(_token_source()).is_file()


@contextlib.contextmanager
def _stderr_kept() -> Any:
    """File descriptor 2 into a temporary file while Ray connects (its C++ client writes there);
    yields a one-item list that holds what was written, after the block."""
    import tempfile

    said = [""]
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield said
        return
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            kept.seek(0)
            said[0] = kept.read(1 << 16).decode("utf-8", "replace")


def visible_paths(pass_: Any) -> list[Path]:
    """What a worker must be able to see: the input files, and the directory the output goes to."""
    from ..formats.generated import is_generated

    paths = {t.file for task in getattr(pass_, "tasks", []) for t in [task.base, *task.secondaries]
             if not is_generated(str(t.file))}  # (synthetic: inputs are computed wherever they are read)
    writer = getattr(pass_, "writer", None)
    if writer is not None and getattr(writer, "directory", None) is not None:
        paths.add(Path(writer.directory))
    return sorted(paths)


def _run_group(pass_: Any, items: list[tuple]) -> list[Any]:
    """A Ray task: check the paths, run the items, close what this copy opened."""
    for path in visible_paths(pass_):
        if not os.path.exists(path):
            raise NearswapError(f"a Ray worker on {socket.gethostname()} cannot see {path}: inputs and output must "
                                "be on storage every node sees (the same path on each)")
    try:
        return [pass_.work(item) for item in items]
    finally:
        writer = getattr(pass_, "writer", None)
        if writer is not None:
            writer.close()
        pass_.close()


def _get(ray: Any, ref: Any) -> Any:
    """A task's result; its NearswapError as one line, a task lost past its retries as one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, NearswapError):
            raise NearswapError(str(cause)) from None
        raise
    except ray.exceptions.RayError as e:  # failed past its retries, a lost node
        raise NearswapError(f"the Ray cluster lost a task past {MAX_RETRIES} retries ({type(e).__name__}); "
                            "nothing was written to the output") from None


def map_tasks(fn: Callable[..., Any], calls: list[tuple], address: str,
              done: Callable[[Any], None] | None = None) -> list[Any]:
    """``[fn(*args) for args in calls]``, each call a Ray task with one CPU (what it computes
    stays on its node: a sweep's merge and its evaluation run in the same task); results in
    order, ``done`` called on each as it is gathered."""
    ray = _ray()
    started = _connect(ray, address)
    refs: list[Any] = []
    try:
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(fn)
        refs = [remote.remote(*args) for args in calls]
        out = []
        for ref in list(refs):
            out.append(_get(ray, ref))
            refs.remove(ref)
            if done:
                done(out[-1])
        return out
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def groups(items: Iterable[tuple], sizes: Callable[[tuple], int], limit: int) -> list[list[tuple]]:
    """Consecutive items cut into groups of about ``limit`` input bytes."""
    out: list[list[tuple]] = [[]]
    held = 0
    for item in items:
        if out[-1] and held + sizes(item) > limit:
            out.append([])
            held = 0
        out[-1].append(item)
        held += sizes(item)
    return [g for g in out if g]


def run(pass_: Pass, settings: Settings, address: str, progress: Callable[[int], None] | None = None) -> None:
    """``stream.run`` on a Ray cluster (see the module docstring)."""
    ray = _ray()
    started = _connect(ray, address)
    pending: list[Any] = []
    try:
        tasks = getattr(pass_, "tasks", None)

        def size(item: tuple) -> int:
            if tasks is None:
                return 1
            task = tasks[item[0]]
            return item[2] * sum(t.dtype.itemsize for t in [task.base, *task.secondaries])

        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_run_group)
        shared = ray.put(pass_)
        pending[:] = [remote.remote(shared, group) for group in groups(pass_.items(settings), size, settings.group_bytes)]
        while pending:
            done, rest = ray.wait(pending, num_returns=1)
            pending[:] = rest
            for result in _get(ray, done[0]):
                pass_.collect(result)
                if progress:
                    progress(result.nbytes)
    finally:
        for ref in pending:  # an error or Ctrl-C: what has not run yet never writes
            ray.cancel(ref, force=True)
        pass_.close()
        if started:
            ray.shutdown()

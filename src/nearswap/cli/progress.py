"""Progress on stderr: a bar on a terminal, one ETA line in a log."""

from __future__ import annotations

import sys
from typing import Any

import click


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A tqdm bar in bytes (rate and ETA), shown only once the preflight has passed."""

    ETA_AFTER = 10.0  # seconds of work measured before a log gets its one ETA line

    def __init__(self, desc: str, quiet: bool) -> None:
        # No bar where stderr is not a terminal (a log file, a pipe): its carriage returns
        # would fill the log, and an error must stay one line there; a long run writes one
        # line there instead, with the speed measured over its first ETA_AFTER seconds.
        self.desc, self.quiet, self.bar = desc, quiet or not _stderr_is_a_terminal(), None
        self.log_eta = not quiet and self.quiet
        self.total = self.done = 0
        self.started: float | None = None

    def start(self, total: int) -> None:
        import time

        self.total, self.started = total, time.perf_counter()
        if self.quiet:
            return  # no bar, and no tqdm import to pay for
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.desc,
                        disable=self.quiet, dynamic_ncols=True, leave=False, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.log_eta and self.started is not None:
            import time

            spent = time.perf_counter() - self.started
            if spent >= self.ETA_AFTER and self.done < self.total:
                self.log_eta = False
                rate = self.done / spent
                click.echo(f"{self.desc}: {rate / 1e9:.2f} GB/s over the first {spent:.0f} s; about "
                           f"{_duration((self.total - self.done) / rate)} left", err=True)
        if self.bar is not None:
            self.bar.update(n)
            if self.bar.n >= self.bar.total:  # done: clear it before anything is printed
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"



class _Phases:
    """Progress of a long job in phases (``what`` changes: a new phase): on a terminal one tqdm
    bar per phase, with rate and ETA; in a log (stderr not a terminal) a line when a phase
    starts, then one every ``LOG_EVERY`` seconds and one when it ends, each with the counts, the
    time spent and the time left — a log of a 35-minute eval is never silent for long."""

    LOG_EVERY = 60.0  # seconds between a phase's lines in a log

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.log = not _stderr_is_a_terminal()
        self.what: str | None = None
        self.bar: Any = None
        self.file = sys.stderr  # the terminal, even while a library's own output is being hidden
        self.started = self.last = 0.0
        self.ended = False

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.log:
            self._line(what, done, total)
            return
        if what != self.what:
            self.close()
            from tqdm import tqdm

            self.what = what
            self.bar = tqdm(total=total, desc=what, dynamic_ncols=True, leave=False, file=self.file)
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)

    def _line(self, what: str, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if what != self.what:
            self.what, self.started, self.last, self.ended = what, now, now, False
            click.echo(f"{what}: {done}/{total}", err=True)
            return
        finished = total > 0 and done >= total
        if self.ended or not (finished or now - self.last >= self.LOG_EVERY):
            return
        self.last, self.ended = now, finished
        spent = now - self.started
        left = f", about {_duration(spent / done * (total - done))} left" if 0 < done < total else ""
        click.echo(f"{what}: {done}/{total} ({100 * done / max(total, 1):.0f}%) in {_duration(spent)}{left}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.what = None, None



"""The start of the child scripts that SIGKILL themselves at a chosen point of a merge
(test_resume.py, test_resume_gguf.py): their arguments (POINT ARG ...), ``die()``, and the live
journal writer kept as ``journal.JournalWriter._live`` (for a point that lets it catch up); the
point ``after-rename``."""

PRELUDE = r"""
import os, signal, sys
from pathlib import Path
import nearswap
from nearswap import engine, journal, output
from nearswap.formats import gguf_writer, safetensors as st
from nearswap.stream import Settings

point, arg = sys.argv[1], int(sys.argv[2])
def die():
    os.kill(os.getpid(), signal.SIGKILL)

init = journal.JournalWriter.__init__
def keep(self, *a, **k):
    init(self, *a, **k)
    journal.JournalWriter._live = self
journal.JournalWriter.__init__ = keep

if point == "after-rename":  # the output complete and in place
    commit = output._commit
    def patched(*a, **k):
        commit(*a, **k)
        die()
    output._commit = patched
"""

"""The start of the child scripts that SIGKILL themselves at a chosen point of a merge
(test_resume.py, test_resume_gguf.py): their arguments (POINT ARG ...), ``die()``, and the live
journal writer kept as ``journal.JournalWriter._live``; the points ``after-rename`` and
``collected-journaled`` (once the driver has collected ARG bytes of output, the journal is made
to catch up with them on the driver's own thread, where it is written — no race with the
workers, whatever the machine's load — and the child dies: what is journaled is then every
tensor completed among the collected items, whatever the disk's speed)."""

PRELUDE = r"""
import os, signal, sys
from pathlib import Path
import nearswap
from nearswap.merging import passes, sinks
from nearswap.runtime import journal, output
from nearswap.formats import gguf_writer, safetensors as st
from nearswap.runtime.stream import Settings

point, arg = sys.argv[1], int(sys.argv[2])
def die():
    os.kill(os.getpid(), signal.SIGKILL)

init = journal.JournalWriter.__init__
def keep(self, *a, **k):
    init(self, *a, **k)
    journal.JournalWriter._live = self
journal.JournalWriter.__init__ = keep

if point == "collected-journaled":
    state = {"n": 0}
    completed = passes.CopyPass._completed
    def collected(self, result):
        completed(self, result)
        task = self.tasks[result.tensor]
        state["n"] += min(self._chunk, task.numel - result.start) * task.out_dtype.itemsize
        if state["n"] >= arg:
            self.journal.flush()
            die()
    passes.CopyPass._completed = collected

if point == "after-rename":  # the output complete and in place
    commit = output._commit
    def patched(*a, **k):
        commit(*a, **k)
        die()
    output._commit = patched
"""

"""Strangers' strings inside Markdown that nearswap writes (model cards, eval and sweep reports):
shown as the text they are, never as markup.

A model's name, a license read from its card, a task name or verdict read from a report file
may hold ``<script>``, ``<img onerror=…>``, a ``[link](javascript:…)``, a ``|`` that ends a
table cell, a newline that starts a heading, or terminal escapes. ``md`` makes one inline
piece of text of any of them; ``fence`` puts a block (a recipe) in a code fence that its own
backticks cannot close.
"""

from __future__ import annotations

import re
from typing import Any

# CommonMark's backslash escapes for the characters that start inline markup or a table cell;
# & < > become HTML entities (a Hub card renders HTML)
_SPECIAL = re.compile(r"([\\`*_\[\]|#~!])")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md(value: Any) -> str:
    """``value`` as inline Markdown text: on one line (control characters written as escapes
    such as ``\\n``, ``\\x1b``), HTML characters as entities, Markdown's punctuation escaped.

    >>> md("a|b <script>")
    'a\\\\|b &lt;script&gt;'
    """
    text = str(value)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    text = _SPECIAL.sub(r"\\\1", text)
    return "".join(_ENTITIES.get(ch, ch) for ch in text)


def fence(text: str, info: str = "") -> str:
    """``text`` in a fenced code block whose fence is longer than any run of backticks in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    bar = "`" * max(3, longest + 1)
    return f"{bar}{info}\n{text}\n{bar}"

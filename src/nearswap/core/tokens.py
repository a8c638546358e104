"""Token sequences."""

from __future__ import annotations

from typing import Sequence


def common_prefix(a: Sequence[int], b: Sequence[int], cap: int | None = None) -> int:
    """How many leading tokens ``a`` and ``b`` share (at most ``cap``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y or (cap is not None and n >= cap):
            break
        n += 1
    return n

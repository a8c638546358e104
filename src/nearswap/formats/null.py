"""The null sink (``-o null:``): a ``Writer`` that stores nothing.

For runs whose output would not fit anywhere (a 70B-shaped merge of generated inputs): the
engine streams, merges and checksums every chunk as for a real output, and this writer only
checks that each tensor receives each of its bytes once. The chunk CRCs the pass computes
stand for the data (``merging.sinks.merge_to_null`` reports their digest).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ..core.dtypes import DType
from ..core.errors import NearswapError, shown

NAME = "null:"


def is_null(out: Any) -> bool:
    return str(out) == NAME


class NullWriter:
    def __init__(self, layout: list[tuple[str, DType, tuple[int, ...]]]) -> None:
        self._sizes = {name: dtype.itemsize * math.prod(shape) for name, dtype, shape in layout}
        self._got = dict.fromkeys(self._sizes, 0)
        self._lock = threading.Lock()
        self.total_size = sum(self._sizes.values())

    def write(self, name: str, start: int, data: Any) -> int:
        from ..core import checksums

        n = memoryview(data).nbytes
        with self._lock:
            self._got[name] += n
        return checksums.crc(data)

    def close(self) -> list:
        short = [name for name, size in self._sizes.items() if self._got[name] != size]
        if short:  # the stream missed or repeated a chunk: a bug, never a result
            raise NearswapError(f"null output: tensor {shown(short[0])} received {self._got[short[0]]} bytes "
                                f"of {self._sizes[short[0]]}")
        return []

    def abort(self) -> None:
        pass

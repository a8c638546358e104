"""t that transfers: the t at which a stated share of the weights swaps, step by step.

The card describes its t by what it does: "about 0.8% of weights are fully switched ... during
each pass". The same t does something else to another model (a 135M model's weights are
larger than a 70B's), so ``--swap-share 0.8%`` picks, for each step of a chain, the one t at
which that share of the merged elements has 0 < |d| <= t, d computed exactly as the merge
computes it (in float32, against the running result of the steps before, rounded between
steps as the merge rounds them).

The t is found exactly, by radix selection on the bit patterns of |d| (for positive floats
their order is their bits' order): one pass counts every element by the high 16 bits of its
|d|, a second by the low 16 bits within the one high pattern where the wanted count falls; t is
the smallest |d| at which at least the wanted count swaps. Elements that share that exact |d|
(ties: common in bf16) all swap together, so the share is met to within the ties at t, which
are reported. Two passes per step, each reading the base and the secondaries up to that step.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..core import kernels
from ..core.dtypes import BY_NAME
from ..core.errors import InvalidValue, NearswapError
from ..formats.safetensors import FileReader
from ..runtime import stream
from ..runtime.stream import ChunkBuffers, Settings, work_items

HIGH = 1 << 16  # patterns of the high (then the low) 16 bits of a float32


@dataclass(frozen=True)
class Choice:
    """One step's t and what it swaps."""

    t: float
    swapped: int  # elements with 0 < |d| <= t
    total: int  # merged elements
    ties: int  # elements with |d| == t exactly
    wanted: int  # round(share * total)


def parse_share(text: str | float) -> float:
    """``0.8%`` or ``0.008`` -> 0.008; a share in (0, 1)."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InvalidValue(f"--swap-share {text!r}: give a share such as 0.8% or 0.008") from None
    if not 0 < value < 1:
        hint = (f" (a bare number is a fraction: {raw} is {100 * value:g}%; for {raw} percent write {raw}%)"
                if not raw.endswith("%") and 1 <= value < 100 else "")
        raise InvalidValue(f"--swap-share {text!r}: the share must be between 0 and 100%, exclusive{hint}")
    return value


class DistancePass:
    """A pass that counts step ``step``'s |d| over every merged element by bit pattern: the high
    16 bits (``high`` None), or the low 16 bits of those whose high bits are ``high``."""

    def __init__(self, tasks: list[Any], step: int, ts_before: list[float], carry_float32: bool,
                 high: int | None = None) -> None:
        self.tasks = [t for t in tasks if t.merged]
        self.step, self.ts_before, self.carry, self.high = step, ts_before, carry_float32, high
        self.counts: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_io"}

    def _open(self) -> tuple[FileReader, ChunkBuffers]:
        io = self.__dict__.get("_io")
        if io is None:
            io = self.__dict__["_io"] = (FileReader(), ChunkBuffers())
        return io

    def items(self, settings: Settings) -> Iterator[tuple[int, int, int]]:
        return (item for item in work_items([t.numel for t in self.tasks], settings.chunk) if item[2])

    def work(self, item: tuple[int, int, int]) -> Any:
        import numpy as np

        i, start, n = item
        task = self.tasks[i]
        reader, buffers = self._open()
        base = reader.read(task.base, start, buffers.get(0, task.base.dtype, n))
        sec = task.secondaries[self.step]
        s = np.frombuffer(reader.read(sec, start, buffers.get(1, sec.dtype, n)), sec.dtype.np).astype(np.float32)
        if self.step == 0:
            r = np.frombuffer(base, task.base.dtype.np).astype(np.float32)
        else:  # the running result the merge's step sees: the chain so far, rounded between steps as it is
            held = BY_NAME["F32"] if self.carry else task.out_dtype
            before = [(reader.read(info, start, buffers.get(2 + k, info.dtype, n)), info.dtype)
                      for k, info in enumerate(task.secondaries[:self.step])]
            out = buffers.get(-1, held, n)
            kernels.chain_raw(out, held, base, task.base.dtype, before, self.ts_before, not self.carry, count_net=False)
            r = np.frombuffer(out, held.np).astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            bits = np.abs(r - s).view(np.uint32)
        bits = bits[(bits > 0) & (bits < 0x7F800000)]  # positive and finite: zeros never swap, NaN/inf never do
        if self.high is None:
            return np.bincount(bits >> 16, minlength=HIGH)
        return np.bincount(bits[(bits >> 16) == self.high] & 0xFFFF, minlength=HIGH)

    def collect(self, result: Any) -> None:
        self.counts = result.astype("int64") if self.counts is None else self.counts + result

    def close(self) -> None:
        io = self.__dict__.pop("_io", None)
        if io is not None:
            io[0].close()


def choose(plan_: Any, share: float, settings: Settings | None = None,
           echo: Callable[[str], None] = lambda s: None) -> list[Choice]:
    """Each step's t for ``share`` (see the module docstring), the steps after the first
    measured against the chain with the t already chosen."""
    import numpy as np

    settings = settings or Settings()
    recipe = plan_.recipe
    if any(step.rules for step in recipe.steps):
        raise NearswapError("--swap-share picks one t per step; a recipe with per-tensor rules sets its own")
    total = sum(t.numel for t in plan_.tasks if t.merged)
    wanted = round(share * total)
    chosen: list[Choice] = []
    for k in range(len(recipe.steps)):
        ts = [c.t for c in chosen]
        coarse = DistancePass(plan_.tasks, k, ts, recipe.carry_float32)
        stream.run(coarse, settings)
        cum = np.cumsum(coarse.counts if coarse.counts is not None else np.zeros(HIGH, np.int64))
        if wanted == 0 or cum[-1] == 0:
            chosen.append(Choice(0.0, 0, total, 0, wanted))
            continue
        high = int(np.searchsorted(cum, min(wanted, int(cum[-1]))))  # the first pattern where the count is reached
        below = int(cum[high - 1]) if high else 0
        fine = DistancePass(plan_.tasks, k, ts, recipe.carry_float32, high)
        stream.run(fine, settings)
        cum_low = below + np.cumsum(fine.counts)
        low = int(np.searchsorted(cum_low, min(wanted, int(cum[-1]))))
        t = struct.unpack("<f", struct.pack("<I", (high << 16) | low))[0]
        choice = Choice(t, int(cum_low[low]), total, int(fine.counts[low]), wanted)
        chosen.append(choice)
        echo(f"step {k + 1}: t = {t:.9g} swaps {choice.swapped:,} of {total:,} weights "
             f"({100 * choice.swapped / total:.4f}%; wanted {100 * share:g}% = {wanted:,}; {choice.ties:,} at |d| = t)")
    return chosen

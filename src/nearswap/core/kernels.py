"""Pure array functions: the NearSwap formula and the fused chain over one chunk. No I/O.

The formula, per element, with ``v0`` the running result and ``v1`` the secondary::

    w = t / |v0 - v1|
    w = nan_to_num(w, nan=1.0, posinf=1.0, neginf=1.0)
    w = clip(w, 0, 1)
    result = (1 - w) * v0 + w * v1

evaluated in float32 (float64 if an input is float64), in exactly this order, so the
result is bit-identical to the model card's numpy code.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

from .dtypes import DType
from .errors import InvalidValue, NearswapError

if TYPE_CHECKING:
    import numpy as np

try:  # the compiled hot loop; numpy below computes the same bits, slower
    from .. import _ckernel
except ImportError:  # pragma: no cover - depends on the build
    _ckernel = None  # type: ignore[assignment]

BACKEND = "c" if _ckernel is not None else "numpy"



def use_isa(name: str) -> None:
    """Force the C kernel's step implementation (``avx512``, ``avx2``, ``scalar``), e.g. to
    compare them; the CLI calls it for ``NEARSWAP_ISA``. Process-wide, by design."""
    if _ckernel is None:
        raise NearswapError("the C kernel is not built: no implementation to choose")
    try:
        _ckernel.use_isa(name)
    except (ValueError, RuntimeError) as e:
        raise NearswapError(f"NEARSWAP_ISA={name!r}: {e}") from None


def describe_backend() -> str:
    """Which implementation runs the chain: ``"c/avx512"``, ``"c/avx2"``, ``"c/scalar"`` or ``"numpy"``."""
    return f"c/{_ckernel.current_isa()}" if _ckernel is not None else "numpy"


class StepCounts(NamedTuple):
    """What one NearSwap step did to a block of elements."""

    identical: int  # |d| == 0
    swapped: int  # 0 < |d| <= t: fully switched to the secondary
    moved: int  # |d| > t: moved by t toward the secondary
    nonfinite: int  # |d| is NaN or inf (an input was not finite)
    abs_change: float  # sum of |result - previous| over finite changes
    changed: int = 0  # result != previous, both as held between steps (the output dtype, or float32 carried)


class ChainCounts(NamedTuple):
    """What a chain did to a block of elements: each step's counts, and the net change."""

    steps: list[StepCounts]
    changed: int | None  # output values that differ from the base's as the output's dtype holds it (None: not counted)


def check_t(t: Any) -> Any:
    """Validate a threshold: finite and >= 0. Returns a float (or array), -0.0 made +0.0.

    >>> check_t(1e-4)
    0.0001
    """
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return _scalar_t(t)
    import numpy as np

    if isinstance(t, (np.floating, np.integer)):
        return _scalar_t(t)
    arr = np.asarray(t)
    if arr.dtype.kind not in "fiu":
        raise InvalidValue(f"t must be a number or a numeric array, got {arr.dtype}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise InvalidValue("t must be finite and >= 0 everywhere")
    return arr + 0.0


def _scalar_t(t: Any) -> float:
    value = float(t)
    if not math.isfinite(value) or value < 0:
        raise InvalidValue(f"t must be a finite number >= 0, got {t!r}")
    return value + 0.0  # -0.0 -> +0.0, so numpy versions that differ on clip(-0.0) agree


def _formula(t: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The card's formula on arrays already in the compute dtype."""
    import numpy as np

    with np.errstate(all="ignore"):
        w = np.asarray(t, dtype=a.dtype) / np.abs(a - b)
        np.nan_to_num(w, copy=False, nan=1.0, posinf=1.0, neginf=1.0)
        np.clip(w, 0.0, 1.0, out=w)
        return (1 - w) * a + w * b


def nearswap(t: Any, v0: Any, v1: Any, out_dtype: Any = None) -> Any:
    """NearSwap of two arrays: weights within ``t`` of each other move (fully) to ``v1``.

    ``v0``/``v1`` are numpy arrays (any float dtype, bfloat16 from ml_dtypes included) or
    torch tensors. ``t`` is a number >= 0 or an array broadcastable to them. The work is
    done in float32 (float64 if an input is float64) and the result is rounded
    (round-to-nearest-even) to ``out_dtype``, by default ``v0``'s dtype.

    >>> import numpy as np
    >>> nearswap(1e-4, np.float32([1.0, 1.00005]), np.float32([2.0, 1.0]))
    array([1.0001, 1.    ], dtype=float32)
    """
    import numpy as np

    t = check_t(t)
    if type(v0).__module__.startswith("torch") or type(v1).__module__.startswith("torch"):
        return _nearswap_torch(t, v0, v1, out_dtype)
    v0, v1 = np.asarray(v0), np.asarray(v1)
    wide = np.float64 if np.float64 in (v0.dtype, v1.dtype) else np.float32
    res = _formula(t, v0.astype(wide), v1.astype(wide))
    return res.astype(v0.dtype if out_dtype is None else out_dtype)


def _nearswap_torch(t: Any, v0: Any, v1: Any, out_dtype: Any) -> Any:
    import torch

    wide = torch.float64 if torch.float64 in (v0.dtype, v1.dtype) else torch.float32
    a, b = v0.to(wide), v1.to(wide)
    w = torch.as_tensor(t, dtype=wide, device=a.device) / (a - b).abs()
    w = torch.nan_to_num(w, nan=1.0, posinf=1.0, neginf=1.0).clamp_(0.0, 1.0)
    res = (1 - w) * a + w * b
    return res.to(v0.dtype if out_dtype is None else out_dtype)


def _counts(t: float, a: np.ndarray, b: np.ndarray, res: np.ndarray, held: np.ndarray) -> StepCounts:
    """The counts of one step from ``a`` (the previous value as loaded), ``res`` (the result as
    held) and ``held`` (the previous value as held: ``a`` rounded as ``res`` was)."""
    import numpy as np

    with np.errstate(all="ignore"):
        d = np.abs(a - b)
        change = np.abs(res - held)
    changed = int(np.count_nonzero(change > 0))
    finite = d <= np.finfo(d.dtype).max
    identical = int(np.count_nonzero(d == 0))
    swapped = int(np.count_nonzero((d > 0) & (d <= d.dtype.type(t))))
    moved = int(np.count_nonzero((d > d.dtype.type(t)) & finite))
    change = change[change <= np.finfo(change.dtype).max]
    return StepCounts(identical, swapped, moved, d.size - identical - swapped - moved, float(change.sum(dtype=np.float64)),
                      changed)


def chain(
    out: np.ndarray,
    base: np.ndarray,
    secondaries: Sequence[np.ndarray],
    ts: Sequence[float],
    round_between: bool = True,
    count_net: bool = True,
) -> ChainCounts:
    """Run the whole NearSwap chain over one flat chunk, writing the result into ``out``.

    ``base``, every secondary and ``out`` are 1-D arrays of the same length, each in its
    own dtype. Step k computes ``r_k = nearswap(ts[k], r_{k-1}, secondaries[k])``; with
    ``round_between`` each ``r_k`` is rounded to ``out.dtype`` before the next step, so a
    chain equals its steps run one by one with saved intermediates. Returns the counts of
    each step and (``count_net``) how many output values differ from the base's as the
    output's dtype holds it. Thread-safe; the C kernel releases the GIL.
    """
    from .dtypes import BY_NUMPY

    dtypes = [BY_NUMPY[a.dtype] for a in (out, base, *secondaries)]
    if _ckernel is not None and all(d.kernel_code is not None for d in dtypes):
        return _chain_c(out, base, secondaries, ts, round_between, dtypes, count_net)
    return _chain_numpy(out, base, secondaries, ts, round_between, dtypes, count_net)


def chain_raw(out: Any, out_dtype: DType, base: Any, base_dtype: DType, secondaries: Sequence[tuple[Any, DType]],
              ts: Sequence[float], round_between: bool = True, count_net: bool = True) -> ChainCounts:
    """``chain`` over raw byte buffers (memoryviews, bytearrays), each with its dtype: the
    engine's entry, which needs no numpy when the C kernel handles the dtypes."""
    dtypes = [out_dtype, base_dtype, *(d for _, d in secondaries)]
    if _ckernel is not None and all(d.kernel_code is not None for d in dtypes):
        return _chain_c(out, base, [b for b, _ in secondaries], ts, round_between, dtypes, count_net)
    import numpy as np

    arrays = [np.frombuffer(buf, d.np) for buf, d in ((out, out_dtype), (base, base_dtype), *secondaries)]
    return _chain_numpy(arrays[0], arrays[1], arrays[2:], ts, round_between, dtypes, count_net)


def _bytes(buf: Any) -> Any:
    """The raw bytes of a numpy array or buffer, for the C kernel (no numpy import needed)."""
    return buf.view("u1") if hasattr(buf, "view") and hasattr(buf, "dtype") else buf


def _chain_c(out, base, secondaries, ts, round_between, dtypes: list[DType], count_net: bool = True) -> ChainCounts:
    codes = tuple(d.kernel_code for d in dtypes[2:])
    steps, net = _ckernel.chain(  # type: ignore[attr-defined]
        _bytes(out), dtypes[0].kernel_code, _bytes(base), dtypes[1].kernel_code,
        tuple(_bytes(s) for s in secondaries), codes, tuple(float(check_t(t)) for t in ts),
        bool(round_between), bool(count_net),
    )
    return ChainCounts([StepCounts(*r) for r in steps], net)


def _chain_numpy(out, base, secondaries, ts, round_between, dtypes: list[DType], count_net: bool = True) -> ChainCounts:
    import numpy as np

    wide = np.float64 if any(d.name == "F64" for d in dtypes) else np.float32
    r = base.astype(wide)
    counts = []
    with np.errstate(over="ignore"):  # rounding a huge value to f16 gives inf, as the formula's numpy does
        for t, s in zip(ts, secondaries):
            s = s.astype(wide)
            res = _formula(t, r, s)
            held = r
            if round_between:
                res = res.astype(out.dtype).astype(wide)
                held = r.astype(out.dtype).astype(wide)
            counts.append(_counts(t, r, s, res, held))
            r = res
        out[...] = r.astype(out.dtype)
        net = None
        if count_net:
            with np.errstate(invalid="ignore"):
                net = int(np.count_nonzero(np.abs(out.astype(wide) - base.astype(out.dtype).astype(wide)) > 0))
    return ChainCounts(counts, net)


# ---------------------------------------------------------------- threshold counts (the curve)

# The curve's sample histogram: bin = clamp(bits(|d|) >> HIST_SHIFT, HIST_LO, HIST_LO + HIST_BINS - 1)
# - HIST_LO, 16 bins per octave, exact at their edges for 2^-40 <= |d| < 2^24; smaller values
# (zeros included) fall in bin 0, larger ones (inf and NaN included) in the last. Every
# HIST_STRIDE-th element of a chunk is sampled. The C kernel defines the same numbers.
HIST_SHIFT = 19
HIST_LO = (127 - 40) << 4
HIST_BINS = 64 << 4
HIST_STRIDE = 8
MAX_THRESHOLDS = 64


class ThresholdCounts(NamedTuple):
    identical: int  # d == 0
    nonfinite: int  # d is NaN or inf


def threshold_counts(a: Any, a_dtype: DType, b: Any, b_dtype: DType, ts: Sequence[float], le: Any,
                     hist: Any) -> ThresholdCounts:
    """For d = |a - b| over one chunk (raw buffers, each with its dtype; d in float32, float64 if
    an input is float64, exactly as a NearSwap step computes it): adds to ``le[k]`` the number
    of elements with d <= ts[k] (``le``: a writable int64 buffer, one slot per t, at most
    MAX_THRESHOLDS) and adds every HIST_STRIDE-th d to ``hist`` (int64[HIST_BINS], see above).
    Returns the identical and non-finite counts. Thread-safe; the C kernel releases the GIL."""
    if len(ts) > MAX_THRESHOLDS:
        raise InvalidValue(f"at most {MAX_THRESHOLDS} thresholds at once, got {len(ts)}")
    if _ckernel is not None and a_dtype.kernel_code is not None and b_dtype.kernel_code is not None:
        return ThresholdCounts(*_ckernel.histogram(_bytes(a), a_dtype.kernel_code, _bytes(b), b_dtype.kernel_code,
                                                   tuple(float(t) for t in ts), hist, le))
    return _threshold_counts_numpy(a, a_dtype, b, b_dtype, ts, le, hist)


def _threshold_counts_numpy(a: Any, a_dtype: DType, b: Any, b_dtype: DType, ts: Sequence[float], le: Any,
                            hist: Any) -> ThresholdCounts:
    import numpy as np

    x, y = np.frombuffer(a, a_dtype.np), np.frombuffer(b, b_dtype.np)
    wide = np.float64 if np.float64 in (x.dtype, y.dtype) else np.float32
    with np.errstate(all="ignore"):
        d = np.abs(x.astype(wide) - y.astype(wide))
    le_arr, hist_arr = np.frombuffer(le, np.int64), np.frombuffer(hist, np.int64)
    for k, t in enumerate(ts):
        le_arr[k] += np.count_nonzero(d <= wide(t))
    with np.errstate(over="ignore"):
        bins = d[::HIST_STRIDE].astype(np.float32).view(np.uint32) >> HIST_SHIFT
    hist_arr += np.bincount(np.clip(bins, HIST_LO, HIST_LO + HIST_BINS - 1) - HIST_LO, minlength=HIST_BINS)
    return ThresholdCounts(int(np.count_nonzero(d == 0)), int(np.count_nonzero(~np.isfinite(d))))

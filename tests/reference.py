"""Independent reference: the model card's NearSwap, evaluated with plain numpy, step by step.

Nothing here imports nearswap; tests compare nearswap's output against these functions.
"""

import numpy as np


def nearswap_step(t, v0, v1):
    """The card's code, verbatim in spirit: float arrays in, same dtype out."""
    with np.errstate(all="ignore"):
        lweight = np.absolute(v0 - v1)
        lweight = np.asarray(t, dtype=v0.dtype) / lweight
        lweight = np.nan_to_num(lweight, nan=1.0, posinf=1.0, neginf=1.0)
        np.clip(lweight, a_min=0.0, a_max=1.0, out=lweight)
        return (1 - lweight) * v0 + lweight * v1


def compute_dtype(*arrays):
    return np.float64 if any(a.dtype == np.float64 for a in arrays) else np.float32


def chain(base, secondaries, ts, out_dtype=None, round_between=True):
    """r0 = base; r_k = nearswap(t_k, r_{k-1}, s_k), rounded to the output dtype after each step."""
    out_dtype = base.dtype if out_dtype is None else np.dtype(out_dtype)
    wide = compute_dtype(base, *secondaries)
    with np.errstate(over="ignore"):  # rounding huge values to f16 gives inf, as intended
        r = base.astype(wide)
        for t, s in zip(ts, secondaries):
            r = nearswap_step(t, r, s.astype(wide))
            if round_between:
                r = r.astype(out_dtype).astype(wide)
        return r.astype(out_dtype)


def counts(t, v0, v1):
    """Plain per-step counts: identical, swapped (0<|d|<=t), moved (|d|>t, finite), nonfinite."""
    wide = compute_dtype(v0, v1)
    with np.errstate(all="ignore"):
        d = np.abs(v0.astype(wide) - v1.astype(wide))
    tt = wide(t)
    return {
        "total": int(d.size),
        "identical": int(np.sum(d == 0)),
        "swapped": int(np.sum((d > 0) & (d <= tt))),
        "moved": int(np.sum((d > tt) & np.isfinite(d))),
        "nonfinite": int(np.sum(~np.isfinite(d))),
    }


def same_bits(a, b):
    """Bitwise equality (NaNs with the same payload are equal; +0 and -0 are not)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    ua = a.view(f"u{a.dtype.itemsize}")
    ub = b.view(f"u{b.dtype.itemsize}")
    return bool(np.array_equal(ua, ub))


def threshold_counts(a, b, ts, stride=8, lo_exp=-40, octaves=64, per_octave=16):
    """Plain counts of d = |a - b| for the curve: d <= t for each t, d == 0, non-finite d; and a
    histogram of every ``stride``-th d over bins whose upper edges are 2^e * (1 + j/16), from
    2^lo_exp up (bin 0 holds everything smaller, zeros included; the last, everything larger,
    inf and NaN included)."""
    wide = compute_dtype(a, b)
    with np.errstate(all="ignore"):
        d = np.abs(a.astype(wide) - b.astype(wide))
    le = [int(np.sum(d <= wide(t))) for t in ts]
    e = np.repeat(np.arange(lo_exp, lo_exp + octaves, dtype=np.float64), per_octave)
    j = np.tile(np.arange(per_octave, dtype=np.float64), octaves)
    upper = np.roll(2.0 ** e * (1 + j / per_octave), -1)  # the bin after 2^e(1+j/16) starts there
    upper[-1] = np.inf
    with np.errstate(over="ignore"):
        sample = d[::stride].astype(np.float32).astype(np.float64)
    bins = np.minimum(np.searchsorted(upper, sample, side="right"), octaves * per_octave - 1)
    bins[np.isnan(sample)] = octaves * per_octave - 1
    hist = np.bincount(bins, minlength=octaves * per_octave)
    return le, int(np.sum(d == 0)), int(np.sum(~np.isfinite(d))), hist


def generated_pools(seeds, period, noise=0.0125):
    """The pools ``synthetic:SHAPE?seed=N`` inputs cycle through, drawn as nearswap's
    ``formats/generated.py`` documents it (Python's generator; Laplace noise by its inverse
    CDF), rounded by numpy and ml_dtypes: {seed: bf16 weights}, and the bf16 norm pool."""
    import random

    import ml_dtypes

    def bf16(x):
        return np.asarray(x, np.float64).astype(np.float32).astype(ml_dtypes.bfloat16)

    rng = random.Random(0)
    base = bf16([0.02 * rng.gauss(0.0, 1.0) for _ in range(period)])
    out = {}
    for seed in seeds:
        if seed == 0:
            out[seed] = base
            continue
        rng = random.Random(seed)
        u = np.array([rng.random() - 0.5 for _ in range(period)])
        out[seed] = bf16(base.astype(np.float64) - noise * np.sign(u) * np.log1p(-2 * np.abs(u)))
    rng = random.Random(10_007)
    norm = bf16([1.0 + 0.05 * rng.gauss(0.0, 1.0) for _ in range(period)])
    return out, norm

"""The formula and the fused chain, element by element, against the plain-numpy reference."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DTYPES
from nearswap.core import kernels
from nearswap.core.dtypes import BY_NUMPY
from reference import chain as ref_chain
from reference import counts as ref_counts
from reference import nearswap_step, same_bits
from reference import threshold_counts as ref_threshold_counts

# Every step implementation of the C kernel this CPU can run (AVX-512, AVX2, scalar), and numpy.
if kernels.BACKEND == "c":
    from nearswap import _ckernel

    BACKENDS = [f"c-{isa}" for isa in _ckernel.isas()] + ["numpy"]
else:
    BACKENDS = ["numpy"]
TS = [0.0, 1e-4, 3e-4, 1e-3, 2.5e-3, 1e-2, 0.5, 1e-40, 3.0]


def run_chain(backend, out, base, secs, ts, round_between=True):
    dtypes = [BY_NUMPY[a.dtype] for a in (out, base, *secs)]
    if backend == "numpy":
        return kernels._chain_numpy(out, base, secs, ts, round_between, dtypes)
    _ckernel.use_isa(backend.removeprefix("c-"))
    try:
        return kernels._chain_c(out, base, secs, ts, round_between, dtypes)
    finally:
        _ckernel.use_isa("best")


@st.composite
def related_arrays(draw, dtype, n_secondaries):
    """A base and secondaries near it: random bits mixed with small, exact-t and zero deltas."""
    dt = DTYPES[dtype]
    n = draw(st.integers(1, 3000))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    uint = np.dtype(f"u{dt.itemsize}")
    base = (0.02 * rng.standard_normal(n)).astype(dt)
    raw = rng.integers(0, np.iinfo(uint).max, n, dtype=uint, endpoint=True).view(dt)
    finite_raw = np.where(np.isfinite(raw.astype(np.float32)), raw, base)
    pick = rng.random(n)
    base = np.where(pick < 0.05, finite_raw, base).astype(dt)
    secs = []
    for _ in range(n_secondaries):
        delta = rng.laplace(0, draw(st.sampled_from([1e-5, 1e-4, 1e-3, 1e-1])), n).astype(np.float32)
        s = (base.astype(np.float32) + delta).astype(dt)
        kind = rng.random(n)
        s = np.where(kind < 0.1, base, s)  # identical
        s = np.where((kind >= 0.1) & (kind < 0.15), (-base.astype(np.float32)).astype(dt), s)  # sign flips, +-0
        secs.append(s.astype(dt))
    return base, secs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_chain_matches_reference(backend, dtype, data):
    steps = data.draw(st.integers(1, 3))
    base, secs = data.draw(related_arrays(dtype, steps))
    ts = [data.draw(st.sampled_from(TS)) for _ in range(steps)]
    round_between = data.draw(st.booleans())
    out = np.empty_like(base)
    got = run_chain(backend, out, base, secs, ts, round_between)
    assert same_bits(out, ref_chain(base, secs, ts, round_between=round_between))
    # counts: each step against the running result the reference computes
    wide = np.float32
    r = base.astype(wide)
    for k, (t, s) in enumerate(zip(ts, secs)):
        expect = ref_counts(t, r, s.astype(wide))
        nxt = nearswap_step(t, r, s.astype(wide))
        if round_between:
            nxt = nxt.astype(base.dtype).astype(wide)
        with np.errstate(invalid="ignore"):
            change = np.abs(nxt - r)
        expect["changed"] = int(np.count_nonzero(change > 0))  # the value as held differs (NaN: not counted)
        assert got.steps[k]._asdict() | {"total": expect["total"]} == {**expect, "abs_change": got.steps[k].abs_change}
        assert got.steps[k].abs_change == pytest.approx(float(change[np.isfinite(change)].sum(dtype=np.float64)), rel=1e-4, abs=1e-30)
        r = nxt
    assert got.changed == net_changed(out, base)


def net_changed(out, base):
    """Output values that differ from the base's as the output's dtype holds it (NaN not counted)."""
    x, y = out.astype(np.float64), base.astype(out.dtype).astype(np.float64)
    return int(np.count_nonzero((x < y) | (x > y)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_dtype,out_dtype", [("f32", "bf16"), ("f16", "bf16"), ("bf16", "f32"), ("f32", "f16"),
                                                  ("bf16", "bf16")])
@pytest.mark.parametrize("round_between", [True, False])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_net_change_against_numpy(backend, base_dtype, out_dtype, round_between, data):
    """The chain's net change for every loop of the kernel (dtype pairs, one step or several,
    a float32 carry into a narrower output): the output against the base as the output holds it."""
    steps = data.draw(st.integers(1, 3))
    base, secs = data.draw(related_arrays(base_dtype, steps))
    ts = [data.draw(st.sampled_from(TS)) for _ in range(steps)]
    with np.errstate(over="ignore"):
        out = np.empty(base.shape, DTYPES[out_dtype])
        got = run_chain(backend, out, base, secs, ts, round_between)
        assert got.changed == net_changed(out, base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", ["bf16", "f16", "f32"])
@settings(max_examples=40, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=500))
def test_narrowing_from_float32_rounds_like_ml_dtypes(backend, out_dtype, bits):
    """t = 0 leaves v0 unchanged (for finite v1), so the output is v0 rounded: any float32 bits."""
    base = np.array(bits, dtype=np.uint32).view(np.float32)
    sec = np.zeros_like(base)
    out = np.empty(base.shape, DTYPES[out_dtype])
    run_chain(backend, out, base, [sec], [0.0], True)
    assert same_bits(out, ref_chain(base, [sec], [0.0], out_dtype=DTYPES[out_dtype]))


EDGE = np.array([
    0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 1e-4, -1e-4, 0.5, 1.0, -1.0, 3.0e38, -3.0e38,
    65504.0, 1e-8, 2e-4, 0.02, -0.02, 1.0001, 0.99990004,
], dtype=np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("t", [0.0, 1e-4, 1.0, 1e-45])
def test_edge_values_all_pairs(backend, dtype, t):
    """Every pair of edge values: +-0, subnormals, |d| == t, identical, huge (overflowing |d|)."""
    dt = DTYPES[dtype]
    with np.errstate(over="ignore"):
        vals = EDGE.astype(dt)  # 3e38 overflows f16 to inf: more edge cases
    a, b = np.meshgrid(vals, np.concatenate([vals, (vals.astype(np.float32) + np.float32(t)).astype(dt)]))
    a, b = a.ravel(), b.ravel()
    out = np.empty_like(a)
    got = run_chain(backend, out, a, [b], [t])
    assert same_bits(out, ref_chain(a, [b], [t]))
    expect = ref_counts(t, a, b)
    assert (got.steps[0].identical, got.steps[0].swapped, got.steps[0].moved, got.steps[0].nonfinite) == (
        expect["identical"], expect["swapped"], expect["moved"], expect["nonfinite"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_difference_exactly_t_swaps_fully(backend):
    t = np.float32(0.25)
    a = np.float32([1.0, 1.0, 1.0])
    b = np.float32([1.25, 1.2500001, 0.75])
    out = np.empty_like(a)
    got = run_chain(backend, out, a, [b], [float(t)])
    assert out[0] == b[0] and out[2] == b[2]  # |d| == t: fully swapped
    assert out[1] != b[1]  # just above t: moved by t, not swapped
    assert (got.steps[0].swapped, got.steps[0].moved) == (2, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_follow_the_formula(backend):
    a = np.float32([np.nan, np.inf, 1.0, -np.inf, 0.0])
    b = np.float32([1.0, 1.0, np.nan, -np.inf, np.inf])
    out = np.empty_like(a)
    got = run_chain(backend, out, a, [b], [1e-4])
    assert same_bits(out, ref_chain(a, [b], [1e-4]))
    assert got.steps[0].nonfinite == 5


def test_float64_inputs_compute_in_float64():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(1000)
    b = a + rng.laplace(0, 1e-4, 1000)
    out = np.empty_like(a)
    kernels.chain(out, a, [b], [1e-4])
    assert same_bits(out, nearswap_step(1e-4, a, b))
    assert not same_bits(out.astype(np.float32), nearswap_step(1e-4, a.astype(np.float32), b.astype(np.float32)))


def test_mixed_input_dtypes():
    rng = np.random.default_rng(4)
    a = (0.02 * rng.standard_normal(500)).astype(ml_dtypes.bfloat16)
    b = (a.astype(np.float32) + rng.laplace(0, 1e-3, 500)).astype(np.float16)
    out = np.empty(500, np.float32)
    kernels.chain(out, a, [b], [1e-3])
    assert same_bits(out, nearswap_step(1e-3, a.astype(np.float32), b.astype(np.float32)))


# ---------------------------------------------------------------- the public function


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_public_nearswap_returns_v0_dtype(dtype):
    rng = np.random.default_rng(5)
    a = (0.02 * rng.standard_normal((30, 7))).astype(DTYPES[dtype])
    b = (a.astype(np.float32) + rng.laplace(0, 1e-3, (30, 7))).astype(DTYPES[dtype])
    got = kernels.nearswap(1e-3, a, b)
    assert got.dtype == a.dtype
    assert same_bits(got, nearswap_step(1e-3, a.astype(np.float32), b.astype(np.float32)).astype(a.dtype))


def test_public_nearswap_array_t_broadcasts():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((4, 50)).astype(np.float32)
    b = a + rng.laplace(0, 1e-2, (4, 50)).astype(np.float32)
    t = np.array([[0.0], [1e-3], [1e-2], [1.0]])
    got = kernels.nearswap(t, a, b)
    assert same_bits(got, nearswap_step(t.astype(np.float32), a, b))
    assert same_bits(got[3], b[3])  # t = 1 swaps every element of that row


@pytest.mark.parametrize("bad", [-1e-4, float("nan"), float("inf"), -float("inf"), np.array([1e-4, -1.0])])
def test_public_nearswap_refuses_bad_t(bad):
    with pytest.raises(ValueError, match="t must be"):
        kernels.nearswap(bad, np.zeros(2, np.float32), np.ones(2, np.float32))


def test_negative_zero_t_is_zero():
    a, b = np.float32([-0.0, 0.0, 1.0]), np.float32([5.0, -5.0, 1.0])
    assert same_bits(kernels.nearswap(-0.0, a, b), nearswap_step(0.0, a, b))


def test_torch_tensors_match_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    a = (0.02 * rng.standard_normal(2000)).astype(np.float32)
    b = a + rng.laplace(0, 1e-3, 2000).astype(np.float32)
    got = kernels.nearswap(1e-3, torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16())
    want = kernels.nearswap(1e-3, a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16))
    assert got.dtype == torch.bfloat16
    assert np.array_equal(got.view(torch.int16).numpy(), want.view(np.int16))


# ---------------------------------------------------------------- threshold counts (the curve)


def run_threshold_counts(backend, a, b, ts):
    from array import array

    le, hist = array("q", bytes(8 * len(ts))), array("q", bytes(8 * kernels.HIST_BINS))
    args = (a.view("u1"), BY_NUMPY[a.dtype], b.view("u1"), BY_NUMPY[b.dtype], ts, le, hist)
    if backend == "numpy":
        got = kernels._threshold_counts_numpy(*args)
    else:
        _ckernel.use_isa(backend.removeprefix("c-"))
        try:
            got = kernels.threshold_counts(*args)
        finally:
            _ckernel.use_isa("best")
    return list(le), got.identical, got.nonfinite, np.array(hist)


def assert_threshold_counts(backend, a, b, ts):
    le, identical, nonfinite, hist = run_threshold_counts(backend, a, b, ts)
    want_le, want_identical, want_nonfinite, want_hist = ref_threshold_counts(
        a, b, ts, kernels.HIST_STRIDE, (kernels.HIST_LO >> 4) - 127, kernels.HIST_BINS >> 4)
    assert (le, identical, nonfinite) == (want_le, want_identical, want_nonfinite)
    assert np.array_equal(hist, want_hist)


def test_histogram_constants_agree_with_the_c_kernel():
    if kernels.BACKEND != "c":
        pytest.skip("no C kernel in this build")
    for name in ("HIST_SHIFT", "HIST_LO", "HIST_BINS", "HIST_STRIDE"):
        assert getattr(_ckernel, name) == getattr(kernels, name), name
    assert _ckernel.MAX_TS == kernels.MAX_THRESHOLDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [("bf16", "bf16"), ("f16", "f16"), ("f32", "f32"), ("bf16", "f32"), ("f16", "bf16")])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_threshold_counts_match_plain_numpy(backend, dtypes, data):
    """Exact counts at any set of t (more than 8 included: the register groups), any length."""
    base, (sec,) = data.draw(related_arrays(dtypes[0], 1))
    sec = sec.astype(np.float32).astype(DTYPES[dtypes[1]])
    ts = data.draw(st.lists(st.sampled_from(TS + [1e-3 * k for k in range(1, 30)]), min_size=1, max_size=20))
    assert_threshold_counts(backend, base, sec, sorted(ts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_threshold_counts_edge_values(backend, dtype):
    """Every pair of edge values: +-0, subnormals, |d| == t, NaN and inf, overflowing |d|."""
    dt = DTYPES[dtype]
    with np.errstate(over="ignore"):
        vals = np.concatenate([EDGE, np.float32([np.nan, np.inf, -np.inf])]).astype(dt)
    ts = [0.0, 1e-45, 1e-4, 2e-4, 1.0, 3.0e38]
    a, b = np.meshgrid(vals, np.concatenate([vals, (vals.astype(np.float32) + np.float32(1e-4)).astype(dt)]))
    assert_threshold_counts(backend, a.ravel(), b.ravel(), ts)


@settings(max_examples=40, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_counts_any_bits(backend, bits):
    a = np.array(bits, np.uint32).view(np.float32)
    b = np.roll(a, 1)
    assert_threshold_counts(backend, a, b, [0.0, 1e-30, 1e-4, 0.5, 1e30])


def test_threshold_counts_refuse_too_many_ts():
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="at most"):
        run_threshold_counts("numpy" if kernels.BACKEND != "c" else BACKENDS[0], a, a, [0.0] * 65)

"""The C dequantizer against gguf.quants.dequantize, bit for bit, on random blocks of every type.

Random bytes are the hostile case: scales that are NaN, infinities, subnormals and huge
values all occur, and every one of them must convert as gguf's numpy code converts it.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from nearswap.formats import gguf as gguf_format  # noqa: E402

TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
needs_c = pytest.mark.skipif(gguf_format._dequant is None, reason="the C dequantizer is not built")


def bits(a):
    return np.asarray(a).view(np.uint32)


@needs_c
def test_every_listed_type_has_a_c_path():
    assert {int(t) for t in TYPES} == set(gguf_format.DEQUANT_TYPES)


@needs_c
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's numpy code on NaN scales
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_bit_identical_to_gguf_on_random_blocks(qtype, data):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nblocks = data.draw(st.integers(1, 12))
    seed = data.draw(st.integers(0, 2**32 - 1))
    raw = np.random.default_rng(seed).integers(0, 256, (3, nblocks * size), dtype=np.uint8)
    if data.draw(st.booleans()):  # extreme scales: the half-float fields set to NaN, inf, 0, subnormal, max
        special = data.draw(st.sampled_from([0x7E00, 0x7C00, 0xFC00, 0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF, 0x7D01]))
        raw.view(np.uint8)[:, :2] = [special & 0xFF, special >> 8]
    want = quants.dequantize(raw, qtype).astype(np.float32)
    got = gguf_format.dequantize(raw, qtype)
    assert got.shape == want.shape == (3, nblocks * block)
    assert np.array_equal(bits(got), bits(want))


@needs_c
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0, Q.F16])
def test_realistic_blocks_from_the_quantizer(qtype):
    """Blocks the way a real file holds them (gguf quantizes Q8_0 and F16; K-quants from llama.cpp
    are random-shaped here: their layout, not their values, is what is exercised)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    raw = quants.quantize(x, qtype).view(np.uint8) if qtype in (Q.Q8_0, Q.F16) else \
        rng.integers(0, 256, (4, 2 * gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    assert np.array_equal(bits(gguf_format.dequantize(raw, qtype)), bits(quants.dequantize(raw, qtype).astype(np.float32)))


def test_fallback_without_the_c_kernel(monkeypatch):
    monkeypatch.setattr(gguf_format, "DEQUANT_TYPES", frozenset())
    raw = np.random.default_rng(0).integers(0, 256, (2, 34 * 4), dtype=np.uint8)
    assert np.array_equal(bits(gguf_format.dequantize(raw, Q.Q8_0)), bits(quants.dequantize(raw, Q.Q8_0)))

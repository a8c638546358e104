/*
 * GGUF dequantization: blocks of llama.cpp's quantization types to float32, bit-identical
 * to gguf.quants.dequantize (the gguf package's numpy code), at memory speed.
 *
 * Every value is computed with the same float32 operations in the same order as the numpy
 * code: a half-precision scale widened exactly, then products and sums each rounded once
 * (built with -ffp-contract=off: no fused multiply-add). Half-to-float conversion goes
 * through a 65,536-entry table the caller builds with numpy itself, so NaN payloads and
 * subnormals convert exactly as numpy converts them on this machine. The GIL is released:
 * the merge's threads dequantize chunks in parallel.
 *
 * Types (their GGMLQuantizationType values): F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8,
 * Q2_K 10, Q3_K 11, Q4_K 12, Q5_K 13, Q6_K 14, BF16 30. Others: the caller uses gguf.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24); }

typedef struct { int block, size; } Layout;

static Layout layout(int qtype)
{
    switch (qtype) {
        case 1: return (Layout){1, 2};      /* F16 */
        case 30: return (Layout){1, 2};     /* BF16 */
        case 2: return (Layout){32, 18};    /* Q4_0 */
        case 3: return (Layout){32, 20};    /* Q4_1 */
        case 6: return (Layout){32, 22};    /* Q5_0 */
        case 7: return (Layout){32, 24};    /* Q5_1 */
        case 8: return (Layout){32, 34};    /* Q8_0 */
        case 10: return (Layout){QK_K, 84}; /* Q2_K */
        case 11: return (Layout){QK_K, 110};/* Q3_K */
        case 12: return (Layout){QK_K, 144};/* Q4_K */
        case 13: return (Layout){QK_K, 176};/* Q5_K */
        case 14: return (Layout){QK_K, 210};/* Q6_K */
        default: return (Layout){0, 0};
    }
}

/* Q4_K and Q5_K: 8 six-bit scales and mins packed in 12 bytes (gguf's Q4_K.get_scale_min) */
static inline void scale_min(const uint8_t *s, uint8_t *sc, uint8_t *mn)
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[4 + j] & 0x3F;
        sc[4 + j] = (uint8_t)((s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30));
        mn[4 + j] = (uint8_t)((s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30));
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* one build, the best the CPU runs: the loops above vectorize with each target's instructions */
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void run(int qtype, const uint8_t *src, Py_ssize_t nblocks, float *out, const float *h)
{
    switch (qtype) {
    case 1:
        for (Py_ssize_t i = 0; i < nblocks; i++) out[i] = h[rd16(src + 2 * i)];
        break;
    case 30:
        for (Py_ssize_t i = 0; i < nblocks; i++) out[i] = bits_f32((uint32_t)rd16(src + 2 * i) << 16);
        break;
    case 8: /* Q8_0: d, 32 x int8;  x * d */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 34, out += 32) {
            const float d = h[rd16(src)];
            for (int j = 0; j < 32; j++) out[j] = (float)(int8_t)src[2 + j] * d;
        }
        break;
    case 2: /* Q4_0: d, 16 bytes of nibbles (low nibbles first);  d * (q - 8) */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 18, out += 32) {
            const float d = h[rd16(src)];
            for (int j = 0; j < 16; j++) {
                out[j] = d * (float)((int)(src[2 + j] & 0x0F) - 8);
                out[16 + j] = d * (float)((int)(src[2 + j] >> 4) - 8);
            }
        }
        break;
    case 3: /* Q4_1: d, m, nibbles;  d * q + m */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 20, out += 32) {
            const float d = h[rd16(src)], m = h[rd16(src + 2)];
            for (int j = 0; j < 16; j++) {
                out[j] = d * (float)(src[4 + j] & 0x0F) + m;
                out[16 + j] = d * (float)(src[4 + j] >> 4) + m;
            }
        }
        break;
    case 6: /* Q5_0: d, 32 high bits, nibbles;  d * (q - 16) */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 22, out += 32) {
            const float d = h[rd16(src)];
            const uint32_t qh = rd32(src + 2);
            for (int j = 0; j < 16; j++) {
                int lo = (src[6 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
                int hi = (src[6 + j] >> 4) | (int)(((qh >> (16 + j)) & 1) << 4);
                out[j] = d * (float)(lo - 16);
                out[16 + j] = d * (float)(hi - 16);
            }
        }
        break;
    case 7: /* Q5_1: d, m, 32 high bits, nibbles;  d * q + m */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 24, out += 32) {
            const float d = h[rd16(src)], m = h[rd16(src + 2)];
            const uint32_t qh = rd32(src + 4);
            for (int j = 0; j < 16; j++) {
                int lo = (src[8 + j] & 0x0F) | (int)(((qh >> j) & 1) << 4);
                int hi = (src[8 + j] >> 4) | (int)(((qh >> (16 + j)) & 1) << 4);
                out[j] = d * (float)lo + m;
                out[16 + j] = d * (float)hi + m;
            }
        }
        break;
    case 10: /* Q2_K: 16 scale bytes (4-bit scale, 4-bit min), 64 bytes of 2-bit quants, d, dmin */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 84, out += QK_K) {
            const uint8_t *scales = src, *qs = src + 16;
            const float d = h[rd16(src + 80)], dmin = h[rd16(src + 82)];
            /* element e = g*128 + s*32 + l: quant (qs[g*32 + l] >> 2s) & 3, sub-block e / 16 */
            for (int g = 0; g < 2; g++)
                for (int s = 0; s < 4; s++)
                    for (int half = 0; half < 2; half++) {
                        const int k = g * 8 + s * 2 + half;
                        const float dl = d * (float)(scales[k] & 0x0F), ml = dmin * (float)(scales[k] >> 4);
                        const uint8_t *q = qs + g * 32 + half * 16;
                        float *o = out + g * 128 + s * 32 + half * 16;
                        for (int l = 0; l < 16; l++) o[l] = dl * (float)((q[l] >> (2 * s)) & 3) - ml;
                    }
        }
        break;
    case 11: /* Q3_K: 32 bytes high-bit mask, 64 bytes of 2-bit quants, 12 bytes of 6-bit scales, d */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 110, out += QK_K) {
            const uint8_t *hmask = src, *qs = src + 32, *sb = src + 96;
            const float d = h[rd16(src + 108)];
            float dl[16];
            for (int k = 0; k < 16; k++) {
                const int lo = (sb[k % 8] >> (4 * (k / 8))) & 0x0F;
                const int hi = (sb[8 + k % 4] >> (2 * (k / 4))) & 0x03;
                dl[k] = d * (float)((int)(int8_t)(uint8_t)(lo | (hi << 4)) - 32);
            }
            /* element e = g*128 + s*32 + l: low bits (qs[g*32 + l] >> 2s) & 3, high bit mask bit (g*4 + s) of hmask[l] */
            for (int g = 0; g < 2; g++)
                for (int s = 0; s < 4; s++)
                    for (int half = 0; half < 2; half++) {
                        const float dk = dl[g * 8 + s * 2 + half];
                        const uint8_t *q = qs + g * 32 + half * 16, *m = hmask + half * 16;
                        float *o = out + g * 128 + s * 32 + half * 16;
                        for (int l = 0; l < 16; l++) {
                            const int ql = (q[l] >> (2 * s)) & 3;
                            const int qh = ((m[l] >> (g * 4 + s)) & 1) ^ 1;
                            o[l] = dk * (float)(ql - (qh << 2));
                        }
                    }
        }
        break;
    case 12: /* Q4_K: d, dmin, 12 bytes of scales and mins, 128 bytes of nibbles;  d*sc*q - dmin*m */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 144, out += QK_K) {
            const float d = h[rd16(src)], dmin = h[rd16(src + 2)];
            uint8_t sc[8], mn[8];
            scale_min(src + 4, sc, mn);
            const uint8_t *qs = src + 16;
            for (int k = 0; k < 8; k++) {
                const float dk = d * (float)sc[k], mk = dmin * (float)mn[k];
                const int c = k / 2, shift = 4 * (k % 2);
                for (int l = 0; l < 32; l++) out[k * 32 + l] = dk * (float)((qs[c * 32 + l] >> shift) & 0x0F) - mk;
            }
        }
        break;
    case 13: /* Q5_K: as Q4_K with a fifth bit from 32 bytes of high bits */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 176, out += QK_K) {
            const float d = h[rd16(src)], dmin = h[rd16(src + 2)];
            uint8_t sc[8], mn[8];
            scale_min(src + 4, sc, mn);
            const uint8_t *qh = src + 16, *qs = src + 48;
            for (int k = 0; k < 8; k++) {
                const float dk = d * (float)sc[k], mk = dmin * (float)mn[k];
                const int c = k / 2, shift = 4 * (k % 2);
                for (int l = 0; l < 32; l++) {
                    const int q = ((qs[c * 32 + l] >> shift) & 0x0F) | (((qh[l] >> k) & 1) << 4);
                    out[k * 32 + l] = dk * (float)q - mk;
                }
            }
        }
        break;
    case 14: /* Q6_K: 128 bytes low nibbles, 64 bytes high 2-bits, 16 int8 scales, d;  d*sc*(q - 32) */
        for (Py_ssize_t b = 0; b < nblocks; b++, src += 210, out += QK_K) {
            const uint8_t *ql = src, *qh = src + 128;
            const int8_t *scales = (const int8_t *)(src + 192);
            const float d = h[rd16(src + 208)];
            float dk[16];
            for (int k = 0; k < 16; k++) dk[k] = d * (float)scales[k];
            /* element e = g*128 + q*32 + l: low nibble of ql[g*64 + (q%2)*32 + l] (high one for q >= 2),
               two high bits (qh[g*32 + l] >> 2q) & 3, sub-block e / 16 */
            for (int g = 0; g < 2; g++)
                for (int q = 0; q < 4; q++)
                    for (int half = 0; half < 2; half++) {
                        const float dq = dk[g * 8 + q * 2 + half];
                        const uint8_t *lo = ql + g * 64 + (q % 2) * 32 + half * 16, *hi = qh + g * 32 + half * 16;
                        float *o = out + g * 128 + q * 32 + half * 16;
                        for (int l = 0; l < 16; l++) {
                            const int v = ((lo[l] >> (4 * (q / 2))) & 0x0F) | (((hi[l] >> (2 * q)) & 0x03) << 4);
                            o[l] = dq * (float)(v - 32);
                        }
                    }
        }
        break;
    }
}

static PyObject *dequantize(PyObject *self, PyObject *args)
{
    int qtype;
    Py_buffer src, out, table;
    if (!PyArg_ParseTuple(args, "iy*w*y*", &qtype, &src, &out, &table))
        return NULL;
    PyObject *result = NULL;
    Layout lay = layout(qtype);
    if (lay.block == 0) {
        PyErr_Format(PyExc_ValueError, "no C dequantizer for type %d", qtype);
    } else if (src.len % lay.size) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not whole blocks of %d", src.len, lay.size);
    } else if (out.len != (src.len / lay.size) * lay.block * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "the output buffer does not hold the blocks' float32 values");
    } else if (table.len != 65536 * (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "the half-to-float table must hold 65536 float32 values");
    } else {
        Py_BEGIN_ALLOW_THREADS
        run(qtype, (const uint8_t *)src.buf, src.len / lay.size, (float *)out.buf, (const float *)table.buf);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&table);
    return result;
}

static PyObject *types(PyObject *self, PyObject *unused)
{
    static const int known[] = {1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30};
    PyObject *out = PyTuple_New(sizeof(known) / sizeof(known[0]));
    for (size_t i = 0; out && i < sizeof(known) / sizeof(known[0]); i++)
        PyTuple_SET_ITEM(out, i, PyLong_FromLong(known[i]));
    return out;
}

static PyMethodDef methods[] = {
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(qtype, blocks, out, half_table): the blocks' values as float32 into out (GIL released)"},
    {"types", types, METH_NOARGS, "types() -> the GGMLQuantizationType values dequantized here"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dequant",
                                    "GGUF dequantization, bit-identical to gguf.quants", -1, methods};

PyMODINIT_FUNC PyInit__dequant(void) { return PyModule_Create(&module); }

/*
 * The fused NearSwap chain over one chunk of elements: the hot loop.
 *
 * For every element, with r the running result (the base at first) and s_k
 * the k-th secondary, each step evaluates, in float32 and in this order,
 *
 *     d = |r - s|;  w = t / d;  w = nan_to_num(w, 1, 1, 1);  w = clip(w, 0, 1)
 *     r = (1 - w) * r + w * s
 *
 * exactly as numpy does it (no FMA contraction: built with -ffp-contract=off),
 * optionally rounds r to the output dtype between steps, and counts, per step,
 * identical / swapped / moved elements and the sum of |change|.
 *
 * Work is done in tiles of TILE elements that live in L1: each input tile is
 * widened to float32 once, every step runs over the tile, the result is
 * narrowed once.  The GIL is released for the whole chunk, so Python threads
 * run chunks in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 2048
#define LANES 16
#define MAX_STEPS 64

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static const int ITEMSIZE[3] = {4, 2, 2};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* ---- dtype conversions (bit-exact with ml_dtypes / numpy astype) ---- */

HOT static void widen(float *dst, const void *src, int code, Py_ssize_t n)
{
    if (code == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (code == DT_BF16) {
        const uint16_t *h = (const uint16_t *)src;
        uint32_t *u = (uint32_t *)dst;
        for (Py_ssize_t i = 0; i < n; i++) u[i] = (uint32_t)h[i] << 16;
    } else {
        const _Float16 *h = (const _Float16 *)src;
        for (Py_ssize_t i = 0; i < n; i++) dst[i] = (float)h[i];
    }
}

/* float32 -> bfloat16, round to nearest even; NaN -> canonical quiet NaN with
 * the input's sign (as ml_dtypes does). */
static inline uint16_t f32_to_bf16(uint32_t u)
{
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

HOT static void narrow(void *dst, const float *src, int code, Py_ssize_t n)
{
    if (code == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (code == DT_BF16) {
        const uint32_t *u = (const uint32_t *)src;
        uint16_t *h = (uint16_t *)dst;
        for (Py_ssize_t i = 0; i < n; i++) h[i] = f32_to_bf16(u[i]);
    } else {
        _Float16 *h = (_Float16 *)dst;
        for (Py_ssize_t i = 0; i < n; i++) h[i] = (_Float16)src[i];
    }
}

/* Round a float32 tile in place through the output dtype. */
HOT static void round_through(float *r, int code, Py_ssize_t n)
{
    if (code == DT_BF16) {
        uint32_t *u = (uint32_t *)r;
        for (Py_ssize_t i = 0; i < n; i++) u[i] = (uint32_t)f32_to_bf16(u[i]) << 16;
    } else if (code == DT_F16) {
        for (Py_ssize_t i = 0; i < n; i++) r[i] = (float)(_Float16)r[i];
    }
}

/* ---- one NearSwap step over a tile ---- */

typedef struct {
    int64_t identical, swapped, moved;
    double abs_change;
} StepCounts;

HOT static void step_tile(float *restrict out, const float *restrict r, const float *restrict s,
                          Py_ssize_t n, float t, StepCounts *c)
{
    int64_t n_id = 0, n_sw = 0, n_mv = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float a = r[i], b = s[i];
        float d = fabsf(a - b);
        float w = t / d;
        w = (fabsf(w) <= FLT_MAX) ? w : 1.0f; /* nan_to_num(nan=1, posinf=1, neginf=1) */
        w = (w < 0.0f) ? 0.0f : w;            /* clip, numpy's semantics */
        w = (w > 1.0f) ? 1.0f : w;
        out[i] = (1.0f - w) * a + w * b;
        n_id += (d == 0.0f);
        n_sw += (d > 0.0f) & (d <= t);
        n_mv += (d > t) & (d <= FLT_MAX);
    }
    c->identical += n_id;
    c->swapped += n_sw;
    c->moved += n_mv;
}

/* Sum of |new - old| over finite differences, in LANES float partial sums. */
HOT static double abs_change(const float *restrict now, const float *restrict before, Py_ssize_t n)
{
    float acc[LANES] = {0};
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) {
            float x = fabsf(now[i + j] - before[i + j]);
            acc[j] += (x <= FLT_MAX) ? x : 0.0f;
        }
    double total = 0.0;
    for (int j = 0; j < LANES; j++) total += acc[j];
    for (; i < n; i++) {
        float x = fabsf(now[i] - before[i]);
        total += (x <= FLT_MAX) ? x : 0.0f;
    }
    return total;
}

/* ---- the chunk driver ---- */

typedef struct {
    Py_ssize_t n;
    int nsteps, base_code, out_code, round_between;
    const char *base;
    const char *secs[MAX_STEPS];
    int sec_codes[MAX_STEPS];
    float ts[MAX_STEPS];
    char *out;
    StepCounts counts[MAX_STEPS];
} Job;

static void run_job(Job *job)
{
    float cur[TILE], nxt[TILE], sec[TILE];
    for (Py_ssize_t start = 0; start < job->n; start += TILE) {
        Py_ssize_t m = job->n - start < TILE ? job->n - start : TILE;
        widen(cur, job->base + start * ITEMSIZE[job->base_code], job->base_code, m);
        for (int k = 0; k < job->nsteps; k++) {
            int code = job->sec_codes[k];
            widen(sec, job->secs[k] + start * ITEMSIZE[code], code, m);
            step_tile(nxt, cur, sec, m, job->ts[k], &job->counts[k]);
            if (job->round_between) round_through(nxt, job->out_code, m);
            job->counts[k].abs_change += abs_change(nxt, cur, m);
            memcpy(cur, nxt, (size_t)m * 4);
        }
        narrow(job->out + start * ITEMSIZE[job->out_code], cur, job->out_code, m);
    }
}

static int get_code(PyObject *obj, int *code)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v > 2) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %ld", v);
        return -1;
    }
    *code = (int)v;
    return 0;
}

static PyObject *chain(PyObject *self, PyObject *args)
{
    Py_buffer out = {0}, base = {0}, secbuf[MAX_STEPS];
    int out_code, base_code, round_between, nbuf = 0;
    PyObject *secs, *codes, *ts, *result = NULL;
    Job *job = NULL;

    if (!PyArg_ParseTuple(args, "w*iy*iO!O!O!p", &out, &out_code, &base, &base_code,
                          &PyTuple_Type, &secs, &PyTuple_Type, &codes, &PyTuple_Type, &ts,
                          &round_between))
        return NULL;
    job = (Job *)PyMem_Calloc(1, sizeof(Job));
    if (!job) { PyErr_NoMemory(); goto done; }
    Py_ssize_t nsteps = PyTuple_GET_SIZE(secs);
    if (nsteps < 1 || nsteps > MAX_STEPS || PyTuple_GET_SIZE(codes) != nsteps ||
        PyTuple_GET_SIZE(ts) != nsteps) {
        PyErr_SetString(PyExc_ValueError, "secs, codes and ts must have the same length (1..64)");
        goto done;
    }
    if (out_code < 0 || out_code > 2 || base_code < 0 || base_code > 2) {
        PyErr_SetString(PyExc_ValueError, "unknown dtype code");
        goto done;
    }
    job->n = base.len / ITEMSIZE[base_code];
    if (base.len != job->n * ITEMSIZE[base_code] || out.len != job->n * ITEMSIZE[out_code]) {
        PyErr_SetString(PyExc_ValueError, "buffer sizes do not match the element count");
        goto done;
    }
    job->nsteps = (int)nsteps;
    job->base_code = base_code;
    job->out_code = out_code;
    job->round_between = round_between;
    job->base = (const char *)base.buf;
    job->out = (char *)out.buf;
    for (Py_ssize_t k = 0; k < nsteps; k++) {
        if (get_code(PyTuple_GET_ITEM(codes, k), &job->sec_codes[k]) < 0) goto done;
        double t = PyFloat_AsDouble(PyTuple_GET_ITEM(ts, k));
        if (t == -1.0 && PyErr_Occurred()) goto done;
        job->ts[k] = (float)t;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(secs, k), &secbuf[k], PyBUF_SIMPLE) < 0) goto done;
        nbuf++;
        if (secbuf[k].len != job->n * ITEMSIZE[job->sec_codes[k]]) {
            PyErr_Format(PyExc_ValueError, "secondary %zd has the wrong size", k);
            goto done;
        }
        job->secs[k] = (const char *)secbuf[k].buf;
    }

    Py_BEGIN_ALLOW_THREADS
    run_job(job);
    Py_END_ALLOW_THREADS

    result = PyTuple_New(nsteps);
    if (!result) goto done;
    for (Py_ssize_t k = 0; k < nsteps; k++) {
        StepCounts *c = &job->counts[k];
        PyObject *item = Py_BuildValue("(LLLLd)", (long long)c->identical, (long long)c->swapped,
                                       (long long)c->moved,
                                       (long long)(job->n - c->identical - c->swapped - c->moved),
                                       c->abs_change);
        if (!item) { Py_CLEAR(result); goto done; }
        PyTuple_SET_ITEM(result, k, item);
    }

done:
    for (int k = 0; k < nbuf; k++) PyBuffer_Release(&secbuf[k]);
    PyBuffer_Release(&out);
    PyBuffer_Release(&base);
    PyMem_Free(job);
    return result;
}

static PyMethodDef methods[] = {
    {"chain", chain, METH_VARARGS,
     "chain(out, out_code, base, base_code, secs, sec_codes, ts, round_between) -> "
     "((identical, swapped, moved, nonfinite, abs_change_sum), ...) per step"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernel",
                                    "Fused NearSwap chain kernel (float32).", -1, methods};

PyMODINIT_FUNC PyInit__ckernel(void) { return PyModule_Create(&module); }

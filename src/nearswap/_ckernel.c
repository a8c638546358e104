/*
 * The fused NearSwap chain over one chunk of elements: the hot loop.
 *
 * For every element, with r the running result (the base at first) and s_k
 * the k-th secondary, each step evaluates, in float32 and in this order,
 *
 *     d = |r - s|;  w = t / d;  w = nan_to_num(w, 1, 1, 1);  w = clip(w, 0, 1)
 *     r = (1 - w) * r + w * s
 *
 * for t >= +0 (the caller turns -0.0 into +0.0 and refuses negative t), where
 * nan_to_num-then-clip reduces exactly to min(w, 1) with NaN -> 1.
 *
 * exactly as numpy does it (no FMA: built with -ffp-contract=off, and the AVX2
 * path is compiled without the fma target), optionally rounds r to the output
 * dtype between steps, and counts, per step, identical / swapped / moved
 * elements and the sum of |change|.
 *
 * Work is done in tiles of TILE elements that stay in L1: step 1 reads the
 * base in its own dtype, every step reads its secondary in that secondary's
 * dtype, steps in between work on a float32 tile, and the last step writes the
 * output dtype. Three step implementations compute the same bits, the best the
 * CPU runs chosen at import: AVX-512 (16 lanes), AVX2+F16C (8 lanes) and a
 * portable scalar loop. The GIL is released for the
 * whole chunk, so Python threads run chunks in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#define AVX2 __attribute__((target("avx2,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512vl,avx2,f16c")))
#else
#define HAVE_AVX2_PATH 0
#endif

#define TILE 2048
#define MAX_STEPS 64

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { NO_ROUND = -1 };

static const int ITEMSIZE[3] = {4, 2, 2};

typedef struct {
    int64_t identical, swapped, moved, changed;
    double abs_change;
} StepCounts;

/* ---- scalar conversions (bit-exact with ml_dtypes / numpy astype) ---- */

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float32 -> bfloat16, round to nearest even; NaN -> canonical quiet NaN with the
 * input's sign (as ml_dtypes does). */
static inline uint16_t f32_to_bf16(uint32_t u)
{
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7fc0u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float load_scalar(const void *src, int code, Py_ssize_t i)
{
    if (code == DT_F32) return ((const float *)src)[i];
    if (code == DT_BF16) return bits_f32((uint32_t)((const uint16_t *)src)[i] << 16);
    return (float)((const _Float16 *)src)[i];
}

static inline float round_scalar(float x, int code)
{
    if (code == DT_BF16) return bits_f32((uint32_t)f32_to_bf16(f32_bits(x)) << 16);
    if (code == DT_F16) return (float)(_Float16)x;
    return x;
}

static void narrow(void *dst, const float *src, int code, Py_ssize_t n)
{
    if (code == DT_F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (code == DT_BF16) {
        uint16_t *h = (uint16_t *)dst;
        for (Py_ssize_t i = 0; i < n; i++) h[i] = f32_to_bf16(f32_bits(src[i]));
    } else {
        _Float16 *h = (_Float16 *)dst;
        for (Py_ssize_t i = 0; i < n; i++) h[i] = (_Float16)src[i];
    }
}

/* ---- one step, portable scalar version ---- */

/* dst[i] = nearswap(t, src[i], s[i]) for i < n, each array in its own dtype (src and dst may
 * be the same float32 tile); the result is rounded through round_code before it is stored
 * and counted. */
static void step_scalar(const void *src, int src_code, const void *s, int s_code, void *dst, int dst_code,
                        int round_code, int src_held, Py_ssize_t n, float t, StepCounts *c)
{
    int64_t n_id = 0, n_sw = 0, n_mv = 0, n_ch = 0;
    double change = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        float a = load_scalar(src, src_code, i), b = load_scalar(s, s_code, i);
        float d = fabsf(a - b);
        float w = t / d;
        /* t >= +0 and d >= +0 (or NaN): w is +0..+inf or NaN, so nan_to_num(nan=1,
         * posinf=1, neginf=1) then clip(0, 1) is: w if w <= 1, else 1. */
        w = (w <= 1.0f) ? w : 1.0f;
        float res = round_scalar((1.0f - w) * a + w * b, round_code);
        narrow((char *)dst + i * ITEMSIZE[dst_code], &res, dst_code, 1);
        n_id += (d == 0.0f);
        n_sw += (d > 0.0f) & (d <= t);
        n_mv += (d > t) & (d <= FLT_MAX);
        /* the change from the previous value as held at this precision (a base of a wider dtype
         * is compared after the same rounding: its cast is not a change of the merge) */
        float ch = fabsf(res - (src_held ? a : round_scalar(a, round_code)));
        n_ch += ch > 0.0f;
        if (ch <= FLT_MAX) change += ch;
    }
    c->identical += n_id;
    c->swapped += n_sw;
    c->moved += n_mv;
    c->changed += n_ch;
    c->abs_change += change;
}

/* ---- one step, AVX2 + F16C, 8 lanes ---- */

#if HAVE_AVX2_PATH
AVX2 static inline __m256 load8(const void *src, int code, Py_ssize_t i)
{
    if (code == DT_F32) return _mm256_loadu_ps((const float *)src + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
    if (code == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

AVX2 static inline __m256 round8(__m256 x, int code)
{
    if (code == DT_BF16) {
        __m256i u = _mm256_castps_si256(x);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
        rounded = _mm256_and_si256(rounded, _mm256_set1_epi32((int)0xffff0000u));
        __m256i nan = _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32((int)0x80000000u)),
                                      _mm256_set1_epi32(0x7fc00000));
        __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                            _mm256_set1_epi32(0x7f800000));
        return _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, nan, is_nan));
    }
    if (code == DT_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    return x;
}

/* Store 8 floats as `code`; `rounded` says x already holds values of that dtype. */
AVX2 static inline void store8(void *dst, int code, Py_ssize_t i, __m256 x, int rounded)
{
    if (code == DT_F32) {
        _mm256_storeu_ps((float *)dst + i, x);
    } else if (code == DT_BF16) {
        __m256i u = _mm256_srli_epi32(_mm256_castps_si256(rounded ? x : round8(x, DT_BF16)), 16);
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1)));
    } else {
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
}

/* The AVX2 twin of step_scalar: same arguments, same bits. Always inlined into the
 * specialisations below, where every dtype code is a constant. */
AVX2 static inline __attribute__((always_inline)) void step_avx2(const void *src, int src_code, const void *s,
                                                                 int s_code, void *dst, int dst_code, int round_code,
                                                                 int src_held, Py_ssize_t n, float t, StepCounts *c)
{
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), vt = _mm256_set1_ps(t);
    const __m256 big = _mm256_set1_ps(FLT_MAX);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i n_id = _mm256_setzero_si256(), n_le = n_id, n_fin = n_id, n_ch = n_id;
    __m256 change = zero;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = load8(src, src_code, i), b = load8(s, s_code, i);
        __m256 d = _mm256_and_ps(_mm256_sub_ps(a, b), absmask);
        /* t >= +0 and d >= +0 (or NaN), so w is +0..+inf or NaN: nan_to_num then clip(0, 1)
         * is min(w, 1), and minps returns its second operand (1) when w is NaN. */
        __m256 w = _mm256_min_ps(_mm256_div_ps(vt, d), one);
        __m256 res = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(one, w), a), _mm256_mul_ps(w, b));
        res = round8(res, round_code);
        store8(dst, dst_code, i, res, round_code == dst_code);
        /* a true comparison is all ones = -1; swapped and moved are differences of these */
        n_id = _mm256_sub_epi32(n_id, _mm256_castps_si256(_mm256_cmp_ps(d, zero, _CMP_EQ_OQ)));
        n_le = _mm256_sub_epi32(n_le, _mm256_castps_si256(_mm256_cmp_ps(d, vt, _CMP_LE_OQ)));
        n_fin = _mm256_sub_epi32(n_fin, _mm256_castps_si256(_mm256_cmp_ps(d, big, _CMP_LE_OQ)));
        __m256 ch = _mm256_and_ps(_mm256_sub_ps(res, src_held ? a : round8(a, round_code)), absmask); /* see step_scalar */
        n_ch = _mm256_sub_epi32(n_ch, _mm256_castps_si256(_mm256_cmp_ps(ch, zero, _CMP_GT_OQ)));
        change = _mm256_add_ps(change, _mm256_and_ps(ch, _mm256_cmp_ps(ch, big, _CMP_LE_OQ)));
    }
    int32_t ids[8], les[8], fins[8], chg[8];
    float chs[8];
    _mm256_storeu_si256((__m256i *)ids, n_id);
    _mm256_storeu_si256((__m256i *)les, n_le);
    _mm256_storeu_si256((__m256i *)fins, n_fin);
    _mm256_storeu_si256((__m256i *)chg, n_ch);
    _mm256_storeu_ps(chs, change);
    for (int j = 0; j < 8; j++) {
        c->identical += ids[j];
        c->swapped += les[j] - ids[j];
        c->moved += fins[j] - les[j];
        c->changed += chg[j];
        c->abs_change += chs[j];
    }
    if (i < n)
        step_scalar((const char *)src + i * ITEMSIZE[src_code], src_code, (const char *)s + i * ITEMSIZE[s_code],
                    s_code, (char *)dst + i * ITEMSIZE[dst_code], dst_code, round_code, src_held, n - i, t, c);
}

/* ---- one step, AVX-512, 16 lanes: the same operations on zmm registers ---- */

AVX512 static inline __m512 load16(const void *src, int code, Py_ssize_t i)
{
    if (code == DT_F32) return _mm512_loadu_ps((const float *)src + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
    if (code == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

AVX512 static inline __m512 round16(__m512 x, int code)
{
    if (code == DT_BF16) {
        __m512i u = _mm512_castps_si512(x);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
        rounded = _mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u));
        __m512i nan = _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32((int)0x80000000u)),
                                      _mm512_set1_epi32(0x7fc00000));
        __mmask16 is_nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        return _mm512_castsi512_ps(_mm512_mask_blend_epi32(is_nan, rounded, nan));
    }
    if (code == DT_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    return x;
}

AVX512 static inline void store16(void *dst, int code, Py_ssize_t i, __m512 x, int rounded)
{
    if (code == DT_F32) {
        _mm512_storeu_ps((float *)dst + i, x);
    } else if (code == DT_BF16) {
        __m512i u = _mm512_srli_epi32(_mm512_castps_si512(rounded ? x : round16(x, DT_BF16)), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm512_cvtepi32_epi16(u));
    } else {
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
}

AVX512 static inline __attribute__((always_inline)) void step_avx512(const void *src, int src_code, const void *s,
                                                                     int s_code, void *dst, int dst_code,
                                                                     int round_code, int src_held, Py_ssize_t n,
                                                                     float t, StepCounts *c)
{
    const __m512 one = _mm512_set1_ps(1.0f), vt = _mm512_set1_ps(t), zero = _mm512_setzero_ps();
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    int64_t n_id = 0, n_le = 0, n_fin = 0, n_ch = 0;
    __m512 change = zero;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 a = load16(src, src_code, i), b = load16(s, s_code, i);
        __m512 d = _mm512_abs_ps(_mm512_sub_ps(a, b));
        __m512 w = _mm512_min_ps(_mm512_div_ps(vt, d), one); /* see step_avx2 */
        __m512 res = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(one, w), a), _mm512_mul_ps(w, b));
        res = round16(res, round_code);
        store16(dst, dst_code, i, res, round_code == dst_code);
        n_id += __builtin_popcount(_mm512_cmp_ps_mask(d, zero, _CMP_EQ_OQ));
        n_le += __builtin_popcount(_mm512_cmp_ps_mask(d, vt, _CMP_LE_OQ));
        n_fin += __builtin_popcount(_mm512_cmp_ps_mask(d, big, _CMP_LE_OQ));
        __m512 ch = _mm512_abs_ps(_mm512_sub_ps(res, src_held ? a : round16(a, round_code))); /* see step_scalar */
        n_ch += __builtin_popcount(_mm512_cmp_ps_mask(ch, zero, _CMP_GT_OQ));
        change = _mm512_mask_add_ps(change, _mm512_cmp_ps_mask(ch, big, _CMP_LE_OQ), change, ch);
    }
    c->identical += n_id;
    c->swapped += n_le - n_id;
    c->moved += n_fin - n_le;
    c->changed += n_ch;
    float chs[16];
    _mm512_storeu_ps(chs, change);
    for (int j = 0; j < 16; j++) c->abs_change += chs[j];
    if (i < n)
        step_scalar((const char *)src + i * ITEMSIZE[src_code], src_code, (const char *)s + i * ITEMSIZE[s_code],
                    s_code, (char *)dst + i * ITEMSIZE[dst_code], dst_code, round_code, src_held, n - i, t, c);
}

/* One copy of each ISA's step per (source, secondary, destination, rounding) dtype
 * combination: 3 x 3 x 3 x 3 small functions, so no dtype test is left in an inner loop. */
#define SPEC(ISA, ATTR, A, S, D, R)                                                               \
    ATTR static void step_##ISA##_##A##_##S##_##D##_##R(const void *src, int a_, const void *s,   \
                                                         int s_, void *dst, int d_, int r_, int held, \
                                                         Py_ssize_t n, float t, StepCounts *c)      \
    {                                                                                             \
        (void)a_, (void)s_, (void)d_, (void)r_;                                                   \
        if (held) /* two loops, so neither tests `held` per element */                            \
            step_##ISA(src, A, s, S, dst, D, (R) == 0 ? NO_ROUND : (R), 1, n, t, c);              \
        else                                                                                      \
            step_##ISA(src, A, s, S, dst, D, (R) == 0 ? NO_ROUND : (R), 0, n, t, c);              \
    }
#define SPEC_R(I, T, A, S, D) SPEC(I, T, A, S, D, 0) SPEC(I, T, A, S, D, 1) SPEC(I, T, A, S, D, 2)
#define SPEC_D(I, T, A, S) SPEC_R(I, T, A, S, 0) SPEC_R(I, T, A, S, 1) SPEC_R(I, T, A, S, 2)
#define SPEC_S(I, T, A) SPEC_D(I, T, A, 0) SPEC_D(I, T, A, 1) SPEC_D(I, T, A, 2)
#define SPEC_ALL(I, T) SPEC_S(I, T, 0) SPEC_S(I, T, 1) SPEC_S(I, T, 2)
SPEC_ALL(avx2, AVX2)
SPEC_ALL(avx512, AVX512)
#define NAME(I, A, S, D, R) step_##I##_##A##_##S##_##D##_##R
#define ROW_R(I, A, S, D) {NAME(I, A, S, D, 0), NAME(I, A, S, D, 1), NAME(I, A, S, D, 2)}
#define ROW_D(I, A, S) {ROW_R(I, A, S, 0), ROW_R(I, A, S, 1), ROW_R(I, A, S, 2)}
#define ROW_S(I, A) {ROW_D(I, A, 0), ROW_D(I, A, 1), ROW_D(I, A, 2)}
#define TABLE(I) {ROW_S(I, 0), ROW_S(I, 1), ROW_S(I, 2)}
#endif

typedef void (*StepFn)(const void *, int, const void *, int, void *, int, int, int, Py_ssize_t, float, StepCounts *);

/* [source dtype][secondary dtype][destination dtype][rounding: 0 none, 1 bf16, 2 f16] */
typedef StepFn StepTable[3][3][3][3];

#if HAVE_AVX2_PATH
static const StepTable STEP_AVX2 = TABLE(avx2);
static const StepTable STEP_AVX512 = TABLE(avx512);
#endif

static StepTable STEP; /* the implementation in use */
static const char *STEP_NAME = "scalar";

/* The step implementations this CPU can run, best first. */
static int isa_supported(const char *name)
{
    if (strcmp(name, "scalar") == 0) return 1;
#if HAVE_AVX2_PATH
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    if (strcmp(name, "avx2") == 0) return avx2;
    if (strcmp(name, "avx512") == 0) return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
#endif
    return 0;
}

static const char *ISAS[] = {"avx512", "avx2", "scalar"};

static int choose_isa(const char *name)
{
    if (strcmp(name, "best") == 0) {
        for (size_t k = 0; k < sizeof ISAS / sizeof *ISAS; k++)
            if (isa_supported(ISAS[k])) return choose_isa(ISAS[k]);
    }
    if (!isa_supported(name)) return -1;
    STEP_NAME = strcmp(name, "avx512") == 0 ? "avx512" : strcmp(name, "avx2") == 0 ? "avx2" : "scalar";
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int d = 0; d < 3; d++)
                for (int r = 0; r < 3; r++) {
                    STEP[a][b][d][r] = step_scalar;
#if HAVE_AVX2_PATH
                    if (STEP_NAME[0] == 'a') {
                        const StepTable *table = STEP_NAME[3] == '5' ? &STEP_AVX512 : &STEP_AVX2;
                        STEP[a][b][d][r] = (*table)[a][b][d][r];
                    }
#endif
                }
    return 0;
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
    int count_net; /* count net_changed (else it is step 1's changed, or not wanted) */
    StepCounts counts[MAX_STEPS];
    int64_t net_changed;
} Job;

/* The chain's net change over n elements: how many of the output's values differ from the
 * base's as the output's dtype holds it (the base rounded to out_code), both compared as
 * float32 ((x < y) | (x > y): +0 and -0 are the same value, NaN is not counted, as for a
 * step's changed). The dtype pairs a merge meets are loops of their own, which vectorize.
 * n is at most TILE. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static int64_t net_changed(const void *base, int base_code, const void *out, int out_code, Py_ssize_t n)
{
    int32_t k = 0; /* n <= TILE: 32-bit lanes vectorize twice as wide */
    if (base_code == DT_BF16 && out_code == DT_BF16) {
        const uint16_t *a = (const uint16_t *)base, *b = (const uint16_t *)out;
#pragma omp simd reduction(+ : k)
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = bits_f32((uint32_t)a[i] << 16), y = bits_f32((uint32_t)b[i] << 16);
            k += (x < y) | (x > y);
        }
    } else if (base_code == DT_F32 && out_code == DT_F32) {
        const float *a = (const float *)base, *b = (const float *)out;
#pragma omp simd reduction(+ : k)
        for (Py_ssize_t i = 0; i < n; i++) k += (a[i] < b[i]) | (a[i] > b[i]);
    } else if (base_code == DT_F32 && out_code == DT_BF16) {
        const float *a = (const float *)base;
        const uint16_t *b = (const uint16_t *)out;
#pragma omp simd reduction(+ : k)
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = bits_f32((uint32_t)f32_to_bf16(f32_bits(a[i])) << 16), y = bits_f32((uint32_t)b[i] << 16);
            k += (x < y) | (x > y);
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = round_scalar(load_scalar(base, base_code, i), out_code), y = load_scalar(out, out_code, i);
            k += (x < y) | (x > y);
        }
    }
    return k;
}

/* Tile by tile: step 1 reads the base in its dtype, the last step writes the output in its
 * dtype, and the steps between work on a float32 tile in L1. */
static void run_job(Job *job)
{
    float cur[TILE];
    /* rounding between steps is a no-op for a float32 output */
    int round_code = (job->round_between && job->out_code != DT_F32) ? job->out_code : NO_ROUND;
    int round_idx = round_code == NO_ROUND ? 0 : round_code;
    for (Py_ssize_t start = 0; start < job->n; start += TILE) {
        Py_ssize_t m = job->n - start < TILE ? job->n - start : TILE;
        for (int k = 0; k < job->nsteps; k++) {
            int first = k == 0, last = k == job->nsteps - 1;
            const void *src = first ? job->base + start * ITEMSIZE[job->base_code] : (const void *)cur;
            void *dst = last ? job->out + start * ITEMSIZE[job->out_code] : (void *)cur;
            int code = job->sec_codes[k], src_code = first ? job->base_code : DT_F32;
            int dst_code = last ? job->out_code : DT_F32;
            /* the previous value is already as held (rounded through round_code) unless it is a
             * base of another dtype than the rounding's: then the change is counted after rounding it */
            int held = !first || round_code == NO_ROUND || src_code == round_code;
            STEP[src_code][code][dst_code][round_idx](src, src_code, job->secs[k] + start * ITEMSIZE[code], code,
                                                      dst, dst_code, round_code, held, m, job->ts[k], &job->counts[k]);
        }
        if (job->count_net)
            job->net_changed += net_changed(job->base + start * ITEMSIZE[job->base_code], job->base_code,
                                            job->out + start * ITEMSIZE[job->out_code], job->out_code, m);
    }
}

/* ---- the threshold curve: where |a - b| falls, without merging ---- */

/* Bins of |d|'s bit pattern >> 19: 16 per octave, exact at their edges, for 2^-40 <= |d| < 2^24;
 * smaller values (zeros included) fall in bin 0, larger ones (inf, NaN included) in the last. */
#define HIST_SHIFT 19
#define HIST_LO ((127 - 40) << 4)
#define HIST_BINS (64 << 4)
#define MAX_TS 64
/* The curve reads straight from memory-mapped files: hardware prefetchers stop at 4 KiB page
 * boundaries, so the loops ask for the data this many elements ahead (2-4x faster from DRAM). */
#define HIST_PREFETCH 1024

static inline uint32_t hist_bin(uint32_t bits)
{
    uint32_t b = bits >> HIST_SHIFT;
    b = b < HIST_LO ? HIST_LO : b;
    b = b > HIST_LO + HIST_BINS - 1 ? HIST_LO + HIST_BINS - 1 : b;
    return b - HIST_LO;
}

/* d = |a - b| (float32, as the merge computes it) for n elements: counts d <= ts[k] for every
 * k, identical (d == 0) and non-finite elements exactly, and adds every HIST_STRIDE-th d (a
 * systematic sample, for the plotted curve) to hist. */
#define HIST_STRIDE 8

static void histogram_scalar(const void *a, int a_code, const void *b, int b_code, Py_ssize_t n,
                             const float *ts, int nts, int64_t *hist, int64_t *le, int64_t *identical,
                             int64_t *nonfinite)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        float d = fabsf(load_scalar(a, a_code, i) - load_scalar(b, b_code, i));
        for (int k = 0; k < nts; k++) le[k] += d <= ts[k];
        *identical += d == 0.0f;
        *nonfinite += !(d <= FLT_MAX);
        if (i % HIST_STRIDE == 0) hist[hist_bin(f32_bits(d))]++;
    }
}

#if HAVE_AVX2_PATH
/* counts d <= t for 8 thresholds at once over a tile of d, accumulators in registers */
AVX2 static void count_le8(const float *dd, Py_ssize_t n, const float *t8, int64_t *le8)
{
    __m256 t[8];
    __m256i acc[8];
    for (int k = 0; k < 8; k++) {
        t[k] = _mm256_set1_ps(t8[k]);
        acc[k] = _mm256_setzero_si256();
    }
    for (Py_ssize_t i = 0; i < n; i += 8) {
        __m256 d = _mm256_loadu_ps(dd + i);
        for (int k = 0; k < 8; k++)
            acc[k] = _mm256_sub_epi32(acc[k], _mm256_castps_si256(_mm256_cmp_ps(d, t[k], _CMP_LE_OQ)));
    }
    for (int k = 0; k < 8; k++) {
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, acc[k]);
        for (int j = 0; j < 8; j++) le8[k] += lanes[j];
    }
}

AVX2 static void histogram_avx2(const void *a, int a_code, const void *b, int b_code, Py_ssize_t n,
                                const float *ts, int nts, int64_t *hist, int64_t *le, int64_t *identical,
                                int64_t *nonfinite)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 zero = _mm256_setzero_ps(), big = _mm256_set1_ps(FLT_MAX);
    float dd[TILE];
    int ngroups = (nts + 7) / 8;
    float tpad[MAX_TS + 8];
    int64_t lepad[MAX_TS + 8] = {0};
    for (int k = 0; k < ngroups * 8; k++) tpad[k] = k < nts ? ts[k] : -1.0f; /* -1: never counts */
    for (Py_ssize_t start = 0; start < n; start += TILE) {
        Py_ssize_t m = n - start < TILE ? n - start : TILE, body = m - m % 8;
        __m256i n_id = _mm256_setzero_si256(), n_fin = n_id;
        const char *pa = (const char *)a + start * ITEMSIZE[a_code], *pb = (const char *)b + start * ITEMSIZE[b_code];
        for (Py_ssize_t i = 0; i < body; i += 8) {
            _mm_prefetch(pa + (i + HIST_PREFETCH) * ITEMSIZE[a_code], _MM_HINT_T0);
            _mm_prefetch(pb + (i + HIST_PREFETCH) * ITEMSIZE[b_code], _MM_HINT_T0);
            __m256 d = _mm256_and_ps(_mm256_sub_ps(load8(pa, a_code, i), load8(pb, b_code, i)), absmask);
            _mm256_storeu_ps(dd + i, d);
            n_id = _mm256_sub_epi32(n_id, _mm256_castps_si256(_mm256_cmp_ps(d, zero, _CMP_EQ_OQ)));
            n_fin = _mm256_sub_epi32(n_fin, _mm256_castps_si256(_mm256_cmp_ps(d, big, _CMP_LE_OQ)));
            hist[hist_bin(f32_bits(_mm256_cvtss_f32(d)))]++; /* lane 0: every 8th element */
        }
        for (int g = 0; g < ngroups; g++) count_le8(dd, body, tpad + 8 * g, lepad + 8 * g);
        int32_t lanes[8];
        int64_t finite = 0;
        _mm256_storeu_si256((__m256i *)lanes, n_id);
        for (int j = 0; j < 8; j++) *identical += lanes[j];
        _mm256_storeu_si256((__m256i *)lanes, n_fin);
        for (int j = 0; j < 8; j++) finite += lanes[j];
        *nonfinite += body - finite;
        if (body < m) /* the tail: start + body is a multiple of 8, so the sample stays every 8th */
            histogram_scalar(pa + body * ITEMSIZE[a_code], a_code, pb + body * ITEMSIZE[b_code], b_code, m - body, ts,
                             nts, hist, le, identical, nonfinite);
    }
    for (int k = 0; k < nts; k++) le[k] += lepad[k];
}
#endif

#if HAVE_AVX2_PATH
/* The AVX-512 twin of histogram_avx2: 16 lanes, mask registers. */
AVX512 static void count_le16(const float *dd, Py_ssize_t n, const float *t8, int64_t *le8)
{
    __m512 t[8];
    __m512i acc[8];
    const __m512i one = _mm512_set1_epi32(1);
    for (int k = 0; k < 8; k++) {
        t[k] = _mm512_set1_ps(t8[k]);
        acc[k] = _mm512_setzero_si512();
    }
    for (Py_ssize_t i = 0; i < n; i += 16) {
        __m512 d = _mm512_loadu_ps(dd + i);
        for (int k = 0; k < 8; k++)
            acc[k] = _mm512_mask_add_epi32(acc[k], _mm512_cmp_ps_mask(d, t[k], _CMP_LE_OQ), acc[k], one);
    }
    for (int k = 0; k < 8; k++) le8[k] += _mm512_reduce_add_epi32(acc[k]);
}

AVX512 static void histogram_avx512(const void *a, int a_code, const void *b, int b_code, Py_ssize_t n,
                                    const float *ts, int nts, int64_t *hist, int64_t *le, int64_t *identical,
                                    int64_t *nonfinite)
{
    /* One pass per tile: d, the identical / finite counts, the first 8 thresholds (in registers,
     * compared as 32-bit lane counts) and the sample; thresholds beyond 8 re-read d from the tile. */
    const __m512 zero = _mm512_setzero_ps(), big = _mm512_set1_ps(FLT_MAX);
    const __m512i one = _mm512_set1_epi32(1), lo = _mm512_set1_epi32(HIST_LO);
    const __m512i hi = _mm512_set1_epi32(HIST_LO + HIST_BINS - 1);
    float dd[TILE];
    int ngroups = (nts + 7) / 8;
    float tpad[MAX_TS + 8];
    int64_t lepad[MAX_TS + 8] = {0};
    for (int k = 0; k < ngroups * 8; k++) tpad[k] = k < nts ? ts[k] : -1.0f; /* -1: never counts */
    __m512 t[8];
    for (int k = 0; k < 8; k++) t[k] = _mm512_set1_ps(tpad[k]);
    for (Py_ssize_t start = 0; start < n; start += TILE) {
        Py_ssize_t m = n - start < TILE ? n - start : TILE, body = m - m % 16;
        __m512i n_id = _mm512_setzero_si512(), n_fin = n_id, acc[8];
        for (int k = 0; k < 8; k++) acc[k] = n_id;
        const char *pa = (const char *)a + start * ITEMSIZE[a_code], *pb = (const char *)b + start * ITEMSIZE[b_code];
        for (Py_ssize_t i = 0; i < body; i += 16) {
            _mm_prefetch(pa + (i + HIST_PREFETCH) * ITEMSIZE[a_code], _MM_HINT_T0);
            _mm_prefetch(pb + (i + HIST_PREFETCH) * ITEMSIZE[b_code], _MM_HINT_T0);
            __m512 d = _mm512_abs_ps(_mm512_sub_ps(load16(pa, a_code, i), load16(pb, b_code, i)));
            if (ngroups > 1) _mm512_storeu_ps(dd + i, d);
            n_id = _mm512_mask_add_epi32(n_id, _mm512_cmp_ps_mask(d, zero, _CMP_EQ_OQ), n_id, one);
            n_fin = _mm512_mask_add_epi32(n_fin, _mm512_cmp_ps_mask(d, big, _CMP_LE_OQ), n_fin, one);
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) /* k < nts: the usual 6 thresholds cost 6 compares, not 8 */
                if (k < nts) acc[k] = _mm512_mask_add_epi32(acc[k], _mm512_cmp_ps_mask(d, t[k], _CMP_LE_OQ), acc[k], one);
            /* hist_bin of every lane, then lanes 0 and 8: every 8th element */
            __m512i bins = _mm512_min_epu32(_mm512_max_epu32(_mm512_srli_epi32(_mm512_castps_si512(d), HIST_SHIFT), lo), hi);
            hist[(uint32_t)_mm_cvtsi128_si32(_mm512_castsi512_si128(bins)) - HIST_LO]++;
            hist[(uint32_t)_mm_cvtsi128_si32(_mm512_extracti32x4_epi32(bins, 2)) - HIST_LO]++;
        }
        for (int k = 0; k < 8; k++) lepad[k] += _mm512_reduce_add_epi32(acc[k]);
        for (int g = 1; g < ngroups; g++) count_le16(dd, body, tpad + 8 * g, lepad + 8 * g);
        *identical += _mm512_reduce_add_epi32(n_id);
        *nonfinite += body - _mm512_reduce_add_epi32(n_fin);
        if (body < m) /* start + body is a multiple of 8: the sample stays every 8th element */
            histogram_scalar(pa + body * ITEMSIZE[a_code], a_code, pb + body * ITEMSIZE[b_code], b_code, m - body, ts,
                             nts, hist, le, identical, nonfinite);
    }
    for (int k = 0; k < nts; k++) le[k] += lepad[k];
}
#endif

static PyObject *histogram(PyObject *self, PyObject *args)
{
    Py_buffer a = {0}, b = {0}, hist = {0}, le = {0};
    int a_code, b_code;
    PyObject *ts_obj, *result = NULL;
    float ts[MAX_TS];
    if (!PyArg_ParseTuple(args, "y*iy*iO!w*w*", &a, &a_code, &b, &b_code, &PyTuple_Type, &ts_obj, &hist, &le))
        return NULL;
    Py_ssize_t nts = PyTuple_GET_SIZE(ts_obj);
    Py_ssize_t n = (a_code >= 0 && a_code <= 2) ? a.len / ITEMSIZE[a_code] : -1;
    if (n < 0 || b_code < 0 || b_code > 2 || b.len != n * ITEMSIZE[b_code] || nts > MAX_TS ||
        hist.len != (Py_ssize_t)(HIST_BINS * sizeof(int64_t)) || le.len != (Py_ssize_t)(nts * sizeof(int64_t))) {
        PyErr_SetString(PyExc_ValueError, "histogram: bad dtype codes or buffer sizes");
        goto done;
    }
    for (Py_ssize_t k = 0; k < nts; k++) {
        ts[k] = (float)PyFloat_AsDouble(PyTuple_GET_ITEM(ts_obj, k));
        if (PyErr_Occurred()) goto done;
    }
    int64_t identical = 0, nonfinite = 0;
    /* the same implementation family as the merge steps: avx512, avx2 or scalar */
    void (*fn)(const void *, int, const void *, int, Py_ssize_t, const float *, int, int64_t *, int64_t *,
               int64_t *, int64_t *) = histogram_scalar;
#if HAVE_AVX2_PATH
    if (strcmp(STEP_NAME, "avx512") == 0) fn = histogram_avx512;
    if (strcmp(STEP_NAME, "avx2") == 0) fn = histogram_avx2;
#endif
    Py_BEGIN_ALLOW_THREADS
    fn(a.buf, a_code, b.buf, b_code, n, ts, (int)nts, (int64_t *)hist.buf, (int64_t *)le.buf, &identical, &nonfinite);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(LL)", (long long)identical, (long long)nonfinite);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&hist);
    PyBuffer_Release(&le);
    return result;
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
    int out_code, base_code, round_between, want_net = 1, nbuf = 0;
    PyObject *secs, *codes, *ts, *result = NULL;
    Job *job = NULL;

    if (!PyArg_ParseTuple(args, "w*iy*iO!O!O!p|p", &out, &out_code, &base, &base_code,
                          &PyTuple_Type, &secs, &PyTuple_Type, &codes, &PyTuple_Type, &ts,
                          &round_between, &want_net))
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
    /* one step whose changed already compares the stored value with the base as stored: no
     * second count (only a float32 carry into a narrower output compares something else) */
    int step1_is_net = nsteps == 1 && (round_between || out_code == DT_F32);
    job->count_net = want_net && !step1_is_net;
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

    PyObject *steps = PyTuple_New(nsteps);
    if (!steps) goto done;
    for (Py_ssize_t k = 0; k < nsteps; k++) {
        StepCounts *c = &job->counts[k];
        PyObject *item = Py_BuildValue("(LLLLdL)", (long long)c->identical, (long long)c->swapped,
                                       (long long)c->moved,
                                       (long long)(job->n - c->identical - c->swapped - c->moved),
                                       c->abs_change, (long long)c->changed);
        if (!item) { Py_DECREF(steps); goto done; }
        PyTuple_SET_ITEM(steps, k, item);
    }
    if (!want_net)
        result = Py_BuildValue("(NO)", steps, Py_None);
    else
        result = Py_BuildValue("(NL)", steps, (long long)(job->count_net ? job->net_changed : job->counts[0].changed));

done:
    for (int k = 0; k < nbuf; k++) PyBuffer_Release(&secbuf[k]);
    PyBuffer_Release(&out);
    PyBuffer_Release(&base);
    PyMem_Free(job);
    return result;
}

static PyObject *use_isa(PyObject *self, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    if (choose_isa(name) < 0) {
        PyErr_Format(PyExc_ValueError, "step implementation %R is not available on this CPU", arg);
        return NULL;
    }
    return PyUnicode_FromString(STEP_NAME);
}

static PyObject *current_isa(PyObject *self, PyObject *unused) { return PyUnicode_FromString(STEP_NAME); }

static PyObject *isas(PyObject *self, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    for (size_t k = 0; out && k < sizeof ISAS / sizeof *ISAS; k++)
        if (isa_supported(ISAS[k])) {
            PyObject *name = PyUnicode_FromString(ISAS[k]);
            if (!name || PyList_Append(out, name) < 0) Py_CLEAR(out);
            Py_XDECREF(name);
        }
    return out;
}

static PyMethodDef methods[] = {
    {"chain", chain, METH_VARARGS,
     "chain(out, out_code, base, base_code, secs, sec_codes, ts, round_between, count_net=True) -> "
     "(((identical, swapped, moved, nonfinite, abs_change_sum, changed), ...) per step, net changed or None)"},
    {"use_isa", use_isa, METH_O,
     "use_isa(name) -> the step implementation now in use: 'best', 'avx512', 'avx2' or 'scalar'"},
    {"isas", isas, METH_NOARGS, "isas() -> the step implementations this CPU can run, best first"},
    {"current_isa", current_isa, METH_NOARGS, "current_isa() -> the step implementation in use"},
    {"histogram", histogram, METH_VARARGS,
     "histogram(a, a_code, b, b_code, ts, hist, le) -> (identical, nonfinite); adds |a-b| to hist "
     "(int64[HIST_BINS], clamp(bits >> HIST_SHIFT) - HIST_LO; every HIST_STRIDE-th element) and counts "
     "|a-b| <= ts[k] exactly into le (int64[len(ts)])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernel",
                                    "Fused NearSwap chain kernel (float32).", -1, methods};

PyMODINIT_FUNC PyInit__ckernel(void)
{
    choose_isa("best");
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "HIST_SHIFT", HIST_SHIFT) < 0 || PyModule_AddIntConstant(m, "HIST_LO", HIST_LO) < 0 ||
              PyModule_AddIntConstant(m, "HIST_BINS", HIST_BINS) < 0 ||
              PyModule_AddIntConstant(m, "HIST_STRIDE", HIST_STRIDE) < 0 ||
              PyModule_AddIntConstant(m, "MAX_TS", MAX_TS) < 0))
        Py_CLEAR(m);
    return m;
}

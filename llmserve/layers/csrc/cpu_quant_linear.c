/* Linear layers on weight-only quantised weights, kept packed in memory (llmserve/quantization/packed.py lays
 * them out).
 *
 * Weight-only (activations stay float32): each weight row is a stream of codes, dequantised in registers
 * as scale[group] * (code - zero[group]) and multiplied into float accumulators:
 *   - WQ_U4: 4-bit codes, 32 per 16 bytes (byte i of a chunk holds code i in its low nibble and code i + 16
 *     in its high one), so one 16-byte load widens to two vectors with a mask and a shift;
 *   - WQ_U8: 8-bit unsigned codes;
 *   - WQ_FP8: float8 e4m3 bytes (no zero point): sign, exponent and mantissa shifted into a float32's bit
 *     positions give the value times 2^-120 (subnormals included), one multiply restores it.
 * The zero point is folded out of the inner loop: sum_k s (q_k - z) x_k = s (sum_k q_k x_k - z sum_k x_k),
 * with the per-group sums of x computed once per call. That is the few-row path; for many rows each thread
 * dequantises 64 outputs at a time into a cache-resident panel and runs cpu_linear.c's float GEMM tiles.
 * (W8A8, int8 activations too: cpu_w8a8_linear.c.) */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define WQ_U4 4
#define WQ_U8 8
#define WQ_FP8 9
#define WQ_CHUNK 32     /* codes decoded per step: two vectors */
#define WQ_ROWS 8       /* rows of x per pass over a weight row */

typedef unsigned char u8x16 __attribute__((vector_size(16)));

/* 16 bytes widened to 16 int lanes (one vpmovzxbd with AVX-512, two with AVX2; GCC scalarises the generic
 * conversion). */
static inline ivec widen_u8(const unsigned char *p) {
#if defined(__AVX512F__)
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    ivec r;
    memcpy(&r, &v, sizeof r);
    return r;
#elif defined(__AVX2__)
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));
    ivec r;
    memcpy(&r, &lo, sizeof lo);
    memcpy((char *)&r + sizeof lo, &hi, sizeof hi);
    return r;
#else
    u8x16 a;
    memcpy(&a, p, 16);
    return __builtin_convertvector(a, ivec);
#endif
}

static inline vec fp8_to_float(ivec v) {
    const ivec bits = ((v & 0x80) << 24) | ((v & 0x7F) << 20);
    return (vec)bits * splat(0x1p120f);
}

static inline float fp8_to_float1(unsigned char b) {
    unsigned bits = ((unsigned)(b & 0x80) << 24) | ((unsigned)(b & 0x7F) << 20);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * 0x1p120f;
}

/* Codes c .. c + 31 (c a multiple of 32) of a row as two float vectors. */
static inline __attribute__((always_inline)) void decode_chunk(const unsigned char *w, long c, const int format,
                                                               vec *lo, vec *hi) {
    if (format == WQ_U4) {
        const ivec v = widen_u8(w + c / 2);
        *lo = __builtin_convertvector(v & 15, vec);
        *hi = __builtin_convertvector(v >> 4, vec);
        return;
    }
    const ivec va = widen_u8(w + c), vb = widen_u8(w + c + 16);
    if (format == WQ_U8) {
        *lo = __builtin_convertvector(va, vec);
        *hi = __builtin_convertvector(vb, vec);
    } else {
        *lo = fp8_to_float(va);
        *hi = fp8_to_float(vb);
    }
}

static inline float decode_one(const unsigned char *w, long j, const int format) {
    if (format == WQ_U4) {
        const unsigned char byte = w[(j / WQ_CHUNK) * 16 + (j % 16)];
        return (float)((j % WQ_CHUNK) < 16 ? byte & 15 : byte >> 4);
    }
    return format == WQ_U8 ? (float)w[j] : fp8_to_float1(w[j]);
}

/* out[m] = sum over groups of s[g] * (sum_k code_k x[m, k] - z[g] xsum[m, g]) for `mr` rows of x. */
static inline __attribute__((always_inline)) void
wq_row(const float *x, long xs, const unsigned char *w, const float *s, const float *z, const float *xsum,
       long groups, long k, long group, const int format, float *out, const int mr) {
    vec total[WQ_ROWS];
    float tail[WQ_ROWS];
    for (int m = 0; m < mr; m++) { total[m] = (vec){0}; tail[m] = 0.f; }
    for (long g = 0; g < groups; g++) {
        const long c0 = g * group, c1 = c0 + group < k ? c0 + group : k;
        /* One or two rows: two chunks in flight, four FMA chains per row (two would leave the FMA latency
         * exposed); more rows are independent chains already, and four per row would spill registers. */
        vec acc[WQ_ROWS][4];
        for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = (vec){0};
        long c = c0;
        for (; mr <= 2 && c + 2 * WQ_CHUNK <= c1; c += 2 * WQ_CHUNK) {
            vec lo, hi, lo2, hi2;
            decode_chunk(w, c, format, &lo, &hi);
            decode_chunk(w, c + WQ_CHUNK, format, &lo2, &hi2);
            for (int m = 0; m < mr; m++) {
                const float *xm = x + m * xs + c;
                acc[m][0] += lo * load(xm);
                acc[m][1] += hi * load(xm + LANES);
                acc[m][2] += lo2 * load(xm + 2 * LANES);
                acc[m][3] += hi2 * load(xm + 3 * LANES);
            }
        }
        for (; c + WQ_CHUNK <= c1; c += WQ_CHUNK) {
            vec lo, hi;
            decode_chunk(w, c, format, &lo, &hi);
            for (int m = 0; m < mr; m++) {
                acc[m][0] += lo * load(x + m * xs + c);
                acc[m][1] += hi * load(x + m * xs + c + LANES);
            }
        }
        const vec sg = splat(s[g]);
        for (int m = 0; m < mr; m++) total[m] += sg * ((acc[m][0] + acc[m][1]) + (acc[m][2] + acc[m][3]));
        for (; c < c1; c++) {
            const float wv = s[g] * decode_one(w, c, format);
            for (int m = 0; m < mr; m++) tail[m] += wv * x[m * xs + c];
        }
    }
    for (int m = 0; m < mr; m++) {
        float r = hsum(total[m]) + tail[m];
        if (z)
            for (long g = 0; g < groups; g++) r -= s[g] * z[g] * xsum[m * groups + g];
        out[m] = r;
    }
}

#define WQ_CASE(MR) case MR:                                                                               \
    wq_row(x + m0 * x_stride, x_stride, row, s, z, xsum + m0 * groups, groups, k, group, format, r, MR); break;

/* One copy of the loops per format (a macro, so the format is a constant inside each OpenMP region). */
#define WQ_ALL(NAME, FORMAT)                                                                                    \
static void NAME(const float *x, long x_stride, const unsigned char *w, long w_row_bytes, const float *scales,  \
                 const float *zeros, const float *xsum, const float *bias, float *y, long y_stride, long M,     \
                 long n, long k, long group, long groups, int num_threads) {                                   \
    const int format = FORMAT;                                                                                  \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads)")                                      \
    for (long i = 0; i < n; i++) {                                                                             \
        const unsigned char *row = w + i * w_row_bytes;                                                         \
        const float *s = scales + i * groups, *z = zeros ? zeros + i * groups : NULL;                           \
        for (long m0 = 0; m0 < M; m0 += WQ_ROWS) {                                                              \
            float r[WQ_ROWS] = {0};                                                                             \
            const int mr = M - m0 < WQ_ROWS ? (int)(M - m0) : WQ_ROWS;                                          \
            switch (mr) { WQ_CASE(1) WQ_CASE(2) WQ_CASE(3) WQ_CASE(4) WQ_CASE(5) WQ_CASE(6) WQ_CASE(7) WQ_CASE(8) } \
            for (int m = 0; m < mr; m++) y[(m0 + m) * y_stride + i] = r[m] + (bias ? bias[i] : 0.f);            \
        }                                                                                                       \
    }                                                                                                           \
}
WQ_ALL(wq_all_u4, WQ_U4)
WQ_ALL(wq_all_u8, WQ_U8)
WQ_ALL(wq_all_fp8, WQ_FP8)

/* y[M, n] = x[M, k] W^T + bias with W[i, j] = scales[i, j / group] * (code(i, j) - zeros[i, j / group])
 * (zeros may be NULL: no zero point). Rows of codes are w_row_bytes apart. group must be a multiple of 32
 * or cover k. Returns 0; -1 for an unknown format or a bad group; -2 without memory. */
int llmserve_linear_weight_only(const float *x, long x_stride, const unsigned char *w, long w_row_bytes,
                                const float *scales, const float *zeros, const float *bias, float *y,
                                long y_stride, long M, long n, long k, long group, int format, int num_threads) {
    if ((format != WQ_U4 && format != WQ_U8 && format != WQ_FP8) || group < 1 || (group % WQ_CHUNK && group < k))
        return -1;
    const long groups = (k + group - 1) / group;
    float *xsum = NULL;
    if (zeros) {
        xsum = malloc(sizeof(float) * M * groups);
        if (!xsum) return -2;
        for (long m = 0; m < M; m++)
            for (long g = 0; g < groups; g++) {
                const long c1 = (g + 1) * group < k ? (g + 1) * group : k;
                float t = 0.f;
                for (long c = g * group; c < c1; c++) t += x[m * x_stride + c];
                xsum[m * groups + g] = t;
            }
    }
    void (*run)(const float *, long, const unsigned char *, long, const float *, const float *, const float *,
                const float *, float *, long, long, long, long, long, long, int) =
        format == WQ_U4 ? wq_all_u4 : format == WQ_U8 ? wq_all_u8 : wq_all_fp8;
    run(x, x_stride, w, w_row_bytes, scales, zeros, xsum, bias, y, y_stride, M, n, k, group, groups, num_threads);
    free(xsum);
    return 0;
}

#if defined(__AVX512F__)
/* r[0..15] (16 rows of 16 floats) transposed in registers: r[j] becomes column j. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xDD);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}
#endif

/* Outputs first .. first + 15 of the weight as float32, blocked ([k][16] at dst: cpu_linear.c's layout):
 * 32 codes of each of the 16 rows are decoded, then turned so each column is one of the layout's vectors
 * (a register transpose with AVX-512, a tile in memory otherwise). */
static void dequantize_block(const unsigned char *w, long w_row_bytes, const float *scales, const float *zeros,
                             long k, long group, long groups, const int format, long first, float *dst) {
    long c = 0;
    for (; c + WQ_CHUNK <= k; c += WQ_CHUNK) {
        const long g = c / group;
        vec lo[LANES], hi[LANES];
        for (int r = 0; r < LANES; r++) {
            const long i = first + r;
            const float s = scales[i * groups + g], sz = zeros ? s * zeros[i * groups + g] : 0.f;
            decode_chunk(w + i * w_row_bytes, c, format, &lo[r], &hi[r]);
            lo[r] = lo[r] * splat(s) - splat(sz);
            hi[r] = hi[r] * splat(s) - splat(sz);
        }
#if defined(__AVX512F__)
        __m512 t[LANES];
        memcpy(t, lo, sizeof t);
        transpose16(t);
        for (int j = 0; j < LANES; j++) _mm512_storeu_ps(dst + (c + j) * LANES, t[j]);
        memcpy(t, hi, sizeof t);
        transpose16(t);
        for (int j = 0; j < LANES; j++) _mm512_storeu_ps(dst + (c + LANES + j) * LANES, t[j]);
#else
        for (int j = 0; j < LANES; j++) {
            vec a, b;
            for (int r = 0; r < LANES; r++) { a[r] = lo[r][j]; b[r] = hi[r][j]; }
            store(dst + (c + j) * LANES, a);
            store(dst + (c + LANES + j) * LANES, b);
        }
#endif
    }
    for (; c < k; c++)
        for (int r = 0; r < LANES; r++) {
            const long i = first + r, g = c / group;
            const float s = scales[i * groups + g], sz = zeros ? s * zeros[i * groups + g] : 0.f;
            dst[c * LANES + r] = s * decode_one(w + i * w_row_bytes, c, format) - sz;
        }
}

static int bad_layout(long n, long k, long group, int format) {
    return (format != WQ_U4 && format != WQ_U8 && format != WQ_FP8) || group < 1 || (group % WQ_CHUNK && group < k)
           || n % LANES;
}

/* The whole weight as float32, blocked as [n/16][k][16] (the reference check of dequantize_block). n must be a
 * multiple of 16. Returns 0, or -1 for a bad format, group or n. */
int llmserve_dequantize_blocked(const unsigned char *w, long w_row_bytes, const float *scales, const float *zeros,
                                long n, long k, long group, int format, float *out, int num_threads) {
    if (bad_layout(n, k, group, format)) return -1;
    const long groups = (k + group - 1) / group;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long b = 0; b < n / LANES; b++)
        dequantize_block(w, w_row_bytes, scales, zeros, k, group, groups, format, b * LANES, out + b * k * LANES);
    return 0;
}

void llmserve_linear_panel(const float *x, long x_stride, const float *w, long k, const float *bias, float *y,
                           long y_stride, long M, int nb);   /* cpu_linear.c */

#define PANEL_BLOCKS 4   /* blocks of 16 outputs per panel: cpu_linear.c's TILE_VECS */

/* Many rows: y[M, n] = x W^T + bias, each thread dequantising one 64-output panel at a time into its own
 * buffer (k * 64 floats, cache-resident) and running the float GEMM tiles over every row of x against it, so
 * the weight is read packed, once, and no float copy of it is ever made. Returns 0; -1 for a bad layout;
 * -2 without memory. */
int llmserve_linear_weight_only_gemm(const float *x, long x_stride, const unsigned char *w, long w_row_bytes,
                                     const float *scales, const float *zeros, const float *bias, float *y,
                                     long y_stride, long M, long n, long k, long group, int format, int num_threads) {
    if (bad_layout(n, k, group, format)) return -1;
    const long groups = (k + group - 1) / group, blocks = n / LANES;
    const long panels = (blocks + PANEL_BLOCKS - 1) / PANEL_BLOCKS;
    int failed = 0;
    #pragma omp parallel num_threads(num_threads) reduction(|: failed)
    {
        float *panel = aligned_alloc(64, sizeof(float) * PANEL_BLOCKS * LANES * k + 64);
        if (!panel) failed = 1;
        #pragma omp for schedule(static)
        for (long p = 0; p < panels; p++) {
            if (!panel) continue;
            const long first = p * PANEL_BLOCKS;
            const int nb = blocks - first < PANEL_BLOCKS ? (int)(blocks - first) : PANEL_BLOCKS;
            for (int j = 0; j < nb; j++)
                dequantize_block(w, w_row_bytes, scales, zeros, k, group, groups, format, (first + j) * LANES,
                                 panel + j * k * LANES);
            llmserve_linear_panel(x, x_stride, panel, k, bias ? bias + first * LANES : NULL, y + first * LANES,
                                  y_stride, M, nb);
        }
        free(panel);
    }
    return failed ? -2 : 0;
}

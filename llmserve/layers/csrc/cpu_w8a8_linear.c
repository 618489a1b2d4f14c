/* W8A8 linear layers: int8 weights with per-output-channel scales (llmserve/quantization/packed.py lays them
 * out), activations quantised per row (token) on the fly to int8. The int8 dot products use AVX-512 VNNI
 * (vpdpbusd: u8 x s8, four products summed per int32 lane) where the compiler targets it (-march=native on a
 * CPU that has it), else AVX2's vpmaddubsw where present, else widened integer vector code. vpdpbusd wants one
 * unsigned operand: x + 128 is, and the weights' row sums times 128 (computed at load) take the offset back
 * out. vpmaddubsw sums pairs of products in int16, where (x + 128) x w can overflow: it multiplies |w| by the
 * signed x carrying w's sign (each pair at most 2 x 128 x 127) and adds the row sum back. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_VNNI 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define HAVE_AVX2_INT8 1
#endif

typedef unsigned char u8x16 __attribute__((vector_size(16)));
typedef signed char s8x16 __attribute__((vector_size(16)));

#define W8A8_ROWS 4
#define W8A8_STEP 64    /* bytes per dot-product step; rows of weights and quantised x are padded to it */

/* Dot products of `mr` quantised rows of x (u8, x + 128) with one int8 weight row of kp bytes. */
static inline __attribute__((always_inline)) void
w8a8_dots(const unsigned char *xq, long kp, const signed char *w, int *out, const int mr) {
#ifdef HAVE_VNNI
    __m512i acc[W8A8_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm512_setzero_si512();
    for (long c = 0; c < kp; c += W8A8_STEP) {
        const __m512i wv = _mm512_loadu_si512((const void *)(w + c));
        for (int m = 0; m < mr; m++)
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_loadu_si512((const void *)(xq + m * kp + c)), wv);
    }
    for (int m = 0; m < mr; m++) out[m] = _mm512_reduce_add_epi32(acc[m]);
#elif defined(HAVE_AVX2_INT8)
    __m256i acc[W8A8_ROWS], wsum = _mm256_setzero_si256();
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_si256();
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1), ones8 = _mm256_set1_epi8(1);
    for (long c = 0; c < kp; c += 32) {
        const __m256i wv = _mm256_loadu_si256((const void *)(w + c)), wabs = _mm256_abs_epi8(wv);
        wsum = _mm256_add_epi32(wsum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, wv), ones));
        for (int m = 0; m < mr; m++) {
            const __m256i xs = _mm256_xor_si256(_mm256_loadu_si256((const void *)(xq + m * kp + c)), flip);
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xs, wv)),
                                                                ones));
        }
    }
    int lanes[8];
    _mm256_storeu_si256((void *)lanes, wsum);
    int w_times_128 = 0;   /* dot(x + 128, w) = dot(x, w) + 128 sum(w) */
    for (int l = 0; l < 8; l++) w_times_128 += 128 * lanes[l];
    for (int m = 0; m < mr; m++) {
        _mm256_storeu_si256((void *)lanes, acc[m]);
        int t = w_times_128;
        for (int l = 0; l < 8; l++) t += lanes[l];
        out[m] = t;
    }
#else
    ivec acc[W8A8_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = (ivec){0};
    for (long c = 0; c < kp; c += 16) {
        s8x16 wb;
        memcpy(&wb, w + c, 16);
        const ivec wv = __builtin_convertvector(wb, ivec);
        for (int m = 0; m < mr; m++) {
            u8x16 xb;
            memcpy(&xb, xq + m * kp + c, 16);
            acc[m] += __builtin_convertvector(xb, ivec) * wv;
        }
    }
    for (int m = 0; m < mr; m++) {
        int t = 0;
        for (int l = 0; l < LANES; l++) t += acc[m][l];
        out[m] = t;
    }
#endif
}

#define W8A8_CASE(MR) case MR: w8a8_dots(xq + m0 * kp, kp, w + i * kp, d, MR); break;

/* y[M, n] = dequant(quant(x)) W^T + bias for int8 W [n, kp] (k values then zero padding) with per-row
 * scales w_scale[n] and w_comp[n] = 128 * sum of the row: each row of x is quantised symmetrically to
 * int8 with its own scale max|x| / 127 (round half to even), then y = sx * sw * (dot(xq + 128, w) - comp).
 * Returns 0; -1 when kp is not a multiple of 64 or below k; -2 without memory. */
int llmserve_linear_w8a8(const float *x, long x_stride, const signed char *w, long kp, const float *w_scale,
                         const int *w_comp, const float *bias, float *y, long y_stride, long M, long n, long k,
                         int num_threads) {
    if (kp % W8A8_STEP || kp < k) return -1;
    unsigned char *xq = malloc((size_t)M * kp);
    float *sx = malloc(sizeof(float) * M);
    if (!xq || !sx) { free(xq); free(sx); return -2; }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float amax = 0.f;
        for (long c = 0; c < k; c++) amax = fmaxf(amax, fabsf(xm[c]));
        const float scale = amax > 0.f ? amax / 127.f : 1.f;
        sx[m] = scale;
        for (long c = 0; c < k; c++) {
            float q = nearbyintf(xm[c] / scale);
            q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
            xq[m * kp + c] = (unsigned char)((int)q + 128);
        }
        memset(xq + m * kp + k, 128, kp - k);
    }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long i = 0; i < n; i++) {
        for (long m0 = 0; m0 < M; m0 += W8A8_ROWS) {
            int d[W8A8_ROWS];
            const int mr = M - m0 < W8A8_ROWS ? (int)(M - m0) : W8A8_ROWS;
            switch (mr) { W8A8_CASE(1) W8A8_CASE(2) W8A8_CASE(3) W8A8_CASE(4) }
            for (int m = 0; m < mr; m++)
                y[(m0 + m) * y_stride + i] = sx[m0 + m] * w_scale[i] * (float)(d[m] - w_comp[i])
                                             + (bias ? bias[i] : 0.f);
        }
    }
    free(xq);
    free(sx);
    return 0;
}

/* Which int8 dot-product path this build uses (2: AVX-512 VNNI, 1: AVX2, 0: portable vector code). */
int llmserve_w8a8_dot_path(void) {
#if defined(HAVE_VNNI)
    return 2;
#elif defined(HAVE_AVX2_INT8)
    return 1;
#else
    return 0;
#endif
}

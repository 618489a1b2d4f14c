/* The group-int8 kernel's activations: rows of x quantised to int8 per block of 32 columns (scale max|x| / 127,
 * as llama.cpp's Q8_0), with the dequantised sums per 16 columns that the weights' offsets multiply
 * (cpu_group_int8_linear.c). With AVX2 a block is four 8-float vectors; without it, portable code. Both divide
 * by the scale and round half to even, so they give the same codes. */
#include <math.h>

#include "cpu_group_int8.h"

#ifdef __AVX2__
#include <immintrin.h>

/* One block of 32: its codes into q, returns its scale; sums[h] the sum of codes 16 h .. 16 h + 15. */
static inline float quantize_block(const float *xb, signed char *q, int *sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float scale = top > 0.f ? top / 127.f : 1.f;
    const __m256 s = _mm256_set1_ps(scale), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
    __m256i c[4];
    for (int i = 0; i < 4; i++) {
        const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    for (int h = 0; h < 2; h++) {
        const __m256i pair = _mm256_add_epi32(c[2 * h], c[2 * h + 1]);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(pair), _mm256_extracti128_si256(pair, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        sums[h] = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
    }
    /* packs interleave 4-code groups across the 128-bit lanes; the permutation puts them back in order */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return scale;
}
#else
static inline float quantize_block(const float *xb, signed char *q, int *sums) {
    float amax = 0.f;
    for (int c = 0; c < GI8_XBLOCK; c++) amax = fmaxf(amax, fabsf(xb[c]));
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    sums[0] = sums[1] = 0;
    for (int c = 0; c < GI8_XBLOCK; c++) {
        float r = nearbyintf(xb[c] / scale);
        r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
        q[c] = (signed char)(int)r;
        sums[c / GI8_XSUM] += (int)r;
    }
    return scale;
}
#endif

#define GI8_QUANTIZE_PARALLEL_MIN (1L << 14)   /* values from which the rows are shared among the threads */

/* Quantises M rows of x [M, k] (k a multiple of 32): xq [M, k] int8, xscale [M, k / 32], and xsum [M, k / 16]
 * the dequantised sums (xscale times the sum of 16 codes). A decode step's few rows are quantised by the calling
 * thread alone: a parallel region's start and end would cost more than the work, and with one row the other
 * threads would only wait.
 * Returns 0, or -1 when k is not a multiple of 32. */
int llmserve_group_int8_quantize(const float *x, long x_stride, long M, long k, signed char *xq, float *xscale,
                                 float *xsum, int num_threads) {
    if (k % GI8_XBLOCK) return -1;
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (M * k >= GI8_QUANTIZE_PARALLEL_MIN)
    for (long m = 0; m < M; m++) {
        for (long b = 0; b < k / GI8_XBLOCK; b++) {
            int sums[GI8_XBLOCK / GI8_XSUM];
            const float scale = quantize_block(x + m * x_stride + b * GI8_XBLOCK, xq + m * k + b * GI8_XBLOCK, sums);
            xscale[m * (k / GI8_XBLOCK) + b] = scale;
            for (int h = 0; h < GI8_XBLOCK / GI8_XSUM; h++)
                xsum[m * (k / GI8_XSUM) + b * (GI8_XBLOCK / GI8_XSUM) + h] = scale * (float)sums[h];
        }
    }
    return 0;
}

/* The group-int8 kernel's activations: rows of x quantised to int8 per block of 32 columns (scale max|x| / 127,
 * as llama.cpp's Q8_0), with the dequantised sums per 16 columns that the weights' offsets multiply
 * (cpu_group_int8_linear.c). */
#include <math.h>

#include "cpu_group_int8.h"

/* Quantises M rows of x [M, k] (k a multiple of 32): xq [M, k] int8, xscale [M, k / 32], and xsum [M, k / 16]
 * the dequantised sums (xscale times the sum of 16 codes).
 * Returns 0, or -1 when k is not a multiple of 32. */
int llmserve_group_int8_quantize(const float *x, long x_stride, long M, long k, signed char *xq, float *xscale,
                                 float *xsum, int num_threads) {
    if (k % GI8_XBLOCK) return -1;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        for (long b = 0; b < k / GI8_XBLOCK; b++) {
            const float *xb = xm + b * GI8_XBLOCK;
            float amax = 0.f;
            for (int c = 0; c < GI8_XBLOCK; c++) amax = fmaxf(amax, fabsf(xb[c]));
            const float scale = amax > 0.f ? amax / 127.f : 1.f;
            xscale[m * (k / GI8_XBLOCK) + b] = scale;
            int sums[GI8_XBLOCK / GI8_XSUM] = {0};
            for (int c = 0; c < GI8_XBLOCK; c++) {
                float q = nearbyintf(xb[c] / scale);
                q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
                xq[m * k + b * GI8_XBLOCK + c] = (signed char)(int)q;
                sums[c / GI8_XSUM] += (int)q;
            }
            for (int h = 0; h < GI8_XBLOCK / GI8_XSUM; h++)
                xsum[m * (k / GI8_XSUM) + b * (GI8_XBLOCK / GI8_XSUM) + h] = scale * (float)sums[h];
        }
    }
    return 0;
}

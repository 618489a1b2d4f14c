/* The group-int8 kernel's weight segment, shared by cpu_group_int8_linear.c and cpu_decode_layers.c. */
#ifndef LLMSERVE_CPU_GROUP_INT8_H
#define LLMSERVE_CPU_GROUP_INT8_H

#include <stdint.h>

#define GI8_XBLOCK 32    /* activation columns per int8 scale */
#define GI8_XSUM 16      /* activation columns per sum (the smallest weight group) */

/* `rows` output rows of a weight of k inputs, as llmserve/quantization/group_int8.py lays them out. `bits`: 4
 * (two codes a byte), 6 (the low 4 bits as 4-bit codes, the top 2 in a plane: 6 bits a code) or 8. Per tile of
 * 16 output rows: `codes`, k * 2 * bits bytes; `d` (and `m`), fp16 [k / (group * per_block)][16], one per
 * row and block of `per_block` groups; `sc` (int8) and `mins` (uint8), [k / group][16], one per row and group
 * (NULL: 1). A group's scale is s = d * sc, its offset m * mins, or -zero * s when `m` is NULL (a signed
 * format's zero point): W[o, c] = s * code + offset, all products exact in float32. */
typedef struct {
    const unsigned char *codes;
    const uint16_t *d;
    const signed char *sc;
    const uint16_t *m;
    const unsigned char *mins;
    long rows;
    int bits, group, per_block, zero;
} gi8_weight;

int llmserve_group_int8_quantize(const float *x, long x_stride, long M, long k, signed char *xq, float *xscale,
                                 float *xsum, int num_threads);
int llmserve_group_int8_linear(const signed char *xq, const float *xscale, const float *xsum, long M, long k,
                               const gi8_weight *w, const float *bias, float *y, long y_stride, int num_threads);

#endif

/* Group-quantised linear layers through int8 dot products (the GGUF block formats, kept packed).
 *
 * Weights: unsigned codes q (4, 6 or 8 bits) with a scale s and offset m per output row and group of 16 or 32
 * input columns, W[o, c] = s[o, g] * q[o, c] + m[o, g], both kept as the file stores them (gi8_weight in
 * cpu_group_int8.h: fp16 per block, times an integer per group for k-quants; the offset a zero point times s for
 * signed formats) and expanded to float32 per group in registers (llmserve/quantization/group_int8.py repacks
 * them). Activations: each row quantised on the fly to int8 per block of 32 columns (scale max|x| / 127, as
 * llama.cpp's Q8_0), with the sum of the quantised x over every 16 columns for the offset term:
 *
 *   y[o] = sum_g s[o, g] * xscale[block(g)] * dot(q[o, g], xq[g]) + m[o, g] * xscale[block(g)] * sum(xq[g])
 *
 * which is exactly the quantised x times W: the rounding error of x meets the weights' values, not their
 * codes (with the float sum of x instead, the error would meet s * q, which for a zero-point format such as
 * Q8_0, q + 128, is about 128 times larger than the weight).
 *
 * Codes are stored per tile of 16 output rows, 4 columns a step: byte 4 r + j of step c is code[r, 4 c + j]
 * (8-bit), or code[r, 8 c + j] in the low nibble and code[r, 8 c + 4 + j] in the high one (4-bit, unpacked in
 * registers with a mask and a shift), so that one load feeds 16 (AVX-512) or 8 (AVX2) rows x 4 columns of u8 x s8
 * dot products. 6-bit codes (Q5_x, Q6_K) come in chunks of 16 columns, 192 bytes: their low 4 bits as two 4-bit
 * steps, then a 2-bit plane, bits 2 s and 2 s + 1 of byte 4 r + j the top bits of code[r, 16 c + 4 s + j]; a
 * step's codes are its nibbles ORed with its plane bits moved to bits 4-5 (six_bit_step), so a decode step
 * streams 6 bits a code, not 8. Scale factors are per tile too ([block][16] fp16, [group][16] integers), so a
 * tile's rows expand one vector of them. Each instruction set has a few-row path (decode: a register tile of
 * every row times a tile) and a many-row path (prefill, or decode at many concurrent sequences) in its own file:
 * cpu_group_int8_vnni.h and cpu_group_int8_avx2.h. All of them add the same terms in the same order, so a row's
 * output depends neither on the path nor on how many rows share the call. Without AVX2 the arithmetic is
 * portable code (tile_dots below), in the same order. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_group_int8.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define GI8_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GI8_AVX2 1
#endif

#define GI8_TILE 16      /* output rows per tile */
#define GI8_ROWS 8       /* activation rows per register tile */
#define GI8_PREFETCH 4096 /* bytes ahead of the codes being read that the few-row paths prefetch */

/* The offset term's sum of x over group g (16 or 32 columns) of a row's 16-column sums. */
static inline float group_xsum(const float *xsum_m, long g, const int group) {
    return group == 16 ? xsum_m[g] : xsum_m[2 * g] + xsum_m[2 * g + 1];
}

/* Prefetch a tile's codes of columns [c0, c0 + columns), GI8_PREFETCH bytes ahead. At a few rows each weight is
 * read once, at the memory's speed, and the hardware prefetchers do not run far enough ahead of such a stream;
 * tiles lie back to back, so near a tile's end this fetches the next one's start. */
static inline void prefetch_codes(const unsigned char *codes, long c0, long columns, const int bits) {
    for (long i = 0; i < columns * 2 * bits; i += 64)
        __builtin_prefetch(codes + c0 * 2 * bits + GI8_PREFETCH + i, 0, 3);
}

/* Bytes from the start of a tile's codes to the 4-bit step holding column c (a multiple of 8) of 6-bit codes,
 * and to the 2-bit plane of column c's chunk of 16. */
static inline long six_bit_nibbles(long c) { return (c / 16) * 3 * 4 * GI8_TILE + (c % 16) / 8 * 4 * GI8_TILE; }
static inline long six_bit_plane(long c) { return (c / 16) * 3 * 4 * GI8_TILE + 2 * 4 * GI8_TILE; }

/* One tile of 16 output rows of a gi8_weight: its codes and scale factors, and the zero point as -zero. */
typedef struct {
    const unsigned char *codes;
    const uint16_t *d, *m;
    const signed char *sc;
    const unsigned char *mins;
    int block_shift;   /* log2 of the groups per block */
    float neg_zero;
} gi8_tile;

static inline gi8_tile tile_at(const gi8_weight *w, long k, long t) {
    const long groups = k / w->group, blocks = groups / w->per_block;
    gi8_tile v = {w->codes + t * (k * GI8_TILE * w->bits / 8), w->d + t * blocks * GI8_TILE,
                  w->m ? w->m + t * blocks * GI8_TILE : NULL, w->sc ? w->sc + t * groups * GI8_TILE : NULL,
                  w->mins ? w->mins + t * groups * GI8_TILE : NULL, __builtin_ctz((unsigned)w->per_block),
                  -(float)w->zero};
    return v;
}

/* An fp16 value as float32 (exact), for the portable path. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 31, mantissa = h & 1023;
    if (exponent == 0) {   /* zero or subnormal: mantissa x 2^-24 */
        const float f = (float)mantissa * 0x1p-24f;
        return sign ? -f : f;
    }
    const uint32_t bits = sign | (exponent == 31 ? 0x7f800000u | (mantissa << 13)
                                                 : ((exponent + 112) << 23) | (mantissa << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#ifdef GI8_VNNI
#include "cpu_group_int8_vnni.h"
#elif defined(GI8_AVX2)
#include "cpu_group_int8_avx2.h"
#else
static inline __attribute__((always_inline)) void
tile_dots(const gi8_tile *t, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
          const int mr, const int bits, const int group) {
    const unsigned char *codes = t->codes;
    float acc[GI8_ROWS][GI8_TILE] = {{0}};
    const long groups = k / group;
    for (long g = 0; g < groups; g++) {
        int dot[GI8_ROWS][GI8_TILE] = {{0}};
        const long c0 = g * group;
        for (long c = c0; c < c0 + group; c += 4) {
            unsigned char w[GI8_TILE * 4];
            if (bits == 8) {
                memcpy(w, codes + c * GI8_TILE, sizeof w);
            } else {   /* columns c..c+3 are the low nibbles of their 8-column step, c+4..c+7 the high ones */
                const unsigned char *p = codes + (bits == 4 ? (c / 8) * 8 * GI8_TILE / 2
                                                            : six_bit_nibbles(c / 8 * 8));
                const int shift = (c % 8) ? 4 : 0;
                for (int i = 0; i < GI8_TILE * 4; i++) w[i] = (p[i] >> shift) & 15;
                if (bits == 6)   /* the top 2 bits: bits 2 s, 2 s + 1 of the chunk's plane, s = step in the chunk */
                    for (int i = 0; i < GI8_TILE * 4; i++)
                        w[i] |= ((codes[six_bit_plane(c) + i] >> (2 * ((c % 16) / 4))) & 3) << 4;
            }
            for (int m = 0; m < mr; m++)
                for (int r = 0; r < GI8_TILE; r++)
                    for (int j = 0; j < 4; j++) dot[m][r] += (int)w[r * 4 + j] * (int)xq[m * k + c + j];
        }
        const long b = g >> t->block_shift;
        float s[GI8_TILE], o[GI8_TILE];
        for (int r = 0; r < GI8_TILE; r++) {
            s[r] = half_to_float(t->d[b * GI8_TILE + r]) * (t->sc ? (float)t->sc[g * GI8_TILE + r] : 1.f);
            o[r] = t->m == NULL ? s[r] * t->neg_zero
                                : half_to_float(t->m[b * GI8_TILE + r])
                                      * (t->mins ? (float)t->mins[g * GI8_TILE + r] : 1.f);
        }
        for (int m = 0; m < mr; m++) {
            const float sx = xscale[m * (k / GI8_XBLOCK) + c0 / GI8_XBLOCK];
            const float xs = group_xsum(xsum + m * (k / GI8_XSUM), g, group);
            for (int r = 0; r < GI8_TILE; r++) {   /* the vector paths' fused multiply-adds, in their order */
                const float a = fmaf(s[r] * sx, (float)dot[m][r], acc[m][r]);
                acc[m][r] = fmaf(o[r], xs, a);
            }
        }
    }
    for (int m = 0; m < mr; m++) memcpy(out + m * GI8_TILE, acc[m], sizeof acc[m]);
}
#endif

#define GI8_CASE(MR, BITS, GROUP)                                                                            \
    if (mr == MR && bits == BITS && group == GROUP) {                                                        \
        tile_dots(&tile, xq + m0 * k, xscale + m0 * (k / GI8_XBLOCK), xsum + m0 * (k / GI8_XSUM), k, out,   \
                  MR, BITS, GROUP);                                                                          \
    } else
#define GI8_CASES(MR) GI8_CASE(MR, 8, 16) GI8_CASE(MR, 8, 32) GI8_CASE(MR, 6, 16) GI8_CASE(MR, 6, 32)            \
    GI8_CASE(MR, 4, 16) GI8_CASE(MR, 4, 32)

/* y[m, o] (+ bias[o]) for the w->rows output rows of one weight, from activations quantised by
 * llmserve_group_int8_quantize (rows of the last tile past w->rows: any finite factors, never stored).
 * Returns 0, -1 for codes other than 4, 6 or 8 bits, a group other than 16/32, blocks (a power of 2 groups)
 * that do not split k, or k not a multiple of 32, or -2 without memory. */
int llmserve_group_int8_linear(const signed char *xq, const float *xscale, const float *xsum, long M, long k,
                               const gi8_weight *w, const float *bias, float *y, long y_stride, int num_threads) {
    const int bits = w->bits, group = w->group;
    if ((bits != 4 && bits != 6 && bits != 8) || (group != 16 && group != 32) || k % GI8_XBLOCK
        || w->per_block < 1 || (w->per_block & (w->per_block - 1)) || (k / group) % w->per_block)
        return -1;
#ifdef GI8_VNNI
    if (M > GI8_ROWS) {
        gemm_tiles(xq, xscale, xsum, M, k, w, bias, y, y_stride, num_threads);
        return 0;
    }
#elif defined(GI8_AVX2)
    if (bits == 4 ? M >= GI8_AVX2_GEMM_ROWS4 : M > GI8_ROWS)   /* where it measured faster */
        return gemm_tiles(xq, xscale, xsum, M, k, w, bias, y, y_stride, num_threads);
#endif
    const long n = w->rows, tiles = (n + GI8_TILE - 1) / GI8_TILE;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long t = 0; t < tiles; t++) {
        const gi8_tile tile = tile_at(w, k, t);
        const int rows = n - t * GI8_TILE < GI8_TILE ? (int)(n - t * GI8_TILE) : GI8_TILE;
        for (long m0 = 0; m0 < M; m0 += GI8_ROWS) {
            const int mr = M - m0 < GI8_ROWS ? (int)(M - m0) : GI8_ROWS;
            float out[GI8_ROWS * GI8_TILE];
            GI8_CASES(1) GI8_CASES(2) GI8_CASES(3) GI8_CASES(4) GI8_CASES(5) GI8_CASES(6) GI8_CASES(7) GI8_CASES(8) {}
            for (int m = 0; m < mr; m++)
                for (int r = 0; r < rows; r++)
                    y[(m0 + m) * y_stride + t * GI8_TILE + r] = out[m * GI8_TILE + r]
                                                                 + (bias ? bias[t * GI8_TILE + r] : 0.f);
        }
    }
    return 0;
}

/* A whole layer in one call: x [M, k] quantised once, then each of `segments` weights w[s] written into its
 * columns of y, in order; bias: all the columns' (or NULL). Returns 0, -1 as llmserve_group_int8_linear, or -2
 * without memory. */
int llmserve_group_int8_layer(const float *x, long x_stride, long M, long k, int segments, const gi8_weight *w,
                              const float *bias, float *y, long y_stride, int num_threads) {
    if (k % GI8_XBLOCK) return -1;
    signed char *xq = malloc((size_t)(M * k));
    float *xscale = malloc(sizeof(float) * (size_t)(M * (k / GI8_XBLOCK)));
    float *xsum = malloc(sizeof(float) * (size_t)(M * (k / GI8_XSUM)));
    int status = xq && xscale && xsum ? 0 : -2;
    if (status == 0) llmserve_group_int8_quantize(x, x_stride, M, k, xq, xscale, xsum, num_threads);
    for (long s = 0, start = 0; s < segments && status == 0; start += w[s].rows, s++)
        status = llmserve_group_int8_linear(xq, xscale, xsum, M, k, &w[s], bias ? bias + start : NULL, y + start,
                                            y_stride, num_threads);
    free(xq);
    free(xscale);
    free(xsum);
    return status;
}

/* Which dot-product path this build uses (2: AVX-512 VNNI, 1: AVX2, 0: portable integer code). */
int llmserve_group_int8_dot_path(void) {
#if defined(GI8_VNNI)
    return 2;
#elif defined(GI8_AVX2)
    return 1;
#else
    return 0;
#endif
}

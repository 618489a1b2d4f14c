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
 * Codes are stored per tile of 16 output rows so that one 64-byte load feeds 16 rows x 4 columns of
 * vpdpbusd (u8 codes x s8 activations, four products summed per int32 lane): byte 4 r + j of step c is
 * code[r, 4 c + j] (8-bit), or code[r, 8 c + j] in the low nibble and code[r, 8 c + 4 + j] in the high one
 * (4-bit, unpacked in registers with a mask and a shift). Scale factors are per tile too ([block][16] fp16,
 * [group][16] integers), so a tile's 16 rows expand one vector of them.
 * Up to GI8_ROWS activation rows (decode), each thread takes whole tiles and multiplies a tile by every row at
 * once (a register tile: each loaded weight vector serves every row), so the weight is streamed once. With
 * more rows (prefill, or decode at many concurrent sequences) threads take pairs of tiles and multiply them by
 * GI8_GEMM_ROWS rows at a time: each activation broadcast serves both tiles, each unpacked weight vector every
 * row, and each row's scale and sum are loaded once per group for both tiles, so fewer instructions surround
 * each vpdpbusd. Both paths add the same terms in the same order: a row's output does not depend on how many
 * rows share the call.
 * With AVX2 but not AVX-512 VNNI, vpmaddubsw (u8 x s8, pairs summed to int16) takes 4-bit codes directly; an
 * 8-bit code enters as its two nibbles (code = 16 hi + lo), since two full 8-bit products can overflow the
 * int16 pair sum. Nibble products sum to at most 2 x 15 x 127 per lane and step, so a group of up to 32 columns
 * is summed in int16 and widened once (vpmaddwd) at its end. "6-bit" codes (a byte each, below 64: Q5_x, Q6_K)
 * go in whole: a pair sum is at most 2 x 63 x 127, so two steps add in int16 before one vpmaddwd widens them.
 * Every path computes the same exact integer dot products and adds the same float terms in the same order; without AVX2 the arithmetic is portable code. */
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
#define GI8_AVX2_ROWS 4  /* activation rows per register tile of a half-tile (16 ymm registers) */
#endif

#define GI8_TILE 16      /* output rows per tile */
#define GI8_ROWS 8       /* activation rows per register tile */
#define GI8_GEMM_ROWS 6  /* activation rows per register tile of the many-row path */
#define GI8_GEMM_TILES 2 /* weight tiles per register tile of the many-row path */

/* The offset term's sum of x over group g (16 or 32 columns) of a row's 16-column sums. */
static inline float group_xsum(const float *xsum_m, long g, const int group) {
    return group == 16 ? xsum_m[g] : xsum_m[2 * g] + xsum_m[2 * g + 1];
}

/* Bits a code takes in memory: 4-bit codes two to a byte, 6- and 8-bit ones a byte each. */
static inline int code_bits(int bits) { return bits == 4 ? 4 : 8; }

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
    gi8_tile v = {w->codes + t * (k * GI8_TILE * code_bits(w->bits) / 8), w->d + t * blocks * GI8_TILE,
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
static inline __m512i bcast4(const signed char *p) { int v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

/* Group g's scales and offsets of a tile's 16 rows, expanded to float32. */
static inline void group_scales(const gi8_tile *t, long g, __m512 *s, __m512 *o) {
    const long b = g >> t->block_shift;
    *s = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(t->d + b * GI8_TILE)));
    if (t->sc)
        *s = _mm512_mul_ps(*s, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                   _mm_loadu_si128((const void *)(t->sc + g * GI8_TILE)))));
    if (t->m == NULL) {
        *o = _mm512_mul_ps(*s, _mm512_set1_ps(t->neg_zero));
        return;
    }
    *o = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(t->m + b * GI8_TILE)));
    if (t->mins)
        *o = _mm512_mul_ps(*o, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                   _mm_loadu_si128((const void *)(t->mins + g * GI8_TILE)))));
}

/* One tile of 16 output rows times mr activation rows; out[m * 16 + r]. */
static inline __attribute__((always_inline)) void
tile_dots(const gi8_tile *t, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
          const int mr, const int bits, const int group) {
    const unsigned char *codes = t->codes;
    __m512 acc[GI8_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f);
    const long groups = k / group;
    for (long g = 0; g < groups; g++) {
        /* two independent sums per row (even and odd steps, or low and high nibbles): vpdpbusd's latency
         * would otherwise bound a single row's chain */
        __m512i dot[GI8_ROWS], dot2[GI8_ROWS];
        for (int m = 0; m < mr; m++) dot[m] = dot2[m] = _mm512_setzero_si512();
        const long c0 = g * group;
        if (bits != 4) {
            for (long c = c0; c < c0 + group; c += 8) {
                const __m512i w = _mm512_loadu_si512((const void *)(codes + c * GI8_TILE));
                const __m512i w2 = _mm512_loadu_si512((const void *)(codes + (c + 4) * GI8_TILE));
                for (int m = 0; m < mr; m++) {
                    dot[m] = _mm512_dpbusd_epi32(dot[m], w, bcast4(xq + m * k + c));
                    dot2[m] = _mm512_dpbusd_epi32(dot2[m], w2, bcast4(xq + m * k + c + 4));
                }
            }
        } else {
            for (long c = c0; c < c0 + group; c += 8) {
                const __m512i w = _mm512_loadu_si512((const void *)(codes + c * GI8_TILE / 2));
                const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
                for (int m = 0; m < mr; m++) {
                    dot[m] = _mm512_dpbusd_epi32(dot[m], lo, bcast4(xq + m * k + c));
                    dot2[m] = _mm512_dpbusd_epi32(dot2[m], hi, bcast4(xq + m * k + c + 4));
                }
            }
        }
        for (int m = 0; m < mr; m++) dot[m] = _mm512_add_epi32(dot[m], dot2[m]);
        __m512 s, o;
        group_scales(t, g, &s, &o);
        for (int m = 0; m < mr; m++) {
            const __m512 sx = _mm512_mul_ps(s, _mm512_set1_ps(xscale[m * (k / GI8_XBLOCK) + c0 / GI8_XBLOCK]));
            acc[m] = _mm512_fmadd_ps(sx, _mm512_cvtepi32_ps(dot[m]), acc[m]);
            acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(group_xsum(xsum + m * (k / GI8_XSUM), g, group)), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) _mm512_storeu_ps(out + m * GI8_TILE, acc[m]);
}

/* nt (1 or 2) tiles times mr (up to GI8_GEMM_ROWS) activation rows; one
 * dot-product chain per (row, tile), which with several rows and tiles is enough independent chains.
 * out[m * 16 * nt + t * 16 + r]. The float terms are tile_dots' in the same order. */
static inline __attribute__((always_inline)) void
panel_dots(const gi8_tile *tiles, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
           const int mr, const int nt, const int bits, const int group) {
    __m512 acc[GI8_GEMM_ROWS][GI8_GEMM_TILES];
    for (int m = 0; m < mr; m++)
        for (int t = 0; t < nt; t++) acc[m][t] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f);
    const long groups = k / group;
    for (long g = 0; g < groups; g++) {
        __m512i dot[GI8_GEMM_ROWS][GI8_GEMM_TILES];
        for (int m = 0; m < mr; m++)
            for (int t = 0; t < nt; t++) dot[m][t] = _mm512_setzero_si512();
        const long c0 = g * group;
        for (long c = c0; c < c0 + group; c += 8) {
            __m512i w[GI8_GEMM_TILES], w2[GI8_GEMM_TILES];
            for (int t = 0; t < nt; t++) {
                if (bits != 4) {
                    w[t] = _mm512_loadu_si512((const void *)(tiles[t].codes + c * GI8_TILE));
                    w2[t] = _mm512_loadu_si512((const void *)(tiles[t].codes + (c + 4) * GI8_TILE));
                } else {
                    const __m512i packed = _mm512_loadu_si512((const void *)(tiles[t].codes + c * GI8_TILE / 2));
                    w[t] = _mm512_and_si512(packed, low);
                    w2[t] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                }
            }
            for (int m = 0; m < mr; m++) {
                const __m512i a = bcast4(xq + m * k + c), a2 = bcast4(xq + m * k + c + 4);
                for (int t = 0; t < nt; t++)
                    dot[m][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[m][t], w[t], a), w2[t], a2);
            }
        }
        __m512 s[GI8_GEMM_TILES], o[GI8_GEMM_TILES];
        for (int t = 0; t < nt; t++) group_scales(&tiles[t], g, &s[t], &o[t]);
        for (int m = 0; m < mr; m++) {
            const __m512 xs = _mm512_set1_ps(xscale[m * (k / GI8_XBLOCK) + c0 / GI8_XBLOCK]);
            const __m512 sum = _mm512_set1_ps(group_xsum(xsum + m * (k / GI8_XSUM), g, group));
            for (int t = 0; t < nt; t++) {
                acc[m][t] = _mm512_fmadd_ps(_mm512_mul_ps(s[t], xs), _mm512_cvtepi32_ps(dot[m][t]), acc[m][t]);
                acc[m][t] = _mm512_fmadd_ps(o[t], sum, acc[m][t]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int t = 0; t < nt; t++) _mm512_storeu_ps(out + (m * nt + t) * GI8_TILE, acc[m][t]);
}

#define GI8_PANEL_CASE(MR, NT, BITS, GROUP)                                                                  \
    if (mr == MR && nt == NT && bits == BITS && group == GROUP) {                                             \
        panel_dots(pair, xq + m0 * k, xscale + m0 * (k / GI8_XBLOCK),          \
                   xsum + m0 * (k / GI8_XSUM), k, out, MR, NT, BITS, GROUP);                                  \
    } else
#define GI8_PANEL_FORMATS(MR, NT) GI8_PANEL_CASE(MR, NT, 8, 16) GI8_PANEL_CASE(MR, NT, 8, 32)              \
    GI8_PANEL_CASE(MR, NT, 6, 16) GI8_PANEL_CASE(MR, NT, 6, 32) GI8_PANEL_CASE(MR, NT, 4, 16)                \
    GI8_PANEL_CASE(MR, NT, 4, 32)
#define GI8_PANEL_CASES(MR) GI8_PANEL_FORMATS(MR, 1) GI8_PANEL_FORMATS(MR, 2)

/* The many-row path of llmserve_group_int8_linear: each thread takes pairs of tiles (the last one maybe
 * alone) and runs them over all M rows, GI8_GEMM_ROWS at a time. */
static void gemm_tiles(const signed char *xq, const float *xscale, const float *xsum, long M, long k,
                       const gi8_weight *wt, const float *bias, float *y, long y_stride, int num_threads) {
    const long n = wt->rows, tiles = (n + GI8_TILE - 1) / GI8_TILE;
    const long pairs = (tiles + GI8_GEMM_TILES - 1) / GI8_GEMM_TILES;
    const int bits = wt->bits, group = wt->group;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long p = 0; p < pairs; p++) {
        const long t0 = p * GI8_GEMM_TILES;
        const int nt = tiles - t0 < GI8_GEMM_TILES ? (int)(tiles - t0) : GI8_GEMM_TILES;
        gi8_tile pair[GI8_GEMM_TILES];
        for (int t = 0; t < nt; t++) pair[t] = tile_at(wt, k, t0 + t);
        const long cols = n - t0 * GI8_TILE < nt * GI8_TILE ? n - t0 * GI8_TILE : nt * GI8_TILE;
        for (long m0 = 0; m0 < M; m0 += GI8_GEMM_ROWS) {
            const int mr = M - m0 < GI8_GEMM_ROWS ? (int)(M - m0) : GI8_GEMM_ROWS;
            float out[GI8_GEMM_ROWS * GI8_GEMM_TILES * GI8_TILE];
            GI8_PANEL_CASES(1) GI8_PANEL_CASES(2) GI8_PANEL_CASES(3) GI8_PANEL_CASES(4) GI8_PANEL_CASES(5)
            GI8_PANEL_CASES(6) {}
            for (int m = 0; m < mr; m++)
                for (long r = 0; r < cols; r++)
                    y[(m0 + m) * y_stride + t0 * GI8_TILE + r] = out[m * nt * GI8_TILE + r]
                                                                  + (bias ? bias[t0 * GI8_TILE + r] : 0.f);
        }
    }
}
#elif defined(GI8_AVX2)
static inline __m256i bcast4_256(const signed char *p) { int v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
static inline __m256 halves8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const void *)p)); }
static inline __m128i bytes8(const void *p) { return _mm_loadl_epi64((const void *)p); }

/* Group g's scales and offsets of rows 8 h .. 8 h + 7 of a tile, expanded to float32. */
static inline void group_scales(const gi8_tile *t, long g, int h, __m256 *s, __m256 *o) {
    const long b = g >> t->block_shift;
    *s = halves8(t->d + b * GI8_TILE + h * 8);
    if (t->sc)
        *s = _mm256_mul_ps(*s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8(t->sc + g * GI8_TILE + h * 8))));
    if (t->m == NULL) {
        *o = _mm256_mul_ps(*s, _mm256_set1_ps(t->neg_zero));
        return;
    }
    *o = halves8(t->m + b * GI8_TILE + h * 8);
    if (t->mins)
        *o = _mm256_mul_ps(*o, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8(t->mins + g * GI8_TILE + h * 8))));
}

/* Rows 8 h .. 8 h + 7 of a tile (h = half) times mr (up to GI8_AVX2_ROWS) activation rows; out[m * 16 + r]. */
static inline __attribute__((always_inline)) void
half_tile_dots(const gi8_tile *t, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
               const int h, const int mr, const int bits, const int group) {
    const unsigned char *codes = t->codes;
    __m256 acc[GI8_AVX2_ROWS];
    for (int m = 0; m < mr; m++) acc[m] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    const long groups = k / group;
    for (long g = 0; g < groups; g++) {
        /* int16 sums of nibble products: lo and hi nibbles (8-bit), or columns c..c+3 and c+4..c+7 (4-bit);
         * 6-bit: int32 sums in dlo */
        __m256i dlo[GI8_AVX2_ROWS], dhi[GI8_AVX2_ROWS];
        for (int m = 0; m < mr; m++) dlo[m] = dhi[m] = _mm256_setzero_si256();
        const long c0 = g * group;
        if (bits == 6) {   /* codes below 64: a pair sum is at most 2 x 63 x 127, two of them fit an int16 */
            for (long c = c0; c < c0 + group; c += 8) {
                const __m256i w = _mm256_loadu_si256((const void *)(codes + c * GI8_TILE + h * 32));
                const __m256i w2 = _mm256_loadu_si256((const void *)(codes + (c + 4) * GI8_TILE + h * 32));
                for (int m = 0; m < mr; m++) {
                    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w, bcast4_256(xq + m * k + c)),
                                                           _mm256_maddubs_epi16(w2, bcast4_256(xq + m * k + c + 4)));
                    dlo[m] = _mm256_add_epi32(dlo[m], _mm256_madd_epi16(pairs, ones));
                }
            }
        } else if (bits == 8) {
            for (long c = c0; c < c0 + group; c += 4) {
                const __m256i w = _mm256_loadu_si256((const void *)(codes + c * GI8_TILE + h * 32));
                const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                for (int m = 0; m < mr; m++) {
                    const __m256i a = bcast4_256(xq + m * k + c);
                    dlo[m] = _mm256_add_epi16(dlo[m], _mm256_maddubs_epi16(lo, a));
                    dhi[m] = _mm256_add_epi16(dhi[m], _mm256_maddubs_epi16(hi, a));
                }
            }
        } else {
            for (long c = c0; c < c0 + group; c += 8) {
                const __m256i w = _mm256_loadu_si256((const void *)(codes + c * GI8_TILE / 2 + h * 32));
                const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                for (int m = 0; m < mr; m++) {
                    dlo[m] = _mm256_add_epi16(dlo[m], _mm256_maddubs_epi16(lo, bcast4_256(xq + m * k + c)));
                    dhi[m] = _mm256_add_epi16(dhi[m], _mm256_maddubs_epi16(hi, bcast4_256(xq + m * k + c + 4)));
                }
            }
        }
        __m256 s, o;
        group_scales(t, g, h, &s, &o);
        for (int m = 0; m < mr; m++) {
            const __m256i dot = bits == 6 ? dlo[m]
                                          : _mm256_add_epi32(_mm256_madd_epi16(dlo[m], ones),
                                                             _mm256_madd_epi16(dhi[m], bits == 8 ? sixteen : ones));
            const __m256 sx = _mm256_mul_ps(s, _mm256_set1_ps(xscale[m * (k / GI8_XBLOCK) + c0 / GI8_XBLOCK]));
            acc[m] = _mm256_fmadd_ps(sx, _mm256_cvtepi32_ps(dot), acc[m]);
            acc[m] = _mm256_fmadd_ps(o, _mm256_set1_ps(group_xsum(xsum + m * (k / GI8_XSUM), g, group)), acc[m]);
        }
    }
    for (int m = 0; m < mr; m++) _mm256_storeu_ps(out + m * GI8_TILE + h * 8, acc[m]);
}

/* One tile of 16 output rows times mr activation rows, as half-tiles of GI8_AVX2_ROWS rows at a time (the
 * tile's codes stay in L1 between them); out[m * 16 + r]. */
static inline __attribute__((always_inline)) void
tile_dots(const gi8_tile *t, const signed char *xq, const float *xscale, const float *xsum, long k, float *out,
          const int mr, const int bits, const int group) {
    for (int m0 = 0; m0 < mr; m0 += GI8_AVX2_ROWS) {
        const int n = mr - m0 < GI8_AVX2_ROWS ? mr - m0 : GI8_AVX2_ROWS;
        for (int h = 0; h < 2; h++)
            half_tile_dots(t, xq + m0 * k, xscale + m0 * (k / GI8_XBLOCK),
                           xsum + m0 * (k / GI8_XSUM), k, out + m0 * GI8_TILE, h, n, bits, group);
    }
}
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
            if (bits != 4) {
                memcpy(w, codes + c * GI8_TILE, sizeof w);
            } else {   /* columns c..c+3 are the low nibbles of their 8-column step, c+4..c+7 the high ones */
                const unsigned char *p = codes + (c / 8) * 8 * GI8_TILE / 2;
                const int shift = (c % 8) ? 4 : 0;
                for (int i = 0; i < GI8_TILE * 4; i++) w[i] = (p[i] >> shift) & 15;
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
 * Returns 0, or -1 for codes other than 4, 6 or 8 bits, a group other than 16/32, blocks (a power of 2 groups)
 * that do not split k, or k not a multiple of 32. */
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

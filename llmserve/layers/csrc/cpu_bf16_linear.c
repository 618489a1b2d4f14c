/* bfloat16 linear layers for CPUs: y[m, :] = W x[m, :] + b with W, x, b and y in bfloat16, float32 sums.
 *
 * The weight is stored blocked in pairs, [N/16][K2][16][2] with K2 = ceil(K/2) (odd K padded with one zero
 * column): one 64-byte vector holds input columns 2c and 2c+1 of 16 outputs, which is the operand layout of
 * AVX512-BF16's `vdpbf16ps` (acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1]): with the pair (x[2c], x[2c+1])
 * broadcast to every lane, one instruction does 32 multiply-adds into 16 float32 sums. Where the CPU has no
 * AVX512-BF16 the same layout is widened in registers (a bfloat16 is the high half of a float32: a shift or
 * a mask) and multiplied with float32 FMAs, so one weight copy serves both. It is also the B operand of AMX
 * tiles: where Linux grants them, each panel goes to cpu_bf16_amx.c first (K a multiple of 32).
 *
 * Threads take column panels of 64 outputs and run register tiles of up to 6 rows x 64 outputs through them
 * (fewer outputs where the vector registers hold fewer accumulators: REG_ACCS in cpu_vec.h), so a panel comes
 * from memory once and then from cache. With one row (decode) this streams the weight at
 * half the bytes of float32, with four independent dot-product chains per row hiding the instruction's
 * latency (measured faster than streaming one block at a time for every row count). Outputs are rounded to bfloat16
 * (to nearest even) after the bias is added in float32.
 *
 * A weight that must stay row-major (a tied LM head, which the embedding also reads) has its own kernel below.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

#define TILE_ROWS 6
#define TILE_VECS 4     /* blocks per panel, in register tiles of up to that */
int llmserve_bf16_amx_panel(const uint16_t *x, long xs, const uint16_t *w, long k, const uint16_t *bias, uint16_t *y,
                            long ys, long M, int nb);

/* The input pair (x[2c], x[2c+1]) as one 32-bit word; the pair past an odd k is (x[k-1], 0). */
static inline uint32_t x_pair(const uint16_t *x, long c, long k) {
    if (2 * c + 1 < k) {
        uint32_t p;
        memcpy(&p, x + 2 * c, sizeof p);
        return p;
    }
    return x[2 * c];
}

/* acc += the 16 outputs' pair of weights at w times the broadcast input pair. */
static inline __attribute__((always_inline)) vec dot_pair(vec acc, const uint16_t *w, uint32_t pair) {
#ifdef __AVX512BF16__
    __m512i wv;
    memcpy(&wv, w, sizeof wv);
    return (vec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)wv, (__m512bh)_mm512_set1_epi32((int)pair));
#else
    ivec lanes;
    memcpy(&lanes, w, sizeof lanes);
    const vec even = (vec)(lanes << 16), odd = (vec)(lanes & (int)0xffff0000u);
    return acc + even * splat(bf16_to_float((uint16_t)pair)) + odd * splat(bf16_to_float((uint16_t)(pair >> 16)));
#endif
}

static inline vec load_bias(const uint16_t *bias) { return bias ? load_bf16(bias) : (vec){0}; }

/* One GEMM tile: `mr` rows against `nb` blocks (block stride k2 * 32 values); constants at the call sites. */
static inline __attribute__((always_inline)) void
gemm_tile(const uint16_t *x, long xs, const uint16_t *w, long k, long k2, const uint16_t *bias, uint16_t *y,
          long ys, const int mr, const int nb) {
#ifdef __AVX512BF16__
    vec acc[TILE_ROWS][TILE_VECS];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nb; j++) acc[m][j] = (vec){0};
    for (long c = 0; c < k2; c++) {
        for (int m = 0; m < mr; m++) {
            const uint32_t p = x_pair(x + m * xs, c, k);
            for (int j = 0; j < nb; j++) acc[m][j] = dot_pair(acc[m][j], w + (j * k2 + c) * 2 * LANES, p);
        }
    }
    for (int j = 0; j < nb; j++) {
        const vec bj = load_bias(bias ? bias + j * LANES : NULL);
        for (int m = 0; m < mr; m++) store_bf16(y + m * ys + j * LANES, acc[m][j] + bj);
    }
#else
    /* widened weights and float32 FMAs on native-width vectors (a 16-float vec would live in memory without
     * AVX-512: see rvec in cpu_vec.h); the same sums as dot_pair's */
    typedef int rivec __attribute__((vector_size(RLANES * sizeof(int))));
    rvec acc[TILE_ROWS][TILE_VECS * RPARTS];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nb * RPARTS; j++) acc[m][j] = (rvec){0};
    for (long c = 0; c < k2; c++) {
        rvec even[TILE_VECS * RPARTS], odd[TILE_VECS * RPARTS];
        for (int j = 0; j < nb; j++)
            for (int q = 0; q < RPARTS; q++) {
                rivec lanes;
                memcpy(&lanes, w + (j * k2 + c) * 2 * LANES + q * 2 * RLANES, sizeof lanes);
                even[j * RPARTS + q] = (rvec)(lanes << 16);
                odd[j * RPARTS + q] = (rvec)(lanes & (int)0xffff0000u);
            }
        for (int m = 0; m < mr; m++) {
            const uint32_t p = x_pair(x + m * xs, c, k);
            const rvec x0 = rsplat(bf16_to_float((uint16_t)p)), x1 = rsplat(bf16_to_float((uint16_t)(p >> 16)));
            for (int j = 0; j < nb * RPARTS; j++) acc[m][j] = acc[m][j] + even[j] * x0 + odd[j] * x1;
        }
    }
    for (int j = 0; j < nb; j++) {
        const vec bj = load_bias(bias ? bias + j * LANES : NULL);
        for (int m = 0; m < mr; m++) {
            vec sum;
            memcpy(&sum, &acc[m][j * RPARTS], sizeof sum);
            store_bf16(y + m * ys + j * LANES, sum + bj);
        }
    }
#endif
}

#define TILE_CASE(MR, NB) case MR: gemm_tile(x, xs, w, k, k2, bias, y, ys, MR, NB); return;
#define TILES_OF_WIDTH(NB)                                                                                \
    static void tile_nb##NB(const uint16_t *x, long xs, const uint16_t *w, long k, long k2,                \
                            const uint16_t *bias, uint16_t *y, long ys, int mr) {                         \
        switch (mr) {                                                                                     \
            TILE_CASE(1, NB) TILE_CASE(2, NB) TILE_CASE(3, NB) TILE_CASE(4, NB) TILE_CASE(5, NB)          \
            TILE_CASE(6, NB)                                                                              \
        }                                                                                                 \
    }
TILES_OF_WIDTH(1) TILES_OF_WIDTH(2) TILES_OF_WIDTH(3) TILES_OF_WIDTH(4)

typedef void (*tile_fn)(const uint16_t *, long, const uint16_t *, long, long, const uint16_t *, uint16_t *, long,
                        int);
static const tile_fn TILES[TILE_VECS + 1] = {NULL, tile_nb1, tile_nb2, tile_nb3, tile_nb4};

/* One column panel of `nb` (1..4) 16-output blocks (pair-blocked weight at w) for all M rows: a thread's unit of
 * work here and in cpu_grouped_linear.c (one per (expert, panel) pair). */
void llmserve_bf16_linear_panel(const uint16_t *x, long x_stride, const uint16_t *w, long k, const uint16_t *bias,
                                uint16_t *y, long y_stride, long M, int nb) {
    if (llmserve_bf16_amx_panel(x, x_stride, w, k, bias, y, y_stride, M, nb)) return;   /* AMX tiles, if granted */
    const long k2 = (k + 1) / 2;
    for (long m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const int mr = M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS;
        const int width = REG_ACCS_PER_ROW(mr, TILE_VECS);   /* blocks per register tile */
        for (int j = 0; j < nb; j += width)
            TILES[nb - j < width ? nb - j : width](x + m0 * x_stride, x_stride, w + j * k2 * 2 * LANES,
                                                                   k, k2, bias ? bias + j * LANES : NULL,
                                                                   y + m0 * y_stride + j * LANES, y_stride, mr);
    }
}

/* y[M, n] (row stride y_stride) = x[M, k] (row stride x_stride) W^T + bias, all bfloat16, with W blocked in
 * pairs as [n/16][ceil(k/2)][16][2]. Returns 0, or -1 when n is not a multiple of 16. */
int llmserve_bf16_linear_blocked(const uint16_t *x, long x_stride, const uint16_t *w, const uint16_t *bias,
                                 uint16_t *y, long y_stride, long M, long n, long k, int num_threads) {
    if (n % LANES != 0) return -1;
    const long blocks = n / LANES, k2 = (k + 1) / 2;
    const long panels = (blocks + TILE_VECS - 1) / TILE_VECS;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (long p = 0; p < panels; p++) {
        const long first = p * TILE_VECS;
        const int nb = blocks - first < TILE_VECS ? (int)(blocks - first) : TILE_VECS;
        llmserve_bf16_linear_panel(x, x_stride, w + first * k2 * 2 * LANES, k, bias ? bias + first * LANES : NULL,
                                   y + first * LANES, y_stride, M, nb);
    }
    return 0;
}

/* Row-major weights [n][k], for a bfloat16 weight that must keep its layout (a tied LM head: the embedding
 * looks up its rows). `vdpbf16ps` multiplies adjacent pairs, and in a row-major weight the adjacent values of a
 * row are input columns 2c and 2c+1: 32 values of a weight row against the same 32 of an input row leave 16
 * partial sums of that one output, added across the lanes at the end. Tiles of up to 4 rows x 4 outputs:
 * four independent chains per row, and each weight vector serves every row of the tile. */
#define RM_ROWS 4
#define RM_OUTS 4
#define RM_STEP (2 * LANES)

/* `count` (<= 32) bfloat16 values from p, zeros after. */
static inline __attribute__((always_inline)) ivec load_pairs(const uint16_t *p, long count) {
    ivec v = (ivec){0};
    memcpy(&v, p, count * sizeof *p);
    return v;
}

/* acc += the pairwise products of 16 weight pairs and 16 input pairs. */
static inline __attribute__((always_inline)) vec dot_pairs(vec acc, ivec w, ivec x) {
#ifdef __AVX512BF16__
    return (vec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)w, (__m512bh)x);
#else
    const int high = (int)0xffff0000u;
    return acc + (vec)(w << 16) * (vec)(x << 16) + (vec)(w & high) * (vec)(x & high);
#endif
}

/* One float rounded to bfloat16 as store_bf16 rounds. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if (f != f) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

static inline __attribute__((always_inline)) void
rowmajor_step(vec acc[RM_ROWS][RM_OUTS], const uint16_t *x, long xs, const uint16_t *w, long k, long c, long count,
              const int mr, const int nr) {
    ivec wv[RM_OUTS];
    for (int j = 0; j < nr; j++) wv[j] = load_pairs(w + j * k + c, count);
    for (int m = 0; m < mr; m++) {
        const ivec xv = load_pairs(x + m * xs + c, count);
        for (int j = 0; j < nr; j++) acc[m][j] = dot_pairs(acc[m][j], wv[j], xv);
    }
}

/* `mr` rows against `nr` consecutive weight rows; constants at the call sites. */
static inline __attribute__((always_inline)) void
rowmajor_tile(const uint16_t *x, long xs, const uint16_t *w, long k, const uint16_t *bias, uint16_t *y, long ys,
              const int mr, const int nr) {
    vec acc[RM_ROWS][RM_OUTS];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nr; j++) acc[m][j] = (vec){0};
    long c = 0;
    for (; c + RM_STEP <= k; c += RM_STEP) rowmajor_step(acc, x, xs, w, k, c, RM_STEP, mr, nr);
    if (c < k) rowmajor_step(acc, x, xs, w, k, c, k - c, mr, nr);
    for (int m = 0; m < mr; m++) {
        float sums[RM_OUTS];
#ifdef HAVE_SHUFFLEVECTOR
        if (nr == RM_OUTS) {
            const vec4 s = hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
            memcpy(sums, &s, sizeof sums);
        } else
#endif
            for (int j = 0; j < nr; j++) sums[j] = hsum(acc[m][j]);
        for (int j = 0; j < nr; j++) y[m * ys + j] = float_to_bf16(sums[j] + (bias ? bf16_to_float(bias[j]) : 0.0f));
    }
}

#define RM_CASE(MR, NR) case MR: rowmajor_tile(x, xs, w, k, bias, y, ys, MR, NR); return;
#define RM_TILES_OF_WIDTH(NR)                                                                             \
    static void rowmajor_nr##NR(const uint16_t *x, long xs, const uint16_t *w, long k, const uint16_t *bias, \
                                uint16_t *y, long ys, int mr) {                                           \
        switch (mr) { RM_CASE(1, NR) RM_CASE(2, NR) RM_CASE(3, NR) RM_CASE(4, NR) }                       \
    }
RM_TILES_OF_WIDTH(1) RM_TILES_OF_WIDTH(2) RM_TILES_OF_WIDTH(3) RM_TILES_OF_WIDTH(4)

typedef void (*rowmajor_fn)(const uint16_t *, long, const uint16_t *, long, const uint16_t *, uint16_t *, long, int);
static const rowmajor_fn ROWMAJOR_TILES[RM_OUTS + 1] = {NULL, rowmajor_nr1, rowmajor_nr2, rowmajor_nr3, rowmajor_nr4};

/* y[M, n] (row stride y_stride) = x[M, k] (row stride x_stride) W^T + bias, all bfloat16, with W row-major
 * [n][k]. Any n and k. */
void llmserve_bf16_linear_rowmajor(const uint16_t *x, long x_stride, const uint16_t *w, const uint16_t *bias,
                                   uint16_t *y, long y_stride, long M, long n, long k, int num_threads) {
    const long groups = (n + RM_OUTS - 1) / RM_OUTS;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (long g = 0; g < groups; g++) {
        const long first = g * RM_OUTS;
        const int nr = n - first < RM_OUTS ? (int)(n - first) : RM_OUTS;
        for (long m0 = 0; m0 < M; m0 += RM_ROWS) {
            const int mr = M - m0 < RM_ROWS ? (int)(M - m0) : RM_ROWS;
            ROWMAJOR_TILES[nr](x + m0 * x_stride, x_stride, w + first * k, k, bias ? bias + first : NULL,
                               y + m0 * y_stride + first, y_stride, mr);
        }
    }
}

/* Whether the multiply-adds run on AVX512-BF16 (else float32 FMAs on widened weights). */
int llmserve_bf16_uses_dpbf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

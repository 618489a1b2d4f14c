/* Linear layers for CPUs: y[m, :] = W x[m, :] + b.
 *
 * `llmserve_linear_blocked` reads a weight stored blocked as [N/16][K][16] (16 output rows interleaved:
 * one vector load is one input column of 16 outputs), made once at load time. For many rows it is a
 * register-tiled GEMM (6 rows x 64 outputs per tile with AVX-512's 32 registers, 6 x 16 with AVX2's 16:
 * REG_ACCS in cpu_vec.h; broadcast inputs, no horizontal sums) that runs at
 * the speed of oneDNN on a prepacked weight, where oneDNN on a plain weight reorders it on every call;
 * for up to 8 rows it streams each 16-output block once, as a GEMV. `llmserve_linear_small_batch` is
 * the row-major GEMV for weights kept plain (a tied LM head, which the embedding also reads, or an
 * output size that is not a multiple of 16).
 *
 * At decode time with few sequences a linear layer is a matrix-vector product: every weight is read
 * from DRAM once and used for only M multiply-adds, so the speed is the speed of streaming W. oneDNN's
 * GEMV on a prepacked weight streams at ~85% of what a plain sum reads, MKL's through F.linear at a
 * third to a half; this loop (about as fast as the sum, sometimes faster) streams each thread's
 * contiguous slice of rows with software prefetch ahead of the loads (hardware prefetchers stop at
 * page boundaries) and keeps the M input rows in cache.
 *
 * Written with GCC vector extensions so the compiler emits AVX-512, AVX2 or NEON for the machine it
 * is built on (-march=native); float32 throughout.
 */
#include <stddef.h>

#include "cpu_vec.h"

#define CHUNK (4 * LANES)          /* floats per inner step: four vectors */
#define PREFETCH_AHEAD 1024        /* floats ahead of the current load (4 KiB) */
#define MAX_ROWS 8

static inline void prefetch_chunk(const float *p) {
    for (int line = 0; line < CHUNK; line += 64 / (int)sizeof(float)) __builtin_prefetch(p + line, 0, 3);
}

/* One weight row against one input row: four independent accumulators hide the FMA latency. */
static inline float row_dot(const float *w, const float *x, long k) {
    vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    long j = 0;
    for (; j + CHUNK <= k; j += CHUNK) {
        prefetch_chunk(w + j + PREFETCH_AHEAD);
        a0 += load(w + j) * load(x + j);
        a1 += load(w + j + LANES) * load(x + j + LANES);
        a2 += load(w + j + 2 * LANES) * load(x + j + 2 * LANES);
        a3 += load(w + j + 3 * LANES) * load(x + j + 3 * LANES);
    }
    float s = hsum((a0 + a1) + (a2 + a3));
    for (; j < k; j++) s += w[j] * x[j];
    return s;
}

/* One weight row against M input rows (M is a compile-time constant at every call site): each
 * weight vector is loaded once and used M times. */
static inline __attribute__((always_inline)) void
row_dots(const float *w, const float *x, long k, long x_stride, int M, float *out) {
    if (M == 1) {
        out[0] = row_dot(w, x, k);
        return;
    }
    vec acc[MAX_ROWS][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = (vec){0};
    long j = 0;
    for (; j + CHUNK <= k; j += CHUNK) {
        prefetch_chunk(w + j + PREFETCH_AHEAD);
        vec w0 = load(w + j), w1 = load(w + j + LANES), w2 = load(w + j + 2 * LANES), w3 = load(w + j + 3 * LANES);
        for (int m = 0; m < M; m++) {
            const float *xm = x + m * x_stride + j;
            acc[m][0] += w0 * load(xm) + w2 * load(xm + 2 * LANES);
            acc[m][1] += w1 * load(xm + LANES) + w3 * load(xm + 3 * LANES);
        }
    }
    for (int m = 0; m < M; m++) {
        const float *xm = x + m * x_stride;
        float s = hsum(acc[m][0] + acc[m][1]);
        for (long t = j; t < k; t++) s += w[t] * xm[t];
        out[m] = s;
    }
}

#define ROWS_CASE(M_) case M_:                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads)")                  \
    for (long i = 0; i < n; i++) {                                                         \
        float r[MAX_ROWS];                                                                 \
        row_dots(w + i * k, x, k, x_stride, M_, r);                                        \
        for (int m = 0; m < M_; m++) y[m * y_stride + i] = r[m] + (bias ? bias[i] : 0.f);  \
    }                                                                                      \
    break;

/* y[M, n] (row stride y_stride) = x[M, k] (row stride x_stride) W[n, k]^T + bias[n]; returns 0, or
 * -1 when M is outside 1..MAX_ROWS (the caller uses another path). */
int llmserve_linear_small_batch(const float *x, long x_stride, const float *w, const float *bias,
                                float *y, long y_stride, long M, long n, long k, int num_threads) {
    switch (M) {
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
        ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
        default: return -1;
    }
    return 0;
}

int llmserve_linear_max_rows(void) { return MAX_ROWS; }

/* Few rows against one 16-output block of the blocked weight (a contiguous stream of k * 16 floats):
 * the k loop is split over `na` accumulators per row so the FMA latency does not bound the stream, as many
 * as the vector registers hold (STREAM_ACCS). */
static inline __attribute__((always_inline)) void
stream_block(const float *x, long xs, const float *w, long k, const float *bias, float *y, long ys,
             const int mr, const int na) {
    rvec acc[MAX_ROWS][4 * RPARTS];
    for (int m = 0; m < mr; m++)
        for (int a = 0; a < na * RPARTS; a++) acc[m][a] = (rvec){0};
    long c = 0;
    for (; c + 4 <= k; c += 4) {
        for (int l = 0; l < 4; l++) __builtin_prefetch(w + (c + l) * LANES + PREFETCH_AHEAD, 0, 3);
        rvec b[4][RPARTS];
        for (int l = 0; l < 4; l++)
            for (int p = 0; p < RPARTS; p++) b[l][p] = rload(w + (c + l) * LANES + p * RLANES);
        for (int m = 0; m < mr; m++) {
            const float *xm = x + m * xs + c;
            for (int l = 0; l < 4; l++) {
                const rvec xl = rsplat(xm[l]);
                for (int p = 0; p < RPARTS; p++) acc[m][(l % na) * RPARTS + p] += xl * b[l][p];
            }
        }
    }
    for (; c < k; c++)
        for (int m = 0; m < mr; m++)
            for (int p = 0; p < RPARTS; p++) acc[m][p] += rsplat(x[m * xs + c]) * rload(w + c * LANES + p * RLANES);
    for (int p = 0; p < RPARTS; p++) {
        const rvec b = bias ? rload(bias + p * RLANES) : (rvec){0};
        for (int m = 0; m < mr; m++) {
            rvec sum = acc[m][p];
            for (int a = 1; a < na; a++) sum += acc[m][a * RPARTS + p];
            rstore(y + m * ys + p * RLANES, sum + b);
        }
    }
}

#define STREAM_CASE(MR, NA) case MR: stream_block(x, xs, w, k, bias, y, ys, MR, NA); return;
/* 4 accumulators per row up to 4 rows and 2 above with AVX-512; within REG_ACCS otherwise */
#ifdef __AVX512F__
#define STREAM_ACCS(MR) ((MR) <= 4 ? 4 : 2)
#else
#define STREAM_ACCS(MR) REG_ACCS_PER_ROW(MR, 4)
#endif
static void stream_rows(const float *x, long xs, const float *w, long k, const float *bias, float *y, long ys,
                        int mr) {
    switch (mr) {
        STREAM_CASE(1, STREAM_ACCS(1)) STREAM_CASE(2, STREAM_ACCS(2)) STREAM_CASE(3, STREAM_ACCS(3))
        STREAM_CASE(4, STREAM_ACCS(4)) STREAM_CASE(5, STREAM_ACCS(5)) STREAM_CASE(6, STREAM_ACCS(6))
        STREAM_CASE(7, STREAM_ACCS(7)) STREAM_CASE(8, STREAM_ACCS(8))
    }
}

#define TILE_ROWS 6
#define TILE_VECS 4                /* outputs per panel: TILE_VECS * 16, in register tiles of up to that */

/* One GEMM tile: `mr` rows of x (stride xs) against `nb` 16-output blocks of the blocked weight from `w`
 * (block stride k * 16 floats), into y (stride ys); mr and nb are constants at every call site. */
static inline __attribute__((always_inline)) void
gemm_tile(const float *x, long xs, const float *w, long k, const float *bias, float *y, long ys, const int mr,
          const int nb) {
    rvec acc[TILE_ROWS][TILE_VECS * RPARTS];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < nb * RPARTS; j++) acc[m][j] = (rvec){0};
    for (long c = 0; c < k; c++) {
        rvec b[TILE_VECS * RPARTS];
        for (int j = 0; j < nb; j++)
            for (int p = 0; p < RPARTS; p++) b[j * RPARTS + p] = rload(w + (j * k + c) * LANES + p * RLANES);
        for (int m = 0; m < mr; m++) {
            const rvec xm = rsplat(x[m * xs + c]);
            for (int j = 0; j < nb * RPARTS; j++) acc[m][j] += xm * b[j];
        }
    }
    for (int j = 0; j < nb; j++)
        for (int p = 0; p < RPARTS; p++) {
            const rvec bj = bias ? rload(bias + j * LANES + p * RLANES) : (rvec){0};
            for (int m = 0; m < mr; m++) rstore(y + m * ys + j * LANES + p * RLANES, acc[m][j * RPARTS + p] + bj);
        }
}

#define TILE_CASE(MR, NB) case MR: gemm_tile(x, xs, w, k, bias, y, ys, MR, NB); return;
#define TILES_OF_WIDTH(NB)                                                                              \
    static void tile_nb##NB(const float *x, long xs, const float *w, long k, const float *bias, float *y, \
                            long ys, int mr) {                                                          \
        switch (mr) {                                                                                   \
            TILE_CASE(1, NB) TILE_CASE(2, NB) TILE_CASE(3, NB) TILE_CASE(4, NB) TILE_CASE(5, NB)        \
            TILE_CASE(6, NB)                                                                            \
        }                                                                                               \
    }
TILES_OF_WIDTH(1) TILES_OF_WIDTH(2) TILES_OF_WIDTH(3) TILES_OF_WIDTH(4)

typedef void (*tile_fn)(const float *, long, const float *, long, const float *, float *, long, int);
static const tile_fn TILES[TILE_VECS + 1] = {NULL, tile_nb1, tile_nb2, tile_nb3, tile_nb4};

/* One column panel of `nb` (1..4) blocks of 16 outputs (blocked weight at w) for all M rows: the many-row
 * GEMM's unit of work, also run by cpu_quant_linear.c on panels it has just dequantised. */
void llmserve_linear_panel(const float *x, long x_stride, const float *w, long k, const float *bias, float *y,
                           long y_stride, long M, int nb) {
    for (long m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const int mr = M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS;
        const int width = REG_ACCS_PER_ROW(mr, TILE_VECS);   /* blocks per register tile */
        for (int j = 0; j < nb; j += width)
            TILES[nb - j < width ? nb - j : width](x + m0 * x_stride, x_stride, w + j * k * LANES, k,
                                                                   bias ? bias + j * LANES : NULL,
                                                                   y + m0 * y_stride + j * LANES, y_stride, mr);
    }
}

/* One column panel of `nb` (1..4) 16-output blocks for M rows, by the path llmserve_linear_blocked takes for M:
 * streamed block by block for up to MAX_ROWS rows, else the GEMM tiles (cpu_grouped_linear.c runs one per
 * (expert, panel) pair). */
void llmserve_linear_blocked_panel(const float *x, long x_stride, const float *w, long k, float *y, long y_stride,
                                   long M, int nb) {
    if (M > MAX_ROWS) {
        llmserve_linear_panel(x, x_stride, w, k, NULL, y, y_stride, M, nb);
        return;
    }
    for (int j = 0; j < nb; j++) stream_rows(x, x_stride, w + j * k * LANES, k, NULL, y + j * LANES, y_stride, (int)M);
}

/* y[M, n] (row stride y_stride) = x[M, k] (row stride x_stride) W^T + bias, with W blocked as
 * [n/16][k][16]. Threads take whole column panels (64 outputs) and run every row tile through them, so
 * a panel's weights come from memory once and then from cache. Returns 0, or -1 when n is not a
 * multiple of 16. */
int llmserve_linear_blocked(const float *x, long x_stride, const float *w, const float *bias, float *y,
                            long y_stride, long M, long n, long k, int num_threads) {
    if (n % LANES != 0) return -1;
    const long blocks = n / LANES;
    if (M <= MAX_ROWS) {
        #pragma omp parallel for num_threads(num_threads) schedule(static)
        for (long blk = 0; blk < blocks; blk++)
            stream_rows(x, x_stride, w + blk * k * LANES, k, bias ? bias + blk * LANES : NULL, y + blk * LANES,
                        y_stride, (int)M);
        return 0;
    }
    const long panels = (blocks + TILE_VECS - 1) / TILE_VECS;
    #pragma omp parallel for num_threads(num_threads) schedule(static)
    for (long p = 0; p < panels; p++) {
        const long first = p * TILE_VECS;
        const int nb = blocks - first < TILE_VECS ? (int)(blocks - first) : TILE_VECS;
        llmserve_linear_panel(x, x_stride, w + first * k * LANES, k, bias ? bias + first * LANES : NULL,
                              y + first * LANES, y_stride, M, nb);
    }
    return 0;
}

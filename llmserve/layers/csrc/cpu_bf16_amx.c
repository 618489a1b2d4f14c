/* bfloat16 linear layers on AMX tiles (Intel Sapphire Rapids and later). With many rows (prompts, decode steps of
 * many sequences) the vector kernel (cpu_bf16_linear.c) is bound by its multiply-adds and the tiles do about ten
 * times as many a cycle; with one row both stream the weight, the tiles no slower. Every call whose K suits
 * them runs here, so a row's output is the same whether it is alone in the call or one of many.
 *
 * The pair-blocked weight ([N/16][K/2][16][2]) is already AMX's operand layout for B: 16 consecutive input
 * pairs of one 16-output block are one 16 x 64-byte tile, contiguous. A (16 rows x 32 input columns) is read
 * straight from the activations with their row stride. Each step of the K loop loads two A and two B tiles
 * and runs four TDPBF16PS into four float32 C tiles (32 rows x 32 outputs); C goes through a small buffer to
 * add the bias and round to bfloat16 as the vector kernel does.
 *
 * Linux hands AMX's tile state to a process only when asked (arch_prctl ARCH_REQ_XCOMP_PERM): the library
 * asks once when it is loaded and, refused or built without AMX, every call falls back to the vector kernel.
 * Only K that is a multiple of 32 takes this path (a tile reads whole 32-column steps; an odd K's padding
 * column would read past the activation row). The sums are added in another order than the vector kernel's:
 * the two can differ by one bfloat16 rounding step in an output.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_M 16       /* rows of an A or C tile */
#define TILE_K 32       /* bfloat16 input columns in one A tile row (64 bytes) */

static int amx_granted;

__attribute__((constructor)) static void request_amx(void) {
    amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Palette 1: tiles 0-3 accumulate C (0, 1: the first 16 rows; 2, 3: the next), 4-5 hold A, 6-7 hold B. */
struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static void configure(int rows0, int rows1) {
    struct tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    const int c_rows[4] = {rows0, rows0, rows1, rows1};
    for (int t = 0; t < 4; t++) {
        cfg.rows[t] = (uint8_t)c_rows[t];
        cfg.colsb[t] = c_rows[t] ? LANES * sizeof(float) : 0;
    }
    cfg.rows[4] = (uint8_t)rows0, cfg.colsb[4] = TILE_K * sizeof(uint16_t);
    cfg.rows[5] = (uint8_t)rows1, cfg.colsb[5] = rows1 ? TILE_K * sizeof(uint16_t) : 0;
    for (int t = 6; t < 8; t++) cfg.rows[t] = TILE_K / 2, cfg.colsb[t] = 2 * LANES * sizeof(uint16_t);
    _tile_loadconfig(&cfg);
}

/* Rows of one C tile (in `c`, 16 floats a row) plus the bias, rounded into y. */
static void store_rows(const float *c, int rows, const uint16_t *bias, uint16_t *y, long ys) {
    const vec b = bias ? load_bf16(bias) : (vec){0};
    for (int m = 0; m < rows; m++) store_bf16(y + m * ys, load(c + m * LANES) + b);
}

/* Up to 32 rows (two_m) against one or two 16-output blocks (two_n) over all of K; constants at the call sites. */
static inline __attribute__((always_inline)) void
amx_tile(const uint16_t *x, long xs, const uint16_t *w, long block_stride, long k, const uint16_t *bias,
         uint16_t *y, long ys, int rows0, int rows1, const int two_m, const int two_n) {
    _tile_zero(0);
    if (two_n) _tile_zero(1);
    if (two_m) _tile_zero(2);
    if (two_m && two_n) _tile_zero(3);
    const long x_bytes = xs * (long)sizeof(uint16_t), w_bytes = 2 * LANES * sizeof(uint16_t);
    for (long c = 0; c < k; c += TILE_K) {
        _tile_loadd(4, x + c, x_bytes);
        _tile_loadd(6, w + c * LANES, w_bytes);   /* input pair c/2 of the block starts c/2 * 32 values in */
        if (two_n) _tile_loadd(7, w + block_stride + c * LANES, w_bytes);
        if (two_m) _tile_loadd(5, x + TILE_M * xs + c, x_bytes);
        _tile_dpbf16ps(0, 4, 6);
        if (two_n) _tile_dpbf16ps(1, 4, 7);
        if (two_m) _tile_dpbf16ps(2, 5, 6);
        if (two_m && two_n) _tile_dpbf16ps(3, 5, 7);
    }
    float c_buf[TILE_M * LANES];
    _tile_stored(0, c_buf, LANES * sizeof(float));
    store_rows(c_buf, rows0, bias, y, ys);
    if (two_n) {
        _tile_stored(1, c_buf, LANES * sizeof(float));
        store_rows(c_buf, rows0, bias ? bias + LANES : NULL, y + LANES, ys);
    }
    if (two_m) {
        _tile_stored(2, c_buf, LANES * sizeof(float));
        store_rows(c_buf, rows1, bias, y + TILE_M * ys, ys);
    }
    if (two_m && two_n) {
        _tile_stored(3, c_buf, LANES * sizeof(float));
        store_rows(c_buf, rows1, bias ? bias + LANES : NULL, y + TILE_M * ys + LANES, ys);
    }
}

int llmserve_bf16_amx_panel(const uint16_t *x, long xs, const uint16_t *w, long k, const uint16_t *bias, uint16_t *y,
                            long ys, long M, int nb) {
    if (!amx_granted || k % TILE_K != 0) return 0;
    const long block_stride = k / 2 * 2 * LANES;   /* values in one 16-output block */
    int configured0 = -1, configured1 = -1;
    for (long m0 = 0; m0 < M; m0 += 2 * TILE_M) {
        const int rows0 = M - m0 < TILE_M ? (int)(M - m0) : TILE_M;
        const long left = M - m0 - TILE_M;
        const int rows1 = left <= 0 ? 0 : left < TILE_M ? (int)left : TILE_M;
        if (rows0 != configured0 || rows1 != configured1) configure(rows0, rows1), configured0 = rows0, configured1 = rows1;
        const uint16_t *xm = x + m0 * xs;
        uint16_t *ym = y + m0 * ys;
        for (int j = 0; j < nb; j += 2) {
            const uint16_t *wj = w + j * block_stride, *bj = bias ? bias + j * LANES : NULL;
            uint16_t *yj = ym + j * LANES;
            const int two_n = j + 1 < nb;
            if (rows1 && two_n) amx_tile(xm, xs, wj, block_stride, k, bj, yj, ys, rows0, rows1, 1, 1);
            else if (rows1) amx_tile(xm, xs, wj, block_stride, k, bj, yj, ys, rows0, rows1, 1, 0);
            else if (two_n) amx_tile(xm, xs, wj, block_stride, k, bj, yj, ys, rows0, rows1, 0, 1);
            else amx_tile(xm, xs, wj, block_stride, k, bj, yj, ys, rows0, rows1, 0, 0);
        }
    }
    _tile_release();
    return 1;
}

int llmserve_bf16_uses_amx(void) { return amx_granted; }

#else

/* Built without AMX (or not on Linux): the vector kernel runs every call. */
int llmserve_bf16_amx_panel(const uint16_t *x, long xs, const uint16_t *w, long k, const uint16_t *bias, uint16_t *y,
                            long ys, long M, int nb) {
    (void)x, (void)xs, (void)w, (void)k, (void)bias, (void)y, (void)ys, (void)M, (void)nb;
    return 0;
}

int llmserve_bf16_uses_amx(void) { return 0; }

#endif

/* Grouped linear layers for mixture-of-experts: the rows of x are sorted by expert (expert e owns rows
 * offsets[e] .. offsets[e+1]-1) and each expert multiplies its own rows by its own blocked weight.
 *
 * One call per projection for all experts, one parallel region: the work is split over (expert, column panel)
 * pairs, so both threads share every expert's GEMM instead of the experts being run one after another with a
 * parallel region (and a Python call) each. At a decode step of 64 sequences an expert of a top-2-of-8 model
 * gets about 16 rows, too few to split over rows; its 64-output panels (32 per expert in the bench Mixtral's
 * gate/up) are plenty.
 * A panel is the same unit the dense blocked kernels run (cpu_linear.c, cpu_bf16_linear.c), so an expert's
 * rows see exactly the arithmetic a dense layer's would.
 */
#include <stdint.h>

#include "cpu_vec.h"

#define PANEL_BLOCKS 4   /* 16-output blocks per panel: the dense kernels' tile width */

void llmserve_linear_blocked_panel(const float *x, long x_stride, const float *w, long k, float *y, long y_stride,
                                   long M, int nb);
void llmserve_bf16_linear_panel(const uint16_t *x, long x_stride, const uint16_t *w, long k, const uint16_t *bias,
                                uint16_t *y, long y_stride, long M, int nb);

/* y[offsets[e]:offsets[e+1]] = x[offsets[e]:offsets[e+1]] W_e^T for every expert e < experts, with W the experts'
 * weights stacked and blocked as the dense kernels take them: float32 [E][n/16][k][16], or bfloat16 (bf16 != 0)
 * [E][n/16][ceil(k/2)][16][2]. x and y are float32 or bfloat16 like W; rows past offsets[experts] are not
 * touched. Returns 0, or -1 when n is not a multiple of 16 or the offsets decrease. */
int llmserve_grouped_linear(const void *x, long x_stride, const void *w, const int64_t *offsets, long experts,
                            void *y, long y_stride, long n, long k, int bf16, int num_threads) {
    if (n % LANES != 0) return -1;
    const long blocks = n / LANES, panels = (blocks + PANEL_BLOCKS - 1) / PANEL_BLOCKS;
    const long block_elems = bf16 ? (k + 1) / 2 * 2 * LANES : k * LANES;   /* one 16-output block */
    const long elem = bf16 ? 2 : 4;
    long active[experts > 0 ? experts : 1], count = 0;
    for (long e = 0; e < experts; e++) {
        if (offsets[e + 1] < offsets[e]) return -1;
        if (offsets[e + 1] > offsets[e]) active[count++] = e;
    }
    #pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (long item = 0; item < count * panels; item++) {
        const long e = active[item / panels], first = item % panels * PANEL_BLOCKS;
        const int nb = blocks - first < PANEL_BLOCKS ? (int)(blocks - first) : PANEL_BLOCKS;
        const long row = offsets[e], rows = offsets[e + 1] - row;
        const char *xe = (const char *)x + row * x_stride * elem;
        const char *we = (const char *)w + (e * blocks + first) * block_elems * elem;
        char *ye = (char *)y + (row * y_stride + first * LANES) * elem;
        if (bf16)
            llmserve_bf16_linear_panel((const uint16_t *)xe, x_stride, (const uint16_t *)we, k, NULL, (uint16_t *)ye,
                                       y_stride, rows, nb);
        else
            llmserve_linear_blocked_panel((const float *)xe, x_stride, (const float *)we, k, (float *)ye, y_stride,
                                          rows, nb);
    }
    return 0;
}

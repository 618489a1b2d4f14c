/* The row bookkeeping around a mixture-of-experts layer's grouped GEMMs, on CPU: sorting the (token, slot) rows
 * by expert with their inputs gathered, and summing the experts' outputs back into their tokens.
 *
 * Done with PyTorch ops this is about ten small ops per layer (a sort, a scatter to count, a cumulative sum, two
 * gathers, a multiply, an index_add_, a fill), each its own parallel region; on a shared machine a region whose
 * second thread is descheduled waits for it, so the bookkeeping took longer than the GEMMs in measured steps.
 * Here the sort is one serial counting pass (a decode step has a few hundred rows) and the combine is one pass
 * per token that adds its slots in float32 and rounds once.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_vec.h"

#define COMBINE_PARALLEL_MIN 65536   /* output values below which the combine runs on one thread */

/* Sort the T*K (token, slot) pairs of ids [T][K] by expert, keeping token order within an expert (a stable
 * counting sort): expert e's rows are offsets[e] .. offsets[e+1]-1 of `rows`, and row r holds x[token] (H values
 * of elem_bytes each, x rows x_stride values apart). slot_row[t*K+s] is the row of pair (t, s), or -1 for the
 * id E (an expert held by another rank: no row). Returns the number of rows, or -1 if an id is outside 0..E. */
long llmserve_moe_sort_rows(const int64_t *ids, long T, long K, long E, const void *x, long x_stride, long H,
                            long elem_bytes, void *rows, int64_t *offsets, int64_t *slot_row) {
    long next[E > 0 ? E : 1];
    for (long e = 0; e <= E; e++) offsets[e] = 0;
    for (long i = 0; i < T * K; i++) {
        if (ids[i] < 0 || ids[i] > E) return -1;
        if (ids[i] < E) offsets[ids[i] + 1]++;
    }
    for (long e = 0; e < E; e++) {
        offsets[e + 1] += offsets[e];
        next[e] = offsets[e];
    }
    const long row_bytes = H * elem_bytes;
    for (long i = 0; i < T * K; i++) {
        const long e = ids[i];
        if (e == E) {
            slot_row[i] = -1;
            continue;
        }
        const long r = next[e]++;
        slot_row[i] = r;
        memcpy((char *)rows + r * row_bytes, (const char *)x + i / K * x_stride * elem_bytes, row_bytes);
    }
    return offsets[E];
}

static inline __attribute__((always_inline)) void
combine_rows(const void *expert_out, long eo_stride, const int64_t *slot_row, const float *weights, long T, long K,
             long H, void *out, long out_stride, int num_threads, const int bf16) {
    #pragma omp parallel for num_threads(num_threads) if (T * H >= COMBINE_PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        char *o = (char *)out + t * out_stride * (bf16 ? 2 : 4);
        long h = 0;
        for (; h + LANES <= H; h += LANES) {
            vec acc = (vec){0};
            for (long s = 0; s < K; s++) {
                const long r = slot_row[t * K + s];
                if (r >= 0) acc += splat(weights[t * K + s]) * load_act(expert_out, r * eo_stride + h, bf16);
            }
            store_act(o, h, acc, bf16);
        }
        for (; h < H; h++) {
            float acc = 0.0f;
            for (long s = 0; s < K; s++) {
                const long r = slot_row[t * K + s];
                if (r >= 0) acc += weights[t * K + s] * load_act1(expert_out, r * eo_stride + h, bf16);
            }
            store_act1(o, h, acc, bf16);
        }
    }
}

/* out[t, :] = sum_s weights[t*K+s] * expert_out[slot_row[t*K+s], :] over the slots with a row (float32 sums,
 * rounded once when bf16), for every token t < T; a token without rows gets zeros. expert_out and out are
 * float32, or bfloat16 when bf16 != 0; weights float32. */
void llmserve_moe_combine(const void *expert_out, long eo_stride, const int64_t *slot_row, const float *weights,
                          long T, long K, long H, void *out, long out_stride, int bf16, int num_threads) {
    if (bf16) combine_rows(expert_out, eo_stride, slot_row, weights, T, K, H, out, out_stride, num_threads, 1);
    else combine_rows(expert_out, eo_stride, slot_row, weights, T, K, H, out, out_stride, num_threads, 0);
}

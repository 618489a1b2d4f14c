/* A layer's LoRA deltas for a whole step in one call: every adapter's shrink and expand, added into the
 * base output in place (llmserve/lora/cpu_ops.py binds it; llmserve/lora/punica.py says the layout).
 *
 * With PyTorch ops the same work is, per layer, a gather of the adapter rows, padding, one batched matmul
 * for the shrink, one per projection for the expand (each copying its strided slice of B first) and a
 * scatter-add: each its own parallel region, and on a machine whose cores are shared every region waits for
 * its slowest thread. Here it is one parallel region with one barrier, reading the rows in place and writing
 * each adapter row's output columns directly (a row belongs to one adapter, so no two threads write the same
 * element and nothing is scattered).
 *
 * Layout: A [slots, S*R, in] (slot s holds projection i's A at rows i*rank_s .. i*rank_s + rank_s);
 * B stored rank-major, [slots, R, out] (B^T of each slot: row j is column j of every projection's B), so the
 * expand adds rank-1 updates along contiguous output columns. The adapter rows are sorted by slot into
 * segments; `rows` maps a segment position to its token row (NULL: position = row).
 *
 * Activations (x, out) and slots (A, B) are each float32 or bfloat16 (`act_bf16`, `w_bf16`: constants in each
 * specialised body). Products are summed in float32 and the shrunk rows kept in float32; each output element is
 * rounded once, when the sum is stored.
 */
#include "cpu_vec.h"

#define ROW_TILE 4     /* rows per register tile, both phases */
#define A_TILE 4       /* A rows per shrink tile: 16 dot products in flight */
#define COL_VECS 4     /* output vectors per expand tile */
#define COL_TILE (COL_VECS * LANES)
#define MAX_SEGMENTS 256
/* Multiply-adds below which one thread runs the call: a parallel region ends in a barrier, and on a machine
 * whose cores are shared that barrier waits for a descheduled thread far longer than this much work takes
 * (a rank-8 decode step with 64 rows is about 7M per layer). */
#define PARALLEL_MIN_MACS (1L << 23)

/* shrunk[t][j] = x[t] . a[j] for up to ROW_TILE rows and A_TILE A rows, over k values. */
static inline __attribute__((always_inline)) void
shrink_tile(const void *const *x, int nrows, const void *a, long a_stride, int na, long k, float *shrunk,
            long shrunk_stride, const int act_bf16, const int w_bf16) {
    vec acc[ROW_TILE][A_TILE] = {{{0}}};
    long c = 0;
    if (nrows == ROW_TILE && na == A_TILE) {
        for (; c + LANES <= k; c += LANES) {
            vec av[A_TILE];
            for (int g = 0; g < A_TILE; g++) av[g] = load_act(a, g * a_stride + c, w_bf16);
            for (int t = 0; t < ROW_TILE; t++) {
                const vec xv = load_act(x[t], c, act_bf16);
                for (int g = 0; g < A_TILE; g++) acc[t][g] += xv * av[g];
            }
        }
    } else {
        for (; c + LANES <= k; c += LANES)
            for (int t = 0; t < nrows; t++) {
                const vec xv = load_act(x[t], c, act_bf16);
                for (int g = 0; g < na; g++) acc[t][g] += xv * load_act(a, g * a_stride + c, w_bf16);
            }
    }
    for (int t = 0; t < nrows; t++)
        for (int g = 0; g < na; g++) {
            float sum = hsum(acc[t][g]);
            for (long cc = c; cc < k; cc++)
                sum += load_act1(x[t], cc, act_bf16) * load_act1(a, g * a_stride + cc, w_bf16);
            shrunk[t * shrunk_stride + g] = sum;
        }
}

/* out[t][lo:hi] += sum_j shrunk[t][j] * bt[j][lo:hi] for up to ROW_TILE rows, j < rank, hi - lo <= COL_TILE. */
static inline __attribute__((always_inline)) void
expand_tile(void *const *out, int nrows, const float *const *shrunk, const void *bt, long bt_stride, int rank,
            long lo, long hi, const int act_bf16, const int w_bf16) {
    if (hi - lo == COL_TILE) {
        vec acc[ROW_TILE][COL_VECS];
        for (int t = 0; t < nrows; t++)
            for (int u = 0; u < COL_VECS; u++) acc[t][u] = load_act(out[t], lo + u * LANES, act_bf16);
        for (int j = 0; j < rank; j++) {
            vec bv[COL_VECS];
            for (int u = 0; u < COL_VECS; u++) bv[u] = load_act(bt, j * bt_stride + lo + u * LANES, w_bf16);
            for (int t = 0; t < nrows; t++) {
                const vec s = splat(shrunk[t][j]);
                for (int u = 0; u < COL_VECS; u++) acc[t][u] += s * bv[u];
            }
        }
        for (int t = 0; t < nrows; t++)
            for (int u = 0; u < COL_VECS; u++) store_act(out[t], lo + u * LANES, acc[t][u], act_bf16);
        return;
    }
    for (int t = 0; t < nrows; t++) {
        long col = lo;
        for (; col + LANES <= hi; col += LANES) {
            vec acc = load_act(out[t], col, act_bf16);
            for (int j = 0; j < rank; j++) acc += splat(shrunk[t][j]) * load_act(bt, j * bt_stride + col, w_bf16);
            store_act(out[t], col, acc, act_bf16);
        }
        for (; col < hi; col++) {
            float acc = load_act1(out[t], col, act_bf16);
            for (int j = 0; j < rank; j++) acc += shrunk[t][j] * load_act1(bt, j * bt_stride + col, w_bf16);
            store_act1(out[t], col, acc, act_bf16);
        }
    }
}

/* The segment holding work item `item` of a phase whose segment s owns items [first[s], first[s + 1]). */
static int segment_of(const long *first, int num_segments, long item) {
    int s = 0;
    while (s + 1 < num_segments && first[s + 1] <= item) s++;
    return s;
}

static inline __attribute__((always_inline)) void
lora_add(const void *x, long x_stride, void *out, long out_stride, const void *a, long a_slot_stride, const void *bt,
         long bt_slot_stride, long bt_stride, const long *slot_ranks, const long *bounds, int projections,
         const long *rows, const long *segments, int num_segments, long in_features, float *shrunk,
         long shrunk_stride, int num_threads, const int act_bf16, const int w_bf16) {
    const long act_size = act_bf16 ? 2 : 4, w_size = w_bf16 ? 2 : 4;
    /* Work items: shrink (segment, A tile, row tile), row tiles innermost so a thread keeps its A tile in L1
     * while the segment's rows stream from L2; expand (segment, column tile, row tile), likewise for B^T. */
    long shrink_first[MAX_SEGMENTS + 1], expand_first[MAX_SEGMENTS + 1];
    long col_tiles = 0;
    for (int i = 0; i < projections; i++) col_tiles += (bounds[i + 1] - bounds[i] + COL_TILE - 1) / COL_TILE;
    shrink_first[0] = expand_first[0] = 0;
    long macs = 0;
    for (int s = 0; s < num_segments; s++) {
        const long rank = slot_ranks[segments[3 * s]];
        macs += (segments[3 * s + 2] - segments[3 * s + 1]) * rank * (projections * in_features + bounds[projections]);
        const long row_tiles = rank ? (segments[3 * s + 2] - segments[3 * s + 1] + ROW_TILE - 1) / ROW_TILE : 0;
        shrink_first[s + 1] = shrink_first[s] + row_tiles * ((projections * rank + A_TILE - 1) / A_TILE);
        expand_first[s + 1] = expand_first[s] + row_tiles * col_tiles;
    }
    const long shrink_items = shrink_first[num_segments], expand_items = expand_first[num_segments];
    if (shrink_items == 0) return;
    #pragma omp parallel num_threads(num_threads) if (macs >= PARALLEL_MIN_MACS)
    {
        #pragma omp for schedule(static)
        for (long item = 0; item < shrink_items; item++) {
            const int s = segment_of(shrink_first, num_segments, item);
            const long slot = segments[3 * s], start = segments[3 * s + 1], end = segments[3 * s + 2];
            const long rank = slot_ranks[slot], width = projections * rank;
            const long row_tiles = (end - start + ROW_TILE - 1) / ROW_TILE, local = item - shrink_first[s];
            const long a_row = (local / row_tiles) * A_TILE, pos = start + (local % row_tiles) * ROW_TILE;
            const int nrows = (int)(end - pos < ROW_TILE ? end - pos : ROW_TILE);
            const int na = (int)(width - a_row < A_TILE ? width - a_row : A_TILE);
            const void *xr[ROW_TILE];
            for (int t = 0; t < nrows; t++)
                xr[t] = (const char *)x + (rows ? rows[pos + t] : pos + t) * x_stride * act_size;
            shrink_tile(xr, nrows, (const char *)a + (slot * a_slot_stride + a_row * in_features) * w_size,
                        in_features, na, in_features, shrunk + pos * shrunk_stride + a_row, shrunk_stride,
                        act_bf16, w_bf16);
        }
        #pragma omp for schedule(static)
        for (long item = 0; item < expand_items; item++) {
            const int s = segment_of(expand_first, num_segments, item);
            const long slot = segments[3 * s], start = segments[3 * s + 1], end = segments[3 * s + 2];
            const long rank = slot_ranks[slot];
            const long row_tiles = (end - start + ROW_TILE - 1) / ROW_TILE, local = item - expand_first[s];
            long tile = local / row_tiles, lo = 0, hi = 0;
            int proj = 0;
            for (; proj < projections; proj++) {   /* the column tile's projection and columns */
                const long tiles = (bounds[proj + 1] - bounds[proj] + COL_TILE - 1) / COL_TILE;
                if (tile < tiles) {
                    lo = bounds[proj] + tile * COL_TILE;
                    hi = lo + COL_TILE < bounds[proj + 1] ? lo + COL_TILE : bounds[proj + 1];
                    break;
                }
                tile -= tiles;
            }
            const long pos = start + (local % row_tiles) * ROW_TILE;
            const int nrows = (int)(end - pos < ROW_TILE ? end - pos : ROW_TILE);
            void *outr[ROW_TILE];
            const float *sr[ROW_TILE];
            for (int t = 0; t < nrows; t++) {
                outr[t] = (char *)out + (rows ? rows[pos + t] : pos + t) * out_stride * act_size;
                sr[t] = shrunk + (pos + t) * shrunk_stride + proj * rank;
            }
            expand_tile(outr, nrows, sr, (const char *)bt + slot * bt_slot_stride * w_size, bt_stride, (int)rank, lo,
                        hi, act_bf16, w_bf16);
        }
    }
}

/* Returns 0, or -1 when there are more than MAX_SEGMENTS segments. Strides are in elements. `segments` is
 * [num_segments, 3] (slot, start, end) in positions of `rows`; `slot_ranks[slot]`: the slot's rank in this
 * layer (0: skipped); `bounds` [projections + 1]: each projection's output columns; `shrunk` [positions, S*R]
 * float32 scratch. `act_bf16`, `w_bf16`: bfloat16 activations, slots (else float32). */
int llmserve_lora_add(const void *x, long x_stride, void *out, long out_stride, const void *a, long a_slot_stride,
                      const void *bt, long bt_slot_stride, long bt_stride, const long *slot_ranks,
                      const long *bounds, int projections, const long *rows, const long *segments,
                      int num_segments, long in_features, float *shrunk, long shrunk_stride, int num_threads,
                      int act_bf16, int w_bf16) {
    if (num_segments > MAX_SEGMENTS) return -1;
#define LORA_ADD(ACT, W) lora_add(x, x_stride, out, out_stride, a, a_slot_stride, bt, bt_slot_stride, bt_stride,  \
                                  slot_ranks, bounds, projections, rows, segments, num_segments, in_features,    \
                                  shrunk, shrunk_stride, num_threads, ACT, W)
    if (act_bf16) {
        if (w_bf16) LORA_ADD(1, 1); else LORA_ADD(1, 0);
    } else {
        if (w_bf16) LORA_ADD(0, 1); else LORA_ADD(0, 0);
    }
#undef LORA_ADD
    return 0;
}

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
 * B stored rank-major, [slots, R, out] (B^T of each slot: row j is column j of every projection's B; rows
 * `bt_stride` apart, which may exceed out), so the expand adds rank-1 updates along contiguous output columns.
 * The adapter rows are sorted by slot into segments; `rows` maps a segment position to its token row (NULL:
 * position = row).
 *
 * Activations (x, out) and slots (A, B) are each float32 or bfloat16 (`act_bf16`, `w_bf16`: constants in each
 * specialised body). Products are summed in float32; each output element is rounded once, when the sum is
 * stored. The shrunk rows are kept in float32, except where both are bfloat16 and the CPU has AVX512-BF16: there
 * both phases run on `vdpbf16ps` (32 bfloat16 products into 16 float32 sums per instruction, as the base
 * layers' kernels do, instead of widening every operand to float32 for FMAs), and the shrunk rows are rounded
 * to bfloat16, the expand's operand (as a bfloat16 matmul rounds them). The shrink needs no other layout: an
 * x row and an A row are both contiguous along k, so 32 of each make 16 partial sums of one dot product. The
 * expand's pairs run along the rank, while B^T's rows run along the output: two rows of B^T are interleaved in
 * registers (which leaves the columns permuted within each 128-bit lane) and the sums put back in column order
 * once per tile, so the slots keep the one layout every path reads.
 *
 * With several adapters in a decode step each adapter's slots serve a few rows, so the kernel streams A and B from
 * memory (8 adapters of rank 64 on the demo model: 167 MB a step in bfloat16) and does little work per byte. The
 * hardware prefetchers follow A (an A tile's rows are contiguous and the next tile follows them) only as far as a
 * page, and not B^T at all: a column tile reads 128 bytes of each of `rank` rows a page or more apart. So both
 * phases prefetch the next tile's lines while they compute on this one: the shrink the next A tile's rows at the
 * same k, the expand each B^T row PREFETCH_COLS columns ahead, from the first row tile of a block only (the block's
 * later row tiles reuse this column tile from L1, and the lines prefetched again by each of them evicted it).
 *
 * The float32-FMA phases use register-width vectors (`rvec`), never a 16-float `vec` in a register tile: without
 * AVX-512 the compiler keeps a `vec` on the stack. The dtypes are picked inside the parallel region (an OpenMP
 * region is outlined before anything is inlined into it, so a dtype tested outside it stays a variable inside).
 */
#include "cpu_vec.h"

#ifdef __AVX512BF16__
#define DPBF16 1
#else
#define DPBF16 0
#endif

#define ROW_TILE 4     /* rows per register tile, both phases */
#define A_TILE 4       /* A rows per shrink tile: 16 dot products in flight */
#define ROW_BLOCK 16   /* row tiles a phase runs past each tile of A or B^T before the next rows: 64 rows */
#define COL_VECS 4     /* output vectors per expand tile */
#define COL_TILE (COL_VECS * LANES)
#define MAX_SEGMENTS 256
#define PREFETCH_COLS (2 * COL_TILE)   /* how far ahead of its column tile the expand prefetches B^T's rows */
/* The float32-FMA phases work on register-width vectors (`rvec`: 8 floats on AVX2, where a 16-float `vec` would
 * live on the stack) in passes whose accumulators fit the registers: with 32 registers (AVX-512, NEON) 4 rows x
 * 4 A rows, 4 rows x 4 vectors of columns (AVX-512: the whole tile); with AVX2's 16, 4 x 2 and 4 x 2. */
#if REG_ACCS >= 16
#define SHRINK_PASS A_TILE
#define EXPAND_PASS 4
#else
#define SHRINK_PASS 2
#define EXPAND_PASS 2
#endif
/* Multiply-adds below which one thread runs the call: a parallel region ends in a barrier, and on a machine
 * whose cores are shared that barrier waits for a descheduled thread far longer than this much work takes (a
 * rank-8 call at 64 decode rows is 1-3M). Above it one thread would take a few hundred microseconds, which a
 * second thread halves: a rank-64 o_proj at 64 rows (4.2M on a hidden size of 512, 6.3M on 768) run on one
 * thread took a fifth of the step's LoRA time. */
#define PARALLEL_MIN_MACS (1L << 22)

/* Pins a loaded vector in a register. Without it GCC folds the load into each FMA that uses the value, as a memory
 * operand: the shrink then read each x vector once per A row of its pass and the expand each B^T vector once per
 * row, twice the loads the FMAs need, and on AVX2 (two 256-bit loads a cycle) the loads, not the FMAs, set the
 * pace. An empty asm that "changes" the register leaves the compiler nothing to reload from. */
#if defined(__x86_64__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

/* Prefetches element `i` of a float32 or bfloat16 (`bf16`) array: a line the next tile reads (prefetches never
 * fault, so one past the slots' end is harmless). */
static inline __attribute__((always_inline)) void prefetch_element(const void *p, long i, const int bf16) {
    __builtin_prefetch((const char *)p + i * (bf16 ? 2 : 4), 0, 3);
}

/* shrunk[t][j] = x[t] . a[j] for up to ROW_TILE rows and A_TILE A rows, over k values: SHRINK_PASS A rows at a
 * time, so that the pass's accumulators stay in registers (the x rows are read again from L1 per pass). */
static inline __attribute__((always_inline)) void
shrink_tile(const void *const *x, int nrows, const void *a, long a_stride, int na, long k, float *shrunk,
            long shrunk_stride, const int act_bf16, const int w_bf16) {
    const long vk = k / RLANES * RLANES;
    for (int g0 = 0; g0 < na; g0 += SHRINK_PASS) {
        const int ng = na - g0 < SHRINK_PASS ? na - g0 : SHRINK_PASS;
        const void *ag = (const char *)a + g0 * a_stride * (w_bf16 ? 2 : 4);
        rvec acc[ROW_TILE][SHRINK_PASS] = {{{0}}};
        if (nrows == ROW_TILE && ng == SHRINK_PASS) {
            for (long c = 0; c < vk; c += RLANES) {
                rvec av[SHRINK_PASS];
                for (int g = 0; g < SHRINK_PASS; g++) av[g] = rload_act(ag, g * a_stride + c, w_bf16);
                if (c % LANES == 0)   /* a line per row every LANES values */
                    for (int g = 0; g < SHRINK_PASS; g++) prefetch_element(ag, (A_TILE + g) * a_stride + c, w_bf16);
                for (int t = 0; t < ROW_TILE; t++) {
                    rvec xv = rload_act(x[t], c, act_bf16);
                    IN_REGISTER(xv);
                    for (int g = 0; g < SHRINK_PASS; g++) acc[t][g] += xv * av[g];
                }
            }
        } else {
            for (long c = 0; c < vk; c += RLANES)
                for (int t = 0; t < nrows; t++) {
                    const rvec xv = rload_act(x[t], c, act_bf16);
                    for (int g = 0; g < ng; g++) acc[t][g] += xv * rload_act(ag, g * a_stride + c, w_bf16);
                }
        }
        for (int t = 0; t < nrows; t++)
            for (int g = 0; g < ng; g++) {
                float sum = rhsum(acc[t][g]);
                for (long cc = vk; cc < k; cc++)
                    sum += load_act1(x[t], cc, act_bf16) * load_act1(ag, g * a_stride + cc, w_bf16);
                shrunk[t * shrunk_stride + g0 + g] = sum;
            }
    }
}

/* x in every lane (rsplat adds x to a zero vector, an addition the compiler must keep: -0 + 0 is +0). */
static inline __attribute__((always_inline)) rvec broadcast(float x) {
#if RLANES == 16
    return (rvec){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#elif RLANES == 8
    return (rvec){x, x, x, x, x, x, x, x};
#else
    return (rvec){x, x, x, x};
#endif
}

/* out[t][lo:hi] += sum_j shrunk[t][j] * bt[j][lo:hi] for up to ROW_TILE rows, j < rank, hi - lo <= COL_TILE;
 * the shrunk rows float32, or bfloat16 (`s_bf16`). A full tile goes EXPAND_PASS register vectors of columns
 * at a time (its accumulators in registers), the rows' shrunk values first gathered rank-major into one array
 * (one pointer in the loop instead of one per row), the rest one vector (then one column) per row. */
static inline __attribute__((always_inline)) void
expand_tile(void *const *out, int nrows, const void *const *shrunk, const void *bt, long bt_stride, int rank,
            long lo, long hi, int prefetch, const int act_bf16, const int w_bf16, const int s_bf16) {
    if (hi - lo == COL_TILE) {
        float sv[rank * ROW_TILE];
        for (int j = 0; j < rank; j++)
            for (int t = 0; t < nrows; t++) sv[j * ROW_TILE + t] = load_act1(shrunk[t], j, s_bf16);
        for (long p = lo; p < hi; p += EXPAND_PASS * RLANES) {
            rvec acc[ROW_TILE][EXPAND_PASS];
            for (int t = 0; t < nrows; t++)
                for (int u = 0; u < EXPAND_PASS; u++) acc[t][u] = rload_act(out[t], p + u * RLANES, act_bf16);
            for (int j = 0; j < rank; j++) {
                rvec bv[EXPAND_PASS];
                for (int u = 0; u < EXPAND_PASS; u++) {
                    bv[u] = rload_act(bt, j * bt_stride + p + u * RLANES, w_bf16);
                    IN_REGISTER(bv[u]);
                }
                if (prefetch && (p - lo) % LANES == 0)   /* a line per row every LANES columns */
                    for (int u = 0; u < EXPAND_PASS * RLANES / LANES; u++)
                        prefetch_element(bt, j * bt_stride + p + PREFETCH_COLS + u * LANES, w_bf16);
                for (int t = 0; t < nrows; t++) {
                    const rvec s = broadcast(sv[j * ROW_TILE + t]);
                    for (int u = 0; u < EXPAND_PASS; u++) acc[t][u] += s * bv[u];
                }
            }
            for (int t = 0; t < nrows; t++)
                for (int u = 0; u < EXPAND_PASS; u++) rstore_act(out[t], p + u * RLANES, acc[t][u], act_bf16);
        }
        return;
    }
    for (int t = 0; t < nrows; t++) {
        long col = lo;
        for (; col + RLANES <= hi; col += RLANES) {
            rvec acc = rload_act(out[t], col, act_bf16);
            for (int j = 0; j < rank; j++)
                acc += rsplat(load_act1(shrunk[t], j, s_bf16)) * rload_act(bt, j * bt_stride + col, w_bf16);
            rstore_act(out[t], col, acc, act_bf16);
        }
        for (; col < hi; col++) {
            float acc = load_act1(out[t], col, act_bf16);
            for (int j = 0; j < rank; j++)
                acc += load_act1(shrunk[t], j, s_bf16) * load_act1(bt, j * bt_stride + col, w_bf16);
            store_act1(out[t], col, acc, act_bf16);
        }
    }
}

#if DPBF16
/* `count` (<= 32) bfloat16 values from p, zeros after: 16 pairs for vdpbf16ps. */
static inline __attribute__((always_inline)) __m512i load_pairs(const uint16_t *p, long count) {
    return count == 2 * LANES ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1u << count) - 1), p);
}

/* 32 (or `count`) values of k: each x row's pairs against each A row's. */
static inline __attribute__((always_inline)) void
shrink_step_dp(__m512 acc[ROW_TILE][A_TILE], const uint16_t *const *x, const int nrows, const uint16_t *a,
               long a_stride, const int na, long c, long count) {
    __m512i av[A_TILE];
    for (int g = 0; g < na; g++) av[g] = load_pairs(a + g * a_stride + c, count);
    for (int g = 0; g < na; g++) __builtin_prefetch(a + (A_TILE + g) * a_stride + c, 0, 3);
    for (int t = 0; t < nrows; t++) {
        const __m512bh xv = (__m512bh)load_pairs(x[t] + c, count);
        for (int g = 0; g < na; g++) acc[t][g] = _mm512_dpbf16_ps(acc[t][g], xv, (__m512bh)av[g]);
    }
}

/* shrink_tile on vdpbf16ps, bfloat16 x and A: the sums rounded to bfloat16 into `shrunk`. */
static inline __attribute__((always_inline)) void
shrink_tile_dp(const uint16_t *const *x, const int nrows, const uint16_t *a, long a_stride, const int na, long k,
               uint16_t *shrunk, long shrunk_stride) {
    __m512 acc[ROW_TILE][A_TILE];
    for (int t = 0; t < nrows; t++)
        for (int g = 0; g < na; g++) acc[t][g] = _mm512_setzero_ps();
    long c = 0;
    for (; c + 2 * LANES <= k; c += 2 * LANES) shrink_step_dp(acc, x, nrows, a, a_stride, na, c, 2 * LANES);
    if (c < k) shrink_step_dp(acc, x, nrows, a, a_stride, na, c, k - c);
    for (int t = 0; t < nrows; t++) {
        float sums[A_TILE];
#ifdef HAVE_SHUFFLEVECTOR
        if (na == A_TILE) {
            const vec4 s = hsum4((vec)acc[t][0], (vec)acc[t][1], (vec)acc[t][2], (vec)acc[t][3]);
            memcpy(sums, &s, sizeof sums);
        } else
#endif
            for (int g = 0; g < na; g++) sums[g] = hsum((vec)acc[t][g]);
        for (int g = 0; g < na; g++) store_act1(shrunk, t * shrunk_stride + g, sums[g], 1);
    }
}

/* expand_tile on vdpbf16ps for a full column tile (COL_TILE columns from lo), bfloat16 shrunk rows, B^T and out.
 * Rows j and j+1 of B^T interleaved by 16-bit unpacks pair each column's two values, for the columns
 * {8L + i} (low unpack) and {8L + 4 + i} (high unpack), L the 128-bit lane and i < 4, of each 32 columns; the
 * shrunk pair (s[j], s[j+1]) is broadcast to every lane. An odd rank's last j is paired with zeros. */
static inline __attribute__((always_inline)) void
expand_tile_dp(void *const *out, const int nrows, const uint16_t *const *shrunk, const uint16_t *bt, long bt_stride,
               int rank, long lo, int prefetch) {
    __m512 acc[ROW_TILE][COL_VECS];
    for (int t = 0; t < nrows; t++)
        for (int u = 0; u < COL_VECS; u++) acc[t][u] = _mm512_setzero_ps();
    for (int j = 0; j < rank; j += 2) {
        const int pair = j + 1 < rank;
        __m512i bv[COL_VECS];
        for (int h = 0; h < COL_VECS / 2; h++) {
            const uint16_t *row = bt + j * bt_stride + lo + h * 2 * LANES;
            if (prefetch) {
                __builtin_prefetch(row + PREFETCH_COLS, 0, 3);
                if (pair) __builtin_prefetch(row + bt_stride + PREFETCH_COLS, 0, 3);
            }
            const __m512i first = _mm512_loadu_si512(row);
            const __m512i second = pair ? _mm512_loadu_si512(row + bt_stride) : _mm512_setzero_si512();
            bv[2 * h] = _mm512_unpacklo_epi16(first, second);
            bv[2 * h + 1] = _mm512_unpackhi_epi16(first, second);
        }
        for (int t = 0; t < nrows; t++) {
            uint32_t s = shrunk[t][j];
            if (pair) memcpy(&s, shrunk[t] + j, sizeof s);
            const __m512bh sv = (__m512bh)_mm512_set1_epi32((int)s);
            for (int u = 0; u < COL_VECS; u++) acc[t][u] = _mm512_dpbf16_ps(acc[t][u], (__m512bh)bv[u], sv);
        }
    }
    /* Column order back: of each 32 columns' two sums (low, high unpack), lanes 0-15 and 16-31. */
    const __m512i first_half = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second_half = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int t = 0; t < nrows; t++)
        for (int h = 0; h < COL_VECS / 2; h++) {
            const long col = lo + h * 2 * LANES;
            const vec d0 = (vec)_mm512_permutex2var_ps(acc[t][2 * h], first_half, acc[t][2 * h + 1]);
            const vec d1 = (vec)_mm512_permutex2var_ps(acc[t][2 * h], second_half, acc[t][2 * h + 1]);
            store_act(out[t], col, load_act(out[t], col, 1) + d0, 1);
            store_act(out[t], col + LANES, load_act(out[t], col + LANES, 1) + d1, 1);
        }
}
#endif

/* Of a segment's `row_tiles` x `inner` work items, taken in blocks of ROW_BLOCK row tiles: item `local`'s inner
 * index (returned) and row tile. */
static inline long blocked_item(long local, long row_tiles, long inner, long *row_tile) {
    const long first = local / (ROW_BLOCK * inner) * ROW_BLOCK, within = local - first * inner;
    const long tiles = row_tiles - first < ROW_BLOCK ? row_tiles - first : ROW_BLOCK;
    *row_tile = first + within % tiles;
    return within / tiles;
}

/* The segment holding work item `item` of a phase whose segment s owns items [first[s], first[s + 1]). */
static int segment_of(const long *first, int num_segments, long item) {
    int s = 0;
    while (s + 1 < num_segments && first[s + 1] <= item) s++;
    return s;
}

/* One call's arguments and its work-item tables (see llmserve_lora_add). */
typedef struct {
    const void *x, *a, *bt;
    void *out, *shrunk;
    long x_stride, out_stride, a_slot_stride, bt_slot_stride, bt_stride, in_features, shrunk_stride, col_tiles;
    const long *slot_ranks, *bounds, *rows, *segments;
    int projections, num_segments;
    long shrink_first[MAX_SEGMENTS + 1], expand_first[MAX_SEGMENTS + 1];
} lora_job;

/* Where a phase's work item lies: its segment's slot, rows [start, end) and rank, the segment's row tiles, and
 * the item's index within the segment. */
typedef struct {
    long slot, start, end, rank, row_tiles, local;
} item_place;

static inline item_place place_of(const lora_job *j, const long *first, long item) {
    const int s = segment_of(first, j->num_segments, item);
    const long slot = j->segments[3 * s], start = j->segments[3 * s + 1], end = j->segments[3 * s + 2];
    return (item_place){slot, start, end, j->slot_ranks[slot], (end - start + ROW_TILE - 1) / ROW_TILE,
                        item - first[s]};
}

/* Shrink work item `item`: rows of a segment against a tile of its A, into `shrunk`. */
static inline __attribute__((always_inline)) void
shrink_item(const lora_job *j, long item, const int act_bf16, const int w_bf16) {
    const int dp = DPBF16 && act_bf16 && w_bf16;
    const long act_size = act_bf16 ? 2 : 4, w_size = w_bf16 ? 2 : 4, s_size = dp ? 2 : 4;
    const item_place at = place_of(j, j->shrink_first, item);
    const long slot = at.slot, width = j->projections * at.rank, k = j->in_features;
    long row_tile;
    const long a_row = blocked_item(at.local, at.row_tiles, (width + A_TILE - 1) / A_TILE, &row_tile) * A_TILE;
    const long pos = at.start + row_tile * ROW_TILE;
    const int nrows = (int)(at.end - pos < ROW_TILE ? at.end - pos : ROW_TILE);
    const int na = (int)(width - a_row < A_TILE ? width - a_row : A_TILE);
    const void *xr[ROW_TILE];
    for (int t = 0; t < nrows; t++)
        xr[t] = (const char *)j->x + (j->rows ? j->rows[pos + t] : pos + t) * j->x_stride * act_size;
    const void *ar = (const char *)j->a + (slot * j->a_slot_stride + a_row * k) * w_size;
    void *sr = (char *)j->shrunk + (pos * j->shrunk_stride + a_row) * s_size;
#if DPBF16
    if (dp) {
        const uint16_t *const *xh = (const uint16_t *const *)xr;
        if (nrows == ROW_TILE && na == A_TILE) shrink_tile_dp(xh, ROW_TILE, ar, k, A_TILE, k, sr, j->shrunk_stride);
        else shrink_tile_dp(xh, nrows, ar, k, na, k, sr, j->shrunk_stride);
        return;
    }
#endif
    shrink_tile(xr, nrows, ar, k, na, k, sr, j->shrunk_stride, act_bf16, w_bf16);
}

/* Expand work item `item`: a column tile of a segment's B^T into its rows' outputs. */
static inline __attribute__((always_inline)) void
expand_item(const lora_job *j, long item, const int act_bf16, const int w_bf16) {
    const int dp = DPBF16 && act_bf16 && w_bf16;
    const long act_size = act_bf16 ? 2 : 4, w_size = w_bf16 ? 2 : 4, s_size = dp ? 2 : 4;
    const item_place at = place_of(j, j->expand_first, item);
    const long slot = at.slot, rank = at.rank;
    long row_tile, tile = blocked_item(at.local, at.row_tiles, j->col_tiles, &row_tile), lo = 0, hi = 0;
    int proj = 0;
    for (; proj < j->projections; proj++) {   /* the column tile's projection and columns */
        const long tiles = (j->bounds[proj + 1] - j->bounds[proj] + COL_TILE - 1) / COL_TILE;
        if (tile < tiles) {
            lo = j->bounds[proj] + tile * COL_TILE;
            hi = lo + COL_TILE < j->bounds[proj + 1] ? lo + COL_TILE : j->bounds[proj + 1];
            break;
        }
        tile -= tiles;
    }
    const long pos = at.start + row_tile * ROW_TILE;
    const int nrows = (int)(at.end - pos < ROW_TILE ? at.end - pos : ROW_TILE);
    void *outr[ROW_TILE];
    const void *sr[ROW_TILE];
    for (int t = 0; t < nrows; t++) {
        outr[t] = (char *)j->out + (j->rows ? j->rows[pos + t] : pos + t) * j->out_stride * act_size;
        sr[t] = (const char *)j->shrunk + ((pos + t) * j->shrunk_stride + proj * rank) * s_size;
    }
    const void *bts = (const char *)j->bt + slot * j->bt_slot_stride * w_size;
    const int prefetch = row_tile % ROW_BLOCK == 0;   /* the block's later row tiles find this tile's B^T in L1 */
#if DPBF16
    if (dp && hi - lo == COL_TILE) {
        const uint16_t *const *sh = (const uint16_t *const *)sr;
        if (nrows == ROW_TILE) expand_tile_dp(outr, ROW_TILE, sh, bts, j->bt_stride, (int)rank, lo, prefetch);
        else expand_tile_dp(outr, nrows, sh, bts, j->bt_stride, (int)rank, lo, prefetch);
        return;
    }
#endif
    const long bs = j->bt_stride;
    if (nrows == ROW_TILE) expand_tile(outr, ROW_TILE, sr, bts, bs, (int)rank, lo, hi, prefetch, act_bf16, w_bf16, dp);
    else expand_tile(outr, nrows, sr, bts, bs, (int)rank, lo, hi, prefetch, act_bf16, w_bf16, dp);
}

/* Both phases' work items, shared among the threads of the enclosing parallel region (the shrink's barrier
 * before the expand reads its sums). */
static inline __attribute__((always_inline)) void lora_items(const lora_job *j, const int act_bf16, const int w_bf16) {
    const long shrink_items = j->shrink_first[j->num_segments], expand_items = j->expand_first[j->num_segments];
    #pragma omp for schedule(static)
    for (long item = 0; item < shrink_items; item++) shrink_item(j, item, act_bf16, w_bf16);
    #pragma omp for schedule(static)
    for (long item = 0; item < expand_items; item++) expand_item(j, item, act_bf16, w_bf16);
}

/* Returns 0, or -1 when there are more than MAX_SEGMENTS segments. Strides are in elements. `segments` is
 * [num_segments, 3] (slot, start, end) in positions of `rows`; `slot_ranks[slot]`: the slot's rank in this
 * layer (0: skipped); `bounds` [projections + 1]: each projection's output columns; `shrunk` [positions, S*R]
 * float32 scratch (used as bfloat16 with the same row stride on the vdpbf16ps path). `act_bf16`, `w_bf16`: bfloat16
 * activations, slots (else float32).
 *
 * Work items: shrink (segment, block of ROW_BLOCK row tiles, A tile, row tile), so a thread keeps its A tile in
 * L1 while a block's rows come from L2 (a long segment's rows, streamed whole past every A tile, would come from
 * memory); expand (segment, block, column tile, row tile), a column tile of B^T in L1 and the block's output rows
 * walked along their columns. */
int llmserve_lora_add(const void *x, long x_stride, void *out, long out_stride, const void *a, long a_slot_stride,
                      const void *bt, long bt_slot_stride, long bt_stride, const long *slot_ranks,
                      const long *bounds, int projections, const long *rows, const long *segments,
                      int num_segments, long in_features, void *shrunk, long shrunk_stride, int num_threads,
                      int act_bf16, int w_bf16) {
    if (num_segments > MAX_SEGMENTS) return -1;
    lora_job j = {x, a, bt, out, shrunk, x_stride, out_stride, a_slot_stride, bt_slot_stride, bt_stride,
                  in_features, shrunk_stride, 0, slot_ranks, bounds, rows, segments, projections, num_segments,
                  {0}, {0}};
    for (int i = 0; i < projections; i++) j.col_tiles += (bounds[i + 1] - bounds[i] + COL_TILE - 1) / COL_TILE;
    long macs = 0;
    for (int s = 0; s < num_segments; s++) {
        const long rank = slot_ranks[segments[3 * s]];
        macs += (segments[3 * s + 2] - segments[3 * s + 1]) * rank * (projections * in_features + bounds[projections]);
        const long row_tiles = rank ? (segments[3 * s + 2] - segments[3 * s + 1] + ROW_TILE - 1) / ROW_TILE : 0;
        j.shrink_first[s + 1] = j.shrink_first[s] + row_tiles * ((projections * rank + A_TILE - 1) / A_TILE);
        j.expand_first[s + 1] = j.expand_first[s] + row_tiles * j.col_tiles;
    }
    if (j.shrink_first[num_segments] == 0) return 0;
    #pragma omp parallel num_threads(num_threads) if (macs >= PARALLEL_MIN_MACS)
    {
        if (act_bf16 && w_bf16) lora_items(&j, 1, 1);
        else if (act_bf16) lora_items(&j, 1, 0);
        else if (w_bf16) lora_items(&j, 0, 1);
        else lora_items(&j, 0, 0);
    }
    return 0;
}

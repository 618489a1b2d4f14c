/* Paged decode attention for CPUs: one new query token per sequence, attending over the sequence's
 * K/V blocks where they lie in the cache.
 *
 * Doing this with tensor ops means gathering every sequence's blocks into a padded contiguous copy and
 * then running a one-query SDPA over it: the context is read twice and written once, and the padding
 * is computed too. Here each work item (a sequence, or one KV head of it when there are few sequences)
 * walks the block table, prefetching the rows a few tokens ahead, scores every query head sharing a KV
 * head against each key as it is read (grouped-query attention reads K/V once per group, not once per
 * query head), takes an exact softmax over the scores with a vectorised exp, then accumulates the
 * values. Items are spread over the OpenMP threads dynamically, since context lengths differ. float32; caches are [num_blocks, block_size, num_kv_heads, head_dim],
 * contiguous. Head sizes that are a multiple of 16 take the vector path, others a scalar one.
 *
 * A sliding window (`window` > 0) makes a sequence of length n attend only its last `window` tokens,
 * positions [n - window, n): the walk simply starts there. A logit soft-cap (`soft_cap` > 0, Gemma 2)
 * replaces each scaled score s by soft_cap * tanh(s / soft_cap) in one pass over the scores before the
 * softmax. ALiBi (`alibi_slopes` non-NULL, one slope per query head: BLOOM, Falcon) then adds
 * slope * (key position - query position) to each score in the same pass. None of them adds work inside
 * the token loops when unused.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_vec.h"

#define MAX_VECS 36   /* head_dim up to 576 on the vector path (MLA: a 512 latent + 64 rope dims) */

/* Gemma 2's logit soft-cap over `n` scores, in place: cap * tanh(s / cap), vectorised as
 * sign(y) (1 - e) / (1 + e) with e = exp(-2 |y|) <= 1 (no overflow; absolute error ~1e-7 * cap). */
static void soft_cap_scores(float *scores, long n, float cap) {
    const float inv = 1.0f / cap;
    const ivec sign_bit = (ivec){0} + (int)0x80000000u;
    long i = 0;
    for (; i + LANES <= n; i += LANES) {
        const vec y = load(scores + i) * inv;
        const ivec sign = (ivec)y & sign_bit;
        const vec e = vexp_nonpositive((vec)((ivec)y | sign_bit) * 2.0f);   /* exp(-2 |y|) */
        const vec t = (splat(1.0f) - e) / (splat(1.0f) + e);
        store(scores + i, (vec)((ivec)t | sign) * cap);
    }
    for (; i < n; i++) scores[i] = cap * tanhf(scores[i] * inv);
}

/* ALiBi over `rows` rows of scores: row r, entry t gets slopes[r] * (first_distance + t), the distance from
 * the query to key t (first_distance <= 0 for the first key attended). */
static void alibi_scores(float *scores, long rows, long len, long stride, const float *slopes,
                         long first_distance) {
    for (long r = 0; r < rows; r++) {
        float *s = scores + r * stride;
        const float slope = slopes[r];
        for (long t = 0; t < len; t++) s[t] += slope * (float)(first_distance + t);
    }
}

/* Softmax over each of the `rows` rows of `scores` (row stride `stride`, `len` valid entries), soft-capped
 * first when `soft_cap` > 0, then ALiBi-biased when `slopes` is set (here rather than at the callers: a call
 * between their token loops costs the common, plain path a few percent at short contexts). */
static void softmax_rows(float *scores, long rows, long len, long stride, float soft_cap, const float *slopes,
                         long first_distance) {
    if (soft_cap > 0.0f) soft_cap_scores(scores, rows * stride, soft_cap);
    if (slopes != NULL) alibi_scores(scores, rows, len, stride, slopes, first_distance);
    for (long r = 0; r < rows; r++) {
        float *s = scores + r * stride;
        float m = -INFINITY;
        long t = 0;
        vec vm = splat(-INFINITY);
        for (; t + LANES <= len; t += LANES) vm = vmax(vm, load(s + t));
        for (long i = 0; i < LANES; i++) m = vm[i] > m ? vm[i] : m;
        for (; t < len; t++) m = s[t] > m ? s[t] : m;
        vec vs = {0};
        for (t = 0; t + LANES <= len; t += LANES) {
            vec e = vexp_nonpositive(load(s + t) - m);
            store(s + t, e);
            vs += e;
        }
        float sum = hsum(vs);
        for (; t < len; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
        const float inv = 1.0f / sum;
        for (t = 0; t < len; t++) s[t] *= inv;
    }
}

/* Where token t of a sequence lies in a cache, for KV head 0. */
static inline const float *token_row(const float *cache, const int *table, long t, long block_size,
                                     long token_stride) {
    return cache + (table[t / block_size] * block_size + t % block_size) * token_stride;
}

/* Prefetch the slice [first, first + count) floats of token t's row, if t is in the sequence: rows of
 * consecutive tokens lie apart (one per slot, blocks scattered), so the hardware prefetchers miss them. */
static inline void prefetch_row(const float *cache, const int *table, long t, long seq_len, long block_size,
                                long token_stride, long first, long count) {
    if (t >= seq_len) return;
    const float *row = token_row(cache, table, t, block_size, token_stride) + first;
    for (long i = 0; i < count; i += 64 / (long)sizeof(float)) __builtin_prefetch(row + i, 0, 3);
}

#define PREFETCH_TOKENS 4   /* how far ahead rows are prefetched */

/* The vector path: head_dim = nv * 16 (`nv` is a constant at the call sites that matter: 4, 8), for the
 * query heads of KV heads [kv_head, kv_head + kv_count): `q` and `out` point at the first of them. Keys
 * [start, seq_len) are attended (start > 0 under a sliding window); `scores` has rows of seq_len - start.
 * `slopes`: the ALiBi slopes of those query heads, or NULL. */
static inline __attribute__((always_inline)) void
attend_vec(const float *q, const float *k_cache, const float *v_cache, const int *table, long start, long seq_len,
           long group, long kv_head, long kv_count, long num_kv_heads, long block_size, float scale,
           float soft_cap, const float *slopes, float *scores, float *out, const int nv) {
    const long head_dim = nv * LANES;
    const long token_stride = num_kv_heads * head_dim;
    const long first = kv_head * head_dim, count = kv_count * head_dim;
    const long rows = kv_count * group;   /* query heads attended: score rows */
    const long len = seq_len - start;   /* t below counts from the window's start */
    for (long t = 0; t < len; t++) {
        prefetch_row(k_cache, table, start + t + PREFETCH_TOKENS, seq_len, block_size, token_stride, first, count);
        const float *k = token_row(k_cache, table, start + t, block_size, token_stride) + first;
        for (long h = 0; h < kv_count; h++, k += head_dim) {
            vec kv[MAX_VECS];
            for (int c = 0; c < nv; c++) kv[c] = load(k + c * LANES);
            for (long g = 0; g < group; g++) {
                const float *qh = q + (h * group + g) * head_dim;
                vec acc = kv[0] * load(qh);
                for (int c = 1; c < nv; c++) acc += kv[c] * load(qh + c * LANES);
                scores[(h * group + g) * len + t] = hsum(acc) * scale;
            }
        }
    }
    softmax_rows(scores, rows, len, len, soft_cap, slopes, start - (seq_len - 1));
    memset(out, 0, sizeof(float) * rows * head_dim);
    for (long t = 0; t < len; t++) {
        prefetch_row(v_cache, table, start + t + PREFETCH_TOKENS, seq_len, block_size, token_stride, first, count);
        const float *v = token_row(v_cache, table, start + t, block_size, token_stride) + first;
        for (long h = 0; h < kv_count; h++, v += head_dim) {
            vec vv[MAX_VECS];
            for (int c = 0; c < nv; c++) vv[c] = load(v + c * LANES);
            for (long g = 0; g < group; g++) {
                const vec p = splat(scores[(h * group + g) * len + t]);
                float *oh = out + (h * group + g) * head_dim;
                for (int c = 0; c < nv; c++) store(oh + c * LANES, load(oh + c * LANES) + p * vv[c]);
            }
        }
    }
}

/* The scalar path, for head sizes that are not a multiple of 16 (same arguments). */
static void attend_scalar(const float *q, const float *k_cache, const float *v_cache, const int *table,
                          long start, long seq_len, long group, long kv_head, long kv_count, long num_kv_heads,
                          long head_dim, long block_size, float scale, float soft_cap, const float *slopes,
                          float *scores, float *out) {
    const long token_stride = num_kv_heads * head_dim;
    const long rows = kv_count * group;
    const long len = seq_len - start;
    for (long t = start; t < seq_len; t++) {
        const float *k = token_row(k_cache, table, t, block_size, token_stride) + kv_head * head_dim;
        for (long r = 0; r < rows; r++) {
            const float *kh = k + (r / group) * head_dim;
            float s = 0.f;
            for (long d = 0; d < head_dim; d++) s += q[r * head_dim + d] * kh[d];
            scores[r * len + (t - start)] = s * scale;
        }
    }
    softmax_rows(scores, rows, len, len, soft_cap, slopes, start - (seq_len - 1));
    memset(out, 0, sizeof(float) * rows * head_dim);
    for (long t = start; t < seq_len; t++) {
        const float *v = token_row(v_cache, table, t, block_size, token_stride) + kv_head * head_dim;
        for (long r = 0; r < rows; r++)
            for (long d = 0; d < head_dim; d++) out[r * head_dim + d] += scores[r * len + (t - start)] * v[(r / group) * head_dim + d];
    }
}

static void attend_one(const float *q, const float *k_cache, const float *v_cache, const int *table,
                       long start, long seq_len, long group, long kv_head, long kv_count, long num_kv_heads,
                       long head_dim, long block_size, float scale, float soft_cap, const float *slopes,
                       float *scores, float *out) {
    switch (head_dim) {
        case 64: attend_vec(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads,
                            block_size, scale, soft_cap, slopes, scores, out, 4); return;
        case 128: attend_vec(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads,
                             block_size, scale, soft_cap, slopes, scores, out, 8); return;
    }
    if (head_dim % LANES == 0 && head_dim / LANES <= MAX_VECS)
        attend_vec(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads, block_size,
                   scale, soft_cap, slopes, scores, out, (int)(head_dim / LANES));
    else
        attend_scalar(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads, head_dim,
                      block_size, scale, soft_cap, slopes, scores, out);
}

/* The first key a sequence of `seq_len` tokens attends: its last `window` tokens (window > 0), else all. */
static inline long first_key(long seq_len, long window) {
    return window > 0 && seq_len > window ? seq_len - window : 0;
}

/* q: [num_seqs, num_heads, head_dim] with row stride q_stride; out likewise with out_stride;
 * block_tables: int32 [num_seqs, >= blocks needed] with row stride table_stride; seq_lens: int32.
 * window: the sliding window in tokens (0 = full attention); soft_cap: the logit soft-cap (0 = none);
 * alibi_slopes: float32 [num_heads] ALiBi slopes, or NULL for none.
 * Returns 0; -1 when num_heads is not a multiple of num_kv_heads; -2 when scratch memory ran out. */
int llmserve_paged_decode_attention(const float *q, long q_stride, const float *k_cache, const float *v_cache,
                                    const int *block_tables, long table_stride, const int *seq_lens,
                                    long num_seqs, long num_heads, long num_kv_heads, long head_dim,
                                    long block_size, float scale, long window, float soft_cap,
                                    const float *alibi_slopes, float *out, long out_stride, int num_threads) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return -1;
    const long group = num_heads / num_kv_heads;
    long max_len = 1;
    for (long s = 0; s < num_seqs; s++) {
        const long len = seq_lens[s] - first_key(seq_lens[s], window);
        max_len = len > max_len ? len : max_len;
    }
    /* Work items: (sequence, run of KV heads). Whole sequences read each token's K/V row contiguously;
     * with few sequences, one KV head per item keeps every thread busy. */
    const long kv_per_item = num_seqs >= 4L * num_threads ? num_kv_heads : 1;
    const long items_per_seq = num_kv_heads / kv_per_item;
    int out_of_memory = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * kv_per_item * group * max_len);
        if (scores == NULL) {
            #pragma omp atomic write
            out_of_memory = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < num_seqs * items_per_seq; item++) {
            const long s = item / items_per_seq, h = (item % items_per_seq) * kv_per_item;
            if (scores != NULL)
                attend_one(q + s * q_stride + h * group * head_dim, k_cache, v_cache,
                           block_tables + s * table_stride, first_key(seq_lens[s], window), seq_lens[s], group, h,
                           kv_per_item, num_kv_heads, head_dim, block_size, scale, soft_cap,
                           alibi_slopes != NULL ? alibi_slopes + h * group : NULL, scores,
                           out + s * out_stride + h * group * head_dim);
        }
        free(scores);
    }
    return out_of_memory ? -2 : 0;
}

/* Paged decode attention for CPUs: one new query token per sequence, attending over the sequence's
 * K/V blocks where they lie in the cache.
 *
 * Doing this with tensor ops means gathering every sequence's blocks into a padded contiguous copy and
 * then running a one-query SDPA over it: the context is read twice and written once, and the padding
 * is computed too. Here each work item (a sequence, or one KV head of it when there are few sequences)
 * walks the block table once into the rows of its tokens, prefetching both caches' rows a block ahead while
 * it scores every query head sharing a KV head against each key (grouped-query attention reads K/V once per
 * group, not once per query head; a run of keys' products is reduced to scores in one shuffle tree), takes an
 * exact softmax over the scores with a vectorised exp, then accumulates the
 * values with the output sums of a few query heads held in registers over every token (summing into the output
 * in memory token by token made each step a load and a store per vector). Items are spread over the OpenMP
 * threads dynamically, since context lengths differ. float32; caches are [num_blocks, block_size, num_kv_heads,
 * head_dim], contiguous within a block (blocks may lie a padded page apart: a cache tensor shared by layers of
 * different shapes). Head sizes that are a multiple of 16 take the vector path, others a scalar one.
 *
 * A sliding window (`window` > 0) makes a sequence of length n attend only its last `window` tokens,
 * positions [n - window, n): the walk simply starts there. A logit soft-cap (`soft_cap` > 0, Gemma 2)
 * replaces each scaled score s by soft_cap * tanh(s / soft_cap) in one pass over the scores before the
 * softmax. ALiBi (`alibi_slopes` non-NULL, one slope per query head: BLOOM, Falcon) then adds
 * slope * (key position - query position) to each score in the same pass. None of them adds work inside
 * the token loops when unused.
 *
 * A quantised cache (float8 e4m3 or e5m2, or int8; one byte per entry) or a bfloat16 one (a bfloat16 model's
 * cache) is converted to float32 in registers as each row is read (see load_entries), never copied; a
 * quantised cache's per-tensor scales are folded into the softmax scale (keys) and into the output (values).
 * The format is a compile-time constant of each specialised path, as the head size is, so the float32 cache
 * runs the same code as before.
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
 * between their token loops costs the common, plain path a few percent at short contexts). Register-width
 * vectors (rvec), as in the token loops. */
static void softmax_rows(float *scores, long rows, long len, long stride, float soft_cap, const float *slopes,
                         long first_distance) {
    if (soft_cap > 0.0f) soft_cap_scores(scores, rows * stride, soft_cap);
    if (slopes != NULL) alibi_scores(scores, rows, len, stride, slopes, first_distance);
    for (long r = 0; r < rows; r++) {
        float *s = scores + r * stride;
        float m = -INFINITY;
        long t = 0;
        rvec vm = rsplat(-INFINITY);
        for (; t + RLANES <= len; t += RLANES) vm = rmax(vm, rload(s + t));
        for (long i = 0; i < RLANES; i++) m = vm[i] > m ? vm[i] : m;
        for (; t < len; t++) m = s[t] > m ? s[t] : m;
        rvec vs = {0};
        for (t = 0; t + RLANES <= len; t += RLANES) {
            rvec e = rexp_nonpositive(rload(s + t) - m);
            rstore(s + t, e);
            vs += e;
        }
        float sum = rhsum(vs);
        for (; t < len; t++) { s[t] = expf(s[t] - m); sum += s[t]; }
        const float inv = 1.0f / sum;
        for (t = 0; t < len; t++) s[t] *= inv;
    }
}

/* Cache entry formats (kv_format). */
enum { KV_F32 = 0, KV_FP8_E4M3 = 1, KV_FP8_E5M2 = 2, KV_INT8 = 3, KV_BF16 = 4 };

typedef unsigned char u8vec __attribute__((vector_size(LANES)));
typedef signed char i8vec __attribute__((vector_size(LANES)));

/* float8 bytes (widened to int lanes) as floats, for a format with `m_bits` mantissa bits and exponent bias
 * `bias`: the exponent and mantissa move into float32's fields with the bias changed, which is exact for
 * normal numbers. A subnormal (exponent field 0) then reads as 2^-bias (1 + m 2^-m_bits) where it means
 * 2^(1-bias) m 2^-m_bits = 2 (that - 2^-bias). The NaN and infinity codes are never written (writes
 * saturate at the largest finite value). */
static inline __attribute__((always_inline)) vec fp8_to_float(ivec x, const int m_bits, const int bias) {
    const ivec mag = x & 0x7f;
    const vec v = (vec)((mag << (23 - m_bits)) + ((127 - bias) << 23));
    const float low = 1.0f / (float)(1u << bias);   /* 2^-bias */
    const vec r = vselect((mag >> m_bits) == 0, (v - splat(low)) * 2.0f, v);
    return (vec)((ivec)r | ((x & 0x80) << 24));
}

static inline float fp8_to_float_scalar(unsigned char x, const int m_bits, const int bias) {
    const int e = (x & 0x7f) >> m_bits, m = x & ((1 << m_bits) - 1);
    const float mag = e == 0 ? ldexpf((float)m, 1 - bias - m_bits)
                             : ldexpf((float)(m + (1 << m_bits)), e - bias - m_bits);
    return x & 0x80 ? -mag : mag;
}

/* LANES cache entries from entry index i of a cache of format `fmt`, as (unscaled) floats. */
static inline __attribute__((always_inline)) vec load_entries(const void *cache, long i, const int fmt) {
    if (fmt == KV_F32) return load((const float *)cache + i);
    if (fmt == KV_BF16) return load_bf16((const uint16_t *)cache + i);
    if (fmt == KV_INT8) {
        i8vec b;
        memcpy(&b, (const signed char *)cache + i, sizeof b);
        return __builtin_convertvector(b, vec);
    }
    u8vec b;
    memcpy(&b, (const unsigned char *)cache + i, sizeof b);
    const ivec x = __builtin_convertvector(b, ivec);
    return fmt == KV_FP8_E4M3 ? fp8_to_float(x, 3, 7) : fp8_to_float(x, 2, 15);
}

/* The same LANES entries as RPARTS register vectors: float32 entries load straight into registers (a 16-float
 * `vec` has no register without AVX-512, so on AVX2 it would go through the stack). */
static inline __attribute__((always_inline)) void load_entry_parts(const void *cache, long i, const int fmt,
                                                                    rvec *parts) {
    if (fmt == KV_F32) {
        for (int p = 0; p < RPARTS; p++) parts[p] = rload((const float *)cache + i + p * RLANES);
        return;
    }
    const vec v = load_entries(cache, i, fmt);
    memcpy(parts, &v, sizeof v);
}

static inline float load_entry(const void *cache, long i, const int fmt) {
    switch (fmt) {
        case KV_FP8_E4M3: return fp8_to_float_scalar(((const unsigned char *)cache)[i], 3, 7);
        case KV_FP8_E5M2: return fp8_to_float_scalar(((const unsigned char *)cache)[i], 2, 15);
        case KV_INT8: return (float)((const signed char *)cache)[i];
        case KV_BF16: return bf16_to_float(((const uint16_t *)cache)[i]);
        default: return ((const float *)cache)[i];
    }
}

/* A walk over a sequence's tokens in order, giving the cache entry where each one's row starts for KV head 0:
 * blocks lie `block_stride` entries apart (block_size * token_stride, or more where a shared cache pads each
 * block's page). It steps through the block table rather than dividing each token's index by the block size. */
typedef struct {
    const int *table;
    long block, offset, block_size, block_stride, token_stride;
} token_walk;

static inline token_walk walk_from(const int *table, long t, long block_size, long block_stride, long token_stride) {
    const token_walk w = {table, t / block_size, t % block_size, block_size, block_stride, token_stride};
    return w;
}

static inline long walk_row(const token_walk *w) {
    return w->table[w->block] * w->block_stride + w->offset * w->token_stride;
}

static inline void walk_next(token_walk *w) {
    if (++w->offset == w->block_size) {
        w->offset = 0;
        w->block++;
    }
}

/* Where each of a sequence's tokens [start, start + len) has its row (the entry of KV head 0), into rows[]. */
static void token_rows(const int *table, long start, long len, long block_size, long block_stride,
                       long token_stride, long *rows) {
    token_walk w = walk_from(table, start, block_size, block_stride, token_stride);
    for (long t = 0; t < len; t++, walk_next(&w)) rows[t] = walk_row(&w);
}

/* Prefetch `count` entries from entry `at`: rows of consecutive tokens lie apart (one per slot, blocks
 * scattered), so the hardware prefetchers miss them. */
static inline __attribute__((always_inline)) void prefetch_entries(const void *cache, long at, long count,
                                                                   const int fmt) {
    const long size = fmt == KV_F32 ? (long)sizeof(float) : fmt == KV_BF16 ? 2 : 1;
    const char *p = (const char *)cache + at * size;
    for (long i = 0; i < count * size; i += 64) __builtin_prefetch(p + i, 0, 3);
}

#define PREFETCH_TOKENS 16   /* how far ahead rows are prefetched */
#define V_SUMS (REG_ACCS * 2 / 3)   /* register vectors of output sums the value pass keeps */
#define SCORE_HEADS 8   /* query heads scored in one pass over a run of keys */

/* The vector path: head_dim = nv * 16 (`nv` is a constant at the call sites that matter: 4, 8), for the
 * query heads of KV heads [kv_head, kv_head + kv_count): `q` and `out` point at the first of them. Keys
 * [start, seq_len) are attended (start > 0 under a sliding window); `scores` has rows of seq_len - start, `rows`
 * room for seq_len - start entries. `slopes`: the ALiBi slopes of those query heads, or NULL. `fmt`: the caches'
 * entry format (a constant). The loops work on `rvec` (the widest vector with registers: 8 floats on AVX2),
 * nv * RPARTS of them a head.
 * Keys are scored RLANES tokens at a time: each (token, query head) product stays a vector until the run's lane
 * sums are taken together (rhsum_each), one shuffle tree for RLANES scores. Both caches' rows are prefetched
 * while the keys are scored, so the value pass finds them cached. */
static inline __attribute__((always_inline)) void
attend_vec(const float *q, const void *k_cache, const void *v_cache, const int *table, long start, long seq_len,
           long group, long kv_head, long kv_count, long num_kv_heads, long block_size, long block_stride,
           float scale, float soft_cap, const float *slopes, float *scores, long *rows, float *out, const int nv,
           const int fmt) {
    const long head_dim = nv * LANES;
    const long token_stride = num_kv_heads * head_dim;
    const long first = kv_head * head_dim, count = kv_count * head_dim;
    const long len = seq_len - start;   /* t below counts from the window's start */
    const int nr = nv * RPARTS;
    token_rows(table, start, len, block_size, block_stride, token_stride, rows);
    for (long t = 0; t < PREFETCH_TOKENS && t < len; t++) {
        prefetch_entries(k_cache, rows[t] + first, count, fmt);
        prefetch_entries(v_cache, rows[t] + first, count, fmt);
    }
    for (long t0 = 0; t0 < len; t0 += RLANES) {
        const int run = len - t0 < RLANES ? (int)(len - t0) : RLANES;
        for (long t = t0 + PREFETCH_TOKENS; t < t0 + PREFETCH_TOKENS + run && t < len; t++) {
            prefetch_entries(k_cache, rows[t] + first, count, fmt);
            prefetch_entries(v_cache, rows[t] + first, count, fmt);
        }
        for (long h = 0; h < kv_count; h++)
            for (long g0 = 0; g0 < group; g0 += SCORE_HEADS) {
                const int heads = group - g0 < SCORE_HEADS ? (int)(group - g0) : SCORE_HEADS;
                const float *qh = q + (h * group + g0) * head_dim;
                rvec dots[SCORE_HEADS][RLANES];
                for (int i = 0; i < RLANES; i++) {
                    if (i >= run) {
                        for (int g = 0; g < heads; g++) dots[g][i] = rsplat(0.0f);
                        continue;
                    }
                    const long k = rows[t0 + i] + first + h * head_dim;
                    rvec kv[MAX_VECS * RPARTS];
                    for (int c = 0; c < nv; c++) load_entry_parts(k_cache, k + c * LANES, fmt, kv + c * RPARTS);
                    for (int g = 0; g < heads; g++) {
                        rvec acc = kv[0] * rload(qh + g * head_dim);
                        for (int c = 1; c < nr; c++) acc += kv[c] * rload(qh + g * head_dim + c * RLANES);
                        dots[g][i] = acc;
                    }
                }
                for (int g = 0; g < heads; g++) {
                    const rvec s = rhsum_each(dots[g]) * scale;
                    float *dst = scores + (h * group + g0 + g) * len + t0;
                    if (run == RLANES) rstore(dst, s);
                    else memcpy(dst, &s, sizeof(float) * run);
                }
            }
    }
    softmax_rows(scores, kv_count * group, len, len, soft_cap, slopes, start - (seq_len - 1));
    /* Values: up to V_SUMS register vectors of output sums at a time (a few query heads of one KV head, which
     * with a small head is the whole group), each summed over every token in order; wider heads or groups
     * go a head or a part of one at a time, re-reading their V rows from the cache. */
    const int per_pass = nr <= V_SUMS ? V_SUMS / nr : 1, width = nr <= V_SUMS ? nr : V_SUMS;
    for (long h = 0; h < kv_count; h++)
        for (long g0 = 0; g0 < group; g0 += per_pass)
            for (int c0 = 0; c0 < nr; c0 += width) {
                const int heads = group - g0 < per_pass ? (int)(group - g0) : per_pass;
                const int parts = nr - c0 < width ? nr - c0 : width;   /* width, but for a wide head's last part */
                rvec acc[V_SUMS];
                for (int i = 0; i < V_SUMS; i++) acc[i] = rsplat(0.0f);
                const float *p = scores + (h * group + g0) * len;
                /* (a long context's rows fetched in the key pass may have left the cache since) */
                const int fetch = g0 == 0 && c0 == 0;   /* later passes over the head find its rows cached */
                const long at = first + h * head_dim + c0 * RLANES;
                for (long t = 0; t < len; t++) {
                    if (fetch && t + PREFETCH_TOKENS < len)
                        prefetch_entries(v_cache, rows[t + PREFETCH_TOKENS] + first + h * head_dim, head_dim, fmt);
                    const long v = rows[t] + at;
                    rvec vv[V_SUMS];
                    for (int c = 0; c < parts; c += RPARTS) load_entry_parts(v_cache, v + c * RLANES, fmt, vv + c);
                    for (int g = 0; g < V_SUMS / width; g++)
                        if (g < heads) {
                            const rvec pg = rsplat(p[g * len + t]);
                            for (int c = 0; c < parts; c++) acc[g * width + c] += pg * vv[c];
                        }
                }
                for (int g = 0; g < heads; g++)
                    for (int c = 0; c < parts; c++)
                        rstore(out + (h * group + g0 + g) * head_dim + (c0 + c) * RLANES, acc[g * width + c]);
            }
}

/* The scalar path, for head sizes that are not a multiple of 16 (same arguments). */
static void attend_scalar(const float *q, const void *k_cache, const void *v_cache, const int *table,
                          long start, long seq_len, long group, long kv_head, long kv_count, long num_kv_heads,
                          long head_dim, long block_size, long block_stride, float scale, float soft_cap,
                          const float *slopes, float *scores, float *out, int fmt) {
    const long token_stride = num_kv_heads * head_dim;
    const long rows = kv_count * group;
    const long len = seq_len - start;
    token_walk at = walk_from(table, start, block_size, block_stride, token_stride);
    for (long t = start; t < seq_len; t++, walk_next(&at)) {
        const long k = walk_row(&at) + kv_head * head_dim;
        for (long r = 0; r < rows; r++) {
            const long kh = k + (r / group) * head_dim;
            float s = 0.f;
            for (long d = 0; d < head_dim; d++) s += q[r * head_dim + d] * load_entry(k_cache, kh + d, fmt);
            scores[r * len + (t - start)] = s * scale;
        }
    }
    softmax_rows(scores, rows, len, len, soft_cap, slopes, start - (seq_len - 1));
    memset(out, 0, sizeof(float) * rows * head_dim);
    at = walk_from(table, start, block_size, block_stride, token_stride);
    for (long t = start; t < seq_len; t++, walk_next(&at)) {
        const long v = walk_row(&at) + kv_head * head_dim;
        for (long r = 0; r < rows; r++)
            for (long d = 0; d < head_dim; d++)
                out[r * head_dim + d] += scores[r * len + (t - start)]
                                         * load_entry(v_cache, v + (r / group) * head_dim + d, fmt);
    }
}

/* One work item with the caches' format `fmt` a constant (each format gets its own specialised loops). */
static inline __attribute__((always_inline)) void
attend_format(const float *q, const void *k_cache, const void *v_cache, const int *table, long start, long seq_len,
              long group, long kv_head, long kv_count, long num_kv_heads, long head_dim, long block_size,
              long block_stride, float scale, float soft_cap, const float *slopes, float *scores, long *rows,
              float *out, const int fmt) {
    switch (head_dim) {
        case 64: attend_vec(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads,
                            block_size, block_stride, scale, soft_cap, slopes, scores, rows, out, 4, fmt); return;
        case 128: attend_vec(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads,
                             block_size, block_stride, scale, soft_cap, slopes, scores, rows, out, 8, fmt); return;
    }
    if (head_dim % LANES == 0 && head_dim / LANES <= MAX_VECS)
        attend_vec(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads, block_size,
                   block_stride, scale, soft_cap, slopes, scores, rows, out, (int)(head_dim / LANES), fmt);
    else
        attend_scalar(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads, head_dim,
                      block_size, block_stride, scale, soft_cap, slopes, scores, out, fmt);
}

static void attend_one(const float *q, const void *k_cache, const void *v_cache, const int *table,
                       long start, long seq_len, long group, long kv_head, long kv_count, long num_kv_heads,
                       long head_dim, long block_size, long block_stride, float scale, float soft_cap,
                       const float *slopes, float *scores, long *rows, float *out, int fmt) {
#define ATTEND(F) attend_format(q, k_cache, v_cache, table, start, seq_len, group, kv_head, kv_count, num_kv_heads, \
                                head_dim, block_size, block_stride, scale, soft_cap, slopes, scores, rows, out, F)
    switch (fmt) {
        case KV_FP8_E4M3: ATTEND(KV_FP8_E4M3); return;
        case KV_FP8_E5M2: ATTEND(KV_FP8_E5M2); return;
        case KV_INT8: ATTEND(KV_INT8); return;
        case KV_BF16: ATTEND(KV_BF16); return;
        default: ATTEND(KV_F32); return;
    }
#undef ATTEND
}

/* The first key a sequence of `seq_len` tokens attends: its last `window` tokens (window > 0), else all. */
static inline long first_key(long seq_len, long window) {
    return window > 0 && seq_len > window ? seq_len - window : 0;
}

/* q: [num_seqs, num_heads, head_dim] with row stride q_stride; out likewise with out_stride;
 * caches: [num_blocks, block_size, num_kv_heads, head_dim], contiguous within a block, blocks block_stride
 * entries apart;
 * block_tables: int32 [num_seqs, >= blocks needed] with row stride table_stride; seq_lens: int32.
 * window: the sliding window in tokens (0 = full attention); soft_cap: the logit soft-cap (0 = none);
 * alibi_slopes: float32 [num_heads] ALiBi slopes, or NULL for none.
 * kv_format: the caches' entries (KV_F32, KV_BF16, or one byte each: KV_FP8_E4M3, KV_FP8_E5M2, KV_INT8), which read as
 * entry * k_scale (keys) and entry * v_scale (values).
 * Returns 0; -1 when num_heads is not a multiple of num_kv_heads; -2 when scratch memory ran out; -3 for an
 * unknown kv_format. */
int llmserve_paged_decode_attention(const float *q, long q_stride, const void *k_cache, const void *v_cache,
                                    const int *block_tables, long table_stride, const int *seq_lens,
                                    long num_seqs, long num_heads, long num_kv_heads, long head_dim,
                                    long block_size, long block_stride, float scale, long window, float soft_cap,
                                    const float *alibi_slopes, float *out, long out_stride, int num_threads,
                                    int kv_format, float k_scale, float v_scale) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return -1;
    if (kv_format < KV_F32 || kv_format > KV_BF16) return -3;
    scale *= k_scale;   /* q . (entry * k_scale) * scale */
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
        /* per thread: the scores of an item, then its tokens' row entries */
        const long score_floats = (kv_per_item * group * max_len + 15) / 16 * 16;
        float *scores = malloc(sizeof(float) * score_floats + sizeof(long) * max_len);
        if (scores == NULL) {
            #pragma omp atomic write
            out_of_memory = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < num_seqs * items_per_seq; item++) {
            const long s = item / items_per_seq, h = (item % items_per_seq) * kv_per_item;
            if (scores != NULL) {
                float *o = out + s * out_stride + h * group * head_dim;
                attend_one(q + s * q_stride + h * group * head_dim, k_cache, v_cache,
                           block_tables + s * table_stride, first_key(seq_lens[s], window), seq_lens[s], group, h,
                           kv_per_item, num_kv_heads, head_dim, block_size, block_stride, scale, soft_cap,
                           alibi_slopes != NULL ? alibi_slopes + h * group : NULL, scores,
                           (long *)(scores + score_floats), o, kv_format);
                if (v_scale != 1.0f)   /* sum_t p_t (entry_t * v_scale) */
                    for (long i = 0; i < kv_per_item * group * head_dim; i++) o[i] *= v_scale;
            }
        }
        free(scores);
    }
    return out_of_memory ? -2 : 0;
}

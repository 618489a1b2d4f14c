/* Paged decode attention for CPUs: one new query token per sequence, attending over the sequence's
 * K/V blocks where they lie in the cache.
 *
 * Doing this with tensor ops means gathering every sequence's blocks into a padded contiguous copy and
 * then running a one-query SDPA over it: the context is read twice and written once, and the padding
 * is computed too. Here each (sequence, KV head) is one work item that walks the block table, scores
 * the whole query group sharing that KV head against each key as it is read (grouped-query attention
 * reads K/V once per group, not once per query head), takes an exact softmax over the scores, then
 * accumulates the values. Items are spread over the OpenMP threads dynamically, since context lengths
 * differ. float32; caches are [num_blocks, block_size, num_kv_heads, head_dim], contiguous.
 */
#include <math.h>
#include <stdlib.h>

static inline float dot(const float *a, const float *b, long n) {
    float s = 0.f;
    #pragma omp simd reduction(+:s)
    for (long i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Attend the `group` query heads starting at `q` (head stride head_dim) for one sequence and one KV
 * head, accumulating into `out` (same layout); `scores` holds group * seq_len floats. */
static void attend_one(const float *q, const float *k_cache, const float *v_cache, const int *table,
                       long seq_len, long group, long kv_head, long num_kv_heads, long head_dim,
                       long block_size, float scale, float *scores, float *out) {
    const long token_stride = num_kv_heads * head_dim;
    const long block_stride = block_size * token_stride;
    long t = 0;
    for (long b = 0; t < seq_len; b++) {
        const float *k = k_cache + table[b] * block_stride + kv_head * head_dim;
        for (long o = 0; o < block_size && t < seq_len; o++, t++, k += token_stride)
            for (long g = 0; g < group; g++) scores[g * seq_len + t] = dot(q + g * head_dim, k, head_dim) * scale;
    }
    for (long g = 0; g < group; g++) {
        float *s = scores + g * seq_len;
        float m = -INFINITY, sum = 0.f;
        for (long i = 0; i < seq_len; i++) m = s[i] > m ? s[i] : m;
        for (long i = 0; i < seq_len; i++) { s[i] = expf(s[i] - m); sum += s[i]; }
        for (long i = 0; i < seq_len; i++) s[i] /= sum;
    }
    for (long i = 0; i < group * head_dim; i++) out[i] = 0.f;
    t = 0;
    for (long b = 0; t < seq_len; b++) {
        const float *v = v_cache + table[b] * block_stride + kv_head * head_dim;
        for (long o = 0; o < block_size && t < seq_len; o++, t++, v += token_stride)
            for (long g = 0; g < group; g++) {
                const float p = scores[g * seq_len + t];
                float *a = out + g * head_dim;
                #pragma omp simd
                for (long d = 0; d < head_dim; d++) a[d] += p * v[d];
            }
    }
}

/* q: [num_seqs, num_heads, head_dim] with row stride q_stride; out likewise with out_stride;
 * block_tables: int32 [num_seqs, >= blocks needed] with row stride table_stride; seq_lens: int32.
 * Returns 0; -1 when num_heads is not a multiple of num_kv_heads; -2 when scratch memory ran out. */
int llmserve_paged_decode_attention(const float *q, long q_stride, const float *k_cache, const float *v_cache,
                                    const int *block_tables, long table_stride, const int *seq_lens,
                                    long num_seqs, long num_heads, long num_kv_heads, long head_dim,
                                    long block_size, float scale, float *out, long out_stride, int num_threads) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0) return -1;
    const long group = num_heads / num_kv_heads;
    long max_len = 1;
    for (long s = 0; s < num_seqs; s++) max_len = seq_lens[s] > max_len ? seq_lens[s] : max_len;
    int out_of_memory = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * group * max_len);
        if (scores == NULL) {
            #pragma omp atomic write
            out_of_memory = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (long item = 0; item < num_seqs * num_kv_heads; item++) {
            const long s = item / num_kv_heads, h = item % num_kv_heads;
            if (scores != NULL)
                attend_one(q + s * q_stride + h * group * head_dim, k_cache, v_cache,
                           block_tables + s * table_stride, seq_lens[s], group, h, num_kv_heads, head_dim,
                           block_size, scale, scores, out + s * out_stride + h * group * head_dim);
        }
        free(scores);
    }
    return out_of_memory ? -2 : 0;
}

/* Every decoder layer of a Llama-shaped model for one decode step (one query token per row), in one call.
 *
 * At batch 1 a decode step of a small model is a few hundred short kernel calls, and between them Python: the
 * module calls, ctypes marshalling, tensor allocation and views, the KV write as an index_copy_. That fixed cost
 * is as large as the weight streaming itself. Here the same kernels run back to back from C over buffers laid out
 * once (the caller's workspace), so the step costs what its kernels cost.
 *
 * The layer is the module path's, step for step and kernel for kernel, so results are bit-identical to it:
 * residual add + RMSNorm -> qkv -> (per-head q/k RMSNorm) -> neox rotary -> K/V written at the rows' slots ->
 * paged decode attention -> o_proj -> residual add + RMSNorm -> gate_up -> SiLU * up -> down; then the final
 * RMSNorm. Activations are float32 or bfloat16 (rounded where the module path rounds); each projection is a
 * blocked float32 weight, a pair-blocked bfloat16 one, or group-quantised int8 segments (GGUF), through the
 * kernels of cpu_linear.c, cpu_bf16_linear.c and cpu_group_int8_linear.c. A step with LoRA adapter rows adds each
 * projection's adapter deltas right after it, with cpu_lora.c's kernel on the module path's operands (the step's
 * segment table and scratch, the projection's slots), so those steps are bit-identical to the module path too.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_group_int8.h"
#include "cpu_sampling.h"
#include "cpu_vec.h"

/* Entry points of the other kernel files of this library. */
int llmserve_linear_blocked(const float *x, long x_stride, const float *w, const float *bias, float *y,
                            long y_stride, long M, long n, long k, int num_threads);
int llmserve_bf16_linear_blocked(const uint16_t *x, long x_stride, const uint16_t *w, const uint16_t *bias,
                                 uint16_t *y, long y_stride, long M, long n, long k, int num_threads);
int llmserve_linear_small_batch(const float *x, long x_stride, const float *w, const float *bias, float *y,
                                long y_stride, long M, long n, long k, int num_threads);
void llmserve_bf16_linear_rowmajor(const uint16_t *x, long x_stride, const uint16_t *w, const uint16_t *bias,
                                   uint16_t *y, long y_stride, long M, long n, long k, int num_threads);
void llmserve_rms_norm(const void *x, long x_stride, const void *residual, long residual_stride,
                       const float *weight, float eps, void *out, long out_stride, void *residual_out,
                       long residual_out_stride, long rows, long n, int num_threads, int weight_first, int bf16);
void llmserve_silu_and_mul(const void *x, long x_stride, void *out, long out_stride, long rows, long n,
                           int num_threads, int bf16);
int llmserve_rotary_embedding(void *q, long q_stride, long num_heads, void *k, long k_stride, long num_kv_heads,
                              long head_dim, long rotary_dim, const long *positions, const float *cos_cache,
                              const float *sin_cache, long max_position, long rows, int num_threads, int bf16);
int llmserve_paged_decode_attention(const float *q, long q_stride, const void *k_cache, const void *v_cache,
                                    const int *block_tables, long table_stride, const int *seq_lens,
                                    long num_seqs, long num_heads, long num_kv_heads, long head_dim,
                                    long block_size, long block_stride, float scale, long window, float soft_cap,
                                    const float *alibi_slopes, float *out, long out_stride, int num_threads,
                                    int kv_format, float k_scale, float v_scale);

int llmserve_lora_add(const void *x, long x_stride, void *out, long out_stride, const void *a, long a_slot_stride,
                      const void *bt, long bt_slot_stride, long bt_stride, const long *slot_ranks,
                      const long *bounds, int projections, const long *rows, const long *segments,
                      int num_segments, long in_features, void *shrunk, long shrunk_stride, int num_threads,
                      int act_bf16, int w_bf16);

#define DL_MAX_SEGMENTS 4
/* (the row-major kinds: a tied LM head, which keeps the embedding's layout, through the kernels the module path
 * runs it with; the float32 one takes at most 8 rows) */
enum { DL_F32_BLOCKED = 0, DL_BF16_BLOCKED = 1, DL_GROUP_INT8 = 2, DL_F32_ROWS = 3, DL_BF16_ROWS = 4 };
enum { DL_KV_F32 = 0, DL_KV_BF16 = 4 };   /* llmserve_paged_decode_attention's kv_format codes */

/* A projection's LoRA slots as llmserve_lora_add takes them (`a` NULL: no adapter slots on it). */
typedef struct {
    const void *a, *bt;
    long a_slot_stride, bt_slot_stride, bt_stride;
    const long *slot_ranks, *bounds;
    long in_features;
    int projections, w_bf16;
} dl_lora;

/* A step's adapter rows as llmserve_lora_add takes them, shared by every projection: `rows` (NULL: every row,
 * one adapter), the (slot, start, end) segments and a float32 scratch for the shrunk rows. */
typedef struct {
    const long *rows, *segments;
    long num_segments;
    void *shrunk;
    long shrunk_stride;
} dl_lora_step;

/* One projection: y [M, n] = x [M, k] W^T + bias. `weight`: blocked float32 [n/16][k][16] or bfloat16
 * [n/16][k/2][16][2], or row-major [n][k] (the _ROWS kinds); group-int8: `segments` row segments as
 * cpu_group_int8_linear.c takes them. `bias`: float32, or bfloat16 for a bfloat16 weight; NULL for none. */
typedef struct {
    int kind;
    int segments;
    long n, k;
    const void *weight;
    const void *bias;
    gi8_weight weights[DL_MAX_SEGMENTS];
    dl_lora lora;
} dl_linear;

/* One decoder layer: float32 norm weights (q_norm / k_norm NULL without per-head norms), its projections, its
 * K/V caches [blocks, block_size, kv_heads, head_dim] in the activations' dtype (blocks block_stride entries apart)
 * and its attention scale. */
typedef struct {
    const float *input_norm, *post_norm, *q_norm, *k_norm;
    dl_linear qkv, o, gate_up, down;
    void *key_cache, *value_cache;
    long block_stride;
    float scale;
} dl_layer;

typedef struct {
    long num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    long block_size, max_position;   /* tokens per KV block; rows of the cos/sin tables */
    float eps;
    int bf16;                        /* activations and caches in bfloat16 (else float32) */
    const float *cos, *sin;          /* [max_position, head_dim / 2] */
    const float *final_norm;
    const dl_layer *layers;
} dl_model;

/* The workspace's buffers for `rows` rows, each 64-byte aligned. */
typedef struct {
    void *res, *h, *normed, *qkv, *attn, *gate_up, *act;
    float *q32, *attn32, *x32, *y32;
    signed char *xq;
    float *xscale, *xsum;
    long bytes;
} dl_buffers;

static long max3(long a, long b, long c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* `head_n`: the widest output besides the layers' (the LM head's, for llmserve_decode_steps; 0 for none). */
static dl_buffers carve(const dl_model *m, long rows, long head_n, char *base) {
    const long s = m->bf16 ? 2 : 4;
    const long q_size = m->num_heads * m->head_dim, qkv_n = q_size + 2 * m->num_kv_heads * m->head_dim;
    const long max_k = max3(m->hidden, q_size, m->intermediate);
    const long layers_n = max3(qkv_n, m->hidden, 2 * m->intermediate), max_n = layers_n > head_n ? layers_n : head_n;
    dl_buffers b;
    long at = 0;
#define TAKE(field, type, size) do { b.field = (type)(base ? base + at : NULL); at += ((size) + 63) / 64 * 64; } while (0)
    TAKE(res, void *, rows * m->hidden * s);
    TAKE(h, void *, rows * m->hidden * s);
    TAKE(normed, void *, rows * m->hidden * s);
    TAKE(qkv, void *, rows * qkv_n * s);
    TAKE(attn, void *, rows * q_size * s);
    TAKE(gate_up, void *, rows * 2 * m->intermediate * s);
    TAKE(act, void *, rows * m->intermediate * s);
    TAKE(q32, float *, rows * q_size * 4);
    TAKE(attn32, float *, rows * q_size * 4);
    TAKE(x32, float *, rows * max_k * 4);
    TAKE(y32, float *, rows * max_n * 4);
    TAKE(xq, signed char *, rows * max_k);
    TAKE(xscale, float *, rows * (max_k / 32 + 1) * 4);
    TAKE(xsum, float *, rows * (max_k / 16 + 1) * 4);
#undef TAKE
    b.bytes = at;
    return b;
}

/* Bytes of workspace llmserve_decode_layers needs for `rows` rows. */
long llmserve_decode_layers_workspace(const dl_model *m, long rows) { return carve(m, rows, 0, NULL).bytes; }

/* `count` rows of `n` values from a row stride of `x_stride`: bfloat16 widened to float32 (exact). */
static void widen_rows(const uint16_t *x, long x_stride, float *out, long count, long n) {
    for (long r = 0; r < count; r++)
        for (long i = 0; i < n; i++) out[r * n + i] = bf16_to_float(x[r * x_stride + i]);
}

/* float32 rounded to bfloat16 (nearest even), as torch's .to(bfloat16) rounds. */
static void round_rows(const float *x, uint16_t *out, long count) {
    long i = 0;
    for (; i + LANES <= count; i += LANES) store_bf16(out + i, load(x + i));
    for (; i < count; i++) store_act1(out, i, x[i], 1);
}

/* y = x W^T + bias for M contiguous rows; returns 0, -2 without memory, or -3 when a kernel refuses its operands.
 * A group-int8 weight multiplies float32 activations (a bfloat16 row is widened first and the result rounded
 * back, as the module path does). */
static int base_linear(const dl_linear *L, const void *x, void *y, long M, int bf16, const dl_buffers *b,
                       int num_threads) {
    if (L->kind == DL_F32_BLOCKED)
        return llmserve_linear_blocked(x, L->k, L->weight, L->bias, y, L->n, M, L->n, L->k, num_threads) ? -3 : 0;
    if (L->kind == DL_BF16_BLOCKED)
        return llmserve_bf16_linear_blocked(x, L->k, L->weight, L->bias, y, L->n, M, L->n, L->k, num_threads)
               ? -3 : 0;
    if (L->kind == DL_F32_ROWS)
        return llmserve_linear_small_batch(x, L->k, L->weight, L->bias, y, L->n, M, L->n, L->k, num_threads) ? -3 : 0;
    if (L->kind == DL_BF16_ROWS) {
        llmserve_bf16_linear_rowmajor(x, L->k, L->weight, L->bias, y, L->n, M, L->n, L->k, num_threads);
        return 0;
    }
    const float *xf = x;
    float *yf = bf16 ? b->y32 : y;
    if (bf16) {
        widen_rows(x, L->k, b->x32, M, L->k);
        xf = b->x32;
    }
    if (llmserve_group_int8_quantize(xf, L->k, M, L->k, b->xq, b->xscale, b->xsum, num_threads)) return -3;
    const float *bias = L->bias;
    for (long s = 0, start = 0; s < L->segments; start += L->weights[s].rows, s++) {
        const int status = llmserve_group_int8_linear(b->xq, b->xscale, b->xsum, M, L->k, &L->weights[s],
                                                      bias ? bias + start : NULL, yf + start, L->n, num_threads);
        if (status) return status == -2 ? -2 : -3;
    }
    if (bf16) round_rows(yf, y, M * L->n);
    return 0;
}

/* y = x W^T + bias for M contiguous rows, plus the adapter rows' LoRA deltas when `lora` is not NULL (as the module
 * path's LoRA method adds them to the base output); returns 0, or base_linear's or the LoRA kernel's error. */
static int linear(const dl_linear *L, const void *x, void *y, long M, int bf16, const dl_buffers *b,
                  const dl_lora_step *lora, int num_threads) {
    const int status = base_linear(L, x, y, M, bf16, b, num_threads);
    if (status) return status;
    if (lora == NULL || L->lora.a == NULL) return 0;
    const dl_lora *A = &L->lora;
    return llmserve_lora_add(x, L->k, y, L->n, A->a, A->a_slot_stride, A->bt, A->bt_slot_stride, A->bt_stride,
                             A->slot_ranks, A->bounds, A->projections, lora->rows, lora->segments,
                             (int)lora->num_segments, A->in_features, lora->shrunk, lora->shrunk_stride, num_threads,
                             bf16, A->w_bf16) ? -3 : 0;
}

/* Attention of one layer for the step's rows: q/k norms, rotary, the K/V write, paged decode attention into
 * b->attn. */
static int attend(const dl_model *m, const dl_layer *L, long rows, const long *positions, const long *slots,
                  const int *block_tables, long table_stride, const int *seq_lens, const dl_buffers *b,
                  int num_threads) {
    const int bf16 = m->bf16;
    const long s = bf16 ? 2 : 4, d = m->head_dim, heads = m->num_heads, kv_heads = m->num_kv_heads;
    const long q_size = heads * d, kv_size = kv_heads * d, qkv_n = q_size + 2 * kv_size;
    char *qkv = b->qkv;
    if (L->q_norm != NULL)
        for (long r = 0; r < rows; r++) {
            char *q = qkv + r * qkv_n * s, *k = q + q_size * s;
            llmserve_rms_norm(q, d, NULL, 0, L->q_norm, m->eps, q, d, NULL, 0, heads, d, num_threads, 0, bf16);
            llmserve_rms_norm(k, d, NULL, 0, L->k_norm, m->eps, k, d, NULL, 0, kv_heads, d, num_threads, 0, bf16);
        }
    if (llmserve_rotary_embedding(qkv, qkv_n, heads, qkv + q_size * s, qkv_n, kv_heads, d, d, positions, m->cos,
                                  m->sin, m->max_position, rows, num_threads, bf16))
        return -1;
    const long token_stride = kv_size * s;
    for (long r = 0; r < rows; r++) {
        const long at = ((slots[r] / m->block_size) * L->block_stride + (slots[r] % m->block_size) * kv_size) * s;
        const char *k = qkv + (r * qkv_n + q_size) * s;
        memcpy((char *)L->key_cache + at, k, token_stride);
        memcpy((char *)L->value_cache + at, k + token_stride, token_stride);
    }
    const float *q = (const float *)qkv;
    long q_stride = qkv_n;
    float *out = bf16 ? b->attn32 : (float *)b->attn;
    if (bf16) {
        widen_rows((const uint16_t *)qkv, qkv_n, b->q32, rows, q_size);
        q = b->q32;
        q_stride = q_size;
    }
    const int status = llmserve_paged_decode_attention(
        q, q_stride, L->key_cache, L->value_cache, block_tables, table_stride, seq_lens, rows, heads, kv_heads, d,
        m->block_size, L->block_stride, L->scale, 0, 0.0f, NULL, out, q_size, num_threads,
        bf16 ? DL_KV_BF16 : DL_KV_F32, 1.0f, 1.0f);
    if (status) return status == -2 ? -2 : -3;
    if (bf16) round_rows(out, b->attn, rows * q_size);
    return 0;
}

/* Every layer of `m` and the final norm for `rows` decode rows, in the buffers `b` (llmserve_decode_layers). */
static int run_layers(const dl_model *m, const dl_buffers *b, const void *embeddings, void *out, long rows,
                      const long *positions, const long *slots, const int *block_tables, long table_stride,
                      const int *seq_lens, const dl_lora_step *lora, int num_threads) {
    const int bf16 = m->bf16;
    const long s = bf16 ? 2 : 4, hidden = m->hidden, inter = m->intermediate;
    for (long i = 0; i < m->num_layers; i++) {
        const dl_layer *L = &m->layers[i];
        if (i == 0) {
            memcpy(b->res, embeddings, rows * hidden * s);
            llmserve_rms_norm(b->res, hidden, NULL, 0, L->input_norm, m->eps, b->normed, hidden, NULL, 0, rows,
                              hidden, num_threads, 0, bf16);
        } else {
            llmserve_rms_norm(b->h, hidden, b->res, hidden, L->input_norm, m->eps, b->normed, hidden, b->res, hidden,
                              rows, hidden, num_threads, 0, bf16);
        }
        int status = linear(&L->qkv, b->normed, b->qkv, rows, bf16, b, lora, num_threads);
        if (!status)
            status = attend(m, L, rows, positions, slots, block_tables, table_stride, seq_lens, b, num_threads);
        if (!status) status = linear(&L->o, b->attn, b->h, rows, bf16, b, lora, num_threads);
        if (status) return status;
        llmserve_rms_norm(b->h, hidden, b->res, hidden, L->post_norm, m->eps, b->normed, hidden, b->res, hidden, rows,
                          hidden, num_threads, 0, bf16);
        status = linear(&L->gate_up, b->normed, b->gate_up, rows, bf16, b, lora, num_threads);
        if (status) return status;
        llmserve_silu_and_mul(b->gate_up, 2 * inter, b->act, inter, rows, inter, num_threads, bf16);
        status = linear(&L->down, b->act, b->h, rows, bf16, b, lora, num_threads);
        if (status) return status;
    }
    llmserve_rms_norm(b->h, hidden, b->res, hidden, m->final_norm, m->eps, out, hidden, b->res, hidden, rows, hidden,
                      num_threads, 0, bf16);
    return 0;
}

/* Every layer of `m` and the final norm for `rows` decode rows: `embeddings` [rows, hidden] in, the final norm's
 * output [rows, hidden] in `out`. Per row: its position, its K/V slot (block * block_size + offset), its block
 * table (int32, `table_stride` apart) and its length with the new token. `lora`: the step's adapter rows, NULL
 * for none. `workspace`: at least
 * llmserve_decode_layers_workspace(m, rows) bytes, 64-byte aligned.
 * Returns 0; -1 when a position is outside the rotary tables; -2 without memory (for the attention scores or a
 * linear layer's copy of its activations); -3 when a kernel refuses a layer's operands. */
int llmserve_decode_layers(const dl_model *m, const void *embeddings, void *out, long rows, const long *positions,
                           const long *slots, const int *block_tables, long table_stride, const int *seq_lens,
                           const dl_lora_step *lora, void *workspace, int num_threads) {
    const dl_buffers b = carve(m, rows, 0, workspace);
    return run_layers(m, &b, embeddings, out, rows, positions, slots, block_tables, table_stride, seq_lens, lora,
                      num_threads);
}

/* The token embedding and LM head of llmserve_decode_steps: `embedding` [vocab, hidden] row-major in the
 * activations' dtype, `head` the LM head's projection (head.n = vocab). */
typedef struct {
    const void *embedding;
    long vocab;
    dl_linear head;
} dl_ends;

/* The widest output the head's projection writes through carve's y32: the vocabulary for a group-int8 head in a
 * bfloat16 model (its float32 result is rounded from there), else none. */
static long head_scratch(const dl_model *m, const dl_ends *e) {
    return m->bf16 && e->head.kind == DL_GROUP_INT8 ? e->vocab : 0;
}

/* The buffers of llmserve_decode_steps after carve's: the step's embeddings and final-norm output, the head's
 * bfloat16 output (a bfloat16 model's) and the float32 logits, the draws' scratch (2 x vocab floats for each of
 * `draw_threads`: 0 without random rows), each row's position, slot and length. */
typedef struct {
    void *emb, *normed, *logits;
    float *logits32, *draws;
    long *positions, *slots;
    int *seq_lens;
    long bytes;
} dl_steps_buffers;

static dl_steps_buffers steps_carve(const dl_model *m, const dl_ends *e, long rows, long draw_threads, char *base) {
    const long s = m->bf16 ? 2 : 4;
    dl_steps_buffers b;
    long at = carve(m, rows, head_scratch(m, e), NULL).bytes;
#define TAKE(field, type, size) do { b.field = (type)(base ? base + at : NULL); at += ((size) + 63) / 64 * 64; } while (0)
    TAKE(emb, void *, rows * m->hidden * s);
    TAKE(normed, void *, rows * m->hidden * s);
    TAKE(logits, void *, m->bf16 ? rows * e->vocab * 2 : 0);
    TAKE(logits32, float *, rows * e->vocab * 4);
    TAKE(draws, float *, draw_threads * 2 * e->vocab * 4);
    TAKE(positions, long *, rows * 8);
    TAKE(slots, long *, rows * 8);
    TAKE(seq_lens, int *, rows * 4);
#undef TAKE
    b.bytes = at;
    return b;
}

/* Bytes of workspace llmserve_decode_steps needs for `rows` rows, with random rows drawn on `draw_threads` threads
 * (0: none). */
long llmserve_decode_steps_workspace(const dl_model *m, const dl_ends *e, long rows, long draw_threads) {
    return steps_carve(m, e, rows, draw_threads, NULL).bytes;
}

/* Whether `token` is one of row r's stop tokens (stop_ids[stop_starts[r] .. stop_starts[r + 1])). */
static int is_stop(const long *stop_ids, const long *stop_starts, long r, long token) {
    if (stop_ids == NULL) return 0;
    for (long i = stop_starts[r]; i < stop_starts[r + 1]; i++)
        if (stop_ids[i] == token) return 1;
    return 0;
}

/* Up to `steps` decode steps of `rows` sequences in one call: step 0 feeds each row its token `first_tokens[r]` at
 * position `start_positions[r]`, every later step the token the row sampled at the step before, at the next
 * position; tokens[t * rows + r] is row r's token after step t. Each step is llmserve_decode_layers, the LM head (a
 * bfloat16 model's logits rounded to bfloat16, as the module path's head returns them) and each row's first index
 * of its largest logit (llmserve_argmax_rows), so a greedy row's tokens are those the one-step path samples; a row
 * with a positive temperature in `sampling` (NULL: every row greedy) draws instead (llmserve_sample_rows, from a
 * generator seeded with `seed` and the step). The
 * steps end early after the first in which a row's token is one of its stop tokens (`stop_ids` from
 * `stop_starts[r]` to `stop_starts[r + 1]`; NULL for none): one step at a time, the next step would run without that
 * row. A row's K/V slots follow its block table (int32, `table_stride` apart, covering every position the steps
 * reach); `workspace`: llmserve_decode_steps_workspace(m, e, rows, sampling ? num_threads : 0) bytes. Returns the
 * steps run (1..steps), or llmserve_decode_layers' errors, or -4 for a first token outside the vocabulary. */
int llmserve_decode_steps(const dl_model *m, const dl_ends *e, long rows, long steps, const long *first_tokens,
                          const long *start_positions, const int *block_tables, long table_stride,
                          const long *stop_ids, const long *stop_starts, const sample_params *sampling, uint64_t seed,
                          const dl_lora_step *lora, long *tokens, void *workspace, int num_threads) {
    const int bf16 = m->bf16;
    const long s = bf16 ? 2 : 4, hidden = m->hidden, vocab = e->vocab, bs = m->block_size;
    const dl_steps_buffers sb = steps_carve(m, e, rows, sampling ? num_threads : 0, workspace);
    void *emb = sb.emb, *normed = sb.normed, *logits = sb.logits;
    float *logits32 = sb.logits32;
    long *positions = sb.positions, *slots = sb.slots;
    int *seq_lens = sb.seq_lens;
    const dl_buffers b = carve(m, rows, head_scratch(m, e), workspace);
    for (long r = 0; r < rows; r++)
        if (first_tokens[r] < 0 || first_tokens[r] >= vocab) return -4;
    for (long t = 0; t < steps; t++) {
        const long *in = t == 0 ? first_tokens : tokens + (t - 1) * rows;
        for (long r = 0; r < rows; r++) {
            const long pos = start_positions[r] + t;
            positions[r] = pos;
            slots[r] = (long)block_tables[r * table_stride + pos / bs] * bs + pos % bs;
            seq_lens[r] = (int)(pos + 1);
            memcpy((char *)emb + r * hidden * s, (const char *)e->embedding + in[r] * hidden * s, hidden * s);
        }
        int status = run_layers(m, &b, emb, normed, rows, positions, slots, block_tables, table_stride, seq_lens,
                                lora, num_threads);
        if (!status) status = linear(&e->head, normed, bf16 ? logits : (void *)logits32, rows, bf16, &b, NULL,
                                     num_threads);
        if (status) return status;
        if (bf16) widen_rows(logits, vocab, logits32, rows, vocab);
        llmserve_argmax_rows(logits32, vocab, tokens + t * rows, rows, vocab, num_threads);
        if (sampling != NULL)
            llmserve_sample_rows(logits32, rows, vocab, sampling, seed + 0x9E3779B97F4A7C15ull * (uint64_t)t,
                                 tokens + t * rows, sb.draws, num_threads);
        for (long r = 0; r < rows; r++)
            if (is_stop(stop_ids, stop_starts, r, tokens[t * rows + r])) return (int)(t + 1);
    }
    return (int)steps;
}

/* The small per-layer operations of a decoder, each fused into one pass: RMSNorm (with the residual
 * add), SiLU-and-multiply, and rotary embedding applied in place.
 *
 * In PyTorch each is five to fifteen separate tensor ops. At decode time with few sequences every op
 * touches a few kilobytes, so the cost is the per-op overhead (dispatch, allocation, a parallel region):
 * about a millisecond per step on a 12-layer model, a tenth of a batch-1 decode step. Rows are split
 * over the OpenMP threads only when there is enough work to pay for waking them.
 *
 * Activations are float32 or bfloat16 (`bf16`, a constant in each specialised loop). bfloat16 values are
 * widened in registers, computed in float32, and rounded back where a bfloat16 model rounds (as
 * transformers does): after the residual add, the normalisation and the weight; after SiLU and the product;
 * once after a rotation. The loops work on `rvec`, the widest vector with registers (8 floats on AVX2).
 */
#include <math.h>

#include "cpu_vec.h"

#define PARALLEL_MIN_ELEMENTS (1L << 15)

/* The bfloat16 rounding of a model in bfloat16 (nothing in float32). */
static inline __attribute__((always_inline)) rvec model_round(rvec v, const int bf16) {
    return bf16 ? rround_bf16(v) : v;
}

static inline __attribute__((always_inline)) float model_round1(float v, const int bf16) {
    return bf16 ? round_bf16(splat(v))[0] : v;
}

/* out = x / sqrt(mean(x^2) + eps) * weight for one row of n values. In bfloat16 the normalised value is
 * rounded before the weight multiplies it (Llama), or after (`weight_first`: Gemma). */
static inline __attribute__((always_inline)) void
rms_norm_row(const void *x, const float *weight, float eps, void *out, long n, int weight_first, const int bf16) {
    rvec acc = {0};
    long i = 0;
    for (; i + RLANES <= n; i += RLANES) { rvec v = rload_act(x, i, bf16); acc += v * v; }
    float sum = rhsum(acc);
    for (; i < n; i++) { const float v = load_act1(x, i, bf16); sum += v * v; }
    const float inv = 1.0f / sqrtf(sum / (float)n + eps);
    i = 0;
    for (; i + RLANES <= n; i += RLANES) {
        const rvec normed = rload_act(x, i, bf16) * inv;
        rstore_act(out, i, (weight_first ? normed : model_round(normed, bf16)) * rload(weight + i), bf16);
    }
    for (; i < n; i++) {
        const float normed = load_act1(x, i, bf16) * inv;
        store_act1(out, i, (weight_first ? normed : model_round1(normed, bf16)) * weight[i], bf16);
    }
}

static inline __attribute__((always_inline)) void
rms_norm_rows(const void *x, long x_stride, const void *residual, long residual_stride, const float *weight,
              float eps, void *out, long out_stride, void *residual_out, long residual_out_stride, long rows, long n,
              int weight_first, int num_threads, const int bf16) {
    const long size = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(num_threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * x_stride * size;
        if (residual != NULL) {
            const char *res = (const char *)residual + r * residual_stride * size;
            char *sum = (char *)residual_out + r * residual_out_stride * size;
            long i = 0;
            for (; i + RLANES <= n; i += RLANES)
                rstore_act(sum, i, rload_act(xr, i, bf16) + rload_act(res, i, bf16), bf16);
            for (; i < n; i++) store_act1(sum, i, load_act1(xr, i, bf16) + load_act1(res, i, bf16), bf16);
            xr = sum;
        }
        rms_norm_row(xr, weight, eps, (char *)out + r * out_stride * size, n, weight_first, bf16);
    }
}

/* For each of `rows` rows (each array with its own row stride, in elements): with a residual,
 * residual_out = x + residual and out = rms_norm(residual_out); without, out = rms_norm(x). `weight` is
 * float32; the activations float32, or bfloat16 when `bf16`. */
void llmserve_rms_norm(const void *x, long x_stride, const void *residual, long residual_stride,
                       const float *weight, float eps, void *out, long out_stride, void *residual_out,
                       long residual_out_stride, long rows, long n, int num_threads, int weight_first, int bf16) {
    if (bf16)
        rms_norm_rows(x, x_stride, residual, residual_stride, weight, eps, out, out_stride, residual_out,
                      residual_out_stride, rows, n, weight_first, num_threads, 1);
    else
        rms_norm_rows(x, x_stride, residual, residual_stride, weight, eps, out, out_stride, residual_out,
                      residual_out_stride, rows, n, weight_first, num_threads, 0);
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

static inline __attribute__((always_inline)) void
silu_and_mul_rows(const void *x, long x_stride, void *out, long out_stride, long rows, long n, int num_threads,
                  const int bf16) {
    const long size = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(num_threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const char *gate = (const char *)x + r * x_stride * size, *up = gate + n * size;
        char *o = (char *)out + r * out_stride * size;
        long i = 0;
        for (; i + RLANES <= n; i += RLANES) {
            rvec g = rload_act(gate, i, bf16);
            rivec negative = g < 0;
            rvec e = rexp_nonpositive(rselect(negative, g, -g));
            rvec s = rselect(negative, g * e, g) / (rsplat(1.0f) + e);
            rstore_act(o, i, model_round(s, bf16) * rload_act(up, i, bf16), bf16);
        }
        for (; i < n; i++)
            store_act1(o, i, model_round1(silu(load_act1(gate, i, bf16)), bf16) * load_act1(up, i, bf16), bf16);
    }
}

/* out[r, :] = silu(x[r, :n]) * x[r, n:2n]. silu(g) = g / (1 + e^-g) is computed from e = exp(-|g|),
 * which never overflows: g / (1 + e) for g >= 0, g e / (1 + e) below. */
void llmserve_silu_and_mul(const void *x, long x_stride, void *out, long out_stride, long rows, long n,
                           int num_threads, int bf16) {
    if (bf16) silu_and_mul_rows(x, x_stride, out, out_stride, rows, n, num_threads, 1);
    else silu_and_mul_rows(x, x_stride, out, out_stride, rows, n, num_threads, 0);
}

/* Rotate one head in place (neox / rotate-half layout): with x1, x2 its halves,
 * x1' = x1 cos - x2 sin and x2' = x2 cos + x1 sin. */
static inline __attribute__((always_inline)) void
rotate_head(void *x, const float *cos, const float *sin, long half, const int bf16) {
    long i = 0;
    for (; i + RLANES <= half; i += RLANES) {
        rvec a = rload_act(x, i, bf16), b = rload_act(x, half + i, bf16), c = rload(cos + i), s = rload(sin + i);
        rstore_act(x, i, a * c - b * s, bf16);
        rstore_act(x, half + i, b * c + a * s, bf16);
    }
    for (; i < half; i++) {
        const float a = load_act1(x, i, bf16), b = load_act1(x, half + i, bf16);
        store_act1(x, i, a * cos[i] - b * sin[i], bf16);
        store_act1(x, half + i, b * cos[i] + a * sin[i], bf16);
    }
}

static inline __attribute__((always_inline)) void
rotary_rows(void *q, long q_stride, long num_heads, void *k, long k_stride, long num_kv_heads, long head_dim,
            long rotary_dim, const long *positions, const float *cos_cache, const float *sin_cache, long rows,
            int num_threads, const int bf16) {
    const long half = rotary_dim / 2, size = bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(num_threads) if (rows * (num_heads + num_kv_heads) * head_dim >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *cos = cos_cache + positions[r] * half, *sin = sin_cache + positions[r] * half;
        for (long h = 0; h < num_heads; h++)
            rotate_head((char *)q + (r * q_stride + h * head_dim) * size, cos, sin, half, bf16);
        for (long h = 0; h < num_kv_heads; h++)
            rotate_head((char *)k + (r * k_stride + h * head_dim) * size, cos, sin, half, bf16);
    }
}

/* Rotary embedding in place on q [rows, num_heads, head_dim] and k [rows, num_kv_heads, head_dim] (heads
 * and dims contiguous, rows q_stride / k_stride elements apart; float32, or bfloat16 when `bf16`) at
 * positions[r], from float32 cos/sin tables [max_position, rotary_dim / 2]: the first rotary_dim dims of each
 * head rotate, the rest are left as they are (partial rotary). Returns 0, or -1 when a position is outside
 * the tables. */
int llmserve_rotary_embedding(void *q, long q_stride, long num_heads, void *k, long k_stride, long num_kv_heads,
                              long head_dim, long rotary_dim, const long *positions, const float *cos_cache,
                              const float *sin_cache, long max_position, long rows, int num_threads, int bf16) {
    for (long r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= max_position) return -1;
    if (bf16)
        rotary_rows(q, q_stride, num_heads, k, k_stride, num_kv_heads, head_dim, rotary_dim, positions, cos_cache,
                    sin_cache, rows, num_threads, 1);
    else
        rotary_rows(q, q_stride, num_heads, k, k_stride, num_kv_heads, head_dim, rotary_dim, positions, cos_cache,
                    sin_cache, rows, num_threads, 0);
    return 0;
}

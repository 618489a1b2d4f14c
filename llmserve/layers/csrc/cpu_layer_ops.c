/* The small per-layer operations of a decoder, each fused into one pass: RMSNorm (with the residual
 * add), SiLU-and-multiply, and rotary embedding applied in place.
 *
 * In PyTorch each is five to fifteen separate tensor ops. At decode time with few sequences every op
 * touches a few kilobytes, so the cost is the per-op overhead (dispatch, allocation, a parallel region):
 * about a millisecond per step on a 12-layer model, a tenth of a batch-1 decode step. Rows are split
 * over the OpenMP threads only when there is enough work to pay for waking them.
 */
#include <math.h>

#include "cpu_vec.h"

#define PARALLEL_MIN_ELEMENTS (1L << 15)

/* out = x / sqrt(mean(x^2) + eps) * weight for one row of n floats. */
static inline void rms_norm_row(const float *x, const float *weight, float eps, float *out, long n) {
    vec acc = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES) { vec v = load(x + i); acc += v * v; }
    float sum = hsum(acc);
    for (; i < n; i++) sum += x[i] * x[i];
    const float inv = 1.0f / sqrtf(sum / (float)n + eps);
    i = 0;
    for (; i + LANES <= n; i += LANES) store(out + i, load(x + i) * inv * load(weight + i));
    for (; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* For each of `rows` rows (each array with its own row stride): with a residual,
 * residual_out = x + residual and out = rms_norm(residual_out); without, out = rms_norm(x). */
void llmserve_rms_norm(const float *x, long x_stride, const float *residual, long residual_stride,
                       const float *weight, float eps, float *out, long out_stride, float *residual_out,
                       long residual_out_stride, long rows, long n, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        if (residual != NULL) {
            const float *res = residual + r * residual_stride;
            float *sum = residual_out + r * residual_out_stride;
            long i = 0;
            for (; i + LANES <= n; i += LANES) store(sum + i, load(xr + i) + load(res + i));
            for (; i < n; i++) sum[i] = xr[i] + res[i];
            xr = sum;
        }
        rms_norm_row(xr, weight, eps, out + r * out_stride, n);
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* out[r, :] = silu(x[r, :n]) * x[r, n:2n]. silu(g) = g / (1 + e^-g) is computed from e = exp(-|g|),
 * which never overflows: g / (1 + e) for g >= 0, g e / (1 + e) below. */
void llmserve_silu_and_mul(const float *x, long x_stride, float *out, long out_stride, long rows, long n,
                           int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows * n >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *gate = x + r * x_stride, *up = gate + n;
        float *o = out + r * out_stride;
        long i = 0;
        for (; i + LANES <= n; i += LANES) {
            vec g = load(gate + i);
            ivec negative = g < 0;
            vec e = vexp_nonpositive(vselect(negative, g, -g));
            vec s = vselect(negative, g * e, g) / (splat(1.0f) + e);
            store(o + i, s * load(up + i));
        }
        for (; i < n; i++) o[i] = silu(gate[i]) * up[i];
    }
}

/* Rotate one head in place (neox / rotate-half layout): with x1, x2 its halves,
 * x1' = x1 cos - x2 sin and x2' = x2 cos + x1 sin. */
static inline void rotate_head(float *x, const float *cos, const float *sin, long half) {
    long i = 0;
    for (; i + LANES <= half; i += LANES) {
        vec a = load(x + i), b = load(x + half + i), c = load(cos + i), s = load(sin + i);
        store(x + i, a * c - b * s);
        store(x + half + i, b * c + a * s);
    }
    for (; i < half; i++) {
        const float a = x[i], b = x[half + i];
        x[i] = a * cos[i] - b * sin[i];
        x[half + i] = b * cos[i] + a * sin[i];
    }
}

/* Rotary embedding in place on q [rows, num_heads, head_dim] and k [rows, num_kv_heads, head_dim] (heads
 * and dims contiguous, rows q_stride / k_stride apart) at positions[r], from cos/sin tables
 * [max_position, rotary_dim / 2]: the first rotary_dim dims of each head rotate, the rest are left as they
 * are (partial rotary). Returns 0, or -1 when a position is outside the tables. */
int llmserve_rotary_embedding(float *q, long q_stride, long num_heads, float *k, long k_stride, long num_kv_heads,
                              long head_dim, long rotary_dim, const long *positions, const float *cos_cache,
                              const float *sin_cache, long max_position, long rows, int num_threads) {
    for (long r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= max_position) return -1;
    const long half = rotary_dim / 2;
    #pragma omp parallel for num_threads(num_threads) if (rows * (num_heads + num_kv_heads) * head_dim >= PARALLEL_MIN_ELEMENTS)
    for (long r = 0; r < rows; r++) {
        const float *cos = cos_cache + positions[r] * half, *sin = sin_cache + positions[r] * half;
        for (long h = 0; h < num_heads; h++) rotate_head(q + r * q_stride + h * head_dim, cos, sin, half);
        for (long h = 0; h < num_kv_heads; h++) rotate_head(k + r * k_stride + h * head_dim, cos, sin, half);
    }
    return 0;
}

/* Row reductions over logits for the sampler: log-sum-exp (the logprob normaliser) and argmax (greedy).
 *
 * PyTorch's CPU logsumexp makes several passes and materialises exp(x - max) for the whole [rows, vocab]
 * matrix (8 ms for 256 x 32000 floats on two cores); here each row is one pass for the maximum and one
 * for the sum of exponentials while the row is still in cache.
 */
#include <math.h>

#include "cpu_vec.h"

/* The maximum of row[0..n), or NaN if the row holds one. The loops work on `rvec` (register width: 8 floats
 * on AVX2, where a 16-float vector would live on the stack). */
static float row_max(const float *row, long n) {
    rvec vm = rsplat(-INFINITY);
    rivec nan_seen = {0};
    long i = 0;
    for (; i + RLANES <= n; i += RLANES) {
        rvec v = rload(row + i);
        vm = rmax(vm, v);
        nan_seen |= v != v;
    }
    float m = -INFINITY;
    for (long l = 0; l < RLANES; l++) m = vm[l] > m ? vm[l] : m;
    for (; i < n; i++) {
        m = row[i] > m ? row[i] : m;
        if (isnan(row[i])) nan_seen[0] = -1;
    }
    return rany_lane(nan_seen) ? NAN : m;
}

/* out[r] = log(sum(exp(x[r, :]))) over n floats per row (row stride x_stride). A row whose maximum
 * is -inf (everything masked) gives -inf; +inf gives +inf; a NaN gives NaN. */
void llmserve_logsumexp_rows(const float *x, long x_stride, float *out, long rows, long n, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows > 1)
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * x_stride;
        const float m = row_max(row, n);
        if (!isfinite(m)) {
            out[r] = m;
            continue;
        }
        rvec vs = {0};
        long i = 0;
        for (; i + RLANES <= n; i += RLANES) vs += rexp_nonpositive(rload(row + i) - m);
        float s = rhsum(vs);
        for (; i < n; i++) s += expf(row[i] - m);
        out[r] = m + logf(s);
    }
}

/* The first index of `value` in row[0..n) (which holds it), or of the first NaN when `value` is NaN. */
static long first_index_of(const float *row, long n, float value) {
    long i = 0;
    if (isnan(value)) {
        while (!isnan(row[i])) i++;
        return i;
    }
    for (; i + RLANES <= n; i += RLANES)
        if (rany_lane(rload(row + i) == value)) break;
    while (row[i] != value) i++;
    return i;
}

/* out[r] = the first index of the largest value of row r (a NaN counts as largest, as in torch.argmax):
 * one vector pass for the maximum, then a scan for its first position. */
void llmserve_argmax_rows(const float *x, long x_stride, long *out, long rows, long n, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows > 1)
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * x_stride;
        out[r] = first_index_of(row, n, row_max(row, n));
    }
}

/* Row reductions over logits for the sampler: log-sum-exp (the logprob normaliser) and argmax (greedy); and the
 * multi-step decode loop's random draws (below).
 *
 * PyTorch's CPU logsumexp makes several passes and materialises exp(x - max) for the whole [rows, vocab]
 * matrix (8 ms for 256 x 32000 floats on two cores); here each row is one pass for the maximum and one
 * for the sum of exponentials while the row is still in cache.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "cpu_sampling.h"
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

/* ---- Random sampling for the multi-step decode loop (llmserve_decode_steps) ---------------------------------
 *
 * The distribution the sampler (llmserve/layers/sampler.py) draws an unseeded random row from: logits divided by
 * the temperature; top-k (every token >= the k-th largest); top-p over the top-k-renormalised distribution (the
 * smallest set of the most likely tokens whose probability reaches p: of tokens tied at its edge, as many as it
 * needs); min-p (tokens below min_p x the most likely one's probability dropped); then one draw. The draw here is
 * the inverse CDF of one uniform from a per-call generator, where the sampler races exponentials: the same
 * distribution (an unseeded row has no draw to reproduce). */

/* xoshiro256+ seeded through splitmix64: a uniform double in [0, 1). */
typedef struct { uint64_t s[4]; } sample_rng;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static sample_rng rng_seeded(uint64_t seed) {
    sample_rng g;
    for (int i = 0; i < 4; i++) g.s[i] = splitmix64(&seed);
    return g;
}

static double rng_uniform(sample_rng *g) {
    uint64_t *s = g->s;
    const uint64_t result = s[0] + s[3], t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return (double)(result >> 11) * 0x1.0p-53;
}

/* The k-th largest of v[0..n) (1 <= k <= n), reordering v (quickselect). */
static float kth_largest(float *v, long n, long k) {
    long lo = 0, hi = n - 1, want = k - 1;   /* the index of the k-th largest in descending order */
    while (lo < hi) {
        const float pivot = v[lo + (hi - lo) / 2];
        long i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                const float t = v[i];
                v[i++] = v[j];
                v[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return v[want];
    }
    return v[want];
}

/* The top-p cut over the weights w[0..n) (reordered): the largest weight t such that the weights > t and
 * `*ties` of those equal to t sum to at least `target` (0 < target <= their total), `*ties` the fewest that do, as
 * the sampler's ascending sort drops the tied tokens it does not need (which of them: unspecified there; here
 * the first by index). */
static float top_mass_cut(float *w, long n, double target, long *ties) {
    long lo = 0, hi = n;   /* the undecided range [lo, hi); everything above it is kept */
    double kept = 0.0;
    while (hi - lo > 1) {
        const float pivot = w[lo + (hi - lo) / 2];
        long gt = lo, eq_end;
        double above = 0.0, equal = 0.0;
        for (long i = lo; i < hi; i++)   /* move the weights > pivot to the front */
            if (w[i] > pivot) {
                above += w[i];
                const float t = w[gt];
                w[gt++] = w[i];
                w[i] = t;
            }
        eq_end = gt;
        for (long i = gt; i < hi; i++)
            if (w[i] == pivot) {
                equal += w[i];
                const float t = w[eq_end];
                w[eq_end++] = w[i];
                w[i] = t;
            }
        if (kept + above >= target) {
            hi = gt;   /* the cut is among the larger ones */
        } else if (kept + above + equal >= target) {
            const long need = (long)ceil((target - kept - above) / pivot);
            *ties = need < 1 ? 1 : need > eq_end - gt ? eq_end - gt : need;
            return pivot;
        } else {
            kept += above + equal;
            lo = eq_end;
        }
    }
    *ties = 1;
    return hi > lo ? w[lo] : 0.0f;   /* (an empty range: rounding put the target at the total; keep all) */
}

/* Whether weight `e` is in: above `floor_w`, or equal to it while `*ties` of those remain (counted down). */
static int kept_weight(float e, float floor_w, long *ties) {
    if (!(e > 0.0f) || !(e >= floor_w)) return 0;   /* (a NaN weight is out) */
    if (e > floor_w) return 1;
    return (*ties)-- > 0;
}

/* One token drawn from `logits` [vocab] under `p` (see above); `scratch` holds 2 x vocab floats. Both passes over
 * the weights below take the same tokens, in index order. */
static long sample_row(const float *logits, long vocab, const sample_params *p, sample_rng *rng, float *scratch) {
    float *x = scratch, *w = scratch + vocab;
    float m = -INFINITY;
    for (long i = 0; i < vocab; i++) {
        x[i] = logits[i] / p->temperature;
        m = x[i] > m ? x[i] : m;
    }
    float floor_x = -INFINITY;   /* tokens below it are out (top-k) */
    if (p->top_k > 0 && p->top_k < vocab) {
        memcpy(w, x, vocab * sizeof(float));
        floor_x = kth_largest(w, vocab, p->top_k);
    }
    double total = 0.0;
    long n = 0;
    for (long i = 0; i < vocab; i++) {
        const float e = x[i] >= floor_x ? expf(x[i] - m) : 0.0f;
        x[i] = e;   /* from here on x holds the weights exp(x - max), 0 when out */
        total += e;
        if (e > 0.0f) w[n++] = e;
    }
    float floor_w = 0.0f;   /* weights below it are out (top-p, min-p); of those equal to it, `ties` are in */
    long ties = vocab;
    if (p->top_p < 1.0f && n > 1) floor_w = top_mass_cut(w, n, (double)p->top_p * total, &ties);
    if (p->min_p > 0.0f && p->min_p > floor_w) {   /* the most likely token weighs 1 */
        floor_w = p->min_p;
        ties = vocab;
    }
    double kept = 0.0;
    long quota = ties;
    for (long i = 0; i < vocab; i++)
        if (kept_weight(x[i], floor_w, &quota)) kept += x[i];
    const double u = rng_uniform(rng) * kept;
    double sum = 0.0;
    long last = 0;
    quota = ties;
    for (long i = 0; i < vocab; i++) {
        if (!kept_weight(x[i], floor_w, &quota)) continue;
        last = i;
        sum += x[i];
        if (sum > u) return i;
    }
    return last;   /* rounding left u at the very top */
}

/* out[r] = a token drawn from row r of `logits` [rows, vocab] under params[r] (see above), from a generator seeded
 * with `seed` and r; rows whose temperature is not positive (greedy) are left as they are. `scratch`: 2 x vocab
 * floats per thread. */
void llmserve_sample_rows(const float *logits, long rows, long vocab, const sample_params *params, uint64_t seed,
                          long *out, float *scratch, int num_threads) {
    #pragma omp parallel for num_threads(num_threads) if (rows > 1)
    for (long r = 0; r < rows; r++) {
        if (!(params[r].temperature > 0.0f)) continue;
        sample_rng rng = rng_seeded(seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(r + 1)));
        out[r] = sample_row(logits + r * vocab, vocab, &params[r], &rng, scratch + 2 * vocab * omp_get_thread_num());
    }
}

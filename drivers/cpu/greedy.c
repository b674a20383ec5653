/* Greedy rows of a step's logits (services/inference/sampler.py): each row's first maximum, and
 * that token's log-probability under the unmodified softmax, -log(sum_j exp(x_j - max)), in one
 * call per step. In place of PyTorch's max, sub, exp, sum and log over the vocabulary, each a
 * dispatch whose code the step's weight stream has just pushed out of the caches (~170 us a
 * one-user int8 step, measured; this call ~20).
 *
 * A row holding NaN picks its first NaN, as torch.max does; a row whose maximum is not finite
 * (NaN, or all -inf, or +inf) gets a NaN log-probability, as PyTorch's ops give.
 * logits: [n, v] with row stride stride; token: [n] int64; logprob: [n] fp32.
 */
#include <math.h>
#include <stdint.h>

#include "exp.h"

enum { CHUNK = 512 };   /* the row is read in chunks: each chunk's max, then its exp sum */

static float chunk_max(const float *x, int64_t n, int *nan) {
    float best = -INFINITY;
    int seen = 0;
    #pragma omp simd reduction(max:best) reduction(|:seen)
    for (int64_t j = 0; j < n; j++) {
        best = x[j] > best ? x[j] : best;
        seen |= x[j] != x[j];
    }
    *nan |= seen;
    return best;
}

/* kept out of line: inlined into its caller, GCC 12 left the AVX2 loop scalar (5x slower) */
static __attribute__((noinline)) float exp_sum(const float *x, int n, float best) {
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int j = 0; j < n; j++) sum += exp_nonpositive(x[j] - best);
    return sum;
}

static void greedy_row(const float *x, int64_t v, int64_t *token, float *logprob) {
    float best = -INFINITY;
    int64_t best_chunk = 0;
    int nan = 0;
    for (int64_t c = 0; c < v; c += CHUNK) {   /* the first chunk holding the maximum */
        float m = chunk_max(x + c, c + CHUNK < v ? CHUNK : v - c, &nan);
        if (m > best) {
            best = m;
            best_chunk = c;
        }
    }
    int64_t at = 0;
    if (nan) {   /* NaN wins, as in torch.max: the first one */
        while (x[at] == x[at]) at++;
        *token = at;
        *logprob = NAN;
        return;
    }
    at = best_chunk;
    while (at < v - 1 && x[at] != best) at++;   /* the first maximum, within that chunk */
    *token = at;
    if (!isfinite(best)) {
        *logprob = NAN;
        return;
    }
    /* float sums of a chunk's terms, added in double: one float sum over ~50K terms in 8 lanes
     * drifts ~5e-5 (measured, AVX2), past what a log-probability may */
    double total = 0.0;
    for (int64_t c = 0; c < v; c += CHUNK)
        total += exp_sum(x + c, c + CHUNK < v ? CHUNK : (int)(v - c), best);
    *logprob = (float)-log(total);
}

void greedy(const float *logits, int64_t stride, int64_t n, int64_t v, int64_t *token,
            float *logprob, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * v >= (1 << 18))
    for (int64_t r = 0; r < n; r++) greedy_row(logits + r * stride, v, token + r, logprob + r);
}

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

static void greedy_row(const float *x, int64_t v, int64_t *token, float *logprob) {
    float best = -INFINITY;
    int64_t at = 0;
    for (int64_t j = 0; j < v; j++) {
        if (x[j] != x[j]) {   /* NaN wins, as in torch.max */
            *token = j;
            *logprob = NAN;
            return;
        }
        if (x[j] > best) {
            best = x[j];
            at = j;
        }
    }
    *token = at;
    if (!isfinite(best)) {
        *logprob = NAN;
        return;
    }
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int64_t j = 0; j < v; j++) sum += exp_nonpositive(x[j] - best);
    *logprob = -logf(sum);
}

void greedy(const float *logits, int64_t stride, int64_t n, int64_t v, int64_t *token,
            float *logprob, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * v >= (1 << 18))
    for (int64_t r = 0; r < n; r++) greedy_row(logits + r * stride, v, token + r, logprob + r);
}

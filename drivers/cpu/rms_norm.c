/* Llama's RMSNorm in fp32, one call per norm: out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w,
 * the products in PyTorch's order. With delta, the residual add before the norm is fused in:
 * x[r] += delta[r] first, in place, as x.add_(delta) would. In place of the seven to nine ops
 * of the PyTorch norm (pow, mean, add, rsqrt, two products, casts), each a dispatch that misses
 * the caches the weights just swept. The sum of squares adds in another order than ATen's, so
 * a row may differ from F.rms_norm in the last bit; each row is computed alone, the same in any
 * batch.
 *
 * x: [n, k] with row stride x_stride; delta: [n, k] with row stride delta_stride, or NULL;
 * w: [k]; out: [n, k] contiguous.
 */
#include <math.h>
#include <stdint.h>

#include "rms.h"

static void norm_row(float *x, const float *delta, const float *w, float eps, float *out,
                     int64_t k) {
    const float r = add_rms_factor(x, delta, k, eps);
    #pragma omp simd
    for (int64_t j = 0; j < k; j++) out[j] = x[j] * r * w[j];
}

void rms_norm(float *x, int64_t x_stride, const float *delta, int64_t delta_stride,
              const float *w, float eps, float *out, int64_t n, int64_t k, int threads) {
    /* small batches stay on the calling thread: waking a second costs more than the rows */
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * k >= (1 << 16))
    for (int64_t r = 0; r < n; r++)
        norm_row(x + r * x_stride, delta ? delta + r * delta_stride : 0, w, eps, out + r * k, k);
}

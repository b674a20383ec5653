/* Per-row scaling before the int8 linear (drivers/quant/cpu_int8.py): each row of x, times
 * inv_smooth when given, is divided by its absolute maximum, so every row spans [-1, 1] and
 * quantizes with one fixed (scale, zero point) whatever its batch; amax[r] keeps that maximum
 * (at least 1e-30) to scale the row's output back. One pass in place of five PyTorch ops (mul,
 * abs, amax, clamp, div), each paying a dispatch that misses the caches the weights just swept.
 * The arithmetic per element is the same (a product, an exact maximum, a true division), so
 * the rows are bit-identical to the PyTorch path's. A row holding NaN keeps NaN as its maximum,
 * as amax does.
 *
 * x: [n, k] with row stride x_stride; rows: [n, k] contiguous; amax: [n].
 */
#include <math.h>
#include <stdint.h>

static void scale_row(const float *x, const float *inv_smooth, float *row, float *amax,
                      int64_t k) {
    float m = 0.0f;
    int nan = 0;
    if (inv_smooth) {
        #pragma omp simd reduction(max:m) reduction(|:nan)
        for (int64_t j = 0; j < k; j++) {
            float v = x[j] * inv_smooth[j];
            row[j] = v;
            m = fabsf(v) > m ? fabsf(v) : m;
            nan |= v != v;
        }
    } else {
        #pragma omp simd reduction(max:m) reduction(|:nan)
        for (int64_t j = 0; j < k; j++) {
            float v = x[j];
            row[j] = v;
            m = fabsf(v) > m ? fabsf(v) : m;
            nan |= v != v;
        }
    }
    m = nan ? NAN : (m < 1e-30f ? 1e-30f : m);
    *amax = m;
    #pragma omp simd
    for (int64_t j = 0; j < k; j++) row[j] = row[j] / m;
}

void row_scale(const float *x, int64_t x_stride, const float *inv_smooth, float *rows,
               float *amax, int64_t n, int64_t k, int threads) {
    /* small batches stay on the calling thread: waking a second costs more than the rows */
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * k >= (1 << 16))
    for (int64_t r = 0; r < n; r++)
        scale_row(x + r * x_stride, inv_smooth, rows + r * k, amax + r, k);
}

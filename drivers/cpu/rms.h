/* RMSNorm's factor for one row, shared by rms_norm.c and int8_linear.c (which folds the norm
 * into its rows' quantization): x += delta in place first (the residual stream, when delta is
 * given), then r = 1 / sqrt(mean(x^2) + eps). A header: build.py keys each library on it too. */
#ifndef LLMASOS_RMS_H
#define LLMASOS_RMS_H
#include <math.h>
#include <stdint.h>

static inline float add_rms_factor(float *x, const float *delta, int64_t k, float eps) {
    float sum = 0.0f;
    if (delta) {
        #pragma omp simd reduction(+:sum)
        for (int64_t j = 0; j < k; j++) {
            float v = x[j] + delta[j];
            x[j] = v;
            sum += v * v;
        }
    } else {
        #pragma omp simd reduction(+:sum)
        for (int64_t j = 0; j < k; j++) sum += x[j] * x[j];
    }
    return 1.0f / sqrtf(sum / (float)k + eps);
}

#endif

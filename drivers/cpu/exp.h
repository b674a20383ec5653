/* exp(x) for x <= 0, shared by the native kernels of this folder (a header: build.py keys each
 * library on the headers too, so a change here rebuilds them). */
#ifndef LLMASOS_EXP_H
#define LLMASOS_EXP_H
#include <stdint.h>

/* x < -87 ? -87 : x (NaN stays NaN), as a bitwise blend: GCC 12 turns the ternary into a
 * branch for AVX2 and then leaves every loop calling this scalar (5x slower, measured) */
static inline float floor_at_minus_87(float x) {
    const float lo = -87.0f;
    int32_t xb, lb;
    __builtin_memcpy(&xb, &x, sizeof xb);
    __builtin_memcpy(&lb, &lo, sizeof lb);
    const int32_t below = -(int32_t)(x < lo);   /* all ones where x < -87 */
    const int32_t r = (xb & ~below) | (lb & below);
    __builtin_memcpy(&x, &r, sizeof x);
    return x;
}

/* exp(x) for x <= 0: Cephes' expf polynomial (max relative error ~1.5e-7), branch-free so the
 * loops calling it vectorize; below -87 it returns ~1.6e-38 instead of underflowing to 0.
 * n = round(x / ln 2) by adding and subtracting 1.5 * 2^23 (exact for |n| < 2^22): with
 * floorf GCC 12 left the softmax loop scalar (-fopt-info-vec), ~30% of this kernel's time. */
static inline float exp_nonpositive(float x) {
    const float shifter = 12582912.0f;   /* 1.5 * 2^23: the sum's last bit is the integer */
    x = floor_at_minus_87(x);
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    __builtin_memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

#endif

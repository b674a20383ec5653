/* The CPU int8 linear (drivers/quant/cpu_native.py): y = x @ W.T for fp32 rows x and int8
 * weights W quantized per output channel (symmetric, in [-127, 127]), the activations quantized
 * per row inside this call.
 *
 * Per row r: v = x * mul (mul per channel: the SmoothQuant factor inv_smooth, an RMSNorm's
 * weight, their product, or none), a = max|v| (at least 1e-30), and each element is
 * s = round(v / a * 127) (to nearest even; in [-127, 127]). Per output n the int8 products add
 * exactly in int32, acc = sum_k s * w, and y = (float)acc * col_scale[n] * (a * c) (+ bias[n]),
 * with col_scale = the weight's scale / 127 and c the row's norm factor (1 without a norm).
 * A row's result depends on that row alone: the same bits alone or in any batch, and on the
 * AVX-512 VNNI, AVX2 and scalar paths alike (they add the same integers, and the float ops are
 * the same ones in the same order).
 *
 * Two producers of the rows are fused in, each saving a pass and a dispatch a layer: a gated
 * MLP's silu(gate) * up (the down projection), and the residual add and RMSNorm before a
 * layer's first linear (q/k/v, gate/up).
 *
 * Weights are packed (drivers/quant/cpu_native.py) in blocks of 16 output channels:
 * w[(nb * kp / 4 + kq) * 64 + c * 4 + j] = W[nb * 16 + c, kq * 4 + j], kp = K rounded up to 4,
 * zeros in the padding; one 64-byte load holds 4 consecutive k of 16 channels, VNNI's shape.
 */
/* the epilogue's multiply then add round separately (no FMA), as its reference in the tests */
#ifdef __clang__
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "exp.h"
#include "rms.h"

#define BLOCK 16   /* output channels a block */
/* VNNI's dpbusd takes u8 x s8: rows are stored as s + 128, and the sums lose 128 * sum_k w */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ZERO 128
#define ROWS 8     /* rows computed together against one block (its weights load once) */
#else
#define ZERO 0
#define ROWS 4     /* AVX2 has 16 registers: 4 rows x 2 accumulators, weights, x */
#endif

int int8_linear_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

/* s + ZERO in a byte, s = v / m * 127 rounded to nearest even (|v| <= m, so |s| <= 127) */
static inline uint8_t quantize(float v, float m) {
    float s = nearbyintf(v / m * 127.0f);
    s = s > 127.0f ? 127.0f : (s < -127.0f ? -127.0f : s);   /* a NaN row: any byte will do */
    return (uint8_t)((int)s + ZERO);
}

/* One row of x times mul (per channel: the smoothing, the norm's weight or their product, or
 * NULL) quantized into q (kp wide, the padding zero); returns its scale.
 * A row holding NaN gets NaN as its scale, which makes its outputs NaN. */
static float quantize_row(const float *x, const float *mul, uint8_t *q, int64_t k,
                          int64_t kp) {
    float m = 0.0f;
    int nan = 0;
    if (mul) {
        #pragma omp simd reduction(max:m) reduction(|:nan)
        for (int64_t j = 0; j < k; j++) {
            float v = x[j] * mul[j];
            m = fabsf(v) > m ? fabsf(v) : m;
            nan |= v != v;
        }
    } else {
        #pragma omp simd reduction(max:m) reduction(|:nan)
        for (int64_t j = 0; j < k; j++) {
            m = fabsf(x[j]) > m ? fabsf(x[j]) : m;
            nan |= x[j] != x[j];
        }
    }
    m = nan ? NAN : (m < 1e-30f ? 1e-30f : m);
    if (mul) {
        #pragma omp simd
        for (int64_t j = 0; j < k; j++) q[j] = quantize(x[j] * mul[j], m);
    } else {
        #pragma omp simd
        for (int64_t j = 0; j < k; j++) q[j] = quantize(x[j], m);
    }
    for (int64_t j = k; j < kp; j++) q[j] = ZERO;
    return m;
}

/* silu(g) * u for a gated MLP's rows [gate | up]: silu(g) = g * sigmoid(g), the sigmoid from
 * exp(-|g|) <= 1, which neither overflows nor underflows to a wrong limit */
static void silu_mul_row(const float *gate_up, float *v, int64_t k) {
    #pragma omp simd
    for (int64_t j = 0; j < k; j++) {
        float g = gate_up[j], e = exp_nonpositive(-fabsf(g));
        v[j] = g * ((g >= 0.0f ? 1.0f : e) / (1.0f + e)) * gate_up[k + j];
    }
}

/* Integer sums acc[r][c] = sum_k u[r][k] * w[c][k] for `rows` rows against one block. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __m512i dot4(__m512i acc, const uint8_t *x, const int8_t *w) {
    int32_t x4;
    memcpy(&x4, x, 4);
    return _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(x4), _mm512_loadu_si512((const void *)w));
}

/* One row (a decode step's GEMV): four chains of sums, so the weights stream at the rate of
 * the loads rather than of one chain's latency. */
static void sums_one(const uint8_t *q, int64_t kp, const int8_t *w, int32_t *acc) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t kq = 0, nq = kp / 4;
    for (; kq + 4 <= nq; kq += 4) {
        a0 = dot4(a0, q + kq * 4, w + kq * 64);
        a1 = dot4(a1, q + kq * 4 + 4, w + kq * 64 + 64);
        a2 = dot4(a2, q + kq * 4 + 8, w + kq * 64 + 128);
        a3 = dot4(a3, q + kq * 4 + 12, w + kq * 64 + 192);
    }
    for (; kq < nq; kq++) a0 = dot4(a0, q + kq * 4, w + kq * 64);
    a0 = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
    _mm512_storeu_si512((void *)acc, a0);
}

static inline __attribute__((always_inline)) void sums(
        const uint8_t *q, int64_t kp, const int rows, const int8_t *w, int32_t acc[ROWS][BLOCK]) {
    if (rows == 1) {
        sums_one(q, kp, w, acc[0]);
        return;
    }
    __m512i a[ROWS];
    for (int r = 0; r < rows; r++) a[r] = _mm512_setzero_si512();
    for (int64_t kq = 0; kq < kp / 4; kq++) {
        __m512i wv = _mm512_loadu_si512((const void *)(w + kq * 64));
        for (int r = 0; r < rows; r++) {
            int32_t x4;
            memcpy(&x4, q + r * kp + kq * 4, 4);
            a[r] = _mm512_dpbusd_epi32(a[r], _mm512_set1_epi32(x4), wv);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_si512((void *)acc[r], a[r]);
}
#elif defined(__AVX2__)
/* No VNNI: maddubs multiplies u8 by s8 and adds pairs into int16, so x goes in as |x| (at most
 * 127) and w takes x's sign (w is in [-127, 127]): a pair is at most 2 * 127 * 127, below the
 * int16 limit, so nothing saturates; madd by ones then adds the pairs into int32. */
static inline __attribute__((always_inline)) void sums(
        const uint8_t *q, int64_t kp, const int rows, const int8_t *w, int32_t acc[ROWS][BLOCK]) {
    __m256i a[ROWS][2];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < rows; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
    for (int64_t kq = 0; kq < kp / 4; kq++) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + kq * 64));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + kq * 64 + 32));
        for (int r = 0; r < rows; r++) {
            int32_t x4;
            memcpy(&x4, q + r * kp + kq * 4, 4);
            __m256i xb = _mm256_set1_epi32(x4), ax = _mm256_abs_epi8(xb);
            __m256i p0 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb));
            __m256i p1 = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb));
            a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(p0, ones));
            a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(p1, ones));
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_si256((__m256i *)acc[r], a[r][0]);
        _mm256_storeu_si256((__m256i *)(acc[r] + 8), a[r][1]);
    }
}
#else
static inline void sums(const uint8_t *q, int64_t kp, const int rows, const int8_t *w,
                        int32_t acc[ROWS][BLOCK]) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < BLOCK; c++) {
            int32_t s = 0;
            for (int64_t kq = 0; kq < kp / 4; kq++)
                for (int j = 0; j < 4; j++)
                    s += (int8_t)q[r * kp + kq * 4 + j] * w[kq * 64 + c * 4 + j];
            acc[r][c] = s;
        }
}
#endif

/* rows as a constant in each call, so the accumulators stay in registers */
static void block_sums(const uint8_t *q, int64_t kp, int rows, const int8_t *w,
                       int32_t acc[ROWS][BLOCK]) {
    switch (rows) {
#if ROWS == 8
    case 8: sums(q, kp, 8, w, acc); break;
    case 7: sums(q, kp, 7, w, acc); break;
    case 6: sums(q, kp, 6, w, acc); break;
    case 5: sums(q, kp, 5, w, acc); break;
#endif
    case 4: sums(q, kp, 4, w, acc); break;
    case 3: sums(q, kp, 3, w, acc); break;
    case 2: sums(q, kp, 2, w, acc); break;
    default: sums(q, kp, 1, w, acc); break;
    }
}

/* The VNNI sums carry ZERO * sum_k w (they took s + ZERO); colsum128 = 128 * sum_k w */
#define OFFSET(colsum128, o) (ZERO ? (colsum128)[o] : 0)

static void block_rows(const uint8_t *q, int64_t kp, const float *amax, int64_t r0, int rows,
                       const int8_t *w, int64_t nb, const float *col_scale,
                       const int32_t *colsum128, const float *bias, int64_t n, float *y,
                       int64_t y_stride) {
    int32_t acc[ROWS][BLOCK];
    block_sums(q + r0 * kp, kp, rows, w + nb * (kp / 4) * 64, acc);
    int64_t n0 = nb * BLOCK, width = n - n0 < BLOCK ? n - n0 : BLOCK;
    float out[BLOCK];
    for (int r = 0; r < rows; r++) {
        const float a = amax[r0 + r];
        if (width == BLOCK) {
            #pragma omp simd
            for (int c = 0; c < BLOCK; c++) {
                float v = (float)(acc[r][c] - OFFSET(colsum128, n0 + c)) * col_scale[n0 + c] * a;
                out[c] = bias ? v + bias[n0 + c] : v;
            }
        } else {
            for (int c = 0; c < width; c++) {
                float v = (float)(acc[r][c] - OFFSET(colsum128, n0 + c)) * col_scale[n0 + c] * a;
                out[c] = bias ? v + bias[n0 + c] : v;
            }
        }
        memcpy(y + (r0 + r) * y_stride + n0, out, (size_t)width * sizeof(float));
    }
}

static uint8_t *scratch(size_t bytes) {
    static __thread uint8_t *buf;
    static __thread size_t cap;
    if (bytes > cap) {
        free(buf);
        buf = malloc(bytes);
        cap = buf ? bytes : 0;
    }
    return buf;
}

/* The RMSNorm before a linear is folded into its rows' quantization (rms.h): the quantizer
 * takes x times the norm's weight, and the norm's factor joins the row's scale, as quantizing
 * per row divides any common factor out; only the epilogue needs it. */

/* y [m, n] (row stride y_stride) = the int8 linear of x [m, k] (row stride x_stride).
 * gated: x [m, 2k] holds an MLP's [gate | up] rows and the linear takes silu(gate) * up.
 * norm_w: the linear takes RMSNorm(x + delta) with that weight (delta [m, k], row stride
 * delta_stride, or NULL), x += delta written back. Returns 0, or -1 where the scratch for the
 * quantized rows could not be had. */
int int8_linear(float *x, int64_t x_stride, const float *delta, int64_t delta_stride,
                const float *norm_w, float eps, const float *inv_smooth, int64_t m, int64_t k,
                const int8_t *w, const float *col_scale, const int32_t *colsum128,
                const float *bias, int64_t n, float *y, int64_t y_stride, int gated,
                int threads) {
    int64_t kp = (k + 3) / 4 * 4, blocks = (n + BLOCK - 1) / BLOCK;
    size_t q_bytes = (size_t)(m * kp), a_bytes = (size_t)m * sizeof(float);
    size_t v_bytes = gated ? (size_t)(m * k) * sizeof(float) : 0;
    size_t mul_bytes = norm_w && inv_smooth ? (size_t)k * sizeof(float) : 0;
    uint8_t *q = scratch(q_bytes + a_bytes + v_bytes + mul_bytes);
    if (!q) return -1;
    /* m * kp is a multiple of 4: the float arrays after it are aligned */
    float *amax = (float *)(q + q_bytes), *v = amax + m, *mul = v + (gated ? m * k : 0);
    if (norm_w && inv_smooth)
        for (int64_t j = 0; j < k; j++) mul[j] = norm_w[j] * inv_smooth[j];
    else
        mul = (float *)(norm_w ? norm_w : inv_smooth);
    int big = m * k >= (1 << 16);
    #pragma omp parallel num_threads(threads) if (big || blocks * kp >= (1 << 14))
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++) {
            float *row = x + r * x_stride, scale = 1.0f;
            if (gated) {
                silu_mul_row(row, v + r * k, k);
                row = v + r * k;
            } else if (norm_w) {
                scale = add_rms_factor(row, delta ? delta + r * delta_stride : 0, k, eps);
            }
            amax[r] = quantize_row(row, mul, q + r * kp, k, kp) * scale;
        }
        /* blocks split across threads: each streams its own share of the weights once */
        #pragma omp for schedule(static)
        for (int64_t nb = 0; nb < blocks; nb++)
            for (int64_t r0 = 0; r0 < m; r0 += ROWS)
                block_rows(q, kp, amax, r0, m - r0 < ROWS ? (int)(m - r0) : ROWS, w, nb,
                           col_scale, colsum128, bias, n, y, y_stride);
    }
    return 0;
}

/* RoPE on the step's queries and keys, in place in the fused QKV rows, then the keys and
 * values stored at their pool slots: one call per layer in place of the ten-odd PyTorch ops
 * of apply_rope and write_kv (products, roll, add, slices, two index_copy_), each a dispatch
 * that misses the caches the weights just swept. Rotate-half over the whole head, with the
 * tables of LlamaModel.rope: cos = [cos, cos], sin = [-sin, sin], so
 *   x'[j] = x[j] * cos[j] + x[(j + D/2) mod D] * sin[j],
 * a product, a product and a sum, each rounded as PyTorch rounds them (no fused multiply-add),
 * so the rows and the pool hold the bits of the PyTorch path. An fp16 pool gets the keys and
 * values rounded to nearest even, as .to(torch.float16) rounds.
 *
 * qkv: [T, (hq + 2 hkv) * D], row stride qkv_stride; cos, sin: [T, D], row stride rot_stride;
 * slots: [T]; k_cache, v_cache: [num_slots, hkv, D], fp32 or fp16 (half != 0).
 * Returns 0, or -1 when a slot lies outside the pool: nothing is then written to the pool.
 */
#ifdef __clang__
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <stdint.h>
#include <immintrin.h>

static void rotate(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t h = D / 2;
    #pragma omp simd
    for (int64_t j = 0; j < h; j++) {
        float a = x[j], b = x[j + h];
        float lo = a * cos[j], lo_r = b * sin[j];
        float hi = b * cos[j + h], hi_r = a * sin[j + h];
        x[j] = lo + lo_r;
        x[j + h] = hi + hi_r;
    }
}

static void store(void *cache, int64_t at, const float *src, int64_t n, int half) {
    if (!half) {
        float *dst = (float *)cache + at;
        for (int64_t j = 0; j < n; j++) dst[j] = src[j];
        return;
    }
    uint16_t *dst = (uint16_t *)cache + at;
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; j++) {
        _Float16 v = (_Float16)src[j];
        __builtin_memcpy(dst + j, &v, sizeof v);
    }
}

int rope_kv(float *qkv, int64_t qkv_stride, const float *cos, const float *sin,
            int64_t rot_stride, const int64_t *slots, void *k_cache, void *v_cache,
            int64_t num_slots, int64_t T, int64_t hq, int64_t hkv, int64_t D, int half,
            int threads) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    const int64_t kv = hkv * D;
    #pragma omp parallel for num_threads(threads) schedule(static) if (T >= 64)
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * qkv_stride;
        for (int64_t head = 0; head < hq + hkv; head++)
            rotate(row + head * D, cos + t * rot_stride, sin + t * rot_stride, D);
        store(k_cache, slots[t] * kv, row + hq * D, kv, half);
        store(v_cache, slots[t] * kv, row + (hq + hkv) * D, kv, half);
    }
    return 0;
}

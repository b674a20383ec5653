/* Paged decode attention on the CPU: one query per sequence attends to its context where the
 * context lies, in the KV pool's blocks, so no gathered copy of K and V is made (the PyTorch
 * path copies every block it reads first, then reads the copy again in SDPA).
 *
 * Layout (drivers/model/kv_pool.py): k_cache, v_cache [num_blocks, block_size, kv_heads, D],
 * fp32 or fp16 (half != 0: read as fp16 and widened to fp32 on load, half the bytes to fetch);
 * token t of sequence b is at block tables[b][t / block_size], offset t % block_size.
 * q: rows [B] of [kv_heads * G, D] (query head h * G + g reads KV head h), row stride q_stride.
 * out: [B, kv_heads * G, D], contiguous.
 *
 * One (sequence, KV head) pair is one unit of work: its G query heads read each key and value
 * once. Each sequence's result depends only on its own query and context, in a fixed order, so
 * it is bit-identical alone or in any batch. Scores and the softmax are fp32, as SDPA's are.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#include "exp.h"
#include <immintrin.h>

typedef float v16 __attribute__((vector_size(64)));   /* 16 floats: 1 AVX-512 or 2 AVX2 regs */

enum { MAX_G = 16, MAX_C = 16 };   /* query heads per KV head; head_dim / 16 (head_dim <= 256) */
enum { AHEAD = 32 };   /* tokens between a prefetch and the read it serves */

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* 16 KV elements from cache[index]: fp32 as they are, fp16 widened (F16C / AVX-512 convert) */
static inline v16 load_kv(const void *cache, int64_t index, const int half) {
    if (!half) return load16((const float *)cache + index);
    const uint16_t *h = (const uint16_t *)cache + index;
    v16 v;
#if defined(__AVX512F__)
    __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
    memcpy(&v, &w, sizeof v);
#elif defined(__F16C__)
    __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8)));
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
#else
    for (int i = 0; i < 16; i++) v[i] = (float)((const _Float16 *)h)[i];   /* no F16C */
#endif
    return v;
}

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* a tree of halves: 4 dependent adds, where a lane-by-lane loop is 15 */
static inline float sum16(v16 v) {
    v8 lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    lo += hi;
    v4 a, b;
    memcpy(&a, &lo, sizeof a);
    memcpy(&b, (const char *)&lo + sizeof a, sizeof b);
    a += b;
    return (a[0] + a[2]) + (a[1] + a[3]);
}

/* token t's first element in a pool layer; block_size is a power of two (the engine's is 16),
 * so the division and remainder are a shift and a mask, not two 64-bit divides per token */
static inline int64_t token(const int64_t *table, int64_t t, int64_t block_size,
                            int64_t token_stride) {
    int64_t shift = __builtin_ctzll((unsigned long long)block_size);
    return ((table[t >> shift] << shift) + (t & (block_size - 1))) * token_stride;
}

static inline void prefetch(const void *cache, int64_t index, const int half) {
    __builtin_prefetch((const char *)cache + index * (half ? 2 : 4));
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
/* AVX2 has 16 vector registers: unit() below keeps every query head's row and accumulators
 * (24 of each for G = 3, D = 64) and spills, and sums each score across lanes alone: 36 us per
 * (sequence, KV head) of 128 tokens on a 2-core AMD EPYC (Zen 2). Here one query head at a
 * time: its row in 8-wide registers, eight keys' dot products reduced together (sums8), then
 * the values summed over all of D at once: 8.5 us. */
static inline __m256 kv8(const void *cache, int64_t index, const int half) {
    if (!half) return _mm256_loadu_ps((const float *)cache + index);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + index)));
}

/* x[j]'s eight lanes summed, into lane j */
static inline __m256 sums8(const __m256 x[8]) {
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(x[4], x[5]), _mm256_hadd_ps(x[6], x[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                         _mm256_permute2f128_ps(a, b, 0x31));
}

static inline float sum8(__m256 x) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

static inline float max8(__m256 x) {
    __m128 v = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_max_ss(v, _mm_movehdup_ps(v)));
}

/* one query head's scores p[0, len) and their max; E = D / 8; ahead: prefetch K (the first
 * head's pass, which brings K into the cache for the others) */
static inline __attribute__((always_inline)) float scores(
        const float *qg, const void *k_cache, const int64_t *table, int64_t len,
        int64_t block_size, int64_t token_stride, int64_t hd, const int64_t E, const int half,
        float scale, int ahead, float *p) {
    __m256 qv[2 * MAX_C];
    for (int64_t e = 0; e < E; e++) qv[e] = _mm256_mul_ps(_mm256_loadu_ps(qg + e * 8),
                                                          _mm256_set1_ps(scale));
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        __m256 dots[8];
        for (int j = 0; j < 8; j++) {
            const int64_t k = token(table, t + j, block_size, token_stride) + hd;
            if (ahead && t + j + AHEAD < len) {   /* the pool is read at random: ask early */
                const int64_t later = token(table, t + j + AHEAD, block_size, token_stride) + hd;
                for (int64_t e = 0; e < E; e += half ? 4 : 2)
                    prefetch(k_cache, later + e * 8, half);
            }
            __m256 d = _mm256_mul_ps(qv[0], kv8(k_cache, k, half));
            for (int64_t e = 1; e < E; e++)
                d = _mm256_fmadd_ps(qv[e], kv8(k_cache, k + e * 8, half), d);
            dots[j] = d;
        }
        __m256 s = sums8(dots);
        _mm256_storeu_ps(p + t, s);
        top8 = _mm256_max_ps(top8, s);
    }
    float top = max8(top8);
    for (; t < len; t++) {
        const int64_t k = token(table, t, block_size, token_stride) + hd;
        __m256 d = _mm256_mul_ps(qv[0], kv8(k_cache, k, half));
        for (int64_t e = 1; e < E; e++)
            d = _mm256_fmadd_ps(qv[e], kv8(k_cache, k + e * 8, half), d);
        p[t] = sum8(d);
        top = p[t] > top ? p[t] : top;
    }
    return top;
}

static inline __attribute__((always_inline)) void unit(
        const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
        int64_t len, float *out, int64_t block_size, int64_t kv_heads, int64_t h, int64_t G,
        const int64_t C, const int half, float scale, float *p /* [G, len] scratch */) {
    const int64_t D = C * 16, E = C * 2, token_stride = kv_heads * D, hd = h * D;
    for (int64_t g = 0; g < G; g++) {
        float *pg = p + g * len;
        float top = scores(q + g * D, k_cache, table, len, block_size, token_stride, hd, E,
                           half, scale, g == 0, pg);
        float sum = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (int64_t t = 0; t < len; t++) {
            pg[t] = exp_nonpositive(pg[t] - top);
            sum += pg[t];
        }
        __m256 acc[2 * MAX_C];
        for (int64_t e = 0; e < E; e++) acc[e] = _mm256_setzero_ps();
        for (int64_t t = 0; t < len; t++) {   /* the values, weighted */
            const int64_t v = token(table, t, block_size, token_stride) + hd;
            if (g == 0 && t + AHEAD < len) {
                const int64_t later = token(table, t + AHEAD, block_size, token_stride) + hd;
                for (int64_t e = 0; e < E; e += half ? 4 : 2)
                    prefetch(v_cache, later + e * 8, half);
            }
            const __m256 w = _mm256_set1_ps(pg[t]);
            for (int64_t e = 0; e < E; e++)
                acc[e] = _mm256_fmadd_ps(w, kv8(v_cache, v + e * 8, half), acc[e]);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (int64_t e = 0; e < E; e++)
            _mm256_storeu_ps(out + g * D + e * 8, _mm256_mul_ps(acc[e], inv));
    }
}
#else
/* C = head_dim / 16, a constant in each caller below so the vectors stay in registers */
static inline __attribute__((always_inline)) void unit(
        const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
        int64_t len, float *out, int64_t block_size, int64_t kv_heads, int64_t h, int64_t G,
        const int64_t C, const int half, float scale, float *p /* [G, len] scratch */) {
    const int64_t D = C * 16, token_stride = kv_heads * D;
    v16 qv[MAX_G][MAX_C], acc[MAX_G][MAX_C];
    float top[MAX_G], total[MAX_G];
    for (int64_t g = 0; g < G; g++) {
        for (int64_t c = 0; c < C; c++) qv[g][c] = load16(q + g * D + c * 16) * scale;
        top[g] = -INFINITY;
        total[g] = 0.0f;
    }
    for (int64_t t = 0; t < len; t++) {   /* scores, and each head's max */
        const int64_t k = token(table, t, block_size, token_stride) + h * D;
        if (t + AHEAD < len) {   /* the pool is read at random: ask for a later token early */
            const int64_t later = token(table, t + AHEAD, block_size, token_stride) + h * D;
            for (int64_t c = 0; c < C; c += half ? 2 : 1) prefetch(k_cache, later + c * 16, half);
        }
        v16 kv[MAX_C];
        for (int64_t c = 0; c < C; c++) kv[c] = load_kv(k_cache, k + c * 16, half);
        for (int64_t g = 0; g < G; g++) {
            v16 dot = qv[g][0] * kv[0];
            for (int64_t c = 1; c < C; c++) dot += qv[g][c] * kv[c];
            float s = sum16(dot);
            p[g * len + t] = s;
            top[g] = s > top[g] ? s : top[g];
        }
    }
    for (int64_t g = 0; g < G; g++) {   /* unnormalized probabilities */
        float *pg = p + g * len, m = top[g], sum = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (int64_t t = 0; t < len; t++) {
            pg[t] = exp_nonpositive(pg[t] - m);
            sum += pg[t];
        }
        total[g] = sum;
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t c = 0; c < C; c++) acc[g][c] = (v16){0};
    for (int64_t t = 0; t < len; t++) {   /* the values, weighted */
        const int64_t v = token(table, t, block_size, token_stride) + h * D;
        if (t + AHEAD < len) {
            const int64_t later = token(table, t + AHEAD, block_size, token_stride) + h * D;
            for (int64_t c = 0; c < C; c += half ? 2 : 1) prefetch(v_cache, later + c * 16, half);
        }
        v16 vv[MAX_C];
        for (int64_t c = 0; c < C; c++) vv[c] = load_kv(v_cache, v + c * 16, half);
        for (int64_t g = 0; g < G; g++) {
            float w = p[g * len + t];
            for (int64_t c = 0; c < C; c++) acc[g][c] += w * vv[c];
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float inv = 1.0f / total[g];
        for (int64_t c = 0; c < C; c++) store16(out + g * D + c * 16, acc[g][c] * inv);
    }
}
#endif

/* unit() with the common head sizes unrolled; any other multiple of 16 generic */
static inline __attribute__((always_inline)) void unit_of(
        const float *q, const void *k_cache, const void *v_cache, const int64_t *table,
        int64_t len, float *out, int64_t block_size, int64_t kv_heads, int64_t h, int64_t G,
        int64_t C, const int half, float scale, float *p) {
    switch (C) {
    case 4: unit(q, k_cache, v_cache, table, len, out, block_size, kv_heads, h, G, 4, half,
                 scale, p); break;
    case 8: unit(q, k_cache, v_cache, table, len, out, block_size, kv_heads, h, G, 8, half,
                 scale, p); break;
    default: unit(q, k_cache, v_cache, table, len, out, block_size, kv_heads, h, G, C, half,
                  scale, p);
    }
}

/* Returns 0, or -1 when the shape is outside what this file handles (the caller checks first). */
int paged_decode(const float *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                 const int64_t *tables, int64_t table_width, const int64_t *lens, float *out,
                 int64_t batch, int64_t block_size, int64_t kv_heads, int64_t G,
                 int64_t head_dim, float scale, int threads, float *scratch,
                 int64_t scratch_per_thread, int half) {
    const int64_t C = head_dim / 16;
    if (head_dim % 16 || C < 1 || C > MAX_C || G < 1 || G > MAX_G || block_size < 1 ||
        (block_size & (block_size - 1)))
        return -1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < batch * kv_heads; item++) {
        int64_t b = item / kv_heads, h = item % kv_heads;
        const float *qh = q + b * q_stride + h * G * head_dim;
        float *oh = out + (b * kv_heads + h) * G * head_dim;
        float *p = scratch + omp_get_thread_num() * scratch_per_thread;
        const int64_t *table = tables + b * table_width;
        if (half)   /* a constant in each call: unit() is built for each KV width */
            unit_of(qh, k_cache, v_cache, table, lens[b], oh, block_size, kv_heads, h, G, C, 1,
                    scale, p);
        else
            unit_of(qh, k_cache, v_cache, table, lens[b], oh, block_size, kv_heads, h, G, C, 0,
                    scale, p);
    }
    return 0;
}

/* y [m, n] = x [m, k] @ W.T (+ bias), fp32, with W packed in panels of 16 output channels:
 * [ceil(n/16)][k][16], zero-padded past n. Each thread streams its panels from memory once, in
 * order, and keeps the sums of a tile of rows in registers while the panel sits in its cache
 * (drivers/cpu/packed_linear.py; the load-time probe picks it per row regime where it is faster).
 *
 * Written with GCC's vector types at the register's width, not one ISA's intrinsics: a panel row
 * is one AVX-512 register, two AVX2 ones, four SSE ones, so the one source is the kernel on every
 * x86 level (and on any CPU GCC targets). Each row's sums run over k in the same order however
 * many rows come with it: a row's result does not depend on its batch. */
#include <stdint.h>
#include <string.h>

#pragma GCC diagnostic ignored "-Wpsabi"   /* v16 returns stay inside this file: no ABI to keep */

#define PANEL 16   /* output channels a panel (drivers/cpu/packed_linear.py's PANEL) */
/* -DPACKED_LAYOUT=512 takes AVX-512's tiles on a CPU without it (GCC splits each 64-byte vector
 * in two), so a test checks the tile code a Xeon runs on any x86 */
#if defined(__AVX512F__) || PACKED_LAYOUT == 512
#define LANES 16   /* floats a register holds */
#define ROWS 12    /* rows a tile: their sums (one zmm each) and a panel row fit 32 registers */
#elif defined(__AVX__)
#define LANES 8
#define ROWS 6     /* two ymm of sums a row, 12 in all, + 2 for the panel row + 1 broadcast */
#else
#define LANES 4
#define ROWS 3     /* four xmm of sums a row, 12 in all, + 4 for the panel row */
#endif
#define PARTS (PANEL / LANES)   /* registers a row of a panel takes */

typedef float vec __attribute__((vector_size(LANES * 4)));
typedef float v16 __attribute__((vector_size(PANEL * 4)));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);   /* unaligned: the compiler emits one plain load */
    return v;
}

/* rows (<= ROWS, a constant where inlined) rows of x times one panel: 16 sums a row. The
 * accumulators are an array of native registers indexed by constants only, so the compiler
 * keeps every one in a register (a wider vector type it spilled to the stack). */
static inline __attribute__((always_inline)) void tile(
        const float *x, int64_t ldx, const float *panel, int64_t k, int rows, v16 *sums) {
    vec acc[ROWS][PARTS];
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < PARTS; j++) acc[r][j] = (vec){0};
    for (int64_t i = 0; i < k; i++) {
        vec w[PARTS];
        for (int j = 0; j < PARTS; j++) w[j] = load(panel + i * PANEL + j * LANES);
        for (int r = 0; r < ROWS; r++) {
            if (r >= rows) break;
            float xv = x[r * ldx + i];
            for (int j = 0; j < PARTS; j++) acc[r][j] += xv * w[j];
        }
    }
    for (int r = 0; r < rows; r++) memcpy(&sums[r], acc[r], sizeof sums[r]);
}

static void tile_any(const float *x, int64_t ldx, const float *panel, int64_t k, int rows,
                     v16 *sums) {
    switch (rows) {   /* each case a tile with its row count known: all sums in registers */
#define CASE(n) case n: tile(x, ldx, panel, k, n, sums); break;
    CASE(1) CASE(2) CASE(3)
#if ROWS > 3
    CASE(4) CASE(5) CASE(6)
#endif
#if ROWS > 6
    CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#endif
#undef CASE
    }
}

static void store(const v16 *sums, int rows, const float *bias, int cols, float *y,
                  int64_t ldy) {
    float b[PANEL] = {0};
    if (bias) memcpy(b, bias, (size_t)cols * sizeof(float));
    v16 bv;
    memcpy(&bv, b, sizeof bv);
    for (int r = 0; r < rows; r++) {
        v16 s = sums[r] + bv;
        if (cols == PANEL) memcpy(y + r * ldy, &s, sizeof s);
        else memcpy(y + r * ldy, &s, (size_t)cols * sizeof(float));   /* the last, short panel */
    }
}

/* Panels are split across threads (each streams its share of W once); a thread takes all m
 * rows against its panel, ROWS at a time, while the panel is in its cache. */
void packed_linear(const float *x, int64_t ldx, int64_t m, int64_t k, const float *w,
                   const float *bias, int64_t n, float *y, int64_t ldy, int threads) {
    int64_t panels = (n + PANEL - 1) / PANEL;
    /* rows in tiles of even height (8 rows: 4 + 4, not 6 + 2): a short tile has too few sums
     * in flight to hide the FMA's latency */
    int64_t tiles = (m + ROWS - 1) / ROWS;
    #pragma omp parallel for num_threads(threads) schedule(static) if (panels * k >= (1 << 14))
    for (int64_t p = 0; p < panels; p++) {
        const float *panel = w + p * k * PANEL;
        int cols = n - p * PANEL < PANEL ? (int)(n - p * PANEL) : PANEL;
        const float *b = bias ? bias + p * PANEL : 0;
        v16 sums[ROWS];
        for (int64_t t = 0, r = 0; t < tiles; t++) {
            int rows = (int)(m / tiles + (t < m % tiles));
            tile_any(x + r * ldx, ldx, panel, k, rows, sums);
            store(sums, rows, b, cols, y + r * ldy + p * PANEL, ldy);
            r += rows;
        }
    }
}

/* W [n, k] (rows along k) into panels [ceil(n/16)][k][16], the last one padded with zero
 * channels: one pass, a panel per thread at a time (a model's weights at load, ~memory speed). */
void packed_linear_pack(const float *w, int64_t n, int64_t k, float *out, int threads) {
    int64_t panels = (n + PANEL - 1) / PANEL;
    #pragma omp parallel for num_threads(threads) schedule(static) if (panels * k >= (1 << 14))
    for (int64_t p = 0; p < panels; p++) {
        float *panel = out + p * k * PANEL;
        for (int j = 0; j < PANEL; j++) {
            int64_t row = p * PANEL + j;
            if (row < n)
                for (int64_t i = 0; i < k; i++) panel[i * PANEL + j] = w[row * k + i];
            else
                for (int64_t i = 0; i < k; i++) panel[i * PANEL + j] = 0.0f;
        }
    }
}

/* A decode step's decoder layers in one call (drivers/cpu/decode_layers.py), for a Llama model
 * whose linears are all the native int8 ones: per layer the same native kernels, with the same
 * arguments and in the same order as LlamaModel.forward's Python loop calls them, so the bits
 * are the same; what goes is the Python between them, six calls a layer (in a step whose
 * weights sweep the caches, rotate_and_store took 18 us a call for ~1 us of C work).
 *
 * The kernels live in their own libraries; Python passes their addresses (struct kernels).
 * Per layer, with x the residual stream [T, hidden] and pending the last MLP's output:
 *   qkv  = int8_linear(RMSNorm(x += pending), Wqkv)     (no add in layer 0)
 *   rope_kv(qkv): RoPE on q and k in place, k and v into the pool
 *   attn = paged_decode(q of qkv)
 *   o    = int8_linear(attn, Wo)
 *   gu   = int8_linear(RMSNorm(x += o), Wgate_up)
 *   pending = int8_linear(silu(gate) * up of gu, Wdown)
 * Returns 0, or the first kernel's nonzero status, with the step's failed_layer and
 * failed_kernel set (nothing of that layer after it ran).
 */
#include <stdint.h>

typedef int (*linear_fn)(float *x, int64_t x_stride, const float *delta, int64_t delta_stride,
                         const float *norm_w, float eps, const float *inv_smooth, int64_t m,
                         int64_t k, const int8_t *w, const float *col_scale,
                         const int32_t *colsum128, const float *bias, int64_t n, float *y,
                         int64_t y_stride, int gated, int threads);
typedef int (*rope_kv_fn)(float *qkv, int64_t qkv_stride, const float *cos, const float *sin,
                          int64_t rot_stride, const int64_t *slots, void *k_cache,
                          void *v_cache, int64_t num_slots, int64_t T, int64_t hq, int64_t hkv,
                          int64_t D, int half, int threads);
typedef int (*decode_fn)(const float *q, int64_t q_stride, const void *k_cache,
                         const void *v_cache, const int64_t *tables, int64_t table_width,
                         const int64_t *lens, float *out, int64_t batch, int64_t block_size,
                         int64_t kv_heads, int64_t G, int64_t head_dim, float scale, int threads,
                         float *scratch, int64_t scratch_per_thread, int half);

struct kernels {
    linear_fn linear;
    rope_kv_fn rope_kv;
    decode_fn decode;
};

struct weight {   /* one native int8 linear (drivers/cpu/int8_linear.py's PackedInt8) */
    const int8_t *w;
    const float *col_scale;
    const int32_t *colsum128;
    const float *inv_smooth;   /* or NULL */
    const float *bias;         /* or NULL */
    int64_t n, k;
};

struct layer {
    struct weight qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm;
    void *k_cache, *v_cache;   /* the pool's layer views */
};

struct model {   /* what every step shares */
    int64_t num_layers, hq, hkv, head_dim, num_slots, block_size;
    float eps, scale;
    int half;   /* the pool holds fp16 */
};

struct step {
    int64_t T;
    float *x, *pending;        /* [T, hidden]; pending: the last layer's MLP output, out */
    float *qkv, *attn, *o, *gate_up;   /* scratch rows, [T, width of each] */
    const float *cos, *sin;    /* [T, head_dim] */
    const int64_t *slots;      /* [T] */
    const int64_t *tables;     /* the decode group's [T, table_width] */
    int64_t table_width;
    const int64_t *lens;       /* [T] */
    float *attn_scratch;       /* [threads, scratch_per_thread] */
    int64_t scratch_per_thread;
    int threads;
    int64_t failed_layer;
    int failed_kernel;   /* 0 a linear, 1 rope_kv, 2 paged_decode */
};

#define CHECK(kind, call) do { int st_ = (call); if (st_) { s->failed_kernel = (kind); \
                                                           return st_; } } while (0)

static int layer(const struct kernels *f, const struct model *m, const struct layer *l,
                 struct step *s, int first) {
    const int64_t T = s->T, hidden = l->qkv.k, G = m->hq / m->hkv;
    const struct weight *w = &l->qkv;
    CHECK(0, f->linear(s->x, hidden, first ? 0 : s->pending, hidden, l->attn_norm, m->eps,
                       w->inv_smooth, T, w->k, w->w, w->col_scale, w->colsum128, w->bias, w->n,
                       s->qkv, w->n, 0, s->threads));
    CHECK(1, f->rope_kv(s->qkv, l->qkv.n, s->cos, s->sin, m->head_dim, s->slots, l->k_cache,
                        l->v_cache, m->num_slots, T, m->hq, m->hkv, m->head_dim, m->half,
                        s->threads));
    CHECK(2, f->decode(s->qkv, l->qkv.n, l->k_cache, l->v_cache, s->tables, s->table_width,
                       s->lens, s->attn, T, m->block_size, m->hkv, G, m->head_dim, m->scale,
                       s->threads, s->attn_scratch, s->scratch_per_thread, m->half));
    w = &l->o;
    CHECK(0, f->linear(s->attn, w->k, 0, 0, 0, 0.0f, w->inv_smooth, T, w->k, w->w,
                       w->col_scale, w->colsum128, w->bias, w->n, s->o, w->n, 0, s->threads));
    w = &l->gate_up;
    CHECK(0, f->linear(s->x, hidden, s->o, hidden, l->mlp_norm, m->eps, w->inv_smooth, T, w->k,
                       w->w, w->col_scale, w->colsum128, w->bias, w->n, s->gate_up, w->n, 0,
                       s->threads));
    w = &l->down;
    CHECK(0, f->linear(s->gate_up, 2 * w->k, 0, 0, 0, 0.0f, w->inv_smooth, T, w->k, w->w,
                       w->col_scale, w->colsum128, w->bias, w->n, s->pending, w->n, 1,
                       s->threads));
    return 0;
}

int decode_layers(const struct kernels *f, const struct model *m, const struct layer *layers,
                  struct step *s) {
    for (int64_t i = 0; i < m->num_layers; i++) {
        int st = layer(f, m, &layers[i], s, i == 0);
        if (st) {
            s->failed_layer = i;
            return st;
        }
    }
    return 0;
}

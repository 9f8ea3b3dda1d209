/* cpu_backend.c - the CPU implementation of the backend ops table: plain loops, threaded over
 * heads or rows where the work is large. Not the matrix products (cpu_matmul.c). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_matmul.h"
#include "core/threadpool.h"

typedef struct cpu_backend {
    mf_backend base;
    mf_pool *pool;
    int reference;
    int n_threads;
    float *scratch;          /* [n_threads][scratch_floats] per-thread work space */
    size_t scratch_floats;
    /* moe_experts work space for up to moe_pairs (token, expert) pairs, all sized by reserve:
     * gate and up [pairs][moe_inter], sort keys [pairs], where each pair's output landed
     * [pairs], x rows gathered per expert and the outputs [pairs][moe_hidden]. */
    float *moe_x, *moe_out, *moe_g, *moe_u;
    uint64_t *moe_key;
    int32_t *moe_pos;
    int64_t *moe_grp;        /* [pairs + 1] first sorted pair of each expert group */
    int64_t moe_pairs, moe_inter, moe_hidden;
} cpu_backend;

static cpu_backend *cpu(mf_backend *b) { return (cpu_backend *)b; }

static void moe_scratch_free(cpu_backend *c) {
    free(c->moe_x);
    free(c->moe_out);
    free(c->moe_g);
    free(c->moe_u);
    free(c->moe_key);
    free(c->moe_pos);
    free(c->moe_grp);
}

static void cpu_destroy(mf_backend *b) {
    if (!b) return;
    pool_destroy(cpu(b)->pool);
    free(cpu(b)->scratch);
    moe_scratch_free(cpu(b));
    free(b);
}

#define DN_CHUNK 64

/* Per thread: attention scores over the context, or the chunked delta rule's work arrays. */
static size_t scratch_need(const mf_backend_limits *lim) {
    size_t d = (size_t)(lim->max_head_dim > 0 ? lim->max_head_dim : 1);
    size_t attn = (size_t)lim->max_ctx;
    if ((size_t)lim->max_experts > attn) attn = (size_t)lim->max_experts;
    size_t dn = DN_CHUNK * (DN_CHUNK + 5 * d + 2);
    return attn > dn ? attn : dn;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Sizes the moe_experts work space for pairs x inter x hidden (each dimension only grows;
 * hidden 0 leaves the hidden-wide arrays to the first call). */
static mf_status moe_grow(cpu_backend *c, int64_t pairs, int64_t inter, int64_t hidden) {
    pairs = max64(c->moe_pairs, pairs), inter = max64(c->moe_inter, inter), hidden = max64(c->moe_hidden, hidden);
    if (pairs == c->moe_pairs && inter == c->moe_inter && hidden == c->moe_hidden) return MF_OK;
    cpu_backend n = {0};
    size_t ph = (size_t)(pairs * hidden), pi = (size_t)(pairs * inter);
    n.moe_x = malloc(sizeof(float) * (ph ? ph : 1));
    n.moe_out = malloc(sizeof(float) * (ph ? ph : 1));
    n.moe_g = malloc(sizeof(float) * (pi ? pi : 1));
    n.moe_u = malloc(sizeof(float) * (pi ? pi : 1));
    n.moe_key = malloc(sizeof(uint64_t) * (size_t)(pairs ? pairs : 1));
    n.moe_pos = malloc(sizeof(int32_t) * (size_t)(pairs ? pairs : 1));
    n.moe_grp = malloc(sizeof(int64_t) * (size_t)(pairs + 1));
    if (!n.moe_x || !n.moe_out || !n.moe_g || !n.moe_u || !n.moe_key || !n.moe_pos || !n.moe_grp) {
        moe_scratch_free(&n);
        return MF_ERR_NOMEM;
    }
    moe_scratch_free(c);
    c->moe_x = n.moe_x, c->moe_out = n.moe_out, c->moe_g = n.moe_g, c->moe_u = n.moe_u;
    c->moe_key = n.moe_key, c->moe_pos = n.moe_pos, c->moe_grp = n.moe_grp;
    c->moe_pairs = pairs, c->moe_inter = inter, c->moe_hidden = hidden;
    return MF_OK;
}

static mf_status cpu_reserve(mf_backend *b, const mf_backend_limits *lim) {
    cpu_backend *c = cpu(b);
    size_t need = scratch_need(lim);
    if (need > c->scratch_floats) {
        float *ns = malloc(sizeof(float) * need * (size_t)c->n_threads);
        if (!ns) return MF_ERR_NOMEM;
        free(c->scratch);
        c->scratch = ns;
        c->scratch_floats = need;
    }
    if (lim->max_top_k <= 0 || lim->max_inter <= 0) return MF_OK; /* no moe_experts calls */
    return moe_grow(c, lim->max_tokens * lim->max_top_k, lim->max_inter, lim->max_hidden);
}

static void cpu_op_matmul(mf_backend *b, const mf_wmat *w, const float *x, int64_t n_tok, float *y) {
    cpu_matmul(cpu(b)->pool, w, x, n_tok, y, cpu(b)->reference);
}

static void cpu_op_embed(mf_backend *b, const mf_wmat *w, const int32_t *ids, int64_t n_tok, float *out) {
    (void)b;
    for (int64_t t = 0; t < n_tok; t++) cpu_dequant_row(w, ids[t], out + t * w->cols);
}

static void cpu_op_rmsnorm(mf_backend *b, const float *x, const float *w, int64_t n_rows, int64_t dim,
                           float eps, float *y) {
    (void)b;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        double ss = 0;
        for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
        float inv = (float)(1.0 / sqrt(ss / (double)dim + eps));
        for (int64_t i = 0; i < dim; i++) yr[i] = w ? xr[i] * inv * w[i] : xr[i] * inv;
    }
}

static void cpu_op_add_rmsnorm(mf_backend *b, float *x, const float *a, const float *w, int64_t n_rows, int64_t dim,
                               float eps, float *y) {
    for (int64_t i = 0; i < n_rows * dim; i++) x[i] += a[i];
    cpu_op_rmsnorm(b, x, w, n_rows, dim, eps, y);
}

static void cpu_op_matmul_multi(mf_backend *b, int n_w, const mf_wmat *w, const float *x, int64_t n_tok,
                                float *const *y) {
    for (int j = 0; j < n_w; j++) cpu_op_matmul(b, &w[j], x, n_tok, y[j]);
}

static void cpu_op_rope(mf_backend *b, float *x, int64_t n_tok, int n_heads, int head_dim, int rot_dim,
                        const int32_t *pos, double theta) {
    (void)b;
    int half = rot_dim / 2;
    for (int64_t t = 0; t < n_tok; t++) {
        for (int i = 0; i < half; i++) {
            double inv_freq = pow(theta, -2.0 * i / rot_dim);
            /* f32 angle and cos/sin as the reference computes them */
            float ang = (float)pos[t] * (float)inv_freq;
            float c = cosf(ang), s = sinf(ang);
            for (int h = 0; h < n_heads; h++) {
                float *v = x + (t * n_heads + h) * head_dim;
                float a = v[i], bb = v[i + half];
                v[i] = a * c - bb * s;
                v[i + half] = bb * c + a * s;
            }
        }
    }
}

typedef struct attn_job {
    const float *q, *kc, *vc;
    const int32_t *pos;
    int64_t n_tok;
    int n_heads, n_kv, hd;
    float scale;
    float *out;
    float *scores; /* [threads][stride] */
    size_t stride;
} attn_job;

static void attn_rows(void *ctx, int64_t begin, int64_t end, int thread) {
    attn_job *j = ctx;
    float *sc = j->scores + (size_t)thread * j->stride;
    int group = j->n_heads / j->n_kv;
    for (int64_t row = begin; row < end; row++) {
        int64_t t = row / j->n_heads;
        int h = (int)(row % j->n_heads), kvh = h / group;
        const float *q = j->q + row * j->hd;
        int64_t last = j->pos[t];
        float mx = -INFINITY;
        for (int64_t p = 0; p <= last; p++) {
            const float *k = j->kc + (p * j->n_kv + kvh) * j->hd;
            float d = 0;
            for (int i = 0; i < j->hd; i++) d += q[i] * k[i];
            sc[p] = d * j->scale;
            if (sc[p] > mx) mx = sc[p];
        }
        double sum = 0;
        for (int64_t p = 0; p <= last; p++) {
            sc[p] = expf(sc[p] - mx);
            sum += sc[p];
        }
        float inv = (float)(1.0 / sum);
        float *o = j->out + row * j->hd;
        memset(o, 0, sizeof(float) * (size_t)j->hd);
        for (int64_t p = 0; p <= last; p++) {
            const float *v = j->vc + (p * j->n_kv + kvh) * j->hd;
            float wgt = sc[p] * inv;
            for (int i = 0; i < j->hd; i++) o[i] += wgt * v[i];
        }
    }
}

static void cpu_op_attention(mf_backend *b, const float *q, const float *k_cache, const float *v_cache,
                             const int32_t *pos, int64_t n_ctx, int64_t n_tok, int n_heads, int n_kv, int hd,
                             float scale, float *out) {
    cpu_backend *c = cpu(b);
    attn_job j = {q, k_cache, v_cache, pos, n_tok, n_heads, n_kv, hd, scale, out, c->scratch, c->scratch_floats};
    if ((size_t)n_ctx > c->scratch_floats) abort(); /* a caller skipped reserve */
    for (int64_t t = 0; t < n_tok; t++)
        if (pos[t] < 0 || pos[t] >= n_ctx) abort(); /* a caller broke the op's contract */
    pool_for(c->reference ? NULL : c->pool, n_tok * n_heads, 1, attn_rows, &j);
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

static void cpu_op_conv1d_silu(mf_backend *b, const float *x, float *state, const float *w, int64_t n_tok,
                               int64_t C, int K, float *out) {
    (void)b;
    for (int64_t t = 0; t < n_tok; t++) {
        const float *xt = x + t * C;
        float *ot = out + t * C;
        for (int64_t ch = 0; ch < C; ch++) {
            const float *wc = w + ch * K;
            float acc = 0;
            for (int k = 0; k < K - 1; k++) acc += wc[k] * state[k * C + ch];
            acc += wc[K - 1] * xt[ch];
            ot[ch] = silu(acc);
        }
        /* shift the window: drop the oldest input, append this one */
        if (K > 1) {
            memmove(state, state + C, sizeof(float) * (size_t)((K - 2) * C));
            memcpy(state + (int64_t)(K - 2) * C, xt, sizeof(float) * (size_t)C);
        }
    }
}

typedef struct dn_job {
    const float *q, *k, *v, *g, *beta;
    float *S, *out;
    int64_t n_tok;
    int Hk, Hv, dk, dv;
    float *scratch;     /* [threads][stride] */
    size_t stride;
} dn_job;

static void dn_heads(void *ctx, int64_t begin, int64_t end, int thread) {
    dn_job *j = ctx;
    int ratio = j->Hv / j->Hk;
    float *kv = j->scratch + (size_t)thread * j->stride; /* [dv] */
    for (int64_t h = begin; h < end; h++) {
        float *S = j->S + h * (int64_t)j->dk * j->dv; /* [dk][dv] */
        int kh = (int)h / ratio;
        for (int64_t t = 0; t < j->n_tok; t++) {
            const float *q = j->q + (t * j->Hk + kh) * j->dk, *k = j->k + (t * j->Hk + kh) * j->dk;
            const float *v = j->v + (t * j->Hv + h) * j->dv;
            float decay = expf(j->g[t * j->Hv + h]), beta = j->beta[t * j->Hv + h];
            float *o = j->out + (t * j->Hv + h) * j->dv;
            for (int64_t i = 0; i < (int64_t)j->dk * j->dv; i++) S[i] *= decay;
            for (int c = 0; c < j->dv; c++) kv[c] = 0;
            for (int r = 0; r < j->dk; r++)
                for (int c = 0; c < j->dv; c++) kv[c] += S[r * j->dv + c] * k[r];
            for (int c = 0; c < j->dv; c++) kv[c] = (v[c] - kv[c]) * beta;
            for (int r = 0; r < j->dk; r++)
                for (int c = 0; c < j->dv; c++) S[r * j->dv + c] += k[r] * kv[c];
            for (int c = 0; c < j->dv; c++) o[c] = 0;
            for (int r = 0; r < j->dk; r++)
                for (int c = 0; c < j->dv; c++) o[c] += S[r * j->dv + c] * q[r];
        }
    }
}

/* The chunked form (transformers' torch_chunk_gated_delta_rule, without padding): within a
 * chunk of c tokens the c delta-rule updates are condensed by solving the unit lower-triangular
 * system (I + L) with L[i][j] = (beta_i k_i . k_j) exp(G_i - G_j), G the cumulative log decay;
 * then the chunk reads the incoming state once and writes it once. Same result as the
 * recurrence up to rounding; used for prefill. */
static void dn_chunked_heads(void *ctx, int64_t begin, int64_t end, int thread) {
    dn_job *j = ctx;
    int ratio = j->Hv / j->Hk, dk = j->dk, dv = j->dv;
    float *L = j->scratch + (size_t)thread * j->stride;                   /* [c][c] */
    float *U = L + DN_CHUNK * DN_CHUNK;   /* [c][dv] solved values, then v_new */
    float *W = U + DN_CHUNK * dv;         /* [c][dk] solved decayed keys */
    float *O = W + DN_CHUNK * dk;         /* [c][dv] */
    float *KS = O + DN_CHUNK * dv;        /* [c][dv] W S */
    float *kd = KS + DN_CHUNK * dv;       /* [c][dk] k exp(G_last - G_i) */
    float *G = kd + DN_CHUNK * dk;        /* [c] cumulative log decay */
    float *beta = G + DN_CHUNK;           /* [c] */
    for (int64_t h = begin; h < end; h++) {
        float *S = j->S + h * (int64_t)dk * dv; /* [dk][dv] */
        int kh = (int)h / ratio;
        for (int64_t t0 = 0; t0 < j->n_tok; t0 += DN_CHUNK) {
            int c = (int)(j->n_tok - t0 < DN_CHUNK ? j->n_tok - t0 : DN_CHUNK);
#define QV(i) (j->q + ((t0 + (i)) * j->Hk + kh) * dk)
#define KV(i) (j->k + ((t0 + (i)) * j->Hk + kh) * dk)
#define VV(i) (j->v + ((t0 + (i)) * j->Hv + h) * dv)
            float acc = 0;
            for (int i = 0; i < c; i++) {
                acc += j->g[(t0 + i) * j->Hv + h];
                G[i] = acc;
                beta[i] = j->beta[(t0 + i) * j->Hv + h];
            }
            /* L (strictly lower) and the two right-hand sides */
            for (int i = 0; i < c; i++) {
                const float *ki = KV(i), *vi = VV(i);
                for (int jj = 0; jj < i; jj++) {
                    const float *kj = KV(jj);
                    float d = 0;
                    for (int r = 0; r < dk; r++) d += ki[r] * kj[r];
                    L[i * DN_CHUNK + jj] = beta[i] * d * expf(G[i] - G[jj]);
                }
                for (int e = 0; e < dv; e++) U[i * dv + e] = vi[e] * beta[i];
                float gi = expf(G[i]);
                for (int r = 0; r < dk; r++) W[i * dk + r] = ki[r] * beta[i] * gi;
            }
            /* forward substitution: row i -= sum_{j<i} L[i][j] row j */
            for (int i = 1; i < c; i++)
                for (int jj = 0; jj < i; jj++) {
                    float l = L[i * DN_CHUNK + jj];
                    for (int e = 0; e < dv; e++) U[i * dv + e] -= l * U[jj * dv + e];
                    for (int r = 0; r < dk; r++) W[i * dk + r] -= l * W[jj * dk + r];
                }
            /* v_new = U - W S; inter-chunk read O = (q exp(G)) S */
            for (int i = 0; i < c; i++) {
                const float *qi = QV(i);
                float gi = expf(G[i]);
                for (int e = 0; e < dv; e++) {
                    KS[i * dv + e] = 0;
                    O[i * dv + e] = 0;
                }
                for (int r = 0; r < dk; r++) {
                    const float *Sr = S + (int64_t)r * dv;
                    float w = W[i * dk + r], qq = qi[r] * gi;
                    for (int e = 0; e < dv; e++) {
                        KS[i * dv + e] += w * Sr[e];
                        O[i * dv + e] += qq * Sr[e];
                    }
                }
                for (int e = 0; e < dv; e++) U[i * dv + e] -= KS[i * dv + e];
            }
            /* intra-chunk attention, causal with the diagonal */
            for (int i = 0; i < c; i++) {
                const float *qi = QV(i);
                float *oi = j->out + ((t0 + i) * j->Hv + h) * dv;
                for (int jj = 0; jj <= i; jj++) {
                    const float *kj = KV(jj);
                    float d = 0;
                    for (int r = 0; r < dk; r++) d += qi[r] * kj[r];
                    d *= expf(G[i] - G[jj]);
                    for (int e = 0; e < dv; e++) O[i * dv + e] += d * U[jj * dv + e];
                }
                memcpy(oi, O + i * dv, sizeof(float) * (size_t)dv);
            }
            /* state update: S = S exp(G_last) + sum_i (k_i exp(G_last - G_i)) (x) v_new_i */
            float glast = G[c - 1], dlast = expf(glast);
            for (int i = 0; i < c; i++) {
                const float *ki = KV(i);
                float f = expf(glast - G[i]);
                for (int r = 0; r < dk; r++) kd[i * dk + r] = ki[r] * f;
            }
            for (int r = 0; r < dk; r++) {
                float *Sr = S + (int64_t)r * dv;
                for (int e = 0; e < dv; e++) Sr[e] *= dlast;
                for (int i = 0; i < c; i++) {
                    float kr = kd[i * dk + r];
                    const float *ui = U + i * dv;
                    for (int e = 0; e < dv; e++) Sr[e] += kr * ui[e];
                }
            }
#undef QV
#undef KV
#undef VV
        }
    }
}

static void cpu_op_deltanet(mf_backend *b, const float *q, const float *k, const float *v, const float *g,
                            const float *beta, float *S, int64_t n_tok, int Hk, int Hv, int dk, int dv,
                            float *out) {
    cpu_backend *c = cpu(b);
    dn_job j = {q, k, v, g, beta, S, out, n_tok, Hk, Hv, dk, dv, c->scratch, c->scratch_floats};
    if ((size_t)DN_CHUNK * (DN_CHUNK + 5 * (size_t)(dk > dv ? dk : dv) + 2) > c->scratch_floats) abort();
    /* prefill of several tokens takes the chunked form; the reference keeps the recurrence */
    pool_for(c->reference ? NULL : c->pool, Hv, 1, !c->reference && n_tok >= 8 ? dn_chunked_heads : dn_heads, &j);
}

/* ---- memory: plain host allocations ---- */

static void *cpu_alloc(mf_backend *b, size_t bytes) {
    (void)b;
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64)) return NULL;
    memset(p, 0, bytes);
    return p;
}

static void cpu_free(mf_backend *b, void *p) {
    (void)b;
    free(p);
}

static void cpu_move(mf_backend *b, void *dst, const void *src, size_t bytes) {
    (void)b;
    if (dst != src && bytes) memmove(dst, src, bytes);
}

static void cpu_sync(mf_backend *b) { (void)b; }

/* Uploads are plain copies here: done on return, nothing to fence. */
static uint64_t cpu_upload_async(mf_backend *b, void *dst, const void *src, size_t bytes) {
    cpu_move(b, dst, src, bytes);
    return 0;
}

static int cpu_upload_done(mf_backend *b, uint64_t ticket) {
    (void)b;
    (void)ticket;
    return 1;
}

static void cpu_upload_fence(mf_backend *b) { (void)b; }

static uint64_t cpu_mem_free(mf_backend *b) {
    (void)b;
    return 0;
}

/* ---- elementwise and data movement ---- */

static float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }
/* torch.nn.functional.softplus with beta 1, threshold 20 */
static float softplus1(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

static void cpu_add(mf_backend *b, float *y, const float *x, int64_t n) {
    (void)b;
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

static void cpu_copy_rows(mf_backend *b, float *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                          int64_t rows, int64_t cols) {
    (void)b;
    for (int64_t r = 0; r < rows; r++) memmove(dst + r * dst_stride, src + r * src_stride, sizeof(float) * (size_t)cols);
}

static void cpu_op_attention_prep(mf_backend *b, const mf_attn_prep *p) {
    const int64_t n = p->n_tok, nh = p->n_heads, nkv = p->n_kv, hd = p->head_dim, kvw = nkv * hd;
    if (p->q != p->q_src || p->q_stride != hd) cpu_copy_rows(b, p->q, hd, p->q_src, p->q_stride, n * nh, hd);
    if (p->gate) cpu_copy_rows(b, p->gate, hd, p->q_src + hd, p->q_stride, n * nh, hd);
    cpu_op_rmsnorm(b, p->q, p->q_norm, n * nh, hd, p->eps, p->q);
    cpu_op_rope(b, p->q, n, (int)nh, (int)hd, p->rot_dim, p->pos, p->theta);
    for (int64_t t = 0; t < n; t++) {
        float *kc = p->k_cache + (int64_t)p->pos[t] * kvw, *vc = p->v_cache + (int64_t)p->pos[t] * kvw;
        memcpy(kc, p->k + t * kvw, sizeof(float) * (size_t)kvw);
        memcpy(vc, p->v + t * kvw, sizeof(float) * (size_t)kvw);
        cpu_op_rmsnorm(b, kc, p->k_norm, nkv, hd, p->eps, kc);
        cpu_op_rope(b, kc, 1, (int)nkv, (int)hd, p->rot_dim, p->pos + t, p->theta);
    }
}

static void cpu_mul_sigmoid(mf_backend *b, float *x, const float *gate, int64_t n) {
    (void)b;
    for (int64_t i = 0; i < n; i++) x[i] *= sigmoid1(gate[i]);
}

static void cpu_swiglu(mf_backend *b, float *g, const float *u, int64_t n) {
    (void)b;
    for (int64_t i = 0; i < n; i++) g[i] = silu(g[i]) * u[i];
}

/* deltanet_step's parts. Each row of x [rows][dim]: x * scale / sqrt(sum(x^2) + eps). */
static void cpu_l2norm(float *x, int64_t rows, int dim, float eps, float scale) {
    for (int64_t r = 0; r < rows; r++) {
        float *v = x + r * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)v[i] * v[i];
        float inv = (float)(1.0 / sqrt(ss + eps)) * scale;
        for (int i = 0; i < dim; i++) v[i] *= inv;
    }
}

/* Gated DeltaNet gates for [n_tok][Hv]: beta = sigmoid(bb); g = -exp(A_log[h]) * softplus(a + dt_bias[h]). */
static void cpu_dn_gates(const float *a, const float *bb, const float *A_log, const float *dt_bias, int64_t n_tok,
                         int Hv, float *g, float *beta) {
    for (int64_t t = 0; t < n_tok; t++)
        for (int h = 0; h < Hv; h++) {
            int64_t i = t * Hv + h;
            beta[i] = sigmoid1(bb[i]);
            g[i] = -expf(A_log[h]) * softplus1(a[i] + dt_bias[h]);
        }
}

static void cpu_op_deltanet_step(mf_backend *b, const mf_deltanet_step *p) {
    cpu_l2norm(p->q, p->n_tok * p->Hk, p->dk, 1e-6f, p->q_scale);
    cpu_l2norm(p->k, p->n_tok * p->Hk, p->dk, 1e-6f, 1.0f);
    cpu_dn_gates(p->a, p->bb, p->A_log, p->dt_bias, p->n_tok, p->Hv, p->g, p->beta);
    cpu_op_deltanet(b, p->q, p->k, p->v, p->g, p->beta, p->S, p->n_tok, p->Hk, p->Hv, p->dk, p->dv, p->out);
}

static void cpu_gated_norm(mf_backend *b, float *o, const float *w, const float *z, int64_t rows, int dim,
                           float eps) {
    cpu_op_rmsnorm(b, o, w, rows, dim, eps, o);
    for (int64_t i = 0; i < rows * dim; i++) o[i] *= silu(z[i]);
}

static void cpu_router_topk(mf_backend *b, const float *logits, int64_t n_tok, int E, int K, int norm,
                            int32_t *ids, float *w) {
    cpu_backend *c = cpu(b);
    float *p = c->scratch; /* [E]: reserve sizes the scratch for max_experts */
    for (int64_t t = 0; t < n_tok; t++) {
        const float *lg = logits + t * E;
        float mx = lg[0];
        for (int e = 1; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
        double sum = 0;
        for (int e = 0; e < E; e++) {
            p[e] = expf(lg[e] - mx);
            sum += p[e];
        }
        for (int e = 0; e < E; e++) p[e] = (float)(p[e] / sum);
        int32_t *id = ids + t * K;
        float *wt = w + t * K;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (p[e] >= 0 && (best < 0 || p[e] > p[best])) best = e;
            id[j] = best;
            wt[j] = p[best];
            p[best] = -1.0f; /* taken */
        }
        if (norm) {
            float ws = 0;
            for (int j = 0; j < K; j++) ws += wt[j];
            for (int j = 0; j < K; j++) wt[j] /= ws;
        }
    }
}

static void cpu_gather_rows(mf_backend *b, float *dst, const float *src, const int32_t *idx, int64_t n,
                            int64_t cols) {
    (void)b;
    for (int64_t i = 0; i < n; i++) memcpy(dst + i * cols, src + (int64_t)idx[i] * cols, sizeof(float) * (size_t)cols);
}

static void cpu_argmax(mf_backend *b, const float *x, int64_t rows, int64_t cols, int32_t *out) {
    (void)b;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        int64_t best = 0;
        for (int64_t i = 1; i < cols; i++)
            if (xr[i] > xr[best] || (xr[best] != xr[best] && xr[i] == xr[i])) best = i;
        out[r] = (int32_t)best;
    }
}

static void cpu_scatter_add(mf_backend *b, float *y, const float *src, const int32_t *idx, const float *w,
                            int64_t n, int64_t cols) {
    (void)b;
    for (int64_t i = 0; i < n; i++) {
        float *yr = y + (int64_t)idx[i] * cols;
        const float *sr = src + i * cols;
        for (int64_t c = 0; c < cols; c++) yr[c] += w[i] * sr[c];
    }
}

static void cpu_add_gated(mf_backend *b, float *y, const float *x, const float *gate, int64_t n_tok, int64_t cols) {
    (void)b;
    for (int64_t t = 0; t < n_tok; t++) {
        float gt = sigmoid1(gate[t]);
        for (int64_t c = 0; c < cols; c++) y[t * cols + c] += gt * x[t * cols + c];
    }
}

/* ---- routed experts ---- */

/* The three matrices of the expert blob at blob. */
static void moe_parts(const mf_expert_layout *lay, const void *blob, mf_wmat *gate, mf_wmat *up, mf_wmat *down) {
    const char *base = blob;
    *gate = (mf_wmat){lay->type[0], lay->inter, lay->hidden, base + lay->offset[0]};
    *up = (mf_wmat){lay->type[1], lay->inter, lay->hidden, base + lay->offset[1]};
    *down = (mf_wmat){lay->type[2], lay->hidden, lay->inter, base + lay->offset[2]};
}

/* out [n][hidden] = down(silu(gate x) * up x) for x [n][hidden]; g, u [n][inter] work space. */
static void moe_swiglu_expert(cpu_backend *c, mf_pool *pool, const mf_expert_layout *lay, const void *blob,
                              const float *x, int64_t n, float *g, float *u, float *out) {
    mf_wmat gate, up, down;
    moe_parts(lay, blob, &gate, &up, &down);
    cpu_matmul(pool, &gate, x, n, g, c->reference);
    cpu_matmul(pool, &up, x, n, u, c->reference);
    for (int64_t i = 0; i < n * lay->inter; i++) g[i] = silu(g[i]) * u[i];
    cpu_matmul(pool, &down, g, n, out, c->reference);
}

/* Expert groups run side by side, one per thread (a decode step's experts are too small to
 * split one over threads). Group k covers sorted pairs [grp[k], grp[k+1]). */
typedef struct moe_group_job {
    cpu_backend *c;
    const mf_expert_layout *lay;
    const void *const *blobs;
} moe_group_job;

static void moe_group_run(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)thread;
    moe_group_job *j = ctx;
    cpu_backend *c = j->c;
    const int64_t H = j->lay->hidden, I = j->lay->inter;
    for (int64_t k = begin; k < end; k++) {
        int64_t a = c->moe_grp[k], e = c->moe_grp[k + 1];
        uint32_t id = (uint32_t)(c->moe_key[a] >> 32);
        moe_swiglu_expert(c, NULL, j->lay, j->blobs[(int32_t)id], c->moe_x + a * H, e - a, c->moe_g + a * I,
                          c->moe_u + a * I, c->moe_out + a * H);
    }
}

static int key_cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Reference: each (token, j) pair through its expert, one at a time. Fast: the pairs sorted by
 * expert (then pair index), each expert run once on all its tokens. Both then sum the pairs'
 * outputs per token in j order, so grouping changes nothing beyond matmul rounding. */
static void cpu_moe_experts(mf_backend *b, const float *x, const int32_t *ids, const float *w, int64_t n_tok, int K,
                            const void *const *blobs, const mf_expert_layout *lay, float *y) {
    cpu_backend *c = cpu(b);
    const int64_t H = lay->hidden, I = lay->inter, P = n_tok * K;
    if (n_tok <= 0) return;
    if (K <= 0) {
        memset(y, 0, sizeof(float) * (size_t)(n_tok * H));
        return;
    }
    if (P > c->moe_pairs || I > c->moe_inter) abort(); /* a caller skipped reserve */
    if (H > c->moe_hidden) abort(); /* a caller skipped reserve (max_hidden) */
    float *out = c->moe_out; /* [P][H], pair p's output at row moe_pos[p] */
    if (c->reference) {
        for (int64_t p = 0; p < P; p++) {
            moe_swiglu_expert(c, NULL, lay, blobs[ids[p]], x + (p / K) * H, 1, c->moe_g, c->moe_u, out + p * H);
            c->moe_pos[p] = (int32_t)p;
        }
    } else {
        for (int64_t p = 0; p < P; p++) c->moe_key[p] = (uint64_t)(uint32_t)ids[p] << 32 | (uint64_t)p;
        qsort(c->moe_key, (size_t)P, sizeof *c->moe_key, key_cmp);
        int64_t ng = 0;
        for (int64_t a = 0, e; a < P; a = e) {
            uint32_t id = (uint32_t)(c->moe_key[a] >> 32);
            for (e = a; e < P && (uint32_t)(c->moe_key[e] >> 32) == id; e++) {
                int64_t p = (int64_t)(c->moe_key[e] & 0xffffffffu);
                c->moe_pos[p] = (int32_t)e;
                memcpy(c->moe_x + e * H, x + (p / K) * H, sizeof(float) * (size_t)H);
            }
            c->moe_grp[ng++] = a;
        }
        c->moe_grp[ng] = P;
        /* few tokens: one expert per thread; many: each expert's matmuls split over threads */
        moe_group_job job = {c, lay, blobs};
        if (n_tok <= 8 && ng > 1 && pool_size(c->pool) > 1) {
            pool_for(c->pool, ng, 1, moe_group_run, &job);
        } else {
            for (int64_t k = 0; k < ng; k++) {
                int64_t a = c->moe_grp[k], e = c->moe_grp[k + 1];
                uint32_t id = (uint32_t)(c->moe_key[a] >> 32);
                moe_swiglu_expert(c, c->pool, lay, blobs[(int32_t)id], c->moe_x + a * H, e - a, c->moe_g + a * I,
                                  c->moe_u + a * I, out + a * H);
            }
        }
    }
    for (int64_t t = 0; t < n_tok; t++) {
        float *yt = y + t * H;
        memset(yt, 0, sizeof(float) * (size_t)H);
        for (int j = 0; j < K; j++) {
            const float wj = w[t * K + j], *o = out + (int64_t)c->moe_pos[t * K + j] * H;
            for (int64_t i = 0; i < H; i++) yt[i] += wj * o[i];
        }
    }
}

/* Ordinary page-aligned memory: the CPU has no faster kind to offer. */
static void *cpu_host_alloc(mf_backend *b, size_t bytes) {
    (void)b;
    void *p = NULL;
    if (posix_memalign(&p, 4096, bytes ? bytes : 4096)) return NULL;
    memset(p, 0, bytes);
    return p;
}

static const mf_backend_ops cpu_ops = {
    .name = "cpu",
    .host_memory = 1,
    .host_alloc_readable = 1,
    .destroy = cpu_destroy,
    .reserve = cpu_reserve,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_move,
    .download = cpu_move,
    .copy = cpu_move,
    .sync = cpu_sync,
    .mem_free = cpu_mem_free,
    .matmul = cpu_op_matmul,
    .matmul_multi = cpu_op_matmul_multi,
    .embed = cpu_op_embed,
    .rmsnorm = cpu_op_rmsnorm,
    .add_rmsnorm = cpu_op_add_rmsnorm,
    .rope = cpu_op_rope,
    .attention_prep = cpu_op_attention_prep,
    .attention = cpu_op_attention,
    .conv1d_silu = cpu_op_conv1d_silu,
    .deltanet = cpu_op_deltanet,
    .add = cpu_add,
    .copy_rows = cpu_copy_rows,
    .mul_sigmoid = cpu_mul_sigmoid,
    .swiglu = cpu_swiglu,
    .deltanet_step = cpu_op_deltanet_step,
    .gated_norm = cpu_gated_norm,
    .router_topk = cpu_router_topk,
    .gather_rows = cpu_gather_rows,
    .argmax = cpu_argmax,
    .scatter_add = cpu_scatter_add,
    .add_gated = cpu_add_gated,
    .moe_experts = cpu_moe_experts,
    .host_alloc = cpu_host_alloc,
    .host_free = cpu_free,
    .upload_async = cpu_upload_async,
    .upload_done = cpu_upload_done,
    .upload_fence = cpu_upload_fence,
};

mf_backend *cpu_backend_create(int n_threads, int reference) {
    cpu_backend *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->base.ops = &cpu_ops;
    c->reference = reference;
    c->pool = pool_create(reference ? 1 : n_threads);
    if (!c->pool) {
        free(c);
        return NULL;
    }
    c->n_threads = pool_size(c->pool);
    return &c->base;
}

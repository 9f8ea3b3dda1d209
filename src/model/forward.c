/* forward.c - one batched forward step of the supported families: gated attention or Gated
 * DeltaNet mixer, then a routed MoE block (experts fetched through the expert store) or a
 * dense MLP, as transformers' modeling_qwen3_5_moe / qwen3_next / qwen3_moe compute them.
 * Not state management (session.c) and not kernels (backend/). */
#include <math.h>
#include <string.h>

#include "model/model_internal.h"

static float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
static float siluf_(float x) { return x / (1.0f + expf(-x)); }
/* torch.nn.functional.softplus with beta 1, threshold 20 */
static float softplusf_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

static void l2norm_rows(float *x, int64_t rows, int dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float *v = x + r * dim;
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)v[i] * v[i];
        float inv = (float)(1.0 / sqrt(ss + eps));
        for (int i = 0; i < dim; i++) v[i] *= inv;
    }
}

/* Gated attention (qwen3_5_moe / qwen3_next) or plain attention (qwen3_moe). h -> y. */
static void attention_block(mf_session *s, int l, int n) {
    const mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const layer_weights *lw = &m->w.layers[l];
    mf_backend *be = m->be;
    int nh = hp->n_heads, nkv = hp->n_kv_heads, hd = hp->head_dim;
    int rot = (int)(hd * hp->partial_rotary + 0.5);
    float *qg = s->big1, *q = s->big2, *k = s->big3, *v = s->big4, *attn = s->big5;
    be->ops->matmul(be, &lw->q_proj, s->h, n, qg);
    be->ops->matmul(be, &lw->k_proj, s->h, n, k);
    be->ops->matmul(be, &lw->v_proj, s->h, n, v);
    /* split per head [q | gate]; keep the gate in qg's first half-width rows */
    int64_t qw = (int64_t)nh * hd;
    for (int t = 0; t < n; t++)
        for (int hh = 0; hh < nh; hh++) {
            const float *src = qg + (int64_t)t * qw * (hp->attn_output_gate ? 2 : 1) +
                               (int64_t)hh * hd * (hp->attn_output_gate ? 2 : 1);
            memcpy(q + (int64_t)t * qw + (int64_t)hh * hd, src, sizeof(float) * (size_t)hd);
        }
    if (hp->attn_output_gate)
        for (int t = 0; t < n; t++)
            for (int hh = 0; hh < nh; hh++)
                memmove(qg + (int64_t)t * qw + (int64_t)hh * hd,
                        qg + (int64_t)t * qw * 2 + (int64_t)hh * hd * 2 + hd, sizeof(float) * (size_t)hd);
    be->ops->rmsnorm(be, q, lw->q_norm, (int64_t)n * nh, hd, (float)hp->rms_eps, q);
    be->ops->rmsnorm(be, k, lw->k_norm, (int64_t)n * nkv, hd, (float)hp->rms_eps, k);
    be->ops->rope(be, q, n, nh, hd, rot, s->positions, hp->rope_theta);
    be->ops->rope(be, k, n, nkv, hd, rot, s->positions, hp->rope_theta);
    int64_t kvw = (int64_t)nkv * hd;
    memcpy(s->k_cache[l] + (int64_t)s->pos * kvw, k, sizeof(float) * (size_t)(n * kvw));
    memcpy(s->v_cache[l] + (int64_t)s->pos * kvw, v, sizeof(float) * (size_t)(n * kvw));
    be->ops->attention(be, q, s->k_cache[l], s->v_cache[l], s->pos, n, nh, nkv, hd,
                       1.0f / sqrtf((float)hd), attn);
    if (hp->attn_output_gate)
        for (int64_t i = 0; i < (int64_t)n * qw; i++) attn[i] *= sigmoidf_(qg[i]);
    be->ops->matmul(be, &lw->o_proj, attn, n, s->y);
}

/* Gated DeltaNet mixer. h -> y. */
static void linear_block(mf_session *s, int l, int n) {
    const mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const layer_weights *lw = &m->w.layers[l];
    mf_backend *be = m->be;
    int Hk = hp->lin_k_heads, Hv = hp->lin_v_heads, dk = hp->lin_k_dim, dv = hp->lin_v_dim;
    int64_t kd = (int64_t)Hk * dk, vd = (int64_t)Hv * dv, C = 2 * kd + vd;
    float *qkv = s->big1, *conv = s->big2, *z = s->big3, *qk = s->big4, *o = s->big5;
    float *b = s->small1, *a = s->small2, *g = s->small3, *beta = s->small4;
    be->ops->matmul(be, &lw->in_qkv, s->h, n, qkv);
    be->ops->matmul(be, &lw->in_z, s->h, n, z);
    be->ops->matmul(be, &lw->in_b, s->h, n, b);
    be->ops->matmul(be, &lw->in_a, s->h, n, a);
    be->ops->conv1d_silu(be, qkv, s->conv_state[l], lw->conv, n, C, hp->lin_conv_kernel, conv);
    /* q [n][Hk][dk] and k [n][Hk][dk] packed into qk; v stays in conv at offset 2 kd */
    float *q = qk, *k = qk + (int64_t)n * kd, *v = qkv;
    for (int t = 0; t < n; t++) {
        memcpy(q + t * kd, conv + t * C, sizeof(float) * (size_t)kd);
        memcpy(k + t * kd, conv + t * C + kd, sizeof(float) * (size_t)kd);
        memcpy(v + t * vd, conv + t * C + 2 * kd, sizeof(float) * (size_t)vd);
    }
    l2norm_rows(q, (int64_t)n * Hk, dk, 1e-6f);
    l2norm_rows(k, (int64_t)n * Hk, dk, 1e-6f);
    float qscale = 1.0f / sqrtf((float)dk);
    for (int64_t i = 0; i < n * kd; i++) q[i] *= qscale;
    for (int t = 0; t < n; t++)
        for (int hh = 0; hh < Hv; hh++) {
            int64_t i = (int64_t)t * Hv + hh;
            beta[i] = sigmoidf_(b[i]);
            g[i] = -expf(lw->A_log[hh]) * softplusf_(a[i] + lw->dt_bias[hh]);
        }
    be->ops->deltanet(be, q, k, v, g, beta, s->rec_state[l], n, Hk, Hv, dk, dv, o);
    be->ops->rmsnorm(be, o, lw->lin_norm, (int64_t)n * Hv, dv, (float)hp->rms_eps, o);
    for (int64_t i = 0; i < n * vd; i++) o[i] *= siluf_(z[i]);
    be->ops->matmul(be, &lw->out_proj, o, n, s->y);
}

/* down(silu(gate x) * up x) for n rows of x into out. */
static void swiglu_mlp(mf_backend *be, const mf_wmat *gate, const mf_wmat *up, const mf_wmat *down,
                       const float *x, int n, float *t1, float *t2, float *out) {
    be->ops->matmul(be, gate, x, n, t1);
    be->ops->matmul(be, up, x, n, t2);
    int64_t I = gate->rows;
    for (int64_t i = 0; i < n * I; i++) t1[i] = siluf_(t1[i]) * t2[i];
    be->ops->matmul(be, down, t1, n, out);
}

/* Softmax over the experts, top-k, optional renormalisation (HF TopKRouter). */
static void route(mf_session *s, int n) {
    const mf_hparams *hp = &s->m->file.L.hp;
    int E = hp->n_experts, K = hp->top_k;
    for (int t = 0; t < n; t++) {
        float *lg = s->small1 + (int64_t)t * E;
        float mx = lg[0];
        for (int e = 1; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
        double sum = 0;
        for (int e = 0; e < E; e++) {
            lg[e] = expf(lg[e] - mx);
            sum += lg[e];
        }
        for (int e = 0; e < E; e++) lg[e] = (float)(lg[e] / sum);
        int32_t *ids = s->topk_ids + (int64_t)t * K;
        float *w = s->topk_w + (int64_t)t * K;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= ids[i] == e;
                if (!taken && (best < 0 || lg[e] > lg[best])) best = e;
            }
            ids[j] = best;
            w[j] = lg[best];
        }
        if (hp->norm_topk_prob) {
            float ws = 0;
            for (int j = 0; j < K; j++) ws += w[j];
            for (int j = 0; j < K; j++) w[j] /= ws;
        }
    }
}

static mf_status moe_block(mf_session *s, int l, int n) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const layer_weights *lw = &m->w.layers[l];
    mf_backend *be = m->be;
    int E = hp->n_experts, K = hp->top_k;
    int64_t H = hp->hidden;
    be->ops->matmul(be, &lw->router, s->h, n, s->small1);
    route(s, n);
    /* group tokens by expert (counting sort keeps token order within an expert) */
    memset(s->expert_count, 0, sizeof(int32_t) * (size_t)E);
    for (int64_t i = 0; i < (int64_t)n * K; i++) s->expert_count[s->topk_ids[i]]++;
    int n_used = 0;
    s->expert_start[0] = 0;
    for (int e = 0; e < E; e++) {
        s->expert_start[e + 1] = s->expert_start[e] + s->expert_count[e];
        if (s->expert_count[e]) s->used_ids[n_used++] = e;
        s->expert_count[e] = 0;
    }
    for (int t = 0; t < n; t++)
        for (int j = 0; j < K; j++) {
            int e = s->topk_ids[(int64_t)t * K + j];
            int at = s->expert_start[e] + s->expert_count[e]++;
            s->expert_tok[at] = t;
            s->expert_tw[at] = s->topk_w[(int64_t)t * K + j];
        }
    memset(s->y, 0, sizeof(float) * (size_t)(n * H));
    mf_status st = expert_store_prefetch(m->store, l, s->used_ids, n_used, &s->err);
    if (st) return st;
    const mfpack_expert_layer *EL = mfpack_experts(&m->file.L, l);
    for (int u = 0; u < n_used; u++) {
        int e = s->used_ids[u];
        const void *blob;
        if ((st = expert_store_get(m->store, l, e, &blob, &s->err))) return st;
        mf_wmat parts[3];
        for (int p = 0; p < 3; p++) {
            parts[p].type = EL->parts[p].type;
            parts[p].rows = EL->parts[p].rows;
            parts[p].cols = EL->parts[p].cols;
            parts[p].data = (const char *)blob + EL->parts[p].offset;
        }
        int cnt = s->expert_start[e + 1] - s->expert_start[e];
        const int32_t *toks = s->expert_tok + s->expert_start[e];
        const float *tw = s->expert_tw + s->expert_start[e];
        float *xg = s->big1, *out = s->big4;
        for (int j = 0; j < cnt; j++) memcpy(xg + j * H, s->h + (int64_t)toks[j] * H, sizeof(float) * (size_t)H);
        swiglu_mlp(be, &parts[0], &parts[1], &parts[2], xg, cnt, s->big2, s->big3, out);
        expert_store_release(m->store, l, e);
        for (int j = 0; j < cnt; j++) {
            float *yr = s->y + (int64_t)toks[j] * H;
            const float *orow = out + (int64_t)j * H;
            for (int64_t i = 0; i < H; i++) yr[i] += tw[j] * orow[i];
        }
    }
    if (lw->has_shared) {
        float *sh = s->big4, *sg = s->small2;
        swiglu_mlp(be, &lw->sh_gate, &lw->sh_up, &lw->sh_down, s->h, n, s->big2, s->big3, sh);
        be->ops->matmul(be, &lw->sh_gate_w, s->h, n, sg);
        for (int t = 0; t < n; t++) {
            float gt = sigmoidf_(sg[t]);
            for (int64_t i = 0; i < H; i++) s->y[t * H + i] += gt * sh[t * H + i];
        }
    }
    return MF_OK;
}

mf_status forward_chunk(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    mf_backend *be = m->be;
    int64_t H = hp->hidden;
    float eps = (float)hp->rms_eps;
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= hp->vocab)
            return err_set(&s->err, MF_ERR_ARG, "token %d at position %d is outside the vocabulary (%d)",
                           tokens[t], s->pos + t, hp->vocab);
        s->positions[t] = s->pos + t;
    }
    be->ops->embed(be, &m->w.embed, tokens, n, s->x);
    for (int l = 0; l < hp->n_layers; l++) {
        const layer_weights *lw = &m->w.layers[l];
        be->ops->rmsnorm(be, s->x, lw->input_norm, n, H, eps, s->h);
        if (hp->layer_kind[l] == MF_LAYER_FULL_ATTENTION) attention_block(s, l, n);
        else linear_block(s, l, n);
        for (int64_t i = 0; i < n * H; i++) s->x[i] += s->y[i];
        be->ops->rmsnorm(be, s->x, lw->post_norm, n, H, eps, s->h);
        if (hp->layer_moe[l]) {
            mf_status st = moe_block(s, l, n);
            if (st) return st;
        } else {
            swiglu_mlp(be, &lw->mlp_gate, &lw->mlp_up, &lw->mlp_down, s->h, n, s->big2, s->big3, s->y);
        }
        for (int64_t i = 0; i < n * H; i++) s->x[i] += s->y[i];
    }
    /* tokens now occupy positions pos .. pos + n - 1 */
    memmove(s->tokens + s->pos, tokens, sizeof(int32_t) * (size_t)n);
    s->pos += n;
    if (!logits) return MF_OK;
    if (all_logits) {
        be->ops->rmsnorm(be, s->x, m->w.final_norm, n, H, eps, s->h);
        be->ops->matmul(be, &m->w.lm_head, s->h, n, logits);
    } else {
        be->ops->rmsnorm(be, s->x + (n - 1) * H, m->w.final_norm, 1, H, eps, s->h);
        be->ops->matmul(be, &m->w.lm_head, s->h, 1, logits);
    }
    return MF_OK;
}

/* forward.c - one batched forward step of the supported families: gated attention or Gated
 * DeltaNet mixer, then a routed MoE block (experts fetched through the expert tiers) or a
 * dense MLP, as transformers' modeling_qwen3_5_moe / qwen3_next / qwen3_moe compute them.
 * Every activation lives in backend memory and every step is a backend op, so the same code
 * drives the CPU and the GPU. Not state management (session.c) and not kernels (backend/). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_backend.h"
#include "model/model_internal.h"

#define OPS (m->be->ops)
#define MARK(field) prof_mark(s, &s->prof.field)

/* Gated attention (qwen3_5_moe / qwen3_next) or plain attention (qwen3_moe). h -> y. */
static void attention_block(mf_session *s, int l, int n) {
    const mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const layer_weights *lw = &m->w.layers[l];
    mf_backend *be = m->be;
    int nh = hp->n_heads, nkv = hp->n_kv_heads, hd = hp->head_dim;
    int rot = (int)(hd * hp->partial_rotary + 0.5);
    int64_t qw = (int64_t)nh * hd;
    float *q = s->big2, *k = s->big3, *v = s->big4, *attn = s->big5, *gate = s->big6;
    const mf_wmat proj[3] = {lw->q_proj, lw->k_proj, lw->v_proj};
    float *const out[3] = {hp->attn_output_gate ? s->big1 : q, k, v};
    OPS->matmul_multi(be, 3, proj, s->h, n, out);
    /* q and k normed and rotated, k and v into the caches; a gated q_proj yields per head
     * [q | gate]. Positions come from backend memory, so a recorded decode step replays at any
     * position. */
    mf_attn_prep ap = {
        .n_tok = n, .n_heads = nh, .n_kv = nkv, .head_dim = hd, .rot_dim = rot, .eps = (float)hp->rms_eps,
        .theta = hp->rope_theta, .q_src = hp->attn_output_gate ? s->big1 : q,
        .q_stride = hp->attn_output_gate ? 2 * hd : hd, .q = q, .gate = hp->attn_output_gate ? gate : NULL,
        .k = k, .v = v, .q_norm = lw->q_norm, .k_norm = lw->k_norm, .pos = s->d_positions,
        .k_cache = s->k_cache[l], .v_cache = s->v_cache[l]};
    OPS->attention_prep(be, &ap);
    OPS->attention(be, q, s->k_cache[l], s->v_cache[l], s->d_positions, s->attn_ctx, n, nh, nkv, hd,
                   1.0f / sqrtf((float)hd), attn);
    if (hp->attn_output_gate) OPS->mul_sigmoid(be, attn, gate, (int64_t)n * qw);
    OPS->matmul(be, &lw->o_proj, attn, n, s->y);
}

/* Gated DeltaNet mixer. h -> y. */
static void linear_block(mf_session *s, int l, int n) {
    const mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const layer_weights *lw = &m->w.layers[l];
    mf_backend *be = m->be;
    int Hk = hp->lin_k_heads, Hv = hp->lin_v_heads, dk = hp->lin_k_dim, dv = hp->lin_v_dim;
    int64_t kd = (int64_t)Hk * dk, vd = (int64_t)Hv * dv, C = 2 * kd + vd;
    float *qkv = s->big1, *conv = s->big2, *z = s->big3, *o = s->big5;
    float *q = s->big4, *k = s->big4 + (int64_t)n * kd, *v = s->big6;
    float *b = s->small1, *a = s->small2, *g = s->small3, *beta = s->small4;
    const mf_wmat proj[4] = {lw->in_qkv, lw->in_z, lw->in_b, lw->in_a};
    float *const out[4] = {qkv, z, b, a};
    OPS->matmul_multi(be, 4, proj, s->h, n, out);
    OPS->conv1d_silu(be, qkv, s->conv_state[l], lw->conv, n, C, hp->lin_conv_kernel, conv);
    if (n == 1) {
        /* one token: q, k and v are contiguous pieces of the conv output */
        q = conv, k = conv + kd, v = conv + 2 * kd;
    } else {
        OPS->copy_rows(be, q, kd, conv, C, n, kd);
        OPS->copy_rows(be, k, kd, conv + kd, C, n, kd);
        OPS->copy_rows(be, v, vd, conv + 2 * kd, C, n, vd);
    }
    const mf_deltanet_step dn = {.n_tok = n, .Hk = Hk, .Hv = Hv, .dk = dk, .dv = dv,
                                 .q_scale = 1.0f / sqrtf((float)dk), .q = q, .k = k, .v = v, .a = a, .bb = b,
                                 .A_log = lw->A_log, .dt_bias = lw->dt_bias, .g = g, .beta = beta,
                                 .S = s->rec_state[l], .out = o};
    OPS->deltanet_step(be, &dn);
    OPS->gated_norm(be, o, lw->lin_norm, z, (int64_t)n * Hv, dv, (float)hp->rms_eps);
    OPS->matmul(be, &lw->out_proj, o, n, s->y);
}

/* down(silu(gate x) * up x) for n rows of x into out; t1, t2 scratch. */
static void swiglu_mlp(mf_backend *be, const mf_wmat *gate, const mf_wmat *up, const mf_wmat *down,
                       const float *x, int64_t n, float *t1, float *t2, float *out) {
    be->ops->matmul(be, gate, x, n, t1);
    be->ops->matmul(be, up, x, n, t2);
    be->ops->swiglu(be, t1, t2, n * gate->rows);
    be->ops->matmul(be, down, t1, n, out);
}

static void pred_clear(mf_session *s) {
    for (int k = 0; k < s->n_pred; k++) s->pred_mark[s->pred_ids[k]] = 0;
    s->n_pred = 0;
    s->pred_layer = -1;
}

/* The next MoE layer after l, or -1. */
static int next_moe_layer(const mf_hparams *hp, int l) {
    for (int ln = l + 1; ln < hp->n_layers; ln++)
        if (hp->layer_moe[ln]) return ln;
    return -1;
}

/* Issues the next MoE layer's router on this layer's hidden state (its choice lands in
 * d_pred_ids, downloaded with this layer's own). Returns that layer, or -1. */
static int predict_issue(mf_session *s, int l, int n) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    mf_backend *be = m->be;
    int ln = s->predict ? next_moe_layer(hp, l) : -1;
    if (ln < 0) return -1;
    OPS->matmul(be, &m->w.layers[ln].router, s->h, n, s->small3);
    OPS->router_topk(be, s->small3, n, hp->n_experts, hp->top_k, 0, s->d_pred_ids, s->d_pred_w);
    return ln;
}

/* Starts fetching the experts layer ln's router picked (pred_raw), so that their reads (and,
 * to_device, their copies) overlap this layer's expert compute. */
static void predict_start(mf_session *s, int ln, int n, int to_device) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    int E = hp->n_experts, K = hp->top_k;
    pred_clear(s);
    for (int64_t i = 0; i < (int64_t)n * K; i++) {
        int32_t e = s->pred_raw[i];
        if (e >= 0 && e < E && !s->pred_mark[e]) {
            s->pred_mark[e] = 1;
            s->pred_ids[s->n_pred++] = e;
        }
    }
    s->pred_layer = ln;
    experts_prefetch_async(m, ln, s->pred_ids, s->n_pred, to_device);
}

/* The layout of layer l's expert blobs, as moe_experts wants it. */
static void expert_layout(const mfpack_expert_layer *EL, mf_expert_layout *lay) {
    for (int p = 0; p < 3; p++) {
        lay->type[p] = EL->parts[p].type;
        lay->offset[p] = EL->parts[p].offset;
    }
    lay->inter = EL->parts[0].rows;
    lay->hidden = EL->parts[0].cols;
}

/* The shared expert's output (before its gate) into big4; big2, big3 scratch. */
static void shared_expert_out(mf_session *s, const layer_weights *lw, int n) {
    mf_backend *be = s->m->be;
    const mf_wmat sh[2] = {lw->sh_gate, lw->sh_up};
    float *const sh_out[2] = {s->big2, s->big3};
    be->ops->matmul_multi(be, 2, sh, s->h, n, sh_out);
    be->ops->swiglu(be, s->big2, s->big3, n * lw->sh_gate.rows);
    be->ops->matmul(be, &lw->sh_down, s->big2, n, s->big4);
}

/* y += sigmoid(gate . h) * shared expert(h) */
static void shared_expert(mf_session *s, const layer_weights *lw, int n) {
    mf_model *m = s->m;
    mf_backend *be = m->be;
    shared_expert_out(s, lw, n);
    OPS->matmul(be, &lw->sh_gate_w, s->h, n, s->small2);
    OPS->add_gated(be, s->y, s->big4, s->small2, n, m->file.L.hp.hidden);
}

/* The front of a streamed MoE layer's routing, all backend ops: the router, its top-k and the
 * next layer's prediction. Returns the predicted layer, or -1. */
static int moe_route(mf_session *s, int l, int n) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    mf_backend *be = m->be;
    OPS->matmul(be, &m->w.layers[l].router, s->h, n, s->small1);
    OPS->router_topk(be, s->small1, n, hp->n_experts, hp->top_k, hp->norm_topk_prob, s->d_topk_ids, s->d_topk_w);
    return predict_issue(s, l, n);
}

/* Whether layer l of a step of n tokens takes the streamed path of moe_block. */
static int moe_streamed(const mf_session *s, int l, int n) {
    const mf_model *m = s->m;
    return m->file.L.hp.layer_moe[l] &&
           !(n <= FUSED_MAX_TOKENS && m->dcache && dev_cache_layer_ready(m->dcache, l));
}

/* routed: moe_route already ran for this step (in the layer's recorded piece). */
static mf_status moe_block(mf_session *s, int l, int n, int routed) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const layer_weights *lw = &m->w.layers[l];
    mf_backend *be = m->be;
    int E = hp->n_experts, K = hp->top_k;
    int64_t H = hp->hidden;
    const mfpack_expert_layer *EL = mfpack_experts(&m->file.L, l);
    mf_expert_layout lay;
    expert_layout(EL, &lay);
    MARK(other);
    /* every expert of the layer in backend memory, or readable in host memory where it is not:
     * the choice never leaves the device during the step */
    if (n <= FUSED_MAX_TOKENS && m->dcache && dev_cache_layer_ready(m->dcache, l)) {
        int32_t *ids = s->d_route_log + (int64_t)l * FUSED_MAX_TOKENS * K;
        /* the shared expert runs beside the routed ones where the backend has branches (and
         * after them when profiling, so that each phase is timed alone) */
        const int branch = lw->has_shared && OPS->branch_begin && !s->profile;
        if (branch) {
            OPS->branch_begin(be);
            shared_expert_out(s, lw, n);
            OPS->branch_end(be);
        }
        /* the router and the shared expert's gate read h together */
        const mf_wmat proj[2] = {lw->router, lw->sh_gate_w};
        float *const out[2] = {s->small1, s->small2};
        OPS->matmul_multi(be, lw->has_shared ? 2 : 1, proj, s->h, n, out);
        OPS->router_topk(be, s->small1, n, E, K, hp->norm_topk_prob, ids, s->d_topk_w);
        MARK(router);
        OPS->moe_experts(be, s->h, ids, s->d_topk_w, n, K, dev_cache_table(m->dcache, l), &lay, s->y);
        /* the device cache learns the choice after the step (route_log_flush) */
        if (dev_cache_host_mapped(m->dcache)) s->log_n = n;
        if (branch) OPS->branch_join(be);
        else if (lw->has_shared) shared_expert_out(s, lw, n);
        if (lw->has_shared) OPS->add_gated(be, s->y, s->big4, s->small2, n, H);
        MARK(expert_compute);
        return MF_OK;
    }
    int ln = routed ? (s->predict ? next_moe_layer(hp, l) : -1) : moe_route(s, l, n);
    /* otherwise the choice (and the next layer's predicted one) comes back to the host in one
     * download: it decides which experts to fetch */
    int64_t TK = (int64_t)s->chunk * K;
    OPS->download(be, s->route, s->d_route, sizeof(int32_t) * (size_t)(ln >= 0 ? 3 * TK : 2 * TK));
    /* group tokens by expert (counting sort keeps token order within an expert) */
    memset(s->expert_count, 0, sizeof(int32_t) * (size_t)E);
    for (int64_t i = 0; i < (int64_t)n * K; i++) {
        int32_t e = s->topk_ids[i];
        if (e < 0 || e >= E) return err_set(&s->err, MF_ERR_INTERNAL, "layer %d: router chose expert %d", l, e);
        s->expert_count[e]++;
    }
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
    /* how well the previous layer predicted this one */
    if (s->pred_layer == l) {
        for (int u = 0; u < n_used; u++) s->prof.predicted_hits += s->pred_mark[s->used_ids[u]];
        s->prof.predicted_total += (uint64_t)n_used;
    }
    pred_clear(s);
    MARK(router);
    mf_status st = experts_prefetch(m, l, s->used_ids, n_used, &s->err);
    if (st) return st;
    MARK(expert_wait);
    int fused = n <= FUSED_MAX_TOKENS && n_used <= experts_capacity(m);
    if (ln >= 0 && !fused) predict_start(s, ln, n, 0);
    if (fused) {
        /* pin every chosen expert, hand the table to the fused op, unpin */
        int got = 0;
        for (; got < n_used && !st; got++) {
            const void *blob;
            st = experts_get(m, l, s->used_ids[got], &blob, &s->err);
            s->blob_host[s->used_ids[got]] = blob;
            if (st) break;
        }
        if (!st) {
            MARK(expert_wait);
            const void *const *table = m->dcache ? dev_cache_table(m->dcache, l) : (const void *const *)s->d_blob_table;
            if (!m->dcache) OPS->upload(be, s->d_blob_table, s->blob_host, sizeof(void *) * (size_t)E);
            OPS->moe_experts(be, s->h, s->d_topk_ids, s->d_topk_w, n, K, table, &lay, s->y);
            if (lw->has_shared) shared_expert(s, lw, n);
        }
        /* with this layer's experts still pinned, the next layer's likely ones may start
         * copying; issued after this layer's compute, which waits for its own misses only */
        if (!st && ln >= 0) predict_start(s, ln, n, 1);
        /* releasing is safe before the op ran: a blob's slot is only refilled by an upload
         * queued after it on the same stream */
        for (int u = 0; u < got; u++) experts_release(m, l, s->used_ids[u]);
        MARK(expert_compute);
        return st;
    }
    OPS->upload(be, s->d_expert_tok, s->expert_tok, sizeof(int32_t) * (size_t)(n * K));
    OPS->upload(be, s->d_expert_tw, s->expert_tw, sizeof(float) * (size_t)(n * K));
    OPS->copy(be, s->y, s->zeros, sizeof(float) * (size_t)(n * H));
    for (int u = 0; u < n_used; u++) {
        int e = s->used_ids[u];
        const void *blob;
        MARK(expert_compute);
        if ((st = experts_get(m, l, e, &blob, &s->err))) return st;
        MARK(expert_wait);
        mf_wmat parts[3];
        for (int p = 0; p < 3; p++) {
            parts[p].type = EL->parts[p].type;
            parts[p].rows = EL->parts[p].rows;
            parts[p].cols = EL->parts[p].cols;
            parts[p].data = (const char *)blob + EL->parts[p].offset;
        }
        int cnt = s->expert_start[e + 1] - s->expert_start[e];
        const int32_t *toks = s->d_expert_tok + s->expert_start[e];
        const float *tw = s->d_expert_tw + s->expert_start[e];
        OPS->gather_rows(be, s->big1, s->h, toks, cnt, H);
        swiglu_mlp(be, &parts[0], &parts[1], &parts[2], s->big1, cnt, s->big2, s->big3, s->big4);
        OPS->scatter_add(be, s->y, s->big4, toks, tw, cnt, H);
        experts_release(m, l, e);
    }
    if (lw->has_shared) shared_expert(s, lw, n);
    MARK(expert_compute);
    return MF_OK;
}

/* A layer's ops from its first norm through the mixer and its second norm (h in, h out). */
static void layer_front(mf_session *s, int l, int n) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const layer_weights *lw = &m->w.layers[l];
    mf_backend *be = m->be;
    int64_t H = hp->hidden;
    float eps = (float)hp->rms_eps;
    /* the previous layer's residual add goes with this layer's first norm */
    if (l == 0) OPS->rmsnorm(be, s->x, lw->input_norm, n, H, eps, s->h);
    else OPS->add_rmsnorm(be, s->x, s->y, lw->input_norm, n, H, eps, s->h);
    MARK(other);
    if (hp->layer_kind[l] == MF_LAYER_FULL_ATTENTION) attention_block(s, l, n);
    else linear_block(s, l, n);
    MARK(mixer);
    OPS->add_rmsnorm(be, s->x, s->y, lw->post_norm, n, H, eps, s->h);
}

/* Layer l's front and routing as one recorded piece for one token (recorded on first use at the
 * context bound max_ctx, as the whole decode graph is): a streamed layer needs the host only
 * after its router, so everything before that replays without issuing op by op. Returns 1 when
 * the piece ran, 0 when the ops must be issued directly. */
static int layer_piece(mf_session *s, int l, int n) {
    mf_model *m = s->m;
    mf_backend *be = m->be;
    if (n != 1 || !OPS->graph_begin || s->profile || !s->use_graph || s->pieces_off || !moe_streamed(s, l, n))
        return 0;
    if (!s->pieces && !(s->pieces = calloc((size_t)m->file.L.hp.n_layers, sizeof(void *)))) return 0;
    if (!s->pieces[l]) {
        if (OPS->graph_begin(be) != MF_OK) {
            s->pieces_off = 1;
            return 0;
        }
        int64_t ctx = s->attn_ctx;
        s->attn_ctx = s->max_ctx;
        layer_front(s, l, n);
        moe_route(s, l, n);
        s->attn_ctx = ctx;
        s->pieces[l] = OPS->graph_end(be);
        if (!s->pieces[l]) {
            s->pieces_off = 1;
            return 0;
        }
    }
    OPS->graph_launch(be, s->pieces[l]);
    return 1;
}

/* Embedding and every layer for the n tokens already in d_tokens / d_positions: x [n][hidden]. */
static mf_status forward_layers(mf_session *s, int n) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    mf_backend *be = m->be;
    int64_t H = hp->hidden;
    OPS->embed(be, &m->w.embed, s->d_tokens, n, s->x);
    for (int l = 0; l < hp->n_layers; l++) {
        const layer_weights *lw = &m->w.layers[l];
        const int routed = layer_piece(s, l, n);
        if (!routed) layer_front(s, l, n);
        if (hp->layer_moe[l]) {
            mf_status st = moe_block(s, l, n, routed);
            if (st) return st;
        } else {
            MARK(other);
            swiglu_mlp(be, &lw->mlp_gate, &lw->mlp_up, &lw->mlp_down, s->h, n, s->big2, s->big3, s->y);
            MARK(expert_compute);
        }
    }
    OPS->add(be, s->x, s->y, n * H);
    return MF_OK;
}

/* Final norm and lm head of `rows` rows of x from `first` on into out [rows][vocab] (backend
 * memory); the greedy choice of the last row into d_next when next is wanted. */
static void forward_head(mf_session *s, int64_t first, int64_t rows, float *out, int next) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    mf_backend *be = m->be;
    OPS->rmsnorm(be, s->x + first * hp->hidden, m->w.final_norm, rows, hp->hidden, (float)hp->rms_eps, s->h);
    OPS->matmul(be, &m->w.lm_head, s->h, rows, out);
    if (next) OPS->argmax(be, out + (rows - 1) * hp->vocab, 1, hp->vocab, s->d_next);
}

/* Whether this step may replay the recorded decode step: one token, a backend that records,
 * no profiling (its marks wait on the backend), and every routed layer's experts in backend
 * memory, so that nothing in the step needs the host. */
static int graph_eligible(const mf_session *s, int n) {
    const mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    if (n != 1 || !OPS->graph_begin || s->profile || !s->use_graph) return 0;
    for (int l = 0; l < hp->n_layers; l++)
        if (hp->layer_moe[l] && !(m->dcache && dev_cache_layer_ready(m->dcache, l))) return 0;
    return 1;
}

static const char *backend_error(mf_backend *be) {
    const char *e = cuda_backend_last_error(be);
    return e ? e : "the backend cannot record";
}

/* Records one decode step (layers, head, greedy choice) at the context bound max_ctx. */
static mf_status graph_record(mf_session *s) {
    const mf_model *m = s->m;
    mf_backend *be = m->be;
    if (m->dcache) dev_cache_send_tables(m->dcache); /* no uploads while recording */
    mf_status st = OPS->graph_begin(be);
    if (st) return err_set(&s->err, st, "recording the decode step failed: %s", backend_error(be));
    s->attn_ctx = s->max_ctx;
    st = forward_layers(s, 1);
    forward_head(s, 0, 1, s->d_logits, 1);
    s->graph = OPS->graph_end(be);
    if (st) return st;
    if (!s->graph) return err_set(&s->err, MF_ERR_INTERNAL, "recording the decode step failed: %s", backend_error(be));
    return MF_OK;
}

/* Bytes of the route log (its words before d_next). */
static size_t route_log_bytes(const mf_session *s) {
    return sizeof(int32_t) * (size_t)(s->d_next - s->d_route_log);
}

/* Host-read mode: hands the device cache the choices of the last step that ran its experts as
 * one op (the step has finished: its outputs came back; route_log holds them), so that its next
 * table send can give slots to experts read from host memory. */
static void route_log_note(mf_session *s) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    const int64_t row = (int64_t)FUSED_MAX_TOKENS * hp->top_k;
    for (int l = 0; l < hp->n_layers; l++)
        if (hp->layer_moe[l]) dev_cache_note_uses(m->dcache, l, s->route_log + l * row, s->log_n * hp->top_k);
    s->log_n = 0;
    s->log_fetched = 0;
}

/* The same, downloading the log first unless it came back with the step's token, then the
 * tables sent. */
static void route_log_flush(mf_session *s) {
    mf_model *m = s->m;
    if (!s->log_n || !m->dcache) return;
    if (!s->log_fetched) OPS->download(m->be, s->route_log, s->d_route_log, route_log_bytes(s));
    route_log_note(s);
    dev_cache_send_tables(m->dcache);
}

mf_status forward_chunk(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits, int32_t *next) {
    mf_model *m = s->m;
    const mf_hparams *hp = &m->file.L.hp;
    mf_backend *be = m->be;
    int64_t V = hp->vocab;
    const int want_out = logits || next || s->keep_logits, graph = want_out && graph_eligible(s, n);
    /* host-read mode: when the last step's choices came back with its token, the device cache
     * notes them while this step's graph runs (its table changes apply from the next step) */
    const int late = graph && s->log_n && s->log_fetched;
    if (!late) route_log_flush(s);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= hp->vocab)
            return err_set(&s->err, MF_ERR_ARG, "token %d at position %d is outside the vocabulary (%d)",
                           tokens[t], s->pos + t, hp->vocab);
        s->positions[t] = s->pos + t;
    }
    memcpy(s->positions + s->chunk, tokens, sizeof(int32_t) * (size_t)n);
    if (s->profile) prof_mark(s, NULL);
    /* positions and tokens in one upload (a decode step's only one) */
    OPS->upload(be, s->d_positions, s->positions, sizeof(int32_t) * (size_t)(s->chunk + n));
    if (graph) {
        mf_status st = s->graph ? MF_OK : graph_record(s);
        if (st) return st;
        /* the tables as the replay must read them (changed rows, uploads since the last fence) */
        if (m->dcache) dev_cache_send_tables(m->dcache);
        OPS->graph_launch(be, s->graph);
        if (late) {
            route_log_note(s);
            dev_cache_send_tables(m->dcache);
        }
        if (m->dcache && dev_cache_host_mapped(m->dcache)) s->log_n = n; /* noted next step */
        if (logits) OPS->download(be, logits, s->d_logits, sizeof(float) * (size_t)V);
    } else {
        s->attn_ctx = s->pos + n;
        mf_status st = forward_layers(s, n);
        if (st) return st;
        if (want_out) {
            int64_t rows = all_logits && logits ? n : 1;
            /* the CPU's lm head writes straight into the caller's buffer */
            float *out = OPS->host_memory && logits ? logits : s->d_logits;
            forward_head(s, n - rows, rows, out, next != NULL);
            if (logits && out != logits) OPS->download(be, logits, out, sizeof(float) * (size_t)(rows * V));
        }
    }
    if (next && graph && s->log_n) {
        /* d_next follows the log: the step's choices come back with its token */
        OPS->download(be, s->route_log, s->d_route_log, route_log_bytes(s) + sizeof(int32_t));
        *next = s->route_log[s->d_next - s->d_route_log];
        s->log_fetched = 1;
    } else if (next) {
        OPS->download(be, next, s->d_next, sizeof(int32_t));
    }
    /* tokens now occupy positions pos .. pos + n - 1 */
    memmove(s->tokens + s->pos, tokens, sizeof(int32_t) * (size_t)n);
    s->pos += n;
    s->prof.tokens += (uint64_t)n;
    MARK(other);
    return MF_OK;
}

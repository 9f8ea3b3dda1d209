/* session.c - per-conversation state: token history, KV caches, linear-attention state and
 * its checkpoints, scratch buffers; eval in prefill chunks, reset, truncate, save and load.
 * Not the layer math (forward.c). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend/cuda/cuda_backend.h"
#include "model/model_internal.h"
#include "text/sampler.h"

#include <time.h>

#define SESSION_MAGIC "MFSESS\0\0"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void prof_mark(mf_session *s, double *acc) {
    if (!s->profile) return;
    s->m->be->ops->sync(s->m->be);
    double t = now_s();
    if (acc) *acc += t - s->prof_t;
    s->prof_t = t;
}

void mf_session_profile(const mf_session *s, mf_profile *p) {
    if (s) *p = s->prof;
    else memset(p, 0, sizeof *p);
}

void mf_session_set_profile(mf_session *s, int on) {
    if (s) s->profile = on;
}

void mf_session_reset_profile(mf_session *s) {
    if (s) memset(&s->prof, 0, sizeof s->prof);
}
#define SESSION_VERSION 1u

void mf_session_options_init(mf_session_options *o) {
    memset(o, 0, sizeof *o);
    o->max_ctx = 4096;
    o->prefill_chunk = 64;
}

const char *mf_session_error(const mf_session *s) { return s ? s->err.msg : "out of memory"; }

static void *zalloc(size_t n, int *ok) {
    void *p = calloc(1, n ? n : 1);
    if (!p) *ok = 0;
    return p;
}

/* Zeroed backend memory. */
static void *balloc(mf_session *s, size_t n, int *ok) {
    mf_backend *be = s->m->be;
    void *p = be->ops->alloc(be, n ? n : 64);
    if (!p) *ok = 0;
    return p;
}

void mf_session_free(mf_session *s) {
    if (!s) return;
    if (s->m) {
        mf_backend *be = s->m->be;
        if (s->graph) be->ops->graph_free(be, s->graph);
        const mf_hparams *hp = &s->m->file.L.hp;
        for (int l = 0; l < hp->n_layers; l++) {
            if (s->pieces && s->pieces[l]) be->ops->graph_free(be, s->pieces[l]);
            if (s->k_cache) be->ops->free(be, s->k_cache[l]);
            if (s->v_cache) be->ops->free(be, s->v_cache[l]);
            if (s->conv_state) be->ops->free(be, s->conv_state[l]);
            if (s->rec_state) be->ops->free(be, s->rec_state[l]);
        }
        void *dev[] = {s->d_positions, s->x, s->h, s->y, s->zeros, s->big1, s->big2, s->big3,
                       s->big4, s->big5, s->big6, s->small1, s->small2, s->small3, s->small4, s->d_route,
                       s->d_expert_tok, s->d_expert_tw, s->d_logits, (void *)s->d_blob_table, s->d_pred_w,
                       s->d_route_log};
        for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) be->ops->free(be, dev[i]);
    }
    free(s->logits_host);
    free(s->pieces);
    free(s->k_cache);
    free(s->v_cache);
    free(s->conv_state);
    free(s->rec_state);
    for (int i = 0; i < SESSION_SNAPSHOTS; i++) free(s->snaps[i].data);
    if (s->route_pinned) s->m->be->ops->host_free(s->m->be, s->route);
    else free(s->route);
    void *bufs[] = {s->tokens, s->positions, s->expert_count, s->expert_tok,
                    s->expert_tw, s->expert_start, s->used_ids, s->lin_host, s->pred_ids, s->pred_mark,
                    (void *)s->blob_host, s->route_log};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
    free(s);
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

mf_status mf_session_new(mf_model *m, const mf_session_options *o, mf_session **out) {
    mf_session *s = calloc(1, sizeof *s);
    *out = s;
    if (!s) return MF_ERR_NOMEM;
    if (!m || !m->loaded)
        return err_set(&s->err, MF_ERR_ARG, "session: the model is not loaded (call mf_model_load)");
    s->m = m;
    mf_session_options def;
    mf_session_options_init(&def);
    if (!o) o = &def;
    const mf_hparams *hp = &m->file.L.hp;
    s->max_ctx = o->max_ctx > 0 ? o->max_ctx : def.max_ctx;
    s->profile = o->profile;
    s->chunk = o->prefill_chunk > 0 ? o->prefill_chunk : def.prefill_chunk;
    if (s->max_ctx > hp->max_position) s->max_ctx = hp->max_position;
    if (s->chunk > s->max_ctx) s->chunk = s->max_ctx;
    int ok = 1, L = hp->n_layers, T = s->chunk;
    int64_t H = hp->hidden, kd = (int64_t)hp->lin_k_heads * hp->lin_k_dim,
            vd = (int64_t)hp->lin_v_heads * hp->lin_v_dim, C = 2 * kd + vd;
    int64_t wide = H;
    wide = max64(wide, (int64_t)hp->n_heads * hp->head_dim * 2);
    wide = max64(wide, C);
    wide = max64(wide, 2 * kd);
    wide = max64(wide, hp->moe_inter);
    wide = max64(wide, hp->shared_inter);
    wide = max64(wide, hp->dense_inter);
    int64_t narrow = max64(max64(hp->lin_v_heads, hp->n_experts), 1);
    int64_t K = hp->top_k;
    size_t f = sizeof(float);
    s->tokens = zalloc(sizeof(int32_t) * (size_t)s->max_ctx, &ok);
    s->positions = zalloc(sizeof(int32_t) * 2 * (size_t)T, &ok);
    const size_t route_bytes = sizeof(int32_t) * 3 * (size_t)(T * K);
    if (m->be->ops->host_alloc && !m->be->ops->host_memory && (s->route = m->be->ops->host_alloc(m->be, route_bytes))) {
        memset(s->route, 0, route_bytes);
        s->route_pinned = 1;
    } else {
        s->route = zalloc(route_bytes, &ok);
    }
    if (s->route) {
        s->topk_ids = s->route;
        s->topk_w = (float *)s->route + T * K;
        s->pred_raw = (int32_t *)s->route + 2 * T * K;
    }
    s->expert_count = zalloc(sizeof(int32_t) * (size_t)hp->n_experts, &ok);
    s->expert_tok = zalloc(sizeof(int32_t) * (size_t)(T * K), &ok);
    s->expert_tw = zalloc(f * (size_t)(T * K), &ok);
    s->expert_start = zalloc(sizeof(int32_t) * (size_t)(hp->n_experts + 1), &ok);
    s->used_ids = zalloc(sizeof(int32_t) * (size_t)hp->n_experts, &ok);
    s->pred_ids = zalloc(sizeof(int32_t) * (size_t)hp->n_experts, &ok);
    s->pred_mark = zalloc((size_t)hp->n_experts, &ok);
    s->pred_layer = -1;
    s->predict = !o->no_predict;
    s->use_graph = !o->no_graph;
    s->blob_host = zalloc(sizeof(void *) * (size_t)hp->n_experts, &ok);
    s->k_cache = zalloc(sizeof(float *) * (size_t)L, &ok);
    s->v_cache = zalloc(sizeof(float *) * (size_t)L, &ok);
    s->conv_state = zalloc(sizeof(float *) * (size_t)L, &ok);
    s->rec_state = zalloc(sizeof(float *) * (size_t)L, &ok);
    if (!ok) return err_set(&s->err, MF_ERR_NOMEM, "session: out of memory (context %d)", s->max_ctx);
    s->d_positions = balloc(s, sizeof(int32_t) * 2 * (size_t)T, &ok);
    s->d_tokens = s->d_positions ? s->d_positions + T : NULL;
    float **hbufs[] = {&s->x, &s->h, &s->y, &s->zeros};
    for (int i = 0; i < 4; i++) *hbufs[i] = balloc(s, f * (size_t)(T * H), &ok);
    float **bigs[] = {&s->big1, &s->big2, &s->big3, &s->big4, &s->big5, &s->big6};
    for (int i = 0; i < 6; i++) *bigs[i] = balloc(s, f * (size_t)(T * wide), &ok);
    float **smalls[] = {&s->small1, &s->small2, &s->small3, &s->small4};
    for (int i = 0; i < 4; i++) *smalls[i] = balloc(s, f * (size_t)(T * narrow), &ok);
    s->d_route = balloc(s, sizeof(int32_t) * 3 * (size_t)(T * K), &ok);
    if (s->d_route) {
        s->d_topk_ids = s->d_route;
        s->d_topk_w = (float *)s->d_route + T * K;
        s->d_pred_ids = (int32_t *)s->d_route + 2 * T * K;
    }
    s->d_expert_tok = balloc(s, sizeof(int32_t) * (size_t)(T * K), &ok);
    s->d_expert_tw = balloc(s, f * (size_t)(T * K), &ok);
    s->d_blob_table = balloc(s, sizeof(void *) * (size_t)hp->n_experts, &ok);
    s->d_pred_w = balloc(s, f * (size_t)(T * K), &ok);
    s->d_route_log = balloc(s, sizeof(int32_t) * (size_t)(L * FUSED_MAX_TOKENS * K + 1), &ok);
    s->route_log = zalloc(sizeof(int32_t) * (size_t)(L * FUSED_MAX_TOKENS * K + 1), &ok);
    if (s->d_route_log) s->d_next = s->d_route_log + L * FUSED_MAX_TOKENS * K;
    /* the CPU's lm head writes into the caller's logits; this row serves greedy-only steps */
    s->d_logits = balloc(s, f * (size_t)(m->be->ops->host_memory ? 1 : T) * (size_t)hp->vocab, &ok);
    for (int l = 0; ok && l < L; l++) {
        if (hp->layer_kind[l] == MF_LAYER_FULL_ATTENTION) {
            size_t n = f * (size_t)s->max_ctx * (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
            s->k_cache[l] = balloc(s, n, &ok);
            s->v_cache[l] = balloc(s, n, &ok);
        } else {
            s->conv_state[l] = balloc(s, f * (size_t)((hp->lin_conv_kernel - 1) * C), &ok);
            s->rec_state[l] = balloc(s, f * (size_t)hp->lin_v_heads * (size_t)hp->lin_k_dim * (size_t)hp->lin_v_dim, &ok);
            s->lin_floats += (uint64_t)(hp->lin_conv_kernel - 1) * (uint64_t)C +
                             (uint64_t)hp->lin_v_heads * (uint64_t)hp->lin_k_dim * (uint64_t)hp->lin_v_dim;
        }
    }
    if (ok && s->lin_floats) s->lin_host = zalloc(f * s->lin_floats, &ok);
    for (int i = 0; i < SESSION_SNAPSHOTS && ok; i++) {
        s->snaps[i].pos = -1;
        if (s->lin_floats) s->snaps[i].data = zalloc(f * s->lin_floats, &ok);
    }
    if (!ok)
        return err_set(&s->err, MF_ERR_NOMEM, "session: out of %s memory (context %d)", m->be->ops->name, s->max_ctx);
    mf_backend_limits lim = {s->max_ctx, s->chunk, hp->lin_k_dim > hp->lin_v_dim ? hp->lin_k_dim : hp->lin_v_dim,
                             hp->n_experts, hp->top_k, hp->moe_inter, hp->hidden};
    if (m->be->ops->reserve(m->be, &lim) != MF_OK)
        return err_set(&s->err, MF_ERR_NOMEM, "session: out of memory for backend scratch (context %d)", s->max_ctx);
    return MF_OK;
}

int mf_session_pos(const mf_session *s) { return s ? s->pos : 0; }

/* Copies every linear layer's state into (to_snap) or out of a flat host buffer. */
static void lin_copy(mf_session *s, float *flat, int to_snap) {
    const mf_hparams *hp = &s->m->file.L.hp;
    mf_backend *be = s->m->be;
    int64_t kd = (int64_t)hp->lin_k_heads * hp->lin_k_dim, vd = (int64_t)hp->lin_v_heads * hp->lin_v_dim;
    size_t conv = sizeof(float) * (size_t)((hp->lin_conv_kernel - 1) * (2 * kd + vd));
    size_t rec = sizeof(float) * (size_t)hp->lin_v_heads * (size_t)hp->lin_k_dim * (size_t)hp->lin_v_dim;
    char *p = (char *)flat;
    for (int l = 0; l < hp->n_layers; l++) {
        if (!s->conv_state[l]) continue;
        if (to_snap) {
            be->ops->download(be, p, s->conv_state[l], conv);
            be->ops->download(be, p + conv, s->rec_state[l], rec);
        } else {
            be->ops->upload(be, s->conv_state[l], p, conv);
            be->ops->upload(be, s->rec_state[l], p + conv, rec);
        }
        p += conv + rec;
    }
}

static void take_snapshot(mf_session *s) {
    if (!s->lin_floats) return;
    for (int i = 0; i < SESSION_SNAPSHOTS; i++)
        if (s->snaps[i].pos == s->pos) return;
    lin_snapshot *sn = &s->snaps[s->snap_next];
    s->snap_next = (s->snap_next + 1) % SESSION_SNAPSHOTS;
    lin_copy(s, sn->data, 1);
    sn->pos = s->pos;
}

static void clear_state(mf_session *s) {
    if (s->lin_floats) {
        memset(s->lin_host, 0, sizeof(float) * s->lin_floats);
        lin_copy(s, s->lin_host, 0);
    }
    s->pos = 0;
}

void mf_session_reset(mf_session *s) {
    if (!s || !s->m) return;
    clear_state(s);
    for (int i = 0; i < SESSION_SNAPSHOTS; i++) s->snaps[i].pos = -1;
    err_clear(&s->err);
}

static mf_status eval_tokens(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits,
                             int32_t *next) {
    int vocab = s->m->file.L.hp.vocab;
    for (int i = 0; i < n; i += s->chunk) {
        int c = n - i < s->chunk ? n - i : s->chunk;
        int last = i + c == n;
        float *lg = NULL;
        if (logits && all_logits) lg = logits + (int64_t)i * vocab;
        else if (logits && last) lg = logits;
        const int keep = s->keep_logits;
        s->keep_logits = keep && last; /* only the last chunk's logits are sampled from */
        mf_status st = forward_chunk(s, tokens + i, c, lg, all_logits, last ? next : NULL);
        s->keep_logits = keep;
        if (st) return st;
    }
    return MF_OK;
}

static mf_status eval_checked(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits,
                              int32_t *next);

mf_status mf_session_eval(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits) {
    return eval_checked(s, tokens, n, logits, all_logits, NULL);
}

mf_status mf_session_eval_greedy(mf_session *s, const int32_t *tokens, int n, int32_t *next) {
    if (!s || !s->m) return MF_ERR_ARG;
    if (!next) return err_set(&s->err, MF_ERR_ARG, "eval_greedy: no place for the next token");
    return eval_checked(s, tokens, n, NULL, 0, next);
}

/* The sampler's choice from the last token's logits in d_logits: on the backend where it
 * samples (the token comes back, or -1 when the draw needs more candidates sorted than it
 * holds: the penalised logits then come back and the host finishes), else on the host. */
static mf_status sample_kept(mf_session *s, sampler *sp, int32_t *next) {
    mf_backend *be = s->m->be;
    const int V = s->m->file.L.hp.vocab;
    mf_sample_args a;
    sampler_prepare(sp, s->tokens, s->pos, &a);
    int penalised = 0;
    if (be->ops->sample) {
        int32_t tok = -1;
        be->ops->sample(be, s->d_logits, V, &a, s->d_next);
        be->ops->download(be, &tok, s->d_next, sizeof tok);
        const char *e = cuda_backend_last_error(be);
        if (e) return err_set(&s->err, MF_ERR_INTERNAL, "sampling on the backend failed: %s", e);
        if (tok >= 0 && tok < V) {
            *next = tok;
            return MF_OK;
        }
        if (tok != -1) return err_set(&s->err, MF_ERR_INTERNAL, "sampling on the backend gave token %d", tok);
        penalised = 1;
    }
    float *lg = s->d_logits;
    if (!be->ops->host_memory) {
        if (!s->logits_host && !(s->logits_host = malloc(sizeof(float) * (size_t)V)))
            return err_set(&s->err, MF_ERR_NOMEM, "sampling: no memory for the logits");
        be->ops->download(be, s->logits_host, s->d_logits, sizeof(float) * (size_t)V);
        lg = s->logits_host;
    }
    *next = sampler_finish(sp, lg, &a, penalised);
    return MF_OK;
}

mf_status mf_session_eval_sample(mf_session *s, const int32_t *tokens, int n, mf_sampler *smp, int32_t *next) {
    if (!s || !s->m) return MF_ERR_ARG;
    if (!smp || !next) return err_set(&s->err, MF_ERR_ARG, "eval_sample: no sampler or no place for the next token");
    sampler *sp = mf_sampler_inner(smp);
    if (sampler_vocab(sp) != s->m->file.L.hp.vocab)
        return err_set(&s->err, MF_ERR_ARG, "eval_sample: the sampler's vocabulary (%d) is not the model's (%d)",
                       sampler_vocab(sp), s->m->file.L.hp.vocab);
    s->keep_logits = 1;
    mf_status st = eval_checked(s, tokens, n, NULL, 0, NULL);
    s->keep_logits = 0;
    if (st) return st;
    return sample_kept(s, sp, next);
}

static mf_status eval_checked(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits,
                              int32_t *next) {
    if (!s || !s->m) return MF_ERR_ARG;
    err_clear(&s->err);
    if (n < 1 || !tokens) return err_set(&s->err, MF_ERR_ARG, "eval: no tokens");
    if ((int64_t)s->pos + n > s->max_ctx)
        return err_set(&s->err, MF_ERR_ARG, "eval: %d tokens at position %d exceed the context of %d",
                       n, s->pos, s->max_ctx);
    int pos0 = s->pos;
    mf_status st = eval_tokens(s, tokens, n, logits, all_logits, next);
    if (st) {
        /* a failed step leaves a partial state; return to where the call began */
        mf_err keep = s->err;
        mf_session_truncate(s, pos0);
        s->err = keep;
        return st;
    }
    if (n > 1) take_snapshot(s);
    return MF_OK;
}

mf_status mf_session_truncate(mf_session *s, int pos) {
    if (!s || !s->m) return MF_ERR_ARG;
    if (pos < 0 || pos > s->pos)
        return err_set(&s->err, MF_ERR_ARG, "truncate: position %d outside 0..%d", pos, s->pos);
    if (pos == s->pos) return MF_OK;
    if (!s->lin_floats) {
        s->pos = pos;
        return MF_OK;
    }
    /* restore the newest checkpoint at or before pos, then re-run the tokens after it */
    int best = -1;
    for (int i = 0; i < SESSION_SNAPSHOTS; i++)
        if (s->snaps[i].pos >= 0 && s->snaps[i].pos <= pos && (best < 0 || s->snaps[i].pos > s->snaps[best].pos))
            best = i;
    for (int i = 0; i < SESSION_SNAPSHOTS; i++)
        if (s->snaps[i].pos > pos) s->snaps[i].pos = -1;
    int from = 0;
    if (best >= 0) {
        lin_copy(s, s->snaps[best].data, 0);
        from = s->snaps[best].pos;
    } else {
        clear_state(s);
    }
    s->pos = from;
    if (pos > from) {
        mf_status st = eval_tokens(s, s->tokens + from, pos - from, NULL, 0, NULL);
        if (st) return st;
    }
    return MF_OK;
}

/* ---- save / load ---- */

static int put(FILE *f, const void *p, size_t n) { return fwrite(p, 1, n, f) == n; }
static int get(FILE *f, void *p, size_t n) { return fread(p, 1, n, f) == n; }

mf_status mf_session_save(mf_session *s, const char *path) {
    if (!s || !s->m) return MF_ERR_ARG;
    const mf_hparams *hp = &s->m->file.L.hp;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) return err_set(&s->err, MF_ERR_IO, "%s: cannot create: %s", path, strerror(errno));
    FILE *f = fdopen(fd, "wb");
    if (!f) {
        close(fd);
        unlink(tmp);
        return err_set(&s->err, MF_ERR_IO, "%s: cannot write", path);
    }
    uint32_t version = SESSION_VERSION, pos = (uint32_t)s->pos;
    int ok = put(f, SESSION_MAGIC, 8) && put(f, &version, 4) && put(f, &pos, 4) &&
             put(f, &s->m->manifest_hash, 8) && put(f, s->tokens, sizeof(int32_t) * pos);
    size_t kvrow = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    size_t kvbytes = sizeof(float) * kvrow * pos;
    float *stage = malloc(kvbytes ? kvbytes : 1);
    ok = ok && stage;
    mf_backend *be = s->m->be;
    for (int l = 0; ok && l < hp->n_layers; l++) {
        if (!s->k_cache[l]) continue;
        be->ops->download(be, stage, s->k_cache[l], kvbytes);
        ok = put(f, stage, kvbytes);
        be->ops->download(be, stage, s->v_cache[l], kvbytes);
        ok = ok && put(f, stage, kvbytes);
    }
    free(stage);
    if (ok && s->lin_floats) {
        lin_copy(s, s->lin_host, 1);
        ok = put(f, s->lin_host, sizeof(float) * s->lin_floats);
    }
    ok = ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return err_set(&s->err, MF_ERR_IO, "%s: cannot save the session: %s", path, strerror(errno));
    }
    return MF_OK;
}

mf_status mf_session_load(mf_session *s, const char *path) {
    if (!s || !s->m) return MF_ERR_ARG;
    const mf_hparams *hp = &s->m->file.L.hp;
    FILE *f = fopen(path, "rb");
    if (!f) return err_set(&s->err, MF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char magic[8];
    uint32_t version = 0, pos = 0;
    uint64_t hash = 0;
    mf_status st = MF_OK;
    if (!get(f, magic, 8) || memcmp(magic, SESSION_MAGIC, 8) || !get(f, &version, 4) || !get(f, &pos, 4) ||
        !get(f, &hash, 8))
        st = err_set(&s->err, MF_ERR_FORMAT, "%s: not a moeflux session file", path);
    else if (version != SESSION_VERSION)
        st = err_set(&s->err, MF_ERR_UNSUPPORTED, "%s: session version %u, this build reads %u", path, version,
                     SESSION_VERSION);
    else if (hash != s->m->manifest_hash)
        st = err_set(&s->err, MF_ERR_FORMAT, "%s: saved from a different model", path);
    else if (pos > (uint32_t)s->max_ctx)
        st = err_set(&s->err, MF_ERR_FORMAT, "%s: %u positions exceed this session's context of %d", path, pos,
                     s->max_ctx);
    if (st) {
        fclose(f);
        return st;
    }
    mf_session_reset(s);
    size_t kvrow = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    int ok = get(f, s->tokens, sizeof(int32_t) * pos);
    size_t kvbytes = sizeof(float) * kvrow * pos;
    float *stage = malloc(kvbytes ? kvbytes : 1);
    ok = ok && stage;
    mf_backend *be = s->m->be;
    for (int l = 0; ok && l < hp->n_layers; l++) {
        if (!s->k_cache[l]) continue;
        ok = get(f, stage, kvbytes);
        if (ok) be->ops->upload(be, s->k_cache[l], stage, kvbytes);
        ok = ok && get(f, stage, kvbytes);
        if (ok) be->ops->upload(be, s->v_cache[l], stage, kvbytes);
    }
    free(stage);
    if (ok && s->lin_floats) {
        ok = get(f, s->lin_host, sizeof(float) * s->lin_floats);
        if (ok) lin_copy(s, s->lin_host, 0);
    }
    char extra;
    if (ok && fread(&extra, 1, 1, f) != 0) ok = 0;
    fclose(f);
    if (!ok) {
        mf_session_reset(s);
        return err_set(&s->err, MF_ERR_FORMAT, "%s: truncated or oversized session file", path);
    }
    for (uint32_t i = 0; i < pos; i++)
        if (s->tokens[i] < 0 || s->tokens[i] >= hp->vocab) {
            mf_session_reset(s);
            return err_set(&s->err, MF_ERR_FORMAT, "%s: token %u is outside the vocabulary", path, i);
        }
    s->pos = (int)pos;
    take_snapshot(s);
    return MF_OK;
}

/* weights.c - reads the dense region of a .moeflux file and builds per-layer views, checking
 * names, shapes and storage types. Not the expert store, not the forward pass. */
#include "model/weights.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct loader {
    const mfpack_file *f;
    model_weights *w;
    mf_err *err;
} loader;

static const mfpack_tensor *need(loader *ld, const char *name, int64_t rows, int64_t cols) {
    const mfpack_tensor *t = mfpack_find(&ld->f->L, name);
    if (!t) {
        err_set(ld->err, MF_ERR_FORMAT, "%s: tensor '%s' is missing", ld->f->path, name);
        return NULL;
    }
    int64_t r = 1;
    for (int i = 0; i < t->ndim - 1; i++) r *= t->shape[i];
    int64_t c = t->shape[t->ndim - 1];
    if ((rows && (r != rows || t->ndim != 2)) || (!rows && t->ndim != 1) || c != cols) {
        err_set(ld->err, MF_ERR_FORMAT, "%s: tensor '%s' has the wrong shape (want %s%lld x %lld)",
                ld->f->path, name, rows ? "" : "vector ", (long long)(rows ? rows : 1), (long long)cols);
        return NULL;
    }
    return t;
}

static const void *ptr(loader *ld, const mfpack_tensor *t) {
    return (const char *)ld->w->mem + (t->offset - ld->f->L.dense_offset);
}

static int mat(loader *ld, mf_wmat *m, const char *name, int64_t rows, int64_t cols) {
    const mfpack_tensor *t = need(ld, name, rows, cols);
    if (!t) return 0;
    m->type = t->type;
    m->rows = rows;
    m->cols = cols;
    m->data = ptr(ld, t);
    return 1;
}

/* A vector stored f32 (norms, conv, gates). */
static int vec(loader *ld, const float **v, const char *name, int64_t rows, int64_t n) {
    const mfpack_tensor *t = need(ld, name, rows, n);
    if (!t) return 0;
    if (t->type != MF_QTYPE_F32) {
        err_set(ld->err, MF_ERR_FORMAT, "%s: tensor '%s' must be stored f32, not %s", ld->f->path, name,
                mf_qtype_name(t->type));
        return 0;
    }
    *v = ptr(ld, t);
    return 1;
}

#define NAME(...) (snprintf(n, sizeof n, __VA_ARGS__), n)

static int load_layer(loader *ld, int l) {
    const mf_hparams *hp = &ld->f->L.hp;
    layer_weights *lw = &ld->w->layers[l];
    char n[160];
    int64_t H = hp->hidden;
    if (!vec(ld, &lw->input_norm, NAME("layers.%d.input_layernorm", l), 0, H) ||
        !vec(ld, &lw->post_norm, NAME("layers.%d.post_attention_layernorm", l), 0, H))
        return 0;
    if (hp->layer_kind[l] == MF_LAYER_FULL_ATTENTION) {
        int64_t hd = hp->head_dim, qr = (int64_t)hp->n_heads * hd * (hp->attn_output_gate ? 2 : 1);
        if (!mat(ld, &lw->q_proj, NAME("layers.%d.self_attn.q_proj", l), qr, H) ||
            !mat(ld, &lw->k_proj, NAME("layers.%d.self_attn.k_proj", l), hp->n_kv_heads * hd, H) ||
            !mat(ld, &lw->v_proj, NAME("layers.%d.self_attn.v_proj", l), hp->n_kv_heads * hd, H) ||
            !mat(ld, &lw->o_proj, NAME("layers.%d.self_attn.o_proj", l), H, hp->n_heads * hd) ||
            !vec(ld, &lw->q_norm, NAME("layers.%d.self_attn.q_norm", l), 0, hd) ||
            !vec(ld, &lw->k_norm, NAME("layers.%d.self_attn.k_norm", l), 0, hd))
            return 0;
    } else {
        int64_t kd = (int64_t)hp->lin_k_heads * hp->lin_k_dim, vd = (int64_t)hp->lin_v_heads * hp->lin_v_dim;
        if (!mat(ld, &lw->in_qkv, NAME("layers.%d.linear_attn.in_proj_qkv", l), 2 * kd + vd, H) ||
            !mat(ld, &lw->in_z, NAME("layers.%d.linear_attn.in_proj_z", l), vd, H) ||
            !mat(ld, &lw->in_b, NAME("layers.%d.linear_attn.in_proj_b", l), hp->lin_v_heads, H) ||
            !mat(ld, &lw->in_a, NAME("layers.%d.linear_attn.in_proj_a", l), hp->lin_v_heads, H) ||
            !mat(ld, &lw->out_proj, NAME("layers.%d.linear_attn.out_proj", l), H, vd) ||
            !vec(ld, &lw->conv, NAME("layers.%d.linear_attn.conv1d", l), 2 * kd + vd, hp->lin_conv_kernel) ||
            !vec(ld, &lw->dt_bias, NAME("layers.%d.linear_attn.dt_bias", l), 0, hp->lin_v_heads) ||
            !vec(ld, &lw->A_log, NAME("layers.%d.linear_attn.A_log", l), 0, hp->lin_v_heads) ||
            !vec(ld, &lw->lin_norm, NAME("layers.%d.linear_attn.norm", l), 0, hp->lin_v_dim))
            return 0;
    }
    if (hp->layer_moe[l]) {
        if (!mat(ld, &lw->router, NAME("layers.%d.mlp.gate", l), hp->n_experts, H)) return 0;
        lw->has_shared = hp->shared_inter > 0;
        if (lw->has_shared) {
            int64_t I = hp->shared_inter;
            if (!mat(ld, &lw->sh_gate, NAME("layers.%d.mlp.shared_expert.gate_proj", l), I, H) ||
                !mat(ld, &lw->sh_up, NAME("layers.%d.mlp.shared_expert.up_proj", l), I, H) ||
                !mat(ld, &lw->sh_down, NAME("layers.%d.mlp.shared_expert.down_proj", l), H, I) ||
                !mat(ld, &lw->sh_gate_w, NAME("layers.%d.mlp.shared_expert_gate", l), 1, H))
                return 0;
        }
        const mfpack_expert_layer *E = mfpack_experts(&ld->f->L, l);
        if (!E || E->count != hp->n_experts || E->parts[0].rows != hp->moe_inter || E->parts[0].cols != H) {
            err_set(ld->err, MF_ERR_FORMAT, "%s: layer %d experts do not match the hyperparameters",
                    ld->f->path, l);
            return 0;
        }
    } else {
        int64_t I = hp->dense_inter;
        if (!mat(ld, &lw->mlp_gate, NAME("layers.%d.mlp.gate_proj", l), I, H) ||
            !mat(ld, &lw->mlp_up, NAME("layers.%d.mlp.up_proj", l), I, H) ||
            !mat(ld, &lw->mlp_down, NAME("layers.%d.mlp.down_proj", l), H, I))
            return 0;
    }
    return 1;
}

mf_status weights_load(model_weights *w, const mfpack_file *f, mf_backend *be, mf_err *err) {
    memset(w, 0, sizeof *w);
    const mf_hparams *hp = &f->L.hp;
    uint64_t bytes = f->L.experts_offset - f->L.dense_offset;
    w->be = be;
    w->mem = be->ops->alloc(be, bytes ? bytes : 4096);
    if (!w->mem)
        return err_set(err, MF_ERR_NOMEM, "%s: cannot allocate %.1f MB of %s memory for the dense weights",
                       f->path, bytes / 1e6, be->ops->name);
    w->mem_bytes = bytes;
    /* host backends read straight into place; others stage through a host buffer */
    size_t stage_bytes = 64u << 20;
    char *stage = be->ops->host_memory ? NULL : malloc(stage_bytes);
    if (!be->ops->host_memory && !stage) {
        weights_free(w);
        return err_set(err, MF_ERR_NOMEM, "out of memory for a staging buffer");
    }
    uint64_t done = 0;
    while (done < bytes) {
        size_t chunk = bytes - done > stage_bytes ? stage_bytes : (size_t)(bytes - done);
        char *dst = stage ? stage : (char *)w->mem + done;
        ssize_t r = pread(f->fd, dst, chunk, (off_t)(f->L.dense_offset + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            free(stage);
            weights_free(w);
            return err_set(err, MF_ERR_IO, "%s: cannot read the dense weights: %s", f->path,
                           r < 0 ? strerror(errno) : "unexpected end of file");
        }
        if (stage) be->ops->upload(be, (char *)w->mem + done, stage, (size_t)r);
        done += (uint64_t)r;
    }
    free(stage);
    w->layers = calloc((size_t)hp->n_layers, sizeof *w->layers);
    if (!w->layers) {
        weights_free(w);
        return err_set(err, MF_ERR_NOMEM, "out of memory");
    }
    loader ld = {f, w, err};
    int ok = mat(&ld, &w->embed, "embed_tokens", hp->vocab, hp->hidden) &&
             vec(&ld, &w->final_norm, "norm", 0, hp->hidden);
    if (ok) {
        if (hp->tie_word_embeddings) w->lm_head = w->embed;
        else ok = mat(&ld, &w->lm_head, "lm_head", hp->vocab, hp->hidden);
    }
    for (int l = 0; ok && l < hp->n_layers; l++) ok = load_layer(&ld, l);
    if (!ok) {
        weights_free(w);
        return err->status;
    }
    return MF_OK;
}

void weights_free(model_weights *w) {
    if (w->be && w->mem) w->be->ops->free(w->be, w->mem);
    free(w->layers);
    memset(w, 0, sizeof *w);
}

/* convert.c - checkpoint directory (Hugging Face or MLX safetensors) -> one .moeflux file,
 * streamed tensor by tensor in row blocks so memory stays bounded.
 * Not a reader of .moeflux files (format/mfpack.c) and not the forward pass. */
#include <cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format/mfpack.h"
#include "format/quant.h"
#include "format/safetensors.h"
#include "core/threadpool.h"
#include "model/hparams.h"

#define BLOCK_FLOATS (1u << 20) /* f32 values decoded per block and thread: 4 MB */

/* A source matrix: rows [row0 + map(r)] of a tensor viewed as [rows_total, cols]
 * (cols are logical values; MLX-quantized sources pack them into u32 words). */
typedef struct srcref {
    const st_tensor *w, *scales, *biases, *scale_inv;
    int qbits;               /* 0: float (F32/F16/BF16/F8 with scale_inv); 4 or 8: MLX affine */
    int64_t row0;
    int64_t rows, cols;      /* the output matrix */
    const int64_t *rowmap;   /* output row -> source row (before row0); NULL = identity */
    int add_one;             /* RMSNorm weights stored as w, wanted as 1 + w */
} srcref;

typedef enum tclass { TC_SMALL, TC_ROUTER, TC_DENSE, TC_EXPERT } tclass;

typedef struct plan_item {
    srcref src;
    mf_qtype type;
    int tensor;              /* index into L.tensors, or -1 for an expert part */
    int layer, expert, part; /* expert parts */
} plan_item;

struct mf_converter {
    mf_err err;
};

typedef struct conv {
    mf_err *err;
    const mf_convert_options *opt;
    mf_hparams hp;
    st_checkpoint ck;
    char prefix[64];         /* text-model prefix: "model.", "model.language_model.", "language_model.model." */
    char head[64];           /* lm_head prefix: "" or "language_model." */
    int mlx;                 /* experts stacked as switch_mlp (MLX layout) */
    int fused;               /* experts as fused 3D gate_up_proj / down_proj */
    int quantized;           /* some source tensor is MLX-quantized */
    mfpack_layout L;
    plan_item *items;
    size_t n_items, cap_items;
    int64_t **maps;          /* row maps owned here */
    size_t n_maps;
    /* progress, and the first error of the writing threads */
    uint64_t done, total;
    pthread_mutex_t mu;
    int failed;
} conv;

void mf_convert_options_init(mf_convert_options *opt) {
    memset(opt, 0, sizeof *opt);
    opt->experts_type = MF_QTYPE_Q4;
    opt->dense_type = MF_QTYPE_Q8;
}

mf_converter *mf_converter_new(void) { return calloc(1, sizeof(mf_converter)); }
const char *mf_converter_error(const mf_converter *c) { return c ? c->err.msg : "out of memory"; }
void mf_converter_free(mf_converter *c) { free(c); }

/* ---- source lookup ---- */

static const st_tensor *find(conv *c, const char *pre, const char *name, const char *suffix) {
    char key[512];
    snprintf(key, sizeof key, "%s%s%s", pre, name, suffix);
    return st_find(&c->ck, key);
}

static int is_float(st_dtype d) { return d == ST_F32 || d == ST_F16 || d == ST_BF16; }

static void shape_str(const st_tensor *t, char *buf, size_t n) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < t->ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

/* Finds pre+name+".weight" (or pre+name when bare) and checks it is a matrix whose logical
 * shape is lead x rows x cols (lead = 0: 2D [rows, cols]; rows = 0: 1D [cols]). Sets s->w and the
 * quantization sidecars. */
static mf_status find_matrix(conv *c, const char *pre, const char *name, int bare, int64_t lead,
                             int64_t rows, int64_t cols, srcref *s) {
    memset(s, 0, sizeof *s);
    char key[512];
    snprintf(key, sizeof key, "%s%s%s", pre, name, bare ? "" : ".weight");
    const st_tensor *w = st_find(&c->ck, key);
    if (!w) return err_set(c->err, MF_ERR_FORMAT, "%s: missing tensor '%s'", c->opt->src_dir, key);
    s->w = w;
    int want_nd = (lead ? 1 : 0) + (rows ? 1 : 0) + 1;
    char got[128];
    shape_str(w, got, sizeof got);
    if (w->dtype == ST_U32) {
        char base[512];
        snprintf(base, sizeof base, "%s%s", pre, name);
        s->scales = find(c, base, "", ".scales");
        s->biases = find(c, base, "", ".biases");
        if (!s->scales || !s->biases)
            return err_set(c->err, MF_ERR_FORMAT,
                           "%s: tensor '%s' is U32 but '%s.scales' / '%s.biases' are missing",
                           w->file, key, base, base);
        const st_tensor *sc = s->scales, *bi = s->biases;
        if (w->ndim != want_nd || sc->ndim != want_nd || bi->ndim != want_nd || !is_float(sc->dtype) ||
            sc->dtype != bi->dtype)
            return err_set(c->err, MF_ERR_FORMAT, "%s: quantized tensor '%s' has shape %s, expected %d dims",
                           w->file, key, got, want_nd);
        for (int i = 0; i < want_nd; i++)
            if (sc->shape[i] != bi->shape[i] || (i < want_nd - 1 && sc->shape[i] != w->shape[i]))
                return err_set(c->err, MF_ERR_FORMAT, "%s: scales/biases of '%s' do not match its shape",
                               w->file, key);
        int64_t gcols = sc->shape[want_nd - 1], wcols = w->shape[want_nd - 1];
        if (gcols <= 0 || cols % gcols || cols / gcols != QUANT_GROUP)
            return err_set(c->err, MF_ERR_UNSUPPORTED,
                           "%s: tensor '%s': %lld columns in %lld groups; only group size %d is supported",
                           w->file, key, (long long)cols, (long long)gcols, QUANT_GROUP);
        if (wcols * 32 == cols * 4) s->qbits = 4;
        else if (wcols * 32 == cols * 8) s->qbits = 8;
        else
            return err_set(c->err, MF_ERR_UNSUPPORTED,
                           "%s: tensor '%s' packs %lld columns into %lld words: not 4 or 8 bits",
                           w->file, key, (long long)cols, (long long)wcols);
        c->quantized = 1;
    } else if (is_float(w->dtype) || w->dtype == ST_F8_E4M3) {
        if (w->ndim != want_nd || w->shape[want_nd - 1] != cols)
            goto bad_shape;
        if (w->dtype == ST_F8_E4M3) {
            char base[512];
            snprintf(base, sizeof base, "%s%s", pre, name);
            s->scale_inv = find(c, base, "", bare ? "_scale_inv" : ".weight_scale_inv");
            if (!s->scale_inv || !is_float(s->scale_inv->dtype) || s->scale_inv->ndim != 2 ||
                want_nd != 2 || s->scale_inv->shape[0] != (w->shape[0] + 127) / 128 ||
                s->scale_inv->shape[1] != (cols + 127) / 128)
                return err_set(c->err, MF_ERR_FORMAT,
                               "%s: F8_E4M3 tensor '%s' needs a [%lld, %lld] weight_scale_inv",
                               w->file, key, (long long)(w->shape[0] + 127) / 128,
                               (long long)(cols + 127) / 128);
        }
    } else {
        return err_set(c->err, MF_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s, not a weight type",
                       w->file, key, st_dtype_name(w->dtype));
    }
    if (lead && w->shape[0] != lead) goto bad_shape;
    if (rows && w->shape[want_nd - 2] != rows) goto bad_shape;
    s->rows = rows ? rows : 1;
    s->cols = cols;
    return MF_OK;
bad_shape:;
    char want[128];
    if (lead) snprintf(want, sizeof want, "[%lld, %lld, %lld]", (long long)lead, (long long)rows, (long long)cols);
    else if (rows) snprintf(want, sizeof want, "[%lld, %lld]", (long long)rows, (long long)cols);
    else snprintf(want, sizeof want, "[%lld]", (long long)cols);
    return err_set(c->err, MF_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected %s%s", w->file, key,
                   got, want, w->dtype == ST_U32 ? " (after dequantization)" : "");
}

/* ---- plan ---- */

static mf_status push_item(conv *c, const plan_item *it) {
    if (c->n_items == c->cap_items) {
        size_t cap = c->cap_items ? 2 * c->cap_items : 1024;
        plan_item *n = realloc(c->items, cap * sizeof *n);
        if (!n) return err_set(c->err, MF_ERR_NOMEM, "out of memory planning the conversion");
        c->items = n;
        c->cap_items = cap;
    }
    c->items[c->n_items++] = *it;
    return MF_OK;
}

static mf_qtype pick_type(conv *c, tclass cls, const srcref *s) {
    mf_qtype t;
    switch (cls) {
    case TC_SMALL:
        if (s->qbits && !c->opt->dense_set) return s->qbits == 4 ? MF_QTYPE_Q4 : MF_QTYPE_Q8;
        return MF_QTYPE_F32;
    case TC_ROUTER:
        if (s->qbits && !c->opt->dense_set) return s->qbits == 4 ? MF_QTYPE_Q4 : MF_QTYPE_Q8;
        return (s->w->dtype == ST_BF16) ? MF_QTYPE_BF16 : MF_QTYPE_F32;
    case TC_DENSE:
        if (s->qbits && !c->opt->dense_set) return s->qbits == 4 ? MF_QTYPE_Q4 : MF_QTYPE_Q8;
        t = c->opt->dense_set ? c->opt->dense_type : MF_QTYPE_Q8;
        break;
    case TC_EXPERT:
    default:
        if (s->qbits && !c->opt->experts_set) return s->qbits == 4 ? MF_QTYPE_Q4 : MF_QTYPE_Q8;
        t = c->opt->experts_set ? c->opt->experts_type : MF_QTYPE_Q4;
        break;
    }
    if (!quant_type_fits(t, s->cols)) t = MF_QTYPE_BF16;
    return t;
}

/* Adds a dense tensor named `out` (1D when rows == 0) read from `s`. */
static mf_status add_dense(conv *c, const char *out, tclass cls, const srcref *s, int one_dim) {
    plan_item it = {0};
    it.src = *s;
    it.type = pick_type(c, cls, s);
    int64_t shape[2] = {s->rows, s->cols};
    mf_status st = one_dim ? mfpack_layout_add_tensor(&c->L, out, it.type, 1, &s->cols, c->err)
                           : mfpack_layout_add_tensor(&c->L, out, it.type, 2, shape, c->err);
    if (st) return st;
    it.tensor = c->L.n_tensors - 1;
    return push_item(c, &it);
}

/* A plain matrix or vector under the text prefix, copied under the same name. */
static mf_status add_simple(conv *c, const char *name, tclass cls, int64_t rows, int64_t cols,
                            int add_one) {
    srcref s;
    mf_status st = find_matrix(c, c->prefix, name, 0, 0, rows, cols, &s);
    if (st) return st;
    s.add_one = add_one;
    return add_dense(c, name, cls, &s, rows == 0);
}

static int64_t *new_map(conv *c, int64_t n) {
    int64_t **nm = realloc(c->maps, (c->n_maps + 1) * sizeof *nm);
    if (!nm) return NULL;
    c->maps = nm;
    int64_t *m = malloc((size_t)(n ? n : 1) * sizeof *m);
    if (m) c->maps[c->n_maps++] = m;
    return m;
}

static mf_status add_attention(conv *c, int l) {
    const mf_hparams *hp = &c->hp;
    char n[256];
    int norm1 = hparams_norm_plus_one(hp) && !c->mlx;
    int64_t H = hp->hidden, hd = hp->head_dim;
    int64_t qrows = hp->n_heads * hd * (hp->attn_output_gate ? 2 : 1);
    struct { const char *p; int64_t rows, cols; } mats[] = {
        {"q_proj", qrows, H}, {"k_proj", hp->n_kv_heads * hd, H},
        {"v_proj", hp->n_kv_heads * hd, H}, {"o_proj", H, hp->n_heads * hd}};
    for (int i = 0; i < 4; i++) {
        snprintf(n, sizeof n, "layers.%d.self_attn.%s", l, mats[i].p);
        mf_status st = add_simple(c, n, TC_DENSE, mats[i].rows, mats[i].cols, 0);
        if (st) return st;
    }
    const char *norms[] = {"q_norm", "k_norm"};
    for (int i = 0; i < 2; i++) {
        snprintf(n, sizeof n, "layers.%d.self_attn.%s", l, norms[i]);
        mf_status st = add_simple(c, n, TC_SMALL, 0, hd, norm1);
        if (st) return st;
    }
    return MF_OK;
}

/* Qwen3-Next keeps q, k, v, z (and b, a) interleaved per key head in one projection; this
 * maps them back to the [q | k | v], z, b, a rows that Qwen3.5 stores separately. */
static mf_status add_next_fused(conv *c, int l, const char *lp) {
    const mf_hparams *hp = &c->hp;
    int64_t Hk = hp->lin_k_heads, Hv = hp->lin_v_heads, dk = hp->lin_k_dim, dv = hp->lin_v_dim;
    int64_t r = Hv / Hk, group = 2 * dk + 2 * r * dv, H = hp->hidden;
    int64_t kd = Hk * dk, vd = Hv * dv;
    srcref qkvz, ba;
    char n[256];
    snprintf(n, sizeof n, "layers.%d.linear_attn.in_proj_qkvz", l);
    mf_status st = find_matrix(c, lp, n, 0, 0, 2 * kd + 2 * vd, H, &qkvz);
    if (st) return st;
    snprintf(n, sizeof n, "layers.%d.linear_attn.in_proj_ba", l);
    if ((st = find_matrix(c, lp, n, 0, 0, 2 * Hv, H, &ba))) return st;
    int64_t *mqkv = new_map(c, 2 * kd + vd), *mz = new_map(c, vd), *mb = new_map(c, Hv),
            *ma = new_map(c, Hv);
    if (!mqkv || !mz || !mb || !ma) return err_set(c->err, MF_ERR_NOMEM, "out of memory");
    for (int64_t g = 0; g < Hk; g++) {
        int64_t base = g * group;
        for (int64_t i = 0; i < dk; i++) {
            mqkv[g * dk + i] = base + i;               /* q */
            mqkv[kd + g * dk + i] = base + dk + i;     /* k */
        }
        for (int64_t i = 0; i < r * dv; i++) {
            mqkv[2 * kd + g * r * dv + i] = base + 2 * dk + i;  /* v */
            mz[g * r * dv + i] = base + 2 * dk + r * dv + i;    /* z */
        }
        for (int64_t i = 0; i < r; i++) {
            mb[g * r + i] = g * 2 * r + i;
            ma[g * r + i] = g * 2 * r + r + i;
        }
    }
    struct { const char *name; srcref *s; int64_t rows; int64_t *map; } outs[] = {
        {"in_proj_qkv", &qkvz, 2 * kd + vd, mqkv}, {"in_proj_z", &qkvz, vd, mz},
        {"in_proj_b", &ba, Hv, mb}, {"in_proj_a", &ba, Hv, ma}};
    for (int i = 0; i < 4; i++) {
        srcref s = *outs[i].s;
        s.rows = outs[i].rows;
        s.rowmap = outs[i].map;
        snprintf(n, sizeof n, "layers.%d.linear_attn.%s", l, outs[i].name);
        if ((st = add_dense(c, n, i < 2 ? TC_DENSE : TC_DENSE, &s, 0))) return st;
    }
    return MF_OK;
}

static mf_status add_linear_attention(conv *c, int l) {
    const mf_hparams *hp = &c->hp;
    char n[256];
    mf_status st;
    int64_t H = hp->hidden, kd = hp->lin_k_heads * hp->lin_k_dim, vd = hp->lin_v_heads * hp->lin_v_dim;
    int64_t C = 2 * kd + vd, K = hp->lin_conv_kernel;
    snprintf(n, sizeof n, "layers.%d.linear_attn.in_proj_qkvz", l);
    if (find(c, c->prefix, n, ".weight")) {
        if ((st = add_next_fused(c, l, c->prefix))) return st;
    } else {
        struct { const char *p; int64_t rows; } mats[] = {
            {"in_proj_qkv", C}, {"in_proj_z", vd}, {"in_proj_b", hp->lin_v_heads},
            {"in_proj_a", hp->lin_v_heads}};
        for (int i = 0; i < 4; i++) {
            snprintf(n, sizeof n, "layers.%d.linear_attn.%s", l, mats[i].p);
            if ((st = add_simple(c, n, TC_DENSE, mats[i].rows, H, 0))) return st;
        }
    }
    /* conv1d: HF [C, 1, K], MLX [C, K, 1]; both hold C x K values in the same order */
    snprintf(n, sizeof n, "layers.%d.linear_attn.conv1d.weight", l);
    const st_tensor *cw = find(c, c->prefix, n, "");
    if (!cw)
        return err_set(c->err, MF_ERR_FORMAT, "%s: missing tensor '%s%s'", c->opt->src_dir, c->prefix, n);
    if (cw->ndim != 3 || cw->shape[0] != C || !is_float(cw->dtype) ||
        !((cw->shape[1] == 1 && cw->shape[2] == K) || (cw->shape[1] == K && cw->shape[2] == 1))) {
        char got[128];
        shape_str(cw, got, sizeof got);
        return err_set(c->err, MF_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected [%lld, 1, %lld]",
                       cw->file, cw->name, got, (long long)C, (long long)K);
    }
    srcref s = {0};
    s.w = cw;
    s.rows = C;
    s.cols = K;
    snprintf(n, sizeof n, "layers.%d.linear_attn.conv1d", l);
    if ((st = add_dense(c, n, TC_SMALL, &s, 0))) return st;
    /* dt_bias and A_log are bare parameters (no .weight) */
    const char *bare[] = {"dt_bias", "A_log"};
    for (int i = 0; i < 2; i++) {
        snprintf(n, sizeof n, "layers.%d.linear_attn.%s", l, bare[i]);
        if ((st = find_matrix(c, c->prefix, n, 1, 0, 0, hp->lin_v_heads, &s))) return st;
        if ((st = add_dense(c, n, TC_SMALL, &s, 1))) return st;
    }
    snprintf(n, sizeof n, "layers.%d.linear_attn.norm", l);
    if ((st = add_simple(c, n, TC_SMALL, 0, hp->lin_v_dim, 0))) return st;
    snprintf(n, sizeof n, "layers.%d.linear_attn.out_proj", l);
    return add_simple(c, n, TC_DENSE, H, vd, 0);
}

static mf_status add_mlp(conv *c, const char *base, int64_t inter) {
    char n[256];
    int64_t H = c->hp.hidden;
    const char *parts[] = {"gate_proj", "up_proj", "down_proj"};
    for (int p = 0; p < 3; p++) {
        snprintf(n, sizeof n, "%s.%s", base, parts[p]);
        mf_status st = add_simple(c, n, TC_DENSE, p == 2 ? H : inter, p == 2 ? inter : H, 0);
        if (st) return st;
    }
    return MF_OK;
}

/* Finds expert e's part p of layer l in whichever layout the checkpoint uses. */
static mf_status expert_source(conv *c, int l, int e, int p, srcref *s) {
    const mf_hparams *hp = &c->hp;
    int64_t E = hp->n_experts, I = hp->moe_inter, H = hp->hidden;
    int64_t rows = p == 2 ? H : I, cols = p == 2 ? I : H;
    const char *parts[] = {"gate_proj", "up_proj", "down_proj"};
    char n[256];
    mf_status st;
    if (c->mlx) {
        snprintf(n, sizeof n, "layers.%d.mlp.switch_mlp.%s", l, parts[p]);
        if ((st = find_matrix(c, c->prefix, n, 0, E, rows, cols, s))) return st;
        s->row0 = (int64_t)e * rows;
    } else if (c->fused) {
        if (p < 2) {
            snprintf(n, sizeof n, "layers.%d.mlp.experts.gate_up_proj", l);
            if ((st = find_matrix(c, c->prefix, n, 1, E, 2 * I, H, s))) return st;
            s->row0 = (int64_t)e * 2 * I + (p == 1 ? I : 0);
        } else {
            snprintf(n, sizeof n, "layers.%d.mlp.experts.down_proj", l);
            if ((st = find_matrix(c, c->prefix, n, 1, E, H, I, s))) return st;
            s->row0 = (int64_t)e * H;
        }
    } else {
        snprintf(n, sizeof n, "layers.%d.mlp.experts.%d.%s", l, e, parts[p]);
        if ((st = find_matrix(c, c->prefix, n, 0, 0, rows, cols, s))) return st;
    }
    s->rows = rows;
    return MF_OK;
}

static mf_status add_moe(conv *c, int l) {
    const mf_hparams *hp = &c->hp;
    char n[256];
    mf_status st;
    snprintf(n, sizeof n, "layers.%d.mlp.gate", l);
    if ((st = add_simple(c, n, TC_ROUTER, hp->n_experts, hp->hidden, 0))) return st;
    if (hp->shared_inter > 0) {
        snprintf(n, sizeof n, "layers.%d.mlp.shared_expert", l);
        if ((st = add_mlp(c, n, hp->shared_inter))) return st;
        snprintf(n, sizeof n, "layers.%d.mlp.shared_expert_gate", l);
        if ((st = add_simple(c, n, TC_ROUTER, 1, hp->hidden, 0))) return st;
    }
    mf_qtype types[3];
    for (int e = 0; e < hp->n_experts; e++)
        for (int p = 0; p < 3; p++) {
            plan_item it = {0};
            if ((st = expert_source(c, l, e, p, &it.src))) return st;
            it.type = pick_type(c, TC_EXPERT, &it.src);
            if (e == 0) types[p] = it.type;
            else if (it.type != types[p])
                return err_set(c->err, MF_ERR_UNSUPPORTED,
                               "%s: layer %d experts are stored in mixed precisions", c->opt->src_dir, l);
            it.tensor = -1;
            it.layer = l;
            it.expert = e;
            it.part = p;
            if ((st = push_item(c, &it))) return st;
        }
    return mfpack_layout_add_experts(&c->L, l, hp->n_experts, types, hp->moe_inter, hp->hidden, c->err);
}

static mf_status detect_layout(conv *c) {
    const char *prefixes[] = {"model.language_model.", "language_model.model.", "model."};
    c->prefix[0] = '\0';
    for (int i = 0; i < 3; i++)
        if (find(c, prefixes[i], "embed_tokens", ".weight")) {
            snprintf(c->prefix, sizeof c->prefix, "%s", prefixes[i]);
            break;
        }
    if (!c->prefix[0])
        return err_set(c->err, MF_ERR_FORMAT,
                       "%s: missing tensor 'model.embed_tokens.weight' (nor under model.language_model. "
                       "or language_model.model.)",
                       c->opt->src_dir);
    snprintf(c->head, sizeof c->head, "%s",
             !strcmp(c->prefix, "language_model.model.") ? "language_model." : "");
    int first_moe = -1;
    for (int i = 0; i < c->hp.n_layers && first_moe < 0; i++)
        if (c->hp.layer_moe[i]) first_moe = i;
    if (first_moe >= 0) {
        char n[256];
        snprintf(n, sizeof n, "layers.%d.mlp.switch_mlp.gate_proj", first_moe);
        c->mlx = find(c, c->prefix, n, ".weight") != NULL;
        snprintf(n, sizeof n, "layers.%d.mlp.experts.gate_up_proj", first_moe);
        c->fused = find(c, c->prefix, n, "") != NULL;
    } else {
        /* no MoE layer: MLX files still betray themselves by quantized or shifted tensors */
        c->mlx = find(c, c->prefix, "embed_tokens", ".scales") != NULL;
    }
    return MF_OK;
}

static mf_status build_plan(conv *c) {
    const mf_hparams *hp = &c->hp;
    mf_status st;
    int norm1 = hparams_norm_plus_one(hp) && !c->mlx;
    if ((st = add_simple(c, "embed_tokens", TC_DENSE, hp->vocab, hp->hidden, 0))) return st;
    for (int l = 0; l < hp->n_layers; l++) {
        char n[256];
        snprintf(n, sizeof n, "layers.%d.input_layernorm", l);
        if ((st = add_simple(c, n, TC_SMALL, 0, hp->hidden, norm1))) return st;
        snprintf(n, sizeof n, "layers.%d.post_attention_layernorm", l);
        if ((st = add_simple(c, n, TC_SMALL, 0, hp->hidden, norm1))) return st;
        st = hp->layer_kind[l] == MF_LAYER_FULL_ATTENTION ? add_attention(c, l) : add_linear_attention(c, l);
        if (st) return st;
        if (hp->layer_moe[l]) {
            st = add_moe(c, l);
        } else {
            snprintf(n, sizeof n, "layers.%d.mlp", l);
            st = add_mlp(c, n, hp->dense_inter);
        }
        if (st) return st;
    }
    if ((st = add_simple(c, "norm", TC_SMALL, 0, hp->hidden, norm1))) return st;
    if (!hp->tie_word_embeddings) {
        srcref s;
        if ((st = find_matrix(c, c->head, "lm_head", 0, 0, hp->vocab, hp->hidden, &s))) return st;
        if ((st = add_dense(c, "lm_head", TC_DENSE, &s, 0))) return st;
    }
    return MF_OK;
}

/* ---- payload ---- */

static float load_scalar(const st_tensor *t, int64_t i) {
    switch (t->dtype) {
    case ST_F32: {
        float f;
        memcpy(&f, (const char *)t->data + 4 * i, 4);
        return f;
    }
    case ST_F16: {
        uint16_t h;
        memcpy(&h, (const char *)t->data + 2 * i, 2);
        return f16_to_f32(h);
    }
    case ST_BF16: {
        uint16_t h;
        memcpy(&h, (const char *)t->data + 2 * i, 2);
        return bf16_to_f32(h);
    }
    default: return 0.0f;
    }
}

/* Decodes output row r of s into dst[cols]. */
static void decode_row(const srcref *s, int64_t r, float *dst) {
    int64_t sr = s->row0 + (s->rowmap ? s->rowmap[r] : r), C = s->cols;
    const st_tensor *w = s->w;
    if (s->qbits) {
        int64_t wpr = C * s->qbits / 32, G = C / QUANT_GROUP;
        const unsigned char *wp = (const unsigned char *)w->data + (uint64_t)sr * wpr * 4;
        int per = 32 / s->qbits;
        uint32_t mask = (1u << s->qbits) - 1;
        for (int64_t j = 0; j < C; j++) {
            uint32_t word;
            memcpy(&word, wp + 4 * (j / per), 4);
            uint32_t q = (word >> ((j % per) * s->qbits)) & mask;
            float sc = load_scalar(s->scales, sr * G + j / QUANT_GROUP);
            float bi = load_scalar(s->biases, sr * G + j / QUANT_GROUP);
            dst[j] = sc * (float)q + bi;
        }
    } else if (w->dtype == ST_F8_E4M3) {
        const unsigned char *p = (const unsigned char *)w->data + (uint64_t)sr * C;
        int64_t sc_cols = s->scale_inv->shape[1];
        for (int64_t j = 0; j < C; j++)
            dst[j] = f8e4m3_to_f32(p[j]) * load_scalar(s->scale_inv, (sr / 128) * sc_cols + j / 128);
    } else {
        for (int64_t j = 0; j < C; j++) dst[j] = load_scalar(w, sr * C + j);
    }
    if (s->add_one)
        for (int64_t j = 0; j < C; j++) dst[j] += 1.0f;
}

typedef struct wbuf {
    float *f;             /* BLOCK_FLOATS decoded values */
    unsigned char *out;   /* encoded block */
    size_t out_cap;
} wbuf;

static mf_status write_at(mf_err *err, int fd, const char *path, const void *buf, size_t n, uint64_t off) {
    const char *p = buf;
    while (n) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return err_set(err, MF_ERR_IO, "%s: write failed: %s", path, w < 0 ? strerror(errno) : "disk full");
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return MF_OK;
}

static void progress(conv *c, uint64_t add) {
    pthread_mutex_lock(&c->mu);
    c->done += add;
    if (c->opt->progress) c->opt->progress(c->opt->progress_user, c->done, c->total);
    pthread_mutex_unlock(&c->mu);
}

/* Writes rows [r_begin, r_end) of matrix s as type t, the whole matrix living at absolute
 * offset base (layout of quant_tensor_bytes), in blocks that fit b. */
static mf_status write_rows(conv *c, mf_err *err, int fd, const char *path, const srcref *s, mf_qtype t,
                            uint64_t base, int64_t r_begin, int64_t r_end, wbuf *b) {
    int64_t R = s->rows, C = s->cols;
    int64_t B = (int64_t)(BLOCK_FLOATS / (uint64_t)C);
    if (B < 1) B = 1;
    int qb = (t == MF_QTYPE_Q4) ? 4 : (t == MF_QTYPE_Q8) ? 8 : 0;
    uint64_t words_row = qb ? (uint64_t)C * qb / 8 : 0, groups_row = qb ? (uint64_t)(C / QUANT_GROUP) * 2 : 0;
    uint64_t scales_base = base + words_row * (uint64_t)R, biases_base = scales_base + groups_row * (uint64_t)R;
    int raw = qb && s->qbits == qb && s->scales->dtype == ST_BF16;
    mf_status st;
    for (int64_t r0 = r_begin; r0 < r_end; r0 += B) {
        int64_t n = r_end - r0 < B ? r_end - r0 : B;
        if (raw) {
            /* MLX bits kept as they are: copy words, scales and biases row by row */
            unsigned char *ow = b->out, *os = ow + words_row * n, *ob = os + groups_row * n;
            for (int64_t r = 0; r < n; r++) {
                int64_t sr = s->row0 + (s->rowmap ? s->rowmap[r0 + r] : r0 + r);
                memcpy(ow + r * words_row, (const char *)s->w->data + sr * words_row, words_row);
                memcpy(os + r * groups_row, (const char *)s->scales->data + sr * groups_row, groups_row);
                memcpy(ob + r * groups_row, (const char *)s->biases->data + sr * groups_row, groups_row);
            }
        } else {
            for (int64_t r = 0; r < n; r++) decode_row(s, r0 + r, b->f + r * C);
        }
        if (qb) {
            unsigned char *ow = b->out, *os = ow + words_row * n, *ob = os + groups_row * n;
            if (!raw)
                quant_rows(t, b->f, n, C, (uint32_t *)ow, (uint16_t *)os, (uint16_t *)ob);
            if ((st = write_at(err, fd, path, ow, words_row * n, base + words_row * r0)) ||
                (st = write_at(err, fd, path, os, groups_row * n, scales_base + groups_row * r0)) ||
                (st = write_at(err, fd, path, ob, groups_row * n, biases_base + groups_row * r0)))
                return st;
            progress(c, (words_row + 2 * groups_row) * n);
        } else {
            quant_encode(t, b->f, n, C, b->out);
            uint64_t es = (t == MF_QTYPE_F32 ? 4 : 2) * (uint64_t)C;
            if ((st = write_at(err, fd, path, b->out, es * n, base + es * r0))) return st;
            progress(c, es * n);
        }
    }
    return MF_OK;
}

/* One piece of work for a writing thread: rows [r0, r0 + n) of plan item `item`. */
typedef struct unit {
    size_t item;
    int64_t r0, n;
} unit;

typedef struct write_job {
    conv *c;
    int fd;
    const char *path;
    const unit *units;
    int64_t n_units;
    atomic_llong next; /* the next unit to take: threads take units one at a time */
    wbuf *bufs;     /* [threads] */
} write_job;

static uint64_t item_base(const conv *c, const plan_item *it) {
    if (it->tensor >= 0) return c->L.tensors[it->tensor].offset;
    const mfpack_expert_layer *E = mfpack_experts(&c->L, it->layer);
    return E->offset + E->stride * (uint64_t)it->expert + E->parts[it->part].offset;
}

static void write_units(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)begin;
    (void)end;
    write_job *j = ctx;
    conv *c = j->c;
    for (int64_t u; (u = atomic_fetch_add(&j->next, 1)) < j->n_units;) {
        pthread_mutex_lock(&c->mu);
        int stop = c->failed;
        pthread_mutex_unlock(&c->mu);
        if (stop) return;
        const unit *un = &j->units[u];
        const plan_item *it = &c->items[un->item];
        mf_err e;
        err_clear(&e);
        mf_status st = write_rows(c, &e, j->fd, j->path, &it->src, it->type, item_base(c, it), un->r0, un->r0 + un->n,
                                  &j->bufs[thread]);
        if (st) {
            pthread_mutex_lock(&c->mu);
            if (!c->failed) *c->err = e;
            c->failed = 1;
            pthread_mutex_unlock(&c->mu);
            return;
        }
    }
}

/* Decodes, quantizes and writes every plan item, the row blocks spread over the CPUs. */
static mf_status write_payload(conv *c, int fd, const char *path) {
    size_t n_units = 0;
    for (size_t i = 0; i < c->n_items; i++) {
        const plan_item *it = &c->items[i];
        if ((uint64_t)it->src.cols > BLOCK_FLOATS)
            return err_set(c->err, MF_ERR_UNSUPPORTED, "%s: a row of %lld values is too long", it->src.w->name,
                           (long long)it->src.cols);
        int64_t B = (int64_t)(BLOCK_FLOATS / (uint64_t)it->src.cols);
        n_units += (size_t)((it->src.rows + B - 1) / B);
    }
    unit *units = malloc(sizeof *units * (n_units ? n_units : 1));
    mf_pool *pool = pool_create(0);
    int nt = pool_size(pool);
    wbuf *bufs = calloc((size_t)nt, sizeof *bufs);
    int ok = units && pool && bufs;
    for (int t = 0; ok && t < nt; t++) {
        bufs[t].f = malloc(BLOCK_FLOATS * sizeof(float));
        bufs[t].out_cap = BLOCK_FLOATS * sizeof(float);
        bufs[t].out = malloc(bufs[t].out_cap);
        ok = bufs[t].f && bufs[t].out;
    }
    mf_status st = MF_OK;
    if (!ok) {
        st = err_set(c->err, MF_ERR_NOMEM, "out of memory for conversion buffers");
    } else {
        size_t k = 0;
        for (size_t i = 0; i < c->n_items; i++) {
            const plan_item *it = &c->items[i];
            int64_t B = (int64_t)(BLOCK_FLOATS / (uint64_t)it->src.cols);
            for (int64_t r0 = 0; r0 < it->src.rows; r0 += B)
                units[k++] = (unit){i, r0, it->src.rows - r0 < B ? it->src.rows - r0 : B};
        }
        pthread_mutex_init(&c->mu, NULL);
        c->failed = 0;
        write_job job = {c, fd, path, units, (int64_t)n_units, 0, bufs};
        atomic_init(&job.next, 0);
        pool_for(pool, nt, 1, write_units, &job);
        pthread_mutex_destroy(&c->mu);
        if (c->failed) st = c->err->status;
    }
    for (int t = 0; bufs && t < nt; t++) {
        free(bufs[t].f);
        free(bufs[t].out);
    }
    free(bufs);
    free(units);
    pool_destroy(pool);
    return st;
}

static void conv_free(conv *c) {
    st_close(&c->ck);
    mfpack_layout_free(&c->L);
    free(c->items);
    for (size_t i = 0; i < c->n_maps; i++) free(c->maps[i]);
    free(c->maps);
}

static char *source_json(conv *c) {
    cJSON *o = cJSON_CreateObject();
    char *dir = strdup(c->opt->src_dir);
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') dir[--n] = '\0';
    cJSON_AddStringToObject(o, "checkpoint", basename(dir));
    free(dir);
    cJSON_AddStringToObject(o, "layout", c->mlx ? "mlx" : c->fused ? "hf-fused-experts" : "hf-per-expert");
    cJSON_AddStringToObject(o, "prefix", c->prefix);
    cJSON_AddBoolToObject(o, "mlx_quantized", c->quantized);
    cJSON_AddStringToObject(o, "converter", "moeflux " MF_VERSION_STRING);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

mf_status mf_convert(mf_converter *cv, const mf_convert_options *opt) {
    if (!cv) return MF_ERR_NOMEM;
    mf_err *err = &cv->err;
    err_clear(err);
    if (!opt || !opt->src_dir || !opt->out_path)
        return err_set(err, MF_ERR_ARG, "convert: source directory and output path are required");
    if (opt->experts_type >= MF_QTYPE_COUNT || opt->dense_type >= MF_QTYPE_COUNT)
        return err_set(err, MF_ERR_ARG, "convert: unknown storage type");
    conv c = {0};
    c.err = err;
    c.opt = opt;
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", opt->src_dir);
    struct stat sb;
    if (stat(opt->src_dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return err_set(err, MF_ERR_IO, "%s: not a checkpoint directory", opt->src_dir);
    mf_status st = hparams_from_config_file(&c.hp, path, err);
    if (st) return st;
    if ((st = st_open_dir(&c.ck, opt->src_dir, err))) return st;
    mfpack_layout_init(&c.L, &c.hp);
    if ((st = detect_layout(&c)) || (st = build_plan(&c))) {
        conv_free(&c);
        return st;
    }
    c.L.extra_json = source_json(&c);
    if ((st = mfpack_add_dir_files(&c.L, opt->src_dir, err))) {
        conv_free(&c);
        return st;
    }
    mfpack_layout_finish(&c.L);
    for (size_t i = 0; i < c.n_items; i++)
        c.total += quant_tensor_bytes(c.items[i].type, c.items[i].src.rows, c.items[i].src.cols);

    /* write to a temporary name in the output's directory, rename when complete */
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", opt->out_path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        st = err_set(err, MF_ERR_IO, "%s: cannot create output: %s", opt->out_path, strerror(errno));
        conv_free(&c);
        return st;
    }
    fchmod(fd, 0644);
    st = mfpack_write_header(&c.L, fd, opt->out_path, err);
    if (!st) st = write_payload(&c, fd, opt->out_path);
    if (!st) st = mfpack_write_dir_files(&c.L, opt->src_dir, fd, opt->out_path, err);
    if (!st && fsync(fd) != 0)
        st = err_set(err, MF_ERR_IO, "%s: fsync failed: %s", opt->out_path, strerror(errno));
    if (close(fd) != 0 && !st)
        st = err_set(err, MF_ERR_IO, "%s: close failed: %s", opt->out_path, strerror(errno));
    if (!st && rename(tmp, opt->out_path) != 0)
        st = err_set(err, MF_ERR_IO, "%s: cannot rename the finished file into place: %s",
                     opt->out_path, strerror(errno));
    if (st) unlink(tmp);
    conv_free(&c);
    return st;
}

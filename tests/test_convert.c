/* test_convert.c - the converter end to end through the CLI on tests/fixtures: every layout
 * converts, `info --json` agrees with config.json, lossless conversion keeps every value, MLX
 * bits are kept, and broken inputs are refused cleanly. Not a forward-pass test. */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format/mfpack.h"
#include "format/quant.h"
#include "format/safetensors.h"
#include "helpers.h"

static char *g_tmp;

static void setup(void) {
    g_tmp = th_tmpdir();
    cr_assert(g_tmp, "cannot create a temporary directory");
}
static void teardown(void) {
    th_rmtree(g_tmp);
    free(g_tmp);
}

TestSuite(convert, .init = setup, .fini = teardown, .timeout = 120);

static char *fixture(const char *name) { return th_join(th_fixtures(), name); }

/* Runs `moeflux convert src out --quiet [e1 [e2 [e3 [e4]]]]` (NULL ends the extras);
 * returns the exit status, stderr in *err. */
static int run_convert(const char *src, const char *out, const char *e1, const char *e2,
                       const char *e3, const char *e4, char **err) {
    char *argv[] = {(char *)th_bin(), "convert", (char *)src, (char *)out, "--quiet", (char *)e1,
                    (char *)e2, (char *)e3, (char *)e4, NULL};
    return th_run(argv, NULL, err);
}

static cJSON *run_info(const char *model) {
    char *out = NULL, *err = NULL;
    char *argv[] = {(char *)th_bin(), "info", (char *)model, "--json", NULL};
    int rc = th_run(argv, &out, &err);
    cr_assert_eq(rc, 0, "info %s failed: %s", model, err);
    cJSON *o = cJSON_Parse(out);
    cr_assert(o, "info --json printed no JSON: %s", out);
    free(out);
    free(err);
    return o;
}

static cJSON *read_json(const char *path) {
    char *text = th_read_file(path, NULL);
    cr_assert(text, "cannot read %s", path);
    cJSON *o = cJSON_Parse(text);
    free(text);
    cr_assert(o, "%s is not JSON", path);
    return o;
}

static double num(const cJSON *o, const char *k) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);
    cr_assert(cJSON_IsNumber(it) || cJSON_IsBool(it), "field %s missing", k);
    return cJSON_IsBool(it) ? cJSON_IsTrue(it) : it->valuedouble;
}

/* A config field from the text part (text_config for vision-language configs), else the top. */
static const cJSON *cfg_field(const cJSON *cfg, const char *k) {
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(cfg, "text_config");
    const cJSON *it = text ? cJSON_GetObjectItemCaseSensitive(text, k) : NULL;
    if (!it || cJSON_IsNull(it)) it = cJSON_GetObjectItemCaseSensitive(cfg, k);
    return it;
}

static double cfg_num(const cJSON *cfg, const char *k, double def) {
    const cJSON *it = cfg_field(cfg, k);
    if ((!it || cJSON_IsNull(it)) && !strcmp(k, "num_experts")) it = cfg_field(cfg, "num_local_experts");
    if (!it || cJSON_IsNull(it)) return def;
    return cJSON_IsBool(it) ? cJSON_IsTrue(it) : it->valuedouble;
}

static int dir_has_tmp(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = 0;
    while (d && (e = readdir(d)))
        if (strstr(e->d_name, ".tmp-")) found = 1;
    if (d) closedir(d);
    return found;
}

static uint64_t file_size(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

/* Bytes of one expert stored as type t, from the format's definition. */
static uint64_t expert_bytes(int bits, uint64_t I, uint64_t H) {
    uint64_t one = bits >= 16 ? I * H * (uint64_t)bits / 8 : I * H * (uint64_t)bits / 8 + 4 * I * H / 64;
    return 3 * one;
}

/* Converts fixture `name` with default types and checks info against its config.json.
 * expert_bits: the storage the experts must end up in. */
static void check_layout(const char *name, int expert_bits) {
    char *src = fixture(name), *out = th_join(g_tmp, "m.moeflux");
    char *err = NULL;
    int rc = run_convert(src, out, NULL, NULL, NULL, NULL, &err);
    cr_assert_eq(rc, 0, "convert %s failed (%d): %s", name, rc, err);
    cr_assert(!dir_has_tmp(g_tmp), "a temporary file was left behind");
    cJSON *info = run_info(out);
    char *cp = th_join(src, "config.json");
    cJSON *cfg = read_json(cp);
    const char *mt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(cfg, "model_type"));
    const char *imt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(info, "model_type"));
    cr_assert(mt && imt && !strcmp(mt, imt), "model_type %s vs config %s", imt, mt);
    const char *arch = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(info, "arch"));
    cr_assert(arch && !strncmp(arch, mt, strlen(arch)), "arch %s does not fit model_type %s", arch, mt);
    struct { const char *info, *cfg; } same[] = {
        {"n_layers", "num_hidden_layers"}, {"hidden_size", "hidden_size"},
        {"vocab_size", "vocab_size"}, {"n_experts", "num_experts"},
        {"n_experts_per_tok", "num_experts_per_tok"}, {"n_heads", "num_attention_heads"},
        {"n_kv_heads", "num_key_value_heads"}, {"head_dim", "head_dim"},
        {"moe_intermediate_size", "moe_intermediate_size"}};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++)
        cr_assert_eq(num(info, same[i].info), cfg_num(cfg, same[i].cfg, -1), "%s: %s = %g, config says %g",
                     name, same[i].info, num(info, same[i].info), cfg_num(cfg, same[i].cfg, -1));
    cr_assert_eq(num(info, "tie_word_embeddings"), cfg_num(cfg, "tie_word_embeddings", 0));
    /* transformers 5 names qwen3_moe's expert count num_local_experts */
    int L = (int)cfg_num(cfg, "num_hidden_layers", 0);
    const cJSON *lt = cfg_field(cfg, "layer_types"), *ilt = cJSON_GetObjectItemCaseSensitive(info, "layer_types");
    cr_assert_eq(cJSON_GetArraySize(ilt), L);
    for (int i = 0; i < L; i++) {
        const char *want = lt ? cJSON_GetStringValue(cJSON_GetArrayItem(lt, i)) : "full_attention";
        cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetArrayItem(ilt, i)), want, "%s layer %d", name, i);
    }
    uint64_t I = (uint64_t)cfg_num(cfg, "moe_intermediate_size", 0), H = (uint64_t)cfg_num(cfg, "hidden_size", 0);
    cr_assert_eq((uint64_t)num(info, "expert_bytes"), expert_bytes(expert_bits, I, H), "%s: expert_bytes", name);
    cr_assert_eq((uint64_t)num(info, "file_bytes"), file_size(out));
    cr_assert_gt(num(info, "dense_bytes"), 0);
    const cJSON *mlo = cfg_field(cfg, "mlp_only_layers");
    int n_moe = L - (mlo ? cJSON_GetArraySize(mlo) : 0);
    cr_assert_eq((int)num(info, "n_moe_layers"), n_moe);
    cJSON_Delete(cfg);
    cJSON_Delete(info);
    free(cp);
    free(err);
    free(src);
    free(out);
}

Test(convert, qwen3_5_moe_vl_sharded_fused) { check_layout("qwen3_5_moe_vl", 4); }
Test(convert, qwen3_5_moe_text_per_expert) { check_layout("qwen3_5_moe_text", 4); }
Test(convert, qwen3_next) { check_layout("qwen3_next", 4); }
Test(convert, qwen3_moe_per_expert_tied) { check_layout("qwen3_moe_experts", 4); }
Test(convert, qwen3_moe_fused_with_dense_layer) { check_layout("qwen3_moe_fused", 4); }
Test(convert, qwen3_5_moe_mlx_4bit) { check_layout("qwen3_5_moe_mlx4", 4); }
Test(convert, qwen3_next_mlx_8bit) { check_layout("qwen3_next_mlx8", 8); }

/* ---- values: lossless conversion and MLX bits, checked against the safetensors source ---- */

typedef struct pair {
    mfpack_file f;
    st_checkpoint ck;
    const char *pre;   /* the source's text prefix */
    cJSON *cfg;
} pair;

static void pair_open(pair *p, const char *name, const char *e1, const char *e2, const char *e3,
                      const char *e4) {
    char *src = fixture(name), *out = th_join(g_tmp, "v.moeflux"), *err = NULL;
    int rc = run_convert(src, out, e1, e2, e3, e4, &err);
    cr_assert_eq(rc, 0, "convert %s failed: %s", name, err);
    mf_err e;
    cr_assert_eq(mfpack_open(&p->f, out, &e), MF_OK, "%s", e.msg);
    cr_assert_eq(st_open_dir(&p->ck, src, &e), MF_OK, "%s", e.msg);
    const char *pres[] = {"model.language_model.", "language_model.model.", "model."};
    p->pre = NULL;
    for (int i = 0; i < 3 && !p->pre; i++) {
        char k[256];
        snprintf(k, sizeof k, "%sembed_tokens.weight", pres[i]);
        if (st_find(&p->ck, k)) p->pre = pres[i];
    }
    cr_assert(p->pre, "no embedding in %s", name);
    char *cp = th_join(src, "config.json");
    p->cfg = read_json(cp);
    free(cp);
    free(src);
    free(out);
    free(err);
}

static void pair_close(pair *p) {
    mfpack_close(&p->f);
    st_close(&p->ck);
    cJSON_Delete(p->cfg);
}

static void *read_range(pair *p, uint64_t off, uint64_t n) {
    void *buf = malloc(n ? n : 1);
    cr_assert(buf);
    cr_assert_eq(pread(p->f.fd, buf, n, (off_t)off), (ssize_t)n);
    return buf;
}

static const st_tensor *src_t(pair *p, const char *fmt, int a, int b) {
    char name[256], key[300];
    snprintf(name, sizeof name, fmt, a, b);
    snprintf(key, sizeof key, "%s%s", p->pre, name);
    const st_tensor *t = st_find(&p->ck, key);
    cr_assert(t, "source lacks %s", key);
    return t;
}

static const mfpack_tensor *dst_t(pair *p, const char *fmt, int a) {
    char name[256];
    snprintf(name, sizeof name, fmt, a);
    const mfpack_tensor *t = mfpack_find(&p->f.L, name);
    cr_assert(t, "converted file lacks %s", name);
    return t;
}

static float src_val(const st_tensor *t, int64_t i) {
    uint16_t h;
    float f;
    switch (t->dtype) {
    case ST_BF16: memcpy(&h, (const char *)t->data + 2 * i, 2); return bf16_to_f32(h);
    case ST_F16: memcpy(&h, (const char *)t->data + 2 * i, 2); return f16_to_f32(h);
    case ST_F32: memcpy(&f, (const char *)t->data + 4 * i, 4); return f;
    default: cr_assert_fail("unexpected dtype in %s", t->name);
    }
    return 0;
}

/* A 1D f32 tensor equals the source plus `add`. */
static void same_vector(pair *p, const mfpack_tensor *d, const st_tensor *s, float add) {
    cr_assert_eq(d->type, MF_QTYPE_F32, "%s should be f32", d->name);
    cr_assert_eq((int64_t)(d->bytes / 4), s->numel, "%s length", d->name);
    float *v = read_range(p, d->offset, d->bytes);
    for (int64_t i = 0; i < s->numel; i++)
        cr_assert_eq(v[i], src_val(s, i) + add, "%s[%lld] = %g, source %g + %g", d->name, (long long)i,
                     v[i], src_val(s, i), add);
    free(v);
}

/* Bytes at off equal `n` bytes of the source starting at src_off. */
static void same_bytes(pair *p, uint64_t off, const st_tensor *s, uint64_t src_off, uint64_t n,
                       const char *what) {
    cr_assert_leq(src_off + n, s->nbytes, "%s: source range", what);
    unsigned char *v = read_range(p, off, n);
    cr_assert(!memcmp(v, (const char *)s->data + src_off, n), "%s differs from %s", what, s->name);
    free(v);
}

static int first_moe_layer(pair *p) {
    for (int l = 0; l < p->f.L.hp.n_layers; l++)
        if (p->f.L.hp.layer_moe[l]) return l;
    cr_assert_fail("no MoE layer");
    return -1;
}

/* Lossless (bf16) conversion of an HF fixture keeps every weight value. */
static void check_lossless(const char *name) {
    pair p;
    pair_open(&p, name, "--experts", "bf16", "--dense", "bf16");
    const mf_hparams *hp = &p.f.L.hp;
    int hybrid = hp->arch != MF_ARCH_QWEN3_MOE;
    float one = hybrid ? 1.0f : 0.0f;
    const mfpack_tensor *emb = dst_t(&p, "embed_tokens", 0);
    const st_tensor *semb = src_t(&p, "embed_tokens.weight", 0, 0);
    cr_assert_eq(emb->type, MF_QTYPE_BF16);
    same_bytes(&p, emb->offset, semb, 0, semb->nbytes, "embed_tokens");
    same_vector(&p, dst_t(&p, "norm", 0), src_t(&p, "norm.weight", 0, 0), one);
    for (int l = 0; l < hp->n_layers; l++) {
        same_vector(&p, dst_t(&p, "layers.%d.input_layernorm", l), src_t(&p, "layers.%d.input_layernorm.weight", l, 0), one);
        same_vector(&p, dst_t(&p, "layers.%d.post_attention_layernorm", l),
                    src_t(&p, "layers.%d.post_attention_layernorm.weight", l, 0), one);
        if (hp->layer_kind[l] == MF_LAYER_FULL_ATTENTION) {
            same_vector(&p, dst_t(&p, "layers.%d.self_attn.q_norm", l), src_t(&p, "layers.%d.self_attn.q_norm.weight", l, 0), one);
            const mfpack_tensor *q = dst_t(&p, "layers.%d.self_attn.q_proj", l);
            const st_tensor *sq = src_t(&p, "layers.%d.self_attn.q_proj.weight", l, 0);
            same_bytes(&p, q->offset, sq, 0, sq->nbytes, q->name);
        } else {
            same_vector(&p, dst_t(&p, "layers.%d.linear_attn.norm", l), src_t(&p, "layers.%d.linear_attn.norm.weight", l, 0), 0);
            same_vector(&p, dst_t(&p, "layers.%d.linear_attn.A_log", l), src_t(&p, "layers.%d.linear_attn.A_log", l, 0), 0);
            same_vector(&p, dst_t(&p, "layers.%d.linear_attn.dt_bias", l), src_t(&p, "layers.%d.linear_attn.dt_bias", l, 0), 0);
            const mfpack_tensor *cv = dst_t(&p, "layers.%d.linear_attn.conv1d", l);
            const st_tensor *scv = src_t(&p, "layers.%d.linear_attn.conv1d.weight", l, 0);
            float *v = read_range(&p, cv->offset, cv->bytes);
            for (int64_t i = 0; i < scv->numel; i++) cr_assert_eq(v[i], src_val(scv, i), "conv1d[%lld]", (long long)i);
            free(v);
        }
    }
    /* routed experts of the first MoE layer: last expert, every part */
    int l = first_moe_layer(&p);
    const mfpack_expert_layer *E = mfpack_experts(&p.f.L, l);
    int e = hp->n_experts - 1;
    uint64_t I = (uint64_t)hp->moe_inter, H = (uint64_t)hp->hidden, blob = E->offset + E->stride * (uint64_t)e;
    char k[256];
    snprintf(k, sizeof k, "%slayers.%d.mlp.experts.gate_up_proj", p.pre, l);
    const st_tensor *gu = st_find(&p.ck, k);
    for (int part = 0; part < 3; part++) {
        cr_assert_eq(E->parts[part].type, MF_QTYPE_BF16);
        uint64_t n = 2 * I * H;
        if (gu) {
            const st_tensor *src = part < 2 ? gu : src_t(&p, "layers.%d.mlp.experts.down_proj", l, 0);
            uint64_t off = part < 2 ? (uint64_t)e * 2 * n + (part == 1 ? n : 0) : (uint64_t)e * n;
            same_bytes(&p, blob + E->parts[part].offset, src, off, n, E->parts[part].name);
        } else {
            const char *names[] = {"layers.%d.mlp.experts.%d.gate_proj.weight", "layers.%d.mlp.experts.%d.up_proj.weight",
                                   "layers.%d.mlp.experts.%d.down_proj.weight"};
            const st_tensor *src = src_t(&p, names[part], l, e);
            same_bytes(&p, blob + E->parts[part].offset, src, 0, n, E->parts[part].name);
        }
    }
    /* the router keeps bf16 */
    const mfpack_tensor *r = dst_t(&p, "layers.%d.mlp.gate", l);
    const st_tensor *sr = src_t(&p, "layers.%d.mlp.gate.weight", l, 0);
    same_bytes(&p, r->offset, sr, 0, sr->nbytes, "router");
    pair_close(&p);
}

Test(convert, lossless_qwen3_5_moe_vl) { check_lossless("qwen3_5_moe_vl"); }
Test(convert, lossless_qwen3_5_moe_text) { check_lossless("qwen3_5_moe_text"); }
Test(convert, lossless_qwen3_moe_experts) { check_lossless("qwen3_moe_experts"); }
Test(convert, lossless_qwen3_moe_fused) { check_lossless("qwen3_moe_fused"); }
Test(convert, lossless_qwen3_next) { check_lossless("qwen3_next"); }

/* Qwen3-Next's in_proj_qkvz holds, per key head, [q (dk) | k (dk) | v (r dv) | z (r dv)]
 * with r = v heads per key head; in_proj_ba holds [b (r) | a (r)] per key head. The
 * converted file must hold q of all heads, then k, then v in in_proj_qkv, z in in_proj_z. */
static void check_next_split(const char *name, int mlx) {
    pair p;
    if (mlx) pair_open(&p, name, NULL, NULL, NULL, NULL);
    else pair_open(&p, name, "--dense", "bf16", NULL, NULL);
    const mf_hparams *hp = &p.f.L.hp;
    int l = 0;
    while (hp->layer_kind[l] != MF_LAYER_LINEAR_ATTENTION) l++;
    int64_t Hk = hp->lin_k_heads, Hv = hp->lin_v_heads, dk = hp->lin_k_dim, dv = hp->lin_v_dim, r = Hv / Hk;
    const st_tensor *qkvz = src_t(&p, "layers.%d.linear_attn.in_proj_qkvz.weight", l, 0);
    const st_tensor *ba = src_t(&p, "layers.%d.linear_attn.in_proj_ba.weight", l, 0);
    const mfpack_tensor *qkv = dst_t(&p, "layers.%d.linear_attn.in_proj_qkv", l);
    const mfpack_tensor *z = dst_t(&p, "layers.%d.linear_attn.in_proj_z", l);
    const mfpack_tensor *b = dst_t(&p, "layers.%d.linear_attn.in_proj_b", l);
    const mfpack_tensor *a = dst_t(&p, "layers.%d.linear_attn.in_proj_a", l);
    /* the expected source row of every output row, built head by head */
    int64_t nq = 2 * Hk * dk + Hv * dv, *want_qkv = malloc(sizeof(int64_t) * (size_t)nq);
    int64_t *want_z = malloc(sizeof(int64_t) * (size_t)(Hv * dv));
    int64_t *want_b = malloc(sizeof(int64_t) * (size_t)Hv), *want_a = malloc(sizeof(int64_t) * (size_t)Hv);
    int64_t iq = 0, ik = Hk * dk, iv = 2 * Hk * dk, iz = 0, ib = 0, ia = 0;
    for (int64_t g = 0, row = 0; g < Hk; g++) {
        for (int64_t i = 0; i < dk; i++) want_qkv[iq++] = row++;
        for (int64_t i = 0; i < dk; i++) want_qkv[ik++] = row++;
        for (int64_t i = 0; i < r * dv; i++) want_qkv[iv++] = row++;
        for (int64_t i = 0; i < r * dv; i++) want_z[iz++] = row++;
    }
    for (int64_t g = 0, row = 0; g < Hk; g++) {
        for (int64_t i = 0; i < r; i++) want_b[ib++] = row++;
        for (int64_t i = 0; i < r; i++) want_a[ia++] = row++;
    }
    struct { const mfpack_tensor *d; const st_tensor *s; int64_t *rows; int64_t n; } outs[] = {
        {qkv, qkvz, want_qkv, nq}, {z, qkvz, want_z, Hv * dv}, {b, ba, want_b, Hv}, {a, ba, want_a, Hv}};
    int64_t H = hp->hidden;
    for (int o = 0; o < 4; o++) {
        const mfpack_tensor *d = outs[o].d;
        cr_assert_eq(d->shape[0], outs[o].n, "%s rows", d->name);
        if (!mlx) {
            cr_assert_eq(d->type, MF_QTYPE_BF16);
            for (int64_t i = 0; i < outs[o].n; i++)
                same_bytes(&p, d->offset + (uint64_t)(i * H * 2), outs[o].s, (uint64_t)(outs[o].rows[i] * H * 2),
                           (uint64_t)H * 2, d->name);
        } else {
            /* MLX: words, scales and biases rows moved as they are */
            int bits = d->type == MF_QTYPE_Q8 ? 8 : 4;
            cr_assert(d->type == MF_QTYPE_Q8 || d->type == MF_QTYPE_Q4);
            char k[300];
            snprintf(k, sizeof k, "%.*sscales", (int)(strlen(outs[o].s->name) - 6), outs[o].s->name);
            const st_tensor *ss = st_find(&p.ck, k);
            cr_assert(ss, "no %s", k);
            uint64_t wr = (uint64_t)H * bits / 8, gr = (uint64_t)H / 64 * 2, R = (uint64_t)outs[o].n;
            for (int64_t i = 0; i < outs[o].n; i++) {
                same_bytes(&p, d->offset + (uint64_t)i * wr, outs[o].s, (uint64_t)outs[o].rows[i] * wr, wr, d->name);
                same_bytes(&p, d->offset + R * wr + (uint64_t)i * gr, ss, (uint64_t)outs[o].rows[i] * gr, gr, d->name);
            }
        }
    }
    free(want_qkv);
    free(want_z);
    free(want_b);
    free(want_a);
    pair_close(&p);
}

Test(convert, qwen3_next_fused_projections_split) { check_next_split("qwen3_next", 0); }
Test(convert, qwen3_next_mlx_fused_projections_split) { check_next_split("qwen3_next_mlx8", 1); }

/* MLX files: quantized tensors are copied bit for bit, norms are kept (already 1 + w). */
static void check_mlx_bits(const char *name) {
    pair p;
    pair_open(&p, name, NULL, NULL, NULL, NULL);
    const mf_hparams *hp = &p.f.L.hp;
    int l = first_moe_layer(&p);
    const mfpack_expert_layer *E = mfpack_experts(&p.f.L, l);
    const char *parts[] = {"gate_proj", "up_proj", "down_proj"};
    for (int part = 0; part < 3; part++) {
        char k[300];
        snprintf(k, sizeof k, "layers.%%d.mlp.switch_mlp.%s.weight", parts[part]);
        const st_tensor *w = src_t(&p, k, l, 0);
        snprintf(k, sizeof k, "layers.%%d.mlp.switch_mlp.%s.scales", parts[part]);
        const st_tensor *s = src_t(&p, k, l, 0);
        snprintf(k, sizeof k, "layers.%%d.mlp.switch_mlp.%s.biases", parts[part]);
        const st_tensor *b = src_t(&p, k, l, 0);
        const mfpack_part *P = &E->parts[part];
        uint64_t wbytes = w->nbytes / (uint64_t)hp->n_experts, sbytes = s->nbytes / (uint64_t)hp->n_experts;
        cr_assert_eq(P->bytes, wbytes + 2 * sbytes, "%s bytes", P->name);
        for (int e = 0; e < hp->n_experts; e++) {
            uint64_t blob = E->offset + E->stride * (uint64_t)e + P->offset;
            same_bytes(&p, blob, w, wbytes * (uint64_t)e, wbytes, P->name);
            same_bytes(&p, blob + wbytes, s, sbytes * (uint64_t)e, sbytes, P->name);
            same_bytes(&p, blob + wbytes + sbytes, b, sbytes * (uint64_t)e, sbytes, P->name);
        }
    }
    const mfpack_tensor *emb = dst_t(&p, "embed_tokens", 0);
    const st_tensor *sw = src_t(&p, "embed_tokens.weight", 0, 0);
    same_bytes(&p, emb->offset, sw, 0, sw->nbytes, "embed_tokens words");
    same_vector(&p, dst_t(&p, "layers.%d.input_layernorm", 0), src_t(&p, "layers.%d.input_layernorm.weight", 0, 0), 0);
    same_vector(&p, dst_t(&p, "norm", 0), src_t(&p, "norm.weight", 0, 0), 0);
    /* the router is 8-bit in MLX files (a per-layer override) and stays so */
    cr_assert_eq(dst_t(&p, "layers.%d.mlp.gate", l)->type, MF_QTYPE_Q8);
    pair_close(&p);
}

Test(convert, mlx4_bits_kept) { check_mlx_bits("qwen3_5_moe_mlx4"); }
Test(convert, mlx8_bits_kept) { check_mlx_bits("qwen3_next_mlx8"); }

/* Default conversion quantizes: every q4 expert value within half a step of the source. */
Test(convert, default_q4_experts_within_half_step) {
    pair p;
    pair_open(&p, "qwen3_5_moe_text", NULL, NULL, NULL, NULL);
    const mf_hparams *hp = &p.f.L.hp;
    int l = first_moe_layer(&p);
    const mfpack_expert_layer *E = mfpack_experts(&p.f.L, l);
    const mfpack_part *P = &E->parts[0];
    cr_assert_eq(P->type, MF_QTYPE_Q4);
    const st_tensor *s = src_t(&p, "layers.%d.mlp.experts.%d.gate_proj.weight", l, 1);
    unsigned char *blob = read_range(&p, E->offset + E->stride + P->offset, P->bytes);
    int64_t R = P->rows, C = P->cols;
    const uint32_t *words = (const uint32_t *)blob;
    const uint16_t *sc = (const uint16_t *)(blob + R * C / 2), *bi = sc + R * C / 64;
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++) {
            uint32_t q = (words[(r * C + c) / 8] >> (4 * (c % 8))) & 15u;
            float step = bf16_to_f32(sc[r * C / 64 + c / 64]);
            float v = step * (float)q + bf16_to_f32(bi[r * C / 64 + c / 64]);
            cr_assert_leq(fabsf(v - src_val(s, r * C + c)), step * 0.5f * 1.0001f + 1e-7f,
                          "expert value [%lld,%lld] off by more than half a step", (long long)r, (long long)c);
        }
    free(blob);
    (void)hp;
    pair_close(&p);
}

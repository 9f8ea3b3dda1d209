/* test_synth.c - `moeflux synth`: tiny shapes give exactly the tensors a conversion of the matching
 * fixture gives, real shapes the published sizes, the bytes follow the seed alone, values have the
 * intended spread, --skew skews routers, and bad input is refused. Not a forward-pass test. */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "format/mfpack.h"
#include "format/quant.h"
#include "format/synth.h"
#include "helpers.h"
#include "model/hparams.h"

static char *g_tmp;

static void setup(void) {
    g_tmp = th_tmpdir();
    cr_assert(g_tmp, "cannot create a temporary directory");
}
static void teardown(void) {
    th_rmtree(g_tmp);
    free(g_tmp);
}

TestSuite(synth, .init = setup, .fini = teardown, .timeout = 60);

/* Runs `moeflux synth` with up to 8 extra arguments (NULL ends them); stderr in *err. */
static int run_synth(const char *shape, const char *out, const char *const *extra, char **err) {
    char *argv[16] = {(char *)th_bin(), "synth", (char *)shape, (char *)out, "--quiet"};
    int n = 5;
    for (int i = 0; extra && extra[i] && n < 15; i++) argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    return th_run(argv, NULL, err);
}

/* synth into g_tmp/name; returns the path (malloc'd). */
static char *synth_ok(const char *shape, const char *name, const char *const *extra) {
    char *out = th_join(g_tmp, name), *err = NULL;
    int rc = run_synth(shape, out, extra, &err);
    cr_assert_eq(rc, 0, "synth %s failed (%d): %s", shape, rc, err);
    free(err);
    return out;
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

static double num(const cJSON *o, const char *k) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);
    cr_assert(cJSON_IsNumber(it) || cJSON_IsBool(it), "field %s missing", k);
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

static void open_ok(mfpack_file *f, const char *path) {
    mf_err e;
    cr_assert_eq(mfpack_open(f, path, &e), MF_OK, "%s", e.msg);
}

static void *read_range(const mfpack_file *f, uint64_t off, uint64_t n) {
    void *buf = malloc(n ? n : 1);
    cr_assert(buf);
    cr_assert_eq(pread(f->fd, buf, n, (off_t)off), (ssize_t)n);
    return buf;
}

/* ---- tiny shapes against converted fixtures ---- */

static void check_against_fixture(const char *shape, const char *fixture) {
    char *syn = synth_ok(shape, "s.moeflux", (const char *const[]){"--seed", "7", NULL});
    char *src = th_join(th_fixtures(), fixture), *conv = th_join(g_tmp, "c.moeflux"), *err = NULL;
    char *argv[] = {(char *)th_bin(), "convert", src, conv, "--quiet", NULL};
    cr_assert_eq(th_run(argv, NULL, &err), 0, "convert %s: %s", fixture, err);
    cr_assert(!dir_has_tmp(g_tmp), "a temporary file was left behind");

    /* info shows the requested hparams and where they came from */
    cJSON *si = run_info(syn), *ci = run_info(conv);
    const char *same[] = {"n_layers", "hidden_size", "vocab_size", "max_position_embeddings",
                          "rms_norm_eps", "n_heads", "n_kv_heads", "head_dim", "rope_theta",
                          "partial_rotary_factor", "attn_output_gate", "linear_num_key_heads",
                          "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                          "linear_conv_kernel_dim", "n_experts", "n_experts_per_tok", "norm_topk_prob",
                          "moe_intermediate_size", "shared_expert_intermediate_size",
                          "intermediate_size", "expert_bytes", "n_moe_layers"};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++)
        cr_assert_eq(num(si, same[i]), num(ci, same[i]), "%s: %s = %g, converted %s has %g", shape,
                     same[i], num(si, same[i]), fixture, num(ci, same[i]));
    cr_assert_eq(num(si, "tie_word_embeddings"), 0);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(si, "model_type")),
                     cJSON_GetStringValue(cJSON_GetObjectItem(ci, "model_type")));
    const cJSON *source = cJSON_GetObjectItem(si, "source");
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItem(source, "synth")), shape);
    cr_assert_eq(num(source, "seed"), 7);
    cr_assert_eq(num(source, "skew"), 0);

    /* the full hparams, then the tensor list: same names, shapes, types, order (the tied
     * qwen3_moe fixture has no lm_head; synthetic models always have one) */
    mfpack_file fs, fc;
    open_ok(&fs, syn);
    open_ok(&fc, conv);
    mf_hparams hs = fs.L.hp, hc = fc.L.hp;
    hc.tie_word_embeddings = hs.tie_word_embeddings;
    char *js = hparams_to_json(&hs), *jc = hparams_to_json(&hc);
    cr_assert_str_eq(js, jc, "%s hparams differ from %s's", shape, fixture);
    free(js);
    free(jc);
    int i = 0, j = 0;
    for (; i < fs.L.n_tensors; i++) {
        const mfpack_tensor *a = &fs.L.tensors[i];
        if (fc.L.hp.tie_word_embeddings && !strcmp(a->name, "lm_head")) continue;
        cr_assert_lt(j, fc.L.n_tensors, "%s: extra tensor %s", shape, a->name);
        const mfpack_tensor *b = &fc.L.tensors[j++];
        cr_assert_str_eq(a->name, b->name, "%s: tensor %d", shape, i);
        cr_assert_eq(a->type, b->type, "%s: type %s vs %s", a->name, mf_qtype_name(a->type), mf_qtype_name(b->type));
        cr_assert_eq(a->ndim, b->ndim, "%s ndim", a->name);
        for (int d = 0; d < a->ndim; d++) cr_assert_eq(a->shape[d], b->shape[d], "%s shape[%d]", a->name, d);
        cr_assert_eq(a->bytes, b->bytes, "%s bytes", a->name);
    }
    cr_assert_eq(j, fc.L.n_tensors, "%s lacks %s's tensor %s", shape, fixture,
                 j < fc.L.n_tensors ? fc.L.tensors[j].name : "");
    cr_assert(!fc.L.hp.tie_word_embeddings || mfpack_find(&fs.L, "lm_head"));
    cr_assert_eq(fs.L.n_expert_layers, fc.L.n_expert_layers);
    for (int l = 0; l < fs.L.n_expert_layers; l++) {
        const mfpack_expert_layer *a = &fs.L.expert_layers[l], *b = &fc.L.expert_layers[l];
        cr_assert_eq(a->layer, b->layer);
        cr_assert_eq(a->count, b->count);
        cr_assert_eq(a->stride, b->stride);
        for (int p = 0; p < MFPACK_EXPERT_PARTS; p++) {
            cr_assert_str_eq(a->parts[p].name, b->parts[p].name);
            cr_assert_eq(a->parts[p].type, b->parts[p].type);
            cr_assert_eq(a->parts[p].rows, b->parts[p].rows);
            cr_assert_eq(a->parts[p].cols, b->parts[p].cols);
            cr_assert_eq(a->parts[p].offset, b->parts[p].offset);
        }
    }
    struct stat sb;
    cr_assert_eq(stat(syn, &sb), 0);
    cr_assert_eq((uint64_t)sb.st_size, fs.L.file_bytes);
    mfpack_close(&fs);
    mfpack_close(&fc);
    cJSON_Delete(si);
    cJSON_Delete(ci);
    free(syn);
    free(src);
    free(conv);
    free(err);
}

Test(synth, tiny_qwen3_5_matches_fixture) { check_against_fixture("tiny-qwen3.5", "qwen3_5_moe_text"); }
Test(synth, tiny_qwen3_next_matches_fixture) { check_against_fixture("tiny-qwen3-next", "qwen3_next"); }
Test(synth, tiny_qwen3_moe_matches_fixture) { check_against_fixture("tiny-qwen3-moe", "qwen3_moe_experts"); }

/* ---- --layers ---- */

Test(synth, layers_cut_keeps_pattern_and_values) {
    char *full = synth_ok("tiny-qwen3-next", "full.moeflux", (const char *const[]){"--seed", "3", NULL});
    char *cut = synth_ok("tiny-qwen3-next", "cut.moeflux", (const char *const[]){"--seed", "3", "--layers", "2", NULL});
    cJSON *info = run_info(cut);
    cr_assert_eq(num(info, "n_layers"), 2);
    cr_assert_eq(num(info, "n_moe_layers"), 2);
    const cJSON *lt = cJSON_GetObjectItem(info, "layer_types");
    cr_assert_eq(cJSON_GetArraySize(lt), 2);
    for (int i = 0; i < 2; i++)
        cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetArrayItem(lt, i)), "linear_attention");
    cJSON_Delete(info);
    /* values depend on the seed and the tensor name only: layer 0 is the same in both files */
    mfpack_file a, b;
    open_ok(&a, full);
    open_ok(&b, cut);
    const char *names[] = {"embed_tokens", "layers.0.linear_attn.in_proj_qkv", "layers.1.mlp.gate", "norm", "lm_head"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const mfpack_tensor *ta = mfpack_find(&a.L, names[i]), *tb = mfpack_find(&b.L, names[i]);
        cr_assert(ta && tb, "%s missing", names[i]);
        cr_assert_eq(ta->bytes, tb->bytes);
        void *va = read_range(&a, ta->offset, ta->bytes), *vb = read_range(&b, tb->offset, tb->bytes);
        cr_assert(!memcmp(va, vb, ta->bytes), "%s differs between the full and the cut model", names[i]);
        free(va);
        free(vb);
    }
    const mfpack_expert_layer *ea = mfpack_experts(&a.L, 1), *eb = mfpack_experts(&b.L, 1);
    void *va = read_range(&a, ea->offset + 5 * ea->stride, ea->stride);
    void *vb = read_range(&b, eb->offset + 5 * eb->stride, eb->stride);
    cr_assert(!memcmp(va, vb, ea->stride), "layer 1 expert 5 differs");
    free(va);
    free(vb);
    mfpack_close(&a);
    mfpack_close(&b);
    free(full);
    free(cut);
}

/* ---- real shapes: the table and the layout, nothing written ---- */

typedef struct real {
    const char *name;
    int layers, hidden, heads, kv, hd, lin_v, lin_k, lin_d, experts, topk, inter, shared, vocab, full, max_pos;
    double theta;
    uint64_t expert_bytes;
} real;

Test(synth, real_shapes_table) {
    /* REFERENCE.md section 2; one q4 expert = 3 * inter * hidden * 0.5625 bytes */
    const real R[] = {
        {"qwen3.5-397b-a17b", 60, 4096, 32, 2, 256, 64, 16, 128, 512, 10, 1024, 1024, 248320, 15, 262144, 1e7, 7077888},
        {"qwen3.6-35b-a3b", 40, 2048, 16, 2, 256, 32, 16, 128, 256, 8, 512, 512, 248320, 10, 262144, 1e7, 1769472},
        {"qwen3-next-80b-a3b", 48, 2048, 16, 2, 256, 32, 16, 128, 512, 10, 512, 512, 151936, 12, 262144, 1e7, 1769472},
        {"qwen3-30b-a3b", 48, 2048, 32, 4, 128, 0, 0, 0, 128, 8, 768, 0, 151936, 48, 40960, 1e6, 2654208},
        {"qwen3-235b-a22b", 94, 4096, 64, 4, 128, 0, 0, 0, 128, 8, 1536, 0, 151936, 94, 40960, 1e6, 10616832},
    };
    for (size_t i = 0; i < sizeof R / sizeof R[0]; i++) {
        const real *r = &R[i];
        mf_hparams hp;
        mf_err e;
        cr_assert_eq(synth_hparams(r->name, 0, &hp, &e), MF_OK, "%s", e.msg);
        int hybrid = r->lin_v > 0;
        cr_assert_eq(hp.n_layers, r->layers, "%s layers", r->name);
        cr_assert_eq(hp.hidden, r->hidden);
        cr_assert_eq(hp.vocab, r->vocab);
        cr_assert_eq(hp.n_heads, r->heads);
        cr_assert_eq(hp.n_kv_heads, r->kv);
        cr_assert_eq(hp.head_dim, r->hd);
        cr_assert_eq(hp.lin_v_heads, r->lin_v);
        cr_assert_eq(hp.lin_k_heads, r->lin_k);
        cr_assert_eq(hp.lin_k_dim, r->lin_d);
        cr_assert_eq(hp.lin_v_dim, r->lin_d);
        cr_assert_eq(hp.lin_conv_kernel, hybrid ? 4 : 0);
        cr_assert_eq(hp.n_experts, r->experts);
        cr_assert_eq(hp.top_k, r->topk);
        cr_assert_eq(hp.moe_inter, r->inter);
        cr_assert_eq(hp.shared_inter, r->shared);
        cr_assert_eq(hp.max_position, r->max_pos);
        cr_assert_eq(hp.rope_theta, r->theta);
        cr_assert_eq(hp.partial_rotary, hybrid ? 0.25 : 1.0);
        cr_assert_eq(hp.attn_output_gate, hybrid);
        cr_assert_eq(hp.rms_eps, 1e-6);
        cr_assert_eq(hp.tie_word_embeddings, 0);
        cr_assert_eq(hp.norm_topk_prob, 1);
        int full = 0;
        for (int l = 0; l < hp.n_layers; l++) {
            full += hp.layer_kind[l] == MF_LAYER_FULL_ATTENTION;
            if (hybrid) cr_assert_eq(hp.layer_kind[l] == MF_LAYER_FULL_ATTENTION, (l + 1) % 4 == 0);
            cr_assert(hp.layer_moe[l]);
        }
        cr_assert_eq(full, r->full, "%s: %d full attention layers", r->name, full);

        mfpack_layout L;
        cr_assert_eq(synth_layout(&hp, MF_QTYPE_Q4, MF_QTYPE_Q8, &L, &e), MF_OK, "%s", e.msg);
        cr_assert_eq(L.n_expert_layers, r->layers);
        cr_assert_eq(mfpack_expert_payload(&L.expert_layers[0]), r->expert_bytes, "%s expert bytes", r->name);
        const mfpack_tensor *emb = mfpack_find(&L, "embed_tokens"), *head = mfpack_find(&L, "lm_head");
        cr_assert(emb && head);
        cr_assert_eq(emb->type, MF_QTYPE_Q8);
        cr_assert_eq(emb->shape[0], r->vocab);
        cr_assert_eq(mfpack_find(&L, "layers.0.mlp.gate")->type, MF_QTYPE_BF16);
        cr_assert_eq(mfpack_find(&L, "layers.0.input_layernorm")->type, MF_QTYPE_F32);
        uint64_t experts = (uint64_t)r->layers * (uint64_t)r->experts * L.expert_layers[0].stride;
        cr_assert_eq(L.experts_bytes, experts);
        cr_assert_eq(L.file_bytes, L.experts_offset + experts);
        mfpack_layout_free(&L);

        /* cut to 2 layers: the first two layers' pattern */
        cr_assert_eq(synth_hparams(r->name, 2, &hp, &e), MF_OK, "%s", e.msg);
        cr_assert_eq(hp.n_layers, 2);
        cr_assert_eq(hp.layer_kind[1], hybrid ? MF_LAYER_LINEAR_ATTENTION : MF_LAYER_FULL_ATTENTION);
        cr_assert_eq(synth_layout(&hp, MF_QTYPE_Q4, MF_QTYPE_Q8, &L, &e), MF_OK, "%s", e.msg);
        cr_assert_eq(L.n_expert_layers, 2);
        mfpack_layout_free(&L);
        cr_assert_neq(synth_hparams(r->name, r->layers + 1, &hp, &e), MF_OK);
    }
    /* 35B-A3B cut to 2 layers: 0.9 GB of experts (a 4096-multiple, so stride = payload) and
     * 0.54 GB each for the q8 embedding and lm_head */
    mf_hparams hp;
    mfpack_layout L;
    mf_err e;
    cr_assert_eq(synth_hparams("qwen3.6-35b-a3b", 2, &hp, &e), MF_OK);
    cr_assert_eq(synth_layout(&hp, MF_QTYPE_Q4, MF_QTYPE_Q8, &L, &e), MF_OK);
    cr_assert_eq(mfpack_find(&L, "embed_tokens")->bytes, 248320ull * 2048 + 248320ull * 2048 / 64 * 4);
    cr_assert_eq(L.experts_bytes, 2ull * 256 * 1769472);
    mfpack_layout_free(&L);
    cr_assert_eq(synth_hparams("qwen3-31b", 0, &hp, &e), MF_ERR_ARG);
    cr_assert(strstr(e.msg, "qwen3-31b") && strstr(e.msg, "qwen3-30b-a3b") && strstr(e.msg, "tiny-qwen3-moe"), "%s", e.msg);
    cr_assert_eq(synth_shape_count(), 9); /* five real shapes, the demo, three tiny ones */
}

/* ---- the bytes follow the seed ---- */

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    void *pa = th_read_file(a, &na), *pb = th_read_file(b, &nb);
    cr_assert(pa && pb);
    int same = na == nb && !memcmp(pa, pb, na);
    free(pa);
    free(pb);
    return same;
}

Test(synth, deterministic_from_seed) {
    const char *const s5[] = {"--seed", "5", "--skew", "1.5", NULL};
    const char *const s6[] = {"--seed", "6", "--skew", "1.5", NULL};
    char *a = synth_ok("tiny-qwen3.5", "a.moeflux", s5), *b = synth_ok("tiny-qwen3.5", "b.moeflux", s5);
    char *c = synth_ok("tiny-qwen3.5", "c.moeflux", s6);
    cr_assert(same_file(a, b), "same seed, different bytes");
    cr_assert(!same_file(a, c), "different seeds, same bytes");
    /* the payload differs too, not only the manifest's seed */
    mfpack_file fa, fc;
    open_ok(&fa, a);
    open_ok(&fc, c);
    const mfpack_tensor *ta = mfpack_find(&fa.L, "embed_tokens"), *tc = mfpack_find(&fc.L, "embed_tokens");
    void *va = read_range(&fa, ta->offset, ta->bytes), *vc = read_range(&fc, tc->offset, tc->bytes);
    cr_assert(memcmp(va, vc, ta->bytes), "embedding does not depend on the seed");
    free(va);
    free(vc);
    mfpack_close(&fa);
    mfpack_close(&fc);
    /* any thread count gives the same bytes */
    char *d = th_join(g_tmp, "d.moeflux");
    mf_synth_options opt;
    mf_synth_options_init(&opt);
    opt.shape = "tiny-qwen3.5";
    opt.out_path = d;
    opt.seed = 5;
    opt.skew = 1.5;
    opt.n_threads = 3;
    mf_synthesizer *s = mf_synthesizer_new();
    cr_assert_eq(mf_synth(s, &opt), MF_OK, "%s", mf_synthesizer_error(s));
    mf_synthesizer_free(s);
    cr_assert(same_file(a, d), "3 threads and the CLI's thread count disagree");
    free(a);
    free(b);
    free(c);
    free(d);
}

/* ---- values ---- */

static void moments(const float *v, int64_t n, double *mean, double *std) {
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < n; i++) s += v[i];
    *mean = s / (double)n;
    for (int64_t i = 0; i < n; i++) s2 += (v[i] - *mean) * (v[i] - *mean);
    *std = sqrt(s2 / (double)n);
}

/* Decodes a whole dense tensor into floats (malloc'd). */
static float *decode_tensor(const mfpack_file *f, const mfpack_tensor *t, int64_t *n) {
    int64_t rows = 1, cols = t->shape[t->ndim - 1];
    for (int d = 0; d < t->ndim - 1; d++) rows *= t->shape[d];
    void *raw = read_range(f, t->offset, t->bytes);
    float *v = malloc(sizeof(float) * (size_t)(rows * cols));
    quant_decode(t->type, raw, rows, cols, v);
    free(raw);
    *n = rows * cols;
    return v;
}

static void check_spread(const char *name, const float *v, int64_t n, double want_std) {
    double mean, std;
    moments(v, n, &mean, &std);
    cr_assert(fabs(std - want_std) < 0.1 * want_std, "%s: std %g, want %g within 10%%", name, std, want_std);
    cr_assert(fabs(mean) < 0.1 * want_std, "%s: mean %g", name, mean);
}

static void check_values(const char *experts_type) {
    char *p = synth_ok("tiny-qwen3.5", "v.moeflux", (const char *const[]){"--seed", "11", "--experts", experts_type, NULL});
    mfpack_file f;
    open_ok(&f, p);
    const mfpack_expert_layer *E = mfpack_experts(&f.L, 2);
    cr_assert(E);
    for (int e = 0; e < E->count; e += 3)
        for (int part = 0; part < 3; part++) {
            const mfpack_part *P = &E->parts[part];
            cr_assert_str_eq(mf_qtype_name(P->type), experts_type);
            void *raw = read_range(&f, E->offset + E->stride * (uint64_t)e + P->offset, P->bytes);
            float *v = malloc(sizeof(float) * (size_t)(P->rows * P->cols));
            quant_decode(P->type, raw, P->rows, P->cols, v);
            char what[64];
            snprintf(what, sizeof what, "expert %d %s", e, P->name);
            check_spread(what, v, P->rows * P->cols, 1.0 / sqrt((double)P->cols));
            free(raw);
            free(v);
        }
    int64_t n;
    float *v = decode_tensor(&f, mfpack_find(&f.L, "layers.3.self_attn.q_proj"), &n);
    check_spread("q_proj (q8)", v, n, 1.0 / 8);
    free(v);
    v = decode_tensor(&f, mfpack_find(&f.L, "embed_tokens"), &n);
    check_spread("embed_tokens", v, n, 1.0);
    free(v);
    v = decode_tensor(&f, mfpack_find(&f.L, "layers.0.mlp.gate"), &n);
    check_spread("router", v, n, 1.0 / 8);
    free(v);
    const char *norms[] = {"layers.0.input_layernorm", "layers.3.self_attn.k_norm", "layers.1.linear_attn.norm", "norm"};
    for (size_t i = 0; i < sizeof norms / sizeof norms[0]; i++) {
        v = decode_tensor(&f, mfpack_find(&f.L, norms[i]), &n);
        for (int64_t k = 0; k < n; k++) cr_assert(v[k] > 0.89f && v[k] < 1.11f, "%s[%lld] = %g", norms[i], (long long)k, v[k]);
        free(v);
    }
    v = decode_tensor(&f, mfpack_find(&f.L, "layers.0.linear_attn.A_log"), &n);
    for (int64_t k = 0; k < n; k++) cr_assert(v[k] >= 0 && v[k] <= logf(16.0f), "A_log %g", v[k]);
    free(v);
    v = decode_tensor(&f, mfpack_find(&f.L, "layers.0.linear_attn.conv1d"), &n);
    for (int64_t k = 0; k < n; k++) cr_assert(fabsf(v[k]) <= 0.25f, "conv1d %g", v[k]);
    free(v);
    v = decode_tensor(&f, mfpack_find(&f.L, "layers.0.linear_attn.dt_bias"), &n);
    for (int64_t k = 0; k < n; k++) cr_assert(fabsf(v[k]) <= 0.2f, "dt_bias %g", v[k]);
    free(v);
    mfpack_close(&f);
    free(p);
}

Test(synth, values_q4_experts) { check_values("q4"); }
Test(synth, values_q8_experts) { check_values("q8"); }
Test(synth, values_bf16_experts) { check_values("bf16"); }

/* ---- --skew ---- */

/* max / min router row norm of layer l */
static double router_spread(const char *path, int l) {
    mfpack_file f;
    open_ok(&f, path);
    char name[64];
    snprintf(name, sizeof name, "layers.%d.mlp.gate", l);
    const mfpack_tensor *t = mfpack_find(&f.L, name);
    int64_t n, rows = t->shape[0], cols = t->shape[1];
    float *v = decode_tensor(&f, t, &n);
    double lo = INFINITY, hi = 0;
    for (int64_t r = 0; r < rows; r++) {
        double s = 0;
        for (int64_t c = 0; c < cols; c++) s += v[r * cols + c] * v[r * cols + c];
        lo = fmin(lo, sqrt(s));
        hi = fmax(hi, sqrt(s));
    }
    free(v);
    mfpack_close(&f);
    return hi / lo;
}

Test(synth, skew_scales_router_rows) {
    char *flat = synth_ok("tiny-qwen3-moe", "flat.moeflux", NULL);
    char *skew = synth_ok("tiny-qwen3-moe", "skew.moeflux", (const char *const[]){"--skew", "3", NULL});
    cr_assert_lt(router_spread(flat, 1), 1.5);
    /* 8 experts at S = 3: row norms span 8^(3/4) = 4.8 */
    cr_assert_gt(router_spread(skew, 1), 3.5);
    free(flat);
    free(skew);
    float m[256];
    synth_router_scales(1, 0, 256, 0, m);
    for (int e = 0; e < 256; e++) cr_assert_eq(m[e], 1.0f);
    /* S = 2: m_e = (1 + r_e)^(-1/2) / rms with r a permutation of 0..255 */
    synth_router_scales(1, 0, 256, 2, m);
    double s2 = 0, mx = 0;
    for (int e = 0; e < 256; e++) {
        s2 += (double)m[e] * m[e];
        mx = fmax(mx, m[e]);
    }
    cr_assert(fabs(s2 / 256 - 1) < 1e-4, "rms of the multipliers %g", sqrt(s2 / 256));
    int seen[256] = {0};
    for (int e = 0; e < 256; e++) {
        double r = pow(mx / m[e], 2.0) - 1;
        int ri = (int)lround(r);
        cr_assert(fabs(r - ri) < 0.05 && ri >= 0 && ri < 256, "expert %d: rank %g", e, r);
        cr_assert(!seen[ri], "rank %d twice", ri);
        seen[ri] = 1;
    }
    float m2[256];
    synth_router_scales(1, 1, 256, 2, m2);
    synth_router_scales(1, 0, 256, 2, m);
    cr_assert(memcmp(m, m2, sizeof m), "every layer ranks its experts the same way");
}

/* ---- refusals ---- */

static void refused(const char *shape, const char *const *extra, const char *needle) {
    char *out = th_join(g_tmp, "bad.moeflux"), *err = NULL;
    int rc = run_synth(shape, out, extra, &err);
    cr_assert_neq(rc, 0, "synth %s with %s was accepted", shape, extra && extra[0] ? extra[0] : "(nothing)");
    cr_assert(err && strstr(err, needle), "message lacks '%s': %s", needle, err);
    cr_assert(access(out, F_OK) != 0, "a file was written");
    cr_assert(!dir_has_tmp(g_tmp), "a temporary file was left behind");
    free(out);
    free(err);
}

Test(synth, refusals) {
    refused("qwen3-31b", NULL, "unknown shape 'qwen3-31b'");
    refused("qwen3-31b", NULL, "tiny-qwen3-next");
    refused("tiny-qwen3.5", (const char *const[]){"--layers", "0", NULL}, "--layers");
    refused("tiny-qwen3.5", (const char *const[]){"--layers", "5", NULL}, "out of range");
    refused("tiny-qwen3.5", (const char *const[]){"--layers", "two", NULL}, "--layers");
    refused("tiny-qwen3.5", (const char *const[]){"--layers", NULL}, "needs a value");
    refused("tiny-qwen3.5", (const char *const[]){"--seed", "-1", NULL}, "--seed");
    refused("tiny-qwen3.5", (const char *const[]){"--seed", "12x", NULL}, "--seed");
    refused("tiny-qwen3.5", (const char *const[]){"--seed", "99999999999999999999999", NULL}, "--seed");
    refused("tiny-qwen3.5", (const char *const[]){"--experts", "q5", NULL}, "unknown type 'q5'");
    refused("tiny-qwen3.5", (const char *const[]){"--dense", "int8", NULL}, "unknown type 'int8'");
    refused("tiny-qwen3.5", (const char *const[]){"--skew", "-1", NULL}, "--skew");
    refused("tiny-qwen3.5", (const char *const[]){"--skew", "nan", NULL}, "--skew");
    refused("tiny-qwen3.5", (const char *const[]){"--skew", "1e", NULL}, "--skew");
    refused("tiny-qwen3.5", (const char *const[]){"--frobnicate", NULL}, "unknown option '--frobnicate'");
    refused("tiny-qwen3.5", (const char *const[]){"extra", NULL}, "unexpected argument 'extra'");
    /* missing OUT: usage */
    char *err = NULL;
    char *argv[] = {(char *)th_bin(), "synth", "tiny-qwen3.5", NULL};
    cr_assert_eq(th_run(argv, NULL, &err), 2);
    cr_assert(err && strstr(err, "usage: moeflux synth"), "%s", err);
    free(err);
    /* an output directory that does not exist */
    char *out = th_join(g_tmp, "no/such/dir.moeflux");
    err = NULL;
    cr_assert_neq(run_synth("tiny-qwen3.5", out, NULL, &err), 0);
    cr_assert(err && strstr(err, "cannot create output"), "%s", err);
    free(err);
    free(out);
}

Test(synth, help_lists_shapes) {
    char *out = NULL, *err = NULL;
    char *argv[] = {(char *)th_bin(), "synth", "--help", NULL};
    cr_assert_eq(th_run(argv, &out, &err), 0);
    for (int i = 0; i < synth_shape_count(); i++)
        cr_assert(strstr(out, synth_shape_name(i)), "help lacks %s", synth_shape_name(i));
    cr_assert(strstr(out, "--skew"));
    free(out);
    free(err);
}

/* A file bigger than the free space is refused before anything is written. */
Test(synth, refuses_when_disk_is_too_small) {
    mf_hparams hp;
    mfpack_layout L;
    mf_err e;
    cr_assert_eq(synth_hparams("qwen3.5-397b-a17b", 0, &hp, &e), MF_OK);
    cr_assert_eq(synth_layout(&hp, MF_QTYPE_F32, MF_QTYPE_F32, &L, &e), MF_OK);
    uint64_t need = L.file_bytes;
    mfpack_layout_free(&L);
    struct statvfs v;
    cr_assert_eq(statvfs(g_tmp, &v), 0);
    /* 397B-A17B in f32 is about 1.6 TB: more than any disk this suite runs on */
    cr_assert_lt((uint64_t)v.f_bavail * v.f_frsize, need, "this test needs less than %llu bytes free",
                 (unsigned long long)need);
    refused("qwen3.5-397b-a17b", (const char *const[]){"--experts", "f32", "--dense", "f32", NULL}, "GB free");
}

/* test_mfpack.c - tests of src/format/mfpack.c: a layout built here, written with known byte
 * patterns, read back and checked against docs/format.md; corrupt files are refused. Not the converter. */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format/mfpack.h"
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

TestSuite(mfpack, .init = setup, .fini = teardown, .timeout = 60);

/* ---- the spec, restated independently of the library ---- */

#define SPEC_ALIGN 4096u
#define SPEC_PART_ALIGN 64u
#define SPEC_HEADER 64u

static uint64_t spec_fnv1a64(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Bytes of a [rows, cols] tensor per the storage-type table of docs/format.md. */
static uint64_t spec_bytes(const char *type, uint64_t rows, uint64_t cols) {
    if (!strcmp(type, "f32")) return 4 * rows * cols;
    if (!strcmp(type, "bf16")) return 2 * rows * cols;
    uint64_t bits = !strcmp(type, "q8") ? 8 : 4;
    cr_assert(!strcmp(type, "q8") || !strcmp(type, "q4"), "unknown type %s", type);
    return rows * cols * bits / 8 + 4 * rows * cols / 64;
}

/* ---- the model built in these tests ---- */

/* qwen3_moe, 4 layers; mlp_only_layers [1] makes layer 1 a dense MLP, so 0, 2, 3 are MoE. */
static const char *cfg_small =
    "{\"model_type\": \"qwen3_moe\", \"num_hidden_layers\": 4, \"hidden_size\": 128,"
    " \"vocab_size\": 320, \"rms_norm_eps\": 1e-06, \"num_attention_heads\": 4,"
    " \"num_key_value_heads\": 2, \"head_dim\": 32, \"rope_theta\": 1000000,"
    " \"num_experts\": 5, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 64,"
    " \"intermediate_size\": 256, \"mlp_only_layers\": [1]}";

typedef struct spec_tensor {
    const char *name, *type;
    int ndim;
    int64_t shape[MFPACK_MAX_DIMS];
} spec_tensor;

/* Every storage type, 1-D to 3-D shapes, and last dims that q types could not take. */
static const spec_tensor g_tensors[] = {
    {"embed_tokens", "q8", 2, {320, 128}},
    {"norm", "f32", 1, {128}},
    {"lm_head", "q4", 2, {320, 128}},
    {"layers.0.input_layernorm", "f32", 1, {128}},
    {"layers.0.self_attn.q_proj", "bf16", 2, {128, 128}},
    {"layers.0.self_attn.k_norm", "f32", 1, {32}},
    {"layers.0.mlp.gate", "bf16", 2, {5, 128}},
    {"layers.1.mlp.gate_proj", "q4", 2, {256, 128}},
    {"layers.1.mlp.down_proj", "q8", 2, {128, 256}},
    {"layers.1.odd_bf16", "bf16", 2, {3, 5}},
    {"layers.2.conv_like", "f32", 3, {7, 3, 5}},
    {"layers.3.q4_3d", "q4", 3, {2, 3, 64}},
};
#define N_TENSORS ((int)(sizeof g_tensors / sizeof g_tensors[0]))

typedef struct spec_experts {
    int layer, count;
    const char *types[3];
    int64_t inter, hidden;
} spec_experts;

/* Layer 3 uses dims that are not multiples of 64 with unquantized parts, so parts need padding
 * to their 64-byte boundaries. */
static const spec_experts g_experts[] = {
    {0, 5, {"q4", "q4", "q4"}, 64, 128},
    {2, 5, {"q8", "q4", "q8"}, 64, 128},
    {3, 5, {"bf16", "f32", "bf16"}, 5, 72},
};
#define N_EXPERTS ((int)(sizeof g_experts / sizeof g_experts[0]))

static mf_qtype qtype_of(const char *s) {
    mf_qtype t;
    cr_assert_eq(mf_qtype_parse(s, &t), MF_OK, "type %s", s);
    return t;
}

/* A byte pattern that differs between ranges (tag) and along a range (j). */
static unsigned char pattern(uint32_t tag, uint64_t j) {
    return (unsigned char)((tag * 131u + j * 7u + (j >> 9) * 13u) ^ 0x5au);
}

static uint32_t expert_tag(int layer, int expert, int part) {
    return 1000u + (uint32_t)layer * 100u + (uint32_t)expert * 4u + (uint32_t)part;
}

static void fill(int fd, uint64_t off, uint64_t n, uint32_t tag) {
    unsigned char *buf = malloc(n ? n : 1);
    cr_assert(buf);
    for (uint64_t j = 0; j < n; j++) buf[j] = pattern(tag, j);
    cr_assert_eq(pwrite(fd, buf, n, (off_t)off), (ssize_t)n);
    free(buf);
}

static void check_fill(int fd, uint64_t off, uint64_t n, uint32_t tag, const char *what) {
    unsigned char *buf = malloc(n ? n : 1);
    cr_assert(buf);
    cr_assert_eq(pread(fd, buf, n, (off_t)off), (ssize_t)n, "%s: short read", what);
    for (uint64_t j = 0; j < n; j++)
        cr_assert_eq(buf[j], pattern(tag, j), "%s: byte %llu differs", what, (unsigned long long)j);
    free(buf);
}

static mf_hparams small_hparams(void) {
    mf_hparams hp;
    mf_err err = {0};
    cr_assert_eq(hparams_from_config_json(&hp, cfg_small, "cfg_small", &err), MF_OK, "%s", err.msg);
    return hp;
}

/* Builds the layout from the tables above (extra tensors with long names when n_filler > 0,
 * to make the manifest outgrow one page) and finishes it. */
static void build_layout(mfpack_layout *L, int n_filler) {
    mf_hparams hp = small_hparams();
    mf_err err = {0};
    mfpack_layout_init(L, &hp);
    for (int i = 0; i < N_TENSORS; i++) {
        const spec_tensor *t = &g_tensors[i];
        cr_assert_eq(mfpack_layout_add_tensor(L, t->name, qtype_of(t->type), t->ndim, t->shape, &err),
                     MF_OK, "%s", err.msg);
    }
    for (int i = 0; i < n_filler; i++) {
        char name[MFPACK_NAME_MAX];
        snprintf(name, sizeof name, "layers.%d.a_rather_long_filler_tensor_name_to_grow_the_manifest", i);
        int64_t shape[1] = {i + 1};
        cr_assert_eq(mfpack_layout_add_tensor(L, name, MF_QTYPE_F32, 1, shape, &err), MF_OK);
    }
    for (int i = 0; i < N_EXPERTS; i++) {
        const spec_experts *e = &g_experts[i];
        mf_qtype types[3] = {qtype_of(e->types[0]), qtype_of(e->types[1]), qtype_of(e->types[2])};
        cr_assert_eq(mfpack_layout_add_experts(L, e->layer, e->count, types, e->inter, e->hidden, &err),
                     MF_OK, "%s", err.msg);
    }
    L->extra_json = strdup("{\"checkpoint\": \"tiny\", \"layout\": \"test\"}");
    mfpack_layout_finish(L);
}

/* Writes the layout to path: header, then every tensor and expert part filled with its pattern. */
static void write_file(const mfpack_layout *L, const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    cr_assert(fd >= 0, "cannot create %s", path);
    mf_err err = {0};
    cr_assert_eq(mfpack_write_header(L, fd, path, &err), MF_OK, "%s", err.msg);
    for (int i = 0; i < L->n_tensors; i++)
        fill(fd, L->tensors[i].offset, L->tensors[i].bytes, (uint32_t)i);
    for (int i = 0; i < L->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &L->expert_layers[i];
        for (int e = 0; e < E->count; e++)
            for (int p = 0; p < MFPACK_EXPERT_PARTS; p++)
                fill(fd, E->offset + (uint64_t)e * E->stride + E->parts[p].offset, E->parts[p].bytes,
                     expert_tag(E->layer, e, p));
    }
    close(fd);
}

/* A good file in the test directory; returns its malloc'd path. */
static char *good_file(const char *name) {
    mfpack_layout L;
    build_layout(&L, 0);
    char *path = th_join(g_tmp, name);
    write_file(&L, path);
    mfpack_layout_free(&L);
    return path;
}

static uint64_t file_size(const char *path) {
    struct stat sb;
    cr_assert_eq(stat(path, &sb), 0);
    return (uint64_t)sb.st_size;
}

static void read_header(const char *path, unsigned char h[SPEC_HEADER]) {
    int fd = open(path, O_RDONLY);
    cr_assert(fd >= 0);
    cr_assert_eq(pread(fd, h, SPEC_HEADER, 0), (ssize_t)SPEC_HEADER);
    close(fd);
}

static void patch(const char *path, uint64_t off, const void *data, size_t n) {
    int fd = open(path, O_RDWR);
    cr_assert(fd >= 0);
    cr_assert_eq(pwrite(fd, data, n, (off_t)off), (ssize_t)n);
    close(fd);
}

/* The stored manifest, parsed. */
static cJSON *load_manifest(const char *path) {
    unsigned char h[SPEC_HEADER];
    read_header(path, h);
    uint64_t mlen = le64(h + 24);
    char *m = malloc(mlen + 1);
    int fd = open(path, O_RDONLY);
    cr_assert(fd >= 0 && m);
    cr_assert_eq(pread(fd, m, mlen, (off_t)le64(h + 16)), (ssize_t)mlen);
    close(fd);
    m[mlen] = '\0';
    cJSON *o = cJSON_Parse(m);
    cr_assert(o, "stored manifest is not JSON");
    free(m);
    return o;
}

/* Replaces the manifest with o's text, zero-pads up to dense_offset, and fixes the header's
 * manifest length and FNV-1a checksum. */
static void store_manifest(const char *path, const cJSON *o) {
    unsigned char h[SPEC_HEADER];
    read_header(path, h);
    uint64_t dense = le64(h + 40);
    char *m = cJSON_PrintUnformatted(o);
    uint64_t mlen = strlen(m);
    cr_assert(SPEC_HEADER + mlen <= dense, "rewritten manifest does not fit");
    unsigned char *zero = calloc(1, dense - SPEC_HEADER - mlen + 1);
    patch(path, SPEC_HEADER, m, mlen);
    patch(path, SPEC_HEADER + mlen, zero, dense - SPEC_HEADER - mlen);
    put_le64(h + 24, mlen);
    put_le64(h + 32, spec_fnv1a64(m, mlen));
    patch(path, 0, h, SPEC_HEADER);
    free(zero);
    free(m);
}

static cJSON *manifest_tensor(cJSON *o, const char *name) {
    cJSON *e;
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(o, "tensors")) {
        if (!strcmp(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "name")), name)) return e;
    }
    cr_assert_fail("tensor %s not in the manifest", name);
    return NULL;
}

static void set_num(cJSON *o, const char *field, double v) {
    cr_assert(cJSON_GetObjectItemCaseSensitive(o, field), "no field %s", field);
    cJSON_ReplaceItemInObjectCaseSensitive(o, field, cJSON_CreateNumber(v));
}

static double get_num(const cJSON *o, const char *field) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, field);
    cr_assert(cJSON_IsNumber(it), "no number %s", field);
    return it->valuedouble;
}

/* mfpack_open must fail with `want`, a message naming the file, and `needle` when given. */
static void expect_refused(const char *path, mf_status want, const char *needle) {
    mfpack_file f;
    mf_err err = {0};
    mf_status st = mfpack_open(&f, path, &err);
    cr_assert_eq(st, want, "%s: expected %s, got %s (%s)", path, mf_status_name(want),
                 mf_status_name(st), err.msg);
    cr_assert_eq(err.status, want);
    cr_assert(strstr(err.msg, path), "message '%s' does not name %s", err.msg, path);
    if (needle) cr_assert(strstr(err.msg, needle), "message '%s' does not mention %s", err.msg, needle);
    cr_assert_eq(f.fd, -1, "a refused open must not leave a descriptor");
}

static void open_ok(mfpack_file *f, const char *path) {
    mf_err err = {0};
    cr_assert_eq(mfpack_open(f, path, &err), MF_OK, "%s", err.msg);
}

/* ---- the layout as written and read ---- */

static int cmp_u64_pairs(const void *a, const void *b) {
    const uint64_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

/* Checks a layout (writer's or reader's) against the format's placement rules. */
static void check_placement(const mfpack_layout *L, uint64_t manifest_bytes, uint64_t size) {
    cr_assert_eq(L->dense_offset % SPEC_ALIGN, 0);
    cr_assert_eq(L->experts_offset % SPEC_ALIGN, 0);
    cr_assert_geq(L->dense_offset, SPEC_HEADER + manifest_bytes, "manifest overlaps dense data");
    cr_assert_leq(L->dense_offset, L->experts_offset);
    cr_assert_eq(L->file_bytes, size);

    /* dense tensors: aligned, inside [dense_offset, experts_offset), pairwise disjoint */
    uint64_t (*r)[2] = malloc((size_t)L->n_tensors * sizeof *r);
    cr_assert(r || !L->n_tensors);
    for (int i = 0; i < L->n_tensors; i++) {
        const mfpack_tensor *t = &L->tensors[i];
        cr_assert_eq(t->offset % SPEC_ALIGN, 0, "%s at %llu", t->name, (unsigned long long)t->offset);
        cr_assert_geq(t->offset, L->dense_offset, "%s", t->name);
        cr_assert_leq(t->offset + t->bytes, L->experts_offset, "%s", t->name);
        r[i][0] = t->offset;
        r[i][1] = t->offset + t->bytes;
    }
    qsort(r, (size_t)L->n_tensors, sizeof *r, cmp_u64_pairs);
    for (int i = 1; i < L->n_tensors; i++)
        cr_assert_leq(r[i - 1][1], r[i][0], "dense ranges overlap");
    free(r);

    /* experts: one blob per (MoE layer in layer order, expert), back to back, to the end of the file */
    uint64_t next = L->experts_offset;
    int prev_layer = -1;
    for (int i = 0; i < L->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &L->expert_layers[i];
        cr_assert_gt(E->layer, prev_layer, "expert layers out of order");
        prev_layer = E->layer;
        cr_assert_eq(E->offset, next, "layer %d experts do not follow the previous blobs", E->layer);
        cr_assert_eq(E->stride % SPEC_ALIGN, 0, "layer %d stride %llu", E->layer,
                     (unsigned long long)E->stride);
        uint64_t end = 0;
        for (int p = 0; p < MFPACK_EXPERT_PARTS; p++) {
            const mfpack_part *P = &E->parts[p];
            cr_assert_eq(P->offset % SPEC_PART_ALIGN, 0, "layer %d %s at %llu", E->layer, P->name,
                         (unsigned long long)P->offset);
            cr_assert_geq(P->offset, end, "layer %d parts overlap", E->layer);
            end = P->offset + P->bytes;
        }
        cr_assert_leq(end, E->stride, "layer %d parts overflow the stride", E->layer);
        next = E->offset + E->stride * (uint64_t)E->count;
    }
    cr_assert_eq(next, L->file_bytes, "the expert section must end the file");
    cr_assert_eq(L->experts_bytes, L->file_bytes - L->experts_offset);
}

/* Checks types, shapes and byte counts against the test's tables and the spec's formula. */
static void check_contents(const mfpack_layout *L, int n_filler) {
    cr_assert_eq(L->n_tensors, N_TENSORS + n_filler);
    for (int i = 0; i < N_TENSORS; i++) {
        const spec_tensor *s = &g_tensors[i];
        const mfpack_tensor *t = mfpack_find(L, s->name);
        cr_assert(t, "%s not found", s->name);
        cr_assert_str_eq(t->name, s->name);
        cr_assert_str_eq(mf_qtype_name(t->type), s->type, "%s", s->name);
        cr_assert_eq(t->ndim, s->ndim, "%s", s->name);
        uint64_t rows = 1;
        for (int d = 0; d < s->ndim; d++) {
            cr_assert_eq(t->shape[d], s->shape[d], "%s dim %d", s->name, d);
            if (d < s->ndim - 1) rows *= (uint64_t)s->shape[d];
        }
        uint64_t want = spec_bytes(s->type, rows, (uint64_t)s->shape[s->ndim - 1]);
        cr_assert_eq(t->bytes, want, "%s: %llu bytes, the spec says %llu", s->name,
                     (unsigned long long)t->bytes, (unsigned long long)want);
    }
    cr_assert_null(mfpack_find(L, "no.such.tensor"));
    cr_assert_null(mfpack_find(L, ""));

    cr_assert_eq(L->n_expert_layers, N_EXPERTS);
    static const char *names[3] = {"gate_proj", "up_proj", "down_proj"};
    for (int i = 0; i < N_EXPERTS; i++) {
        const spec_experts *s = &g_experts[i];
        const mfpack_expert_layer *E = mfpack_experts(L, s->layer);
        cr_assert(E, "layer %d has no experts", s->layer);
        cr_assert_eq(E->layer, s->layer);
        cr_assert_eq(E->count, s->count);
        uint64_t payload = 0;
        for (int p = 0; p < 3; p++) {
            const mfpack_part *P = &E->parts[p];
            int64_t rows = p == 2 ? s->hidden : s->inter, cols = p == 2 ? s->inter : s->hidden;
            cr_assert_str_eq(P->name, names[p]);
            cr_assert_str_eq(mf_qtype_name(P->type), s->types[p]);
            cr_assert_eq(P->rows, rows, "layer %d %s rows", s->layer, names[p]);
            cr_assert_eq(P->cols, cols, "layer %d %s cols", s->layer, names[p]);
            uint64_t want = spec_bytes(s->types[p], (uint64_t)rows, (uint64_t)cols);
            cr_assert_eq(P->bytes, want, "layer %d %s bytes", s->layer, names[p]);
            payload += want;
        }
        cr_assert_eq(mfpack_expert_payload(E), payload);
    }
    /* layer 1 is a dense MLP layer; 4 is past the last layer */
    cr_assert_null(mfpack_experts(L, 1));
    cr_assert_null(mfpack_experts(L, 4));
    cr_assert_null(mfpack_experts(L, -1));
}

Test(mfpack, writer_layout_follows_spec) {
    mfpack_layout L;
    build_layout(&L, 0);
    char *m = mfpack_manifest_json(&L);
    cr_assert(m);
    check_contents(&L, 0);
    check_placement(&L, strlen(m), L.file_bytes);
    /* layer 3's parts: gate bf16 [5, 72] = 720 bytes, so up starts at the next 64-byte boundary */
    const mfpack_expert_layer *E = mfpack_experts(&L, 3);
    cr_assert_eq(E->parts[0].offset, 0);
    cr_assert_eq(E->parts[1].offset, 768);
    free(m);
    mfpack_layout_free(&L);
}

Test(mfpack, header_matches_spec) {
    mfpack_layout L;
    build_layout(&L, 0);
    char *path = th_join(g_tmp, "h.moeflux");
    write_file(&L, path);
    size_t n = 0;
    unsigned char *b = th_read_file(path, &n);
    cr_assert(b);
    cr_assert_eq(n, file_size(path));
    cr_assert_eq(memcmp(b, "MOEFLUX\0", 8), 0);
    cr_assert_eq(le32(b + 8), 1);
    cr_assert_eq(le32(b + 12), SPEC_HEADER);
    cr_assert_eq(le64(b + 16), SPEC_HEADER);
    uint64_t mlen = le64(b + 24);
    cr_assert_gt(mlen, 0);
    cr_assert_eq(le64(b + 32), spec_fnv1a64(b + SPEC_HEADER, mlen), "checksum");
    cr_assert_eq(le64(b + 40), L.dense_offset);
    cr_assert_eq(le64(b + 48), L.experts_offset);
    cr_assert_eq(le64(b + 56), (uint64_t)n, "file_bytes is the exact size");
    /* the manifest is the layout's, followed by zero padding up to dense_offset */
    char *m = mfpack_manifest_json(&L);
    cr_assert_eq(strlen(m), mlen);
    cr_assert_eq(memcmp(m, b + SPEC_HEADER, mlen), 0);
    for (uint64_t i = SPEC_HEADER + mlen; i < L.dense_offset; i++)
        cr_assert_eq(b[i], 0, "padding byte %llu is not zero", (unsigned long long)i);
    /* the manifest's own copy of the offsets agrees with the header */
    cJSON *o = cJSON_Parse(m);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "format")), "moeflux");
    cr_assert(get_num(o, "version") == 1);
    cr_assert(get_num(o, "group_size") == 64);
    cr_assert(get_num(o, "dense_offset") == (double)le64(b + 40));
    cr_assert(get_num(o, "experts_offset") == (double)le64(b + 48));
    cr_assert(get_num(o, "file_bytes") == (double)n);
    const cJSON *hp = cJSON_GetObjectItemCaseSensitive(o, "hparams");
    cr_assert(get_num(hp, "n_experts_per_tok") == 2);
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(hp, "layer_types")), 4);
    const cJSON *moe = cJSON_GetObjectItemCaseSensitive(hp, "moe_layers");
    cr_assert_eq(cJSON_GetArraySize(moe), 4);
    for (int i = 0; i < 4; i++)
        cr_assert_eq(cJSON_IsTrue(cJSON_GetArrayItem(moe, i)), i != 1, "moe_layers[%d]", i);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(
                         cJSON_GetObjectItemCaseSensitive(o, "source"), "checkpoint")),
                     "tiny");
    cJSON_Delete(o);
    free(m);
    free(b);
    free(path);
    mfpack_layout_free(&L);
}

Test(mfpack, round_trip) {
    mfpack_layout W;
    build_layout(&W, 0);
    char *path = th_join(g_tmp, "rt.moeflux");
    write_file(&W, path);
    mfpack_file f;
    open_ok(&f, path);
    const mfpack_layout *R = &f.L;

    check_contents(R, 0);
    check_placement(R, strlen(f.manifest), file_size(path));

    /* every field the reader rebuilt equals the writer's */
    cr_assert_eq(R->dense_offset, W.dense_offset);
    cr_assert_eq(R->dense_bytes, W.dense_bytes);
    cr_assert_eq(R->experts_offset, W.experts_offset);
    cr_assert_eq(R->experts_bytes, W.experts_bytes);
    cr_assert_eq(R->file_bytes, W.file_bytes);
    cr_assert_eq(R->n_tensors, W.n_tensors);
    for (int i = 0; i < W.n_tensors; i++) {
        const mfpack_tensor *a = &W.tensors[i], *b = &R->tensors[i];
        cr_assert_str_eq(b->name, a->name, "tensor order");
        cr_assert_eq(b->type, a->type);
        cr_assert_eq(b->ndim, a->ndim);
        for (int d = 0; d < a->ndim; d++) cr_assert_eq(b->shape[d], a->shape[d]);
        cr_assert_eq(b->offset, a->offset, "%s offset", a->name);
        cr_assert_eq(b->bytes, a->bytes);
    }
    cr_assert_eq(R->n_expert_layers, W.n_expert_layers);
    for (int i = 0; i < W.n_expert_layers; i++) {
        const mfpack_expert_layer *a = &W.expert_layers[i], *b = &R->expert_layers[i];
        cr_assert_eq(b->layer, a->layer);
        cr_assert_eq(b->count, a->count);
        cr_assert_eq(b->offset, a->offset);
        cr_assert_eq(b->stride, a->stride);
        for (int p = 0; p < 3; p++) {
            cr_assert_str_eq(b->parts[p].name, a->parts[p].name);
            cr_assert_eq(b->parts[p].type, a->parts[p].type);
            cr_assert_eq(b->parts[p].rows, a->parts[p].rows);
            cr_assert_eq(b->parts[p].cols, a->parts[p].cols);
            cr_assert_eq(b->parts[p].offset, a->parts[p].offset);
            cr_assert_eq(b->parts[p].bytes, a->parts[p].bytes);
        }
    }
    /* hyperparameters and the source object */
    cr_assert_eq(R->hp.arch, W.hp.arch);
    cr_assert_str_eq(R->hp.model_type, W.hp.model_type);
    cr_assert_eq(R->hp.n_layers, W.hp.n_layers);
    cr_assert_eq(R->hp.hidden, W.hp.hidden);
    cr_assert_eq(R->hp.vocab, W.hp.vocab);
    cr_assert_eq(R->hp.head_dim, W.hp.head_dim);
    cr_assert_eq(R->hp.n_experts, W.hp.n_experts);
    cr_assert_eq(R->hp.top_k, W.hp.top_k);
    cr_assert_eq(R->hp.dense_inter, W.hp.dense_inter);
    cr_assert(R->hp.rms_eps == W.hp.rms_eps && R->hp.rope_theta == W.hp.rope_theta);
    for (int i = 0; i < W.hp.n_layers; i++) {
        cr_assert_eq(R->hp.layer_kind[i], W.hp.layer_kind[i]);
        cr_assert_eq(R->hp.layer_moe[i], W.hp.layer_moe[i]);
    }
    cr_assert(R->extra_json);
    cJSON *src = cJSON_Parse(R->extra_json);
    cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(src, "layout")), "test");
    cJSON_Delete(src);

    /* the bytes at the reader's offsets are the ones written there */
    for (int i = 0; i < R->n_tensors; i++)
        check_fill(f.fd, R->tensors[i].offset, R->tensors[i].bytes, (uint32_t)i, R->tensors[i].name);
    for (int i = 0; i < R->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &R->expert_layers[i];
        for (int e = 0; e < E->count; e++)
            for (int p = 0; p < 3; p++) {
                char what[64];
                snprintf(what, sizeof what, "layer %d expert %d %s", E->layer, e, E->parts[p].name);
                check_fill(f.fd, E->offset + (uint64_t)e * E->stride + E->parts[p].offset,
                           E->parts[p].bytes, expert_tag(E->layer, e, p), what);
            }
    }
    mfpack_close(&f);
    cr_assert_eq(f.fd, -1);
    mfpack_close(&f); /* closing twice is harmless */
    free(path);
    mfpack_layout_free(&W);
}

Test(mfpack, large_manifest_moves_dense_offset) {
    /* 150 long-named tensors: the manifest no longer fits in the first 4096 bytes */
    mfpack_layout W;
    build_layout(&W, 150);
    char *m = mfpack_manifest_json(&W);
    cr_assert_gt(strlen(m) + SPEC_HEADER, SPEC_ALIGN, "the filler did not grow the manifest enough");
    check_placement(&W, strlen(m), W.file_bytes);
    char *path = th_join(g_tmp, "big.moeflux");
    write_file(&W, path);
    mfpack_file f;
    open_ok(&f, path);
    check_contents(&f.L, 150);
    check_placement(&f.L, strlen(f.manifest), file_size(path));
    for (int i = 0; i < f.L.n_tensors; i++)
        check_fill(f.fd, f.L.tensors[i].offset, f.L.tensors[i].bytes, (uint32_t)i, f.L.tensors[i].name);
    mfpack_close(&f);
    free(m);
    free(path);
    mfpack_layout_free(&W);
}

Test(mfpack, writer_refuses_bad_tensors) {
    mf_hparams hp = small_hparams();
    mfpack_layout L;
    mfpack_layout_init(&L, &hp);
    mf_err err = {0};
    int64_t odd[2] = {4, 72}; /* 72 is not a multiple of 64 */
    cr_assert_eq(mfpack_layout_add_tensor(&L, "w", MF_QTYPE_Q4, 2, odd, &err), MF_ERR_ARG);
    cr_assert(strstr(err.msg, "w"), "%s", err.msg);
    cr_assert_eq(mfpack_layout_add_tensor(&L, "w", MF_QTYPE_Q8, 2, odd, &err), MF_ERR_ARG);
    cr_assert_eq(mfpack_layout_add_tensor(&L, "w", MF_QTYPE_BF16, 2, odd, &err), MF_OK);
    int64_t five[5] = {1, 1, 1, 1, 64};
    cr_assert_eq(mfpack_layout_add_tensor(&L, "v", MF_QTYPE_F32, 5, five, &err), MF_ERR_ARG);
    cr_assert_eq(mfpack_layout_add_tensor(&L, "v", MF_QTYPE_F32, 0, five, &err), MF_ERR_ARG);
    char longname[MFPACK_NAME_MAX + 8];
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    cr_assert_eq(mfpack_layout_add_tensor(&L, longname, MF_QTYPE_F32, 1, five, &err), MF_ERR_ARG);
    mf_qtype q4[3] = {MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_Q4};
    /* down_proj's input is inter = 72: not groupable */
    cr_assert_eq(mfpack_layout_add_experts(&L, 0, 4, q4, 72, 128, &err), MF_ERR_ARG);
    cr_assert(strstr(err.msg, "layer 0"), "%s", err.msg);
    cr_assert_eq(L.n_tensors, 1, "refused tensors must not be added");
    cr_assert_eq(L.n_expert_layers, 0, "a refused experts entry must not be added");
    mfpack_layout_free(&L);
}

/* ---- refusals ---- */

Test(mfpack, refuses_truncated) {
    char *path = good_file("t.moeflux");
    uint64_t n = file_size(path);
    cr_assert_eq(truncate(path, (off_t)(n - 1)), 0);
    expect_refused(path, MF_ERR_FORMAT, "truncated");
    /* one byte too many is as wrong */
    cr_assert_eq(truncate(path, (off_t)(n + 1)), 0);
    expect_refused(path, MF_ERR_FORMAT, NULL);
    cr_assert_eq(truncate(path, (off_t)n), 0);
    mfpack_file f;
    open_ok(&f, path);
    mfpack_close(&f);
    /* shorter than the header */
    cr_assert_eq(truncate(path, (off_t)(SPEC_HEADER - 1)), 0);
    expect_refused(path, MF_ERR_FORMAT, NULL);
    free(path);
}

Test(mfpack, refuses_bad_magic) {
    char *path = good_file("m.moeflux");
    patch(path, 0, "MOEFLUY", 7);
    expect_refused(path, MF_ERR_FORMAT, "magic");
    free(path);
}

Test(mfpack, refuses_version_2) {
    char *path = good_file("v.moeflux");
    unsigned char v[4];
    put_le32(v, 2);
    patch(path, 8, v, 4);
    expect_refused(path, MF_ERR_UNSUPPORTED, "version 2");
    free(path);
}

Test(mfpack, refuses_manifest_flip) {
    char *path = good_file("c.moeflux");
    unsigned char h[SPEC_HEADER];
    read_header(path, h);
    uint64_t mlen = le64(h + 24);
    uint64_t at[] = {SPEC_HEADER, SPEC_HEADER + mlen / 2, SPEC_HEADER + mlen - 1};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++) {
        size_t n = 0;
        unsigned char *orig = th_read_file(path, &n);
        unsigned char b = orig[at[i]] ^ 0x01;
        patch(path, at[i], &b, 1);
        expect_refused(path, MF_ERR_FORMAT, "checksum");
        cr_assert_eq(th_write_file(path, orig, n), 0);
        free(orig);
    }
    /* the checksum itself flipped */
    unsigned char b = h[32] ^ 0x80;
    patch(path, 32, &b, 1);
    expect_refused(path, MF_ERR_FORMAT, "checksum");
    free(path);
}

Test(mfpack, rewritten_manifest_control) {
    /* the rewriting helper alone (same content, re-serialized, new checksum) keeps the file valid */
    char *path = good_file("ctl.moeflux");
    cJSON *o = load_manifest(path);
    store_manifest(path, o);
    cJSON_Delete(o);
    mfpack_file f;
    open_ok(&f, path);
    check_contents(&f.L, 0);
    mfpack_close(&f);
    free(path);
}

Test(mfpack, refuses_tensor_outside_dense_region) {
    char *path = good_file("r.moeflux");
    cJSON *orig = load_manifest(path);
    double experts_offset = get_num(orig, "experts_offset");

    /* starts at the expert section */
    cJSON *o = cJSON_Duplicate(orig, 1);
    set_num(manifest_tensor(o, "lm_head"), "offset", experts_offset);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "lm_head");
    cJSON_Delete(o);

    /* starts inside the dense region (on a boundary) but runs past its end */
    o = cJSON_Duplicate(orig, 1);
    cJSON *t = manifest_tensor(o, "embed_tokens");
    double off = experts_offset - SPEC_ALIGN;
    cr_assert_gt(off + get_num(t, "bytes"), experts_offset);
    set_num(t, "offset", off);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "embed_tokens");
    cJSON_Delete(o);

    /* starts before the dense region (over the header) */
    o = cJSON_Duplicate(orig, 1);
    set_num(manifest_tensor(o, "embed_tokens"), "offset", 0);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "embed_tokens");
    cJSON_Delete(o);

    /* bytes disagreeing with shape and type */
    o = cJSON_Duplicate(orig, 1);
    t = manifest_tensor(o, "norm");
    set_num(t, "bytes", get_num(t, "bytes") + 4);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "norm");
    cJSON_Delete(o);

    /* and the original manifest, stored again, is accepted */
    store_manifest(path, orig);
    mfpack_file f;
    open_ok(&f, path);
    mfpack_close(&f);
    cJSON_Delete(orig);
    free(path);
}

Test(mfpack, refuses_experts_outside_file) {
    char *path = good_file("e.moeflux");
    cJSON *o = load_manifest(path);
    cJSON *last = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(o, "experts"), N_EXPERTS - 1);
    set_num(last, "count", get_num(last, "count") + 1);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "layer 3");
    cJSON_Delete(o);
    free(path);
}

Test(mfpack, refuses_moe_layer_without_experts) {
    char *path = good_file("x.moeflux");
    cJSON *o = load_manifest(path);
    cJSON_DeleteItemFromArray(cJSON_GetObjectItemCaseSensitive(o, "experts"), 1); /* layer 2 */
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "layer 2");
    cJSON_Delete(o);
    free(path);
}

static cJSON *last_experts(cJSON *o) {
    return cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(o, "experts"), N_EXPERTS - 1);
}

Test(mfpack, refuses_misaligned_ranges) {
    /* docs/format.md: dense tensors start on 4096-byte boundaries, expert strides are multiples
     * of 4096, parts start on 64-byte boundaries. Each case keeps every range inside its region. */
    char *path = good_file("a.moeflux");
    cJSON *orig = load_manifest(path);

    cJSON *o = cJSON_Duplicate(orig, 1);
    cJSON *t = manifest_tensor(o, "norm");
    set_num(t, "offset", get_num(t, "offset") + 64);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "norm");
    cJSON_Delete(o);

    /* layer 3's up_proj starts 8 bytes early: still after gate_proj's end, still in the blob */
    o = cJSON_Duplicate(orig, 1);
    cJSON *part = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(last_experts(o), "parts"), 1);
    set_num(part, "offset", get_num(part, "offset") - 8);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "layer 3");
    cJSON_Delete(o);

    /* layer 3's stride 64 bytes short: the parts and all blobs still fit */
    o = cJSON_Duplicate(orig, 1);
    cJSON *E = last_experts(o);
    set_num(E, "stride", get_num(E, "stride") - 64);
    store_manifest(path, o);
    expect_refused(path, MF_ERR_FORMAT, "layer 3");
    cJSON_Delete(o);

    store_manifest(path, orig);
    mfpack_file f;
    open_ok(&f, path);
    mfpack_close(&f);
    cJSON_Delete(orig);

    /* the header's dense_offset 64 bytes early: still past the manifest and before every tensor */
    unsigned char h[SPEC_HEADER];
    read_header(path, h);
    cr_assert_geq(le64(h + 40) - 64, SPEC_HEADER + le64(h + 24));
    put_le64(h + 40, le64(h + 40) - 64);
    patch(path, 0, h, SPEC_HEADER);
    expect_refused(path, MF_ERR_FORMAT, NULL);
    free(path);
}

Test(mfpack, refuses_empty_missing_and_directory) {
    char *empty = th_join(g_tmp, "empty.moeflux");
    cr_assert_eq(th_write_file(empty, "", 0), 0);
    expect_refused(empty, MF_ERR_FORMAT, NULL);

    char *missing = th_join(g_tmp, "missing.moeflux");
    expect_refused(missing, MF_ERR_IO, NULL);

    expect_refused(g_tmp, MF_ERR_IO, NULL);
    free(empty);
    free(missing);
}

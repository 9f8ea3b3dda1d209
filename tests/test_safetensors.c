/* test_safetensors.c - Criterion tests of the safetensors reader on small files built here:
 * good single files and sharded dirs, and every kind of broken input. Not a model test. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format/safetensors.h"
#include "helpers.h"

static char *g_dir; /* fresh temporary directory per test */

static void st_setup(void) {
    g_dir = th_tmpdir();
    cr_assert(g_dir != NULL, "could not create a temporary directory");
}

static void st_teardown(void) {
    if (g_dir) th_rmtree(g_dir);
    free(g_dir);
    g_dir = NULL;
}

TestSuite(safetensors, .init = st_setup, .fini = st_teardown);

/* Byte i of every data area built here. */
static uint8_t pattern(size_t i) {
    return (uint8_t)(i * 31u + 7u);
}

/* Writes dir/name: the 8-byte little-endian hlen_field, the header text, then data_len
 * pattern bytes. Returns the malloc'd path. */
static char *build_raw(const char *dir, const char *name, const char *header,
                       uint64_t hlen_field, size_t data_len) {
    size_t hl = strlen(header), n = 8 + hl + data_len;
    uint8_t *buf = malloc(n ? n : 1);
    cr_assert(buf != NULL);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(hlen_field >> (8 * i));
    memcpy(buf + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) buf[8 + hl + i] = pattern(i);
    char *path = th_join(dir, name);
    cr_assert(th_write_file(path, buf, n) == 0, "cannot write %s", path);
    free(buf);
    return path;
}

/* The usual case: the length field matches the header. */
static char *build(const char *dir, const char *name, const char *header, size_t data_len) {
    return build_raw(dir, name, header, strlen(header), data_len);
}

static void write_text(const char *dir, const char *name, const char *text) {
    char *p = th_join(dir, name);
    cr_assert(th_write_file(p, text, strlen(text)) == 0, "cannot write %s", p);
    free(p);
}

static int is_zeroed(const st_checkpoint *ck) {
    return !ck->tensors && !ck->n_tensors && !ck->files && !ck->n_files;
}

/* Asserts the open failed with want, left ck zeroed, and the message holds each needle. */
static void expect_refused(mf_status got, mf_status want, const st_checkpoint *ck,
                           const mf_err *e, const char *needle1, const char *needle2) {
    cr_assert(got == want, "expected status %s, got %s (message: %s)", mf_status_name(want),
              mf_status_name(got), e->msg);
    cr_assert(e->status == want, "err.status %s differs from the returned %s",
              mf_status_name(e->status), mf_status_name(want));
    cr_assert(is_zeroed(ck), "a failed open must leave the checkpoint zeroed");
    if (needle1)
        cr_assert(strstr(e->msg, needle1), "message \"%s\" should mention \"%s\"", e->msg, needle1);
    if (needle2)
        cr_assert(strstr(e->msg, needle2), "message \"%s\" should mention \"%s\"", e->msg, needle2);
}

/* Builds g_dir/bad.safetensors and checks st_open_file refuses it as want. */
static void refuse_file(const char *header, uint64_t hlen_field, size_t data_len, mf_status want,
                        const char *needle2) {
    char *path = build_raw(g_dir, "bad.safetensors", header, hlen_field, data_len);
    st_checkpoint ck;
    memset(&ck, 0x5a, sizeof ck); /* not initialised: the open must not care */
    mf_err e;
    err_clear(&e);
    mf_status st = st_open_file(&ck, path, &e);
    expect_refused(st, want, &ck, &e, path, needle2);
    st_close(&ck);
    free(path);
}

/* refuse_file with a length field that matches the header. */
static void refuse(const char *header, size_t data_len, mf_status want, const char *needle2) {
    refuse_file(header, strlen(header), data_len, want, needle2);
}

static void check_data(const st_tensor *t, size_t begin) {
    const uint8_t *d = t->data;
    for (uint64_t i = 0; i < t->nbytes; i++)
        cr_assert(d[i] == pattern(begin + i), "tensor %s: byte %llu is %u, expected %u", t->name,
                  (unsigned long long)i, d[i], pattern(begin + i));
}

/* Eight tensors, one per dtype, with a scalar, an empty tensor, a gap and metadata. */
static const char GOOD_HEADER[] =
    "{\"__metadata__\": {\"format\": \"pt\"},"
    " \"w.f32\": {\"dtype\": \"F32\", \"shape\": [2, 3], \"data_offsets\": [0, 24]},"
    " \"a.bf16\": {\"dtype\": \"BF16\", \"shape\": [4], \"data_offsets\": [24, 32]},"
    " \"scalar.u8\": {\"dtype\": \"U8\", \"shape\": [], \"data_offsets\": [32, 33]},"
    " \"empty.f8\": {\"dtype\": \"F8_E4M3\", \"shape\": [0, 5], \"data_offsets\": [33, 33]},"
    " \"m.i32\": {\"dtype\": \"I32\", \"shape\": [2, 1], \"data_offsets\": [36, 44]},"
    " \"h.f16\": {\"dtype\": \"F16\", \"shape\": [1, 1, 3], \"data_offsets\": [44, 50]},"
    " \"u.u32\": {\"dtype\": \"U32\", \"shape\": [1], \"data_offsets\": [52, 56]},"
    " \"z.i8\": {\"dtype\": \"I8\", \"shape\": [3], \"data_offsets\": [56, 59]}}       ";

Test(safetensors, dtype_names_and_sizes) {
    static const char *names[] = {"F32", "F16", "BF16", "U32", "I32", "U8", "I8", "F8_E4M3"};
    static const size_t sizes[] = {4, 2, 2, 4, 4, 1, 1, 1};
    for (int i = 0; i < ST_DTYPE_COUNT; i++) {
        cr_assert_str_eq(st_dtype_name((st_dtype)i), names[i], "name of dtype %d", i);
        cr_assert_eq(st_dtype_size((st_dtype)i), sizes[i], "size of dtype %s", names[i]);
    }
    cr_assert_eq(st_dtype_size(ST_DTYPE_COUNT), 0, "out-of-range dtype has size 0");
}

Test(safetensors, good_file) {
    char *path = build(g_dir, "x.safetensors", GOOD_HEADER, 59);
    st_checkpoint ck;
    mf_err e;
    err_clear(&e);
    mf_status st = st_open_file(&ck, path, &e);
    cr_assert(st == MF_OK, "open failed: %s", e.msg);
    cr_assert_eq(ck.n_tensors, 8, "8 tensors expected (metadata is not one), got %zu", ck.n_tensors);
    cr_assert_eq(ck.n_files, 1);
    for (size_t i = 1; i < ck.n_tensors; i++)
        cr_assert(strcmp(ck.tensors[i - 1].name, ck.tensors[i].name) < 0, "tensors not sorted");

    static const struct {
        const char *name;
        st_dtype dtype;
        int ndim;
        int64_t shape[3], numel;
        size_t begin, nbytes;
    } want[] = {
        {"w.f32", ST_F32, 2, {2, 3}, 6, 0, 24},
        {"a.bf16", ST_BF16, 1, {4}, 4, 24, 8},
        {"scalar.u8", ST_U8, 0, {0}, 1, 32, 1},
        {"empty.f8", ST_F8_E4M3, 2, {0, 5}, 0, 33, 0},
        {"m.i32", ST_I32, 2, {2, 1}, 2, 36, 8},
        {"h.f16", ST_F16, 3, {1, 1, 3}, 3, 44, 6},
        {"u.u32", ST_U32, 1, {1}, 1, 52, 4},
        {"z.i8", ST_I8, 1, {3}, 3, 56, 3},
    };
    const uint8_t *base = NULL;
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        const st_tensor *t = st_find(&ck, want[k].name);
        cr_assert(t != NULL, "st_find(%s) returned NULL", want[k].name);
        cr_assert_str_eq(t->name, want[k].name);
        cr_assert_eq(t->dtype, want[k].dtype, "%s: dtype %s", t->name, st_dtype_name(t->dtype));
        cr_assert_eq(t->ndim, want[k].ndim, "%s: ndim %d", t->name, t->ndim);
        for (int d = 0; d < t->ndim; d++)
            cr_assert_eq(t->shape[d], want[k].shape[d], "%s: shape[%d]", t->name, d);
        cr_assert_eq(t->numel, want[k].numel, "%s: numel %lld", t->name, (long long)t->numel);
        cr_assert_eq(t->nbytes, want[k].nbytes, "%s: nbytes", t->name);
        cr_assert_str_eq(t->file, path, "%s: file", t->name);
        /* Every data pointer sits at its offset from one data-area start. */
        const uint8_t *b0 = (const uint8_t *)t->data - want[k].begin;
        if (!base) base = b0;
        cr_assert(b0 == base, "%s: data pointer not at its offset", t->name);
        check_data(t, want[k].begin);
    }
    cr_assert_null(st_find(&ck, "missing"), "a missing name gives NULL");
    cr_assert_null(st_find(&ck, ""), "the empty name gives NULL");
    cr_assert_null(st_find(&ck, "__metadata__"), "metadata is not a tensor");
    st_close(&ck);
    cr_assert(is_zeroed(&ck), "st_close zeroes the checkpoint");
    st_close(&ck); /* twice is fine */
    free(path);
}

Test(safetensors, close_and_find_on_zeroed) {
    st_checkpoint ck = {0};
    cr_assert_null(st_find(&ck, "x"));
    st_close(&ck);
    st_close(NULL);
}

Test(safetensors, empty_header_object) {
    char *path = build(g_dir, "e.safetensors", "{}", 0);
    st_checkpoint ck;
    mf_err e;
    cr_assert(st_open_file(&ck, path, &e) == MF_OK, "an empty checkpoint is valid: %s", e.msg);
    cr_assert_eq(ck.n_tensors, 0);
    cr_assert_null(st_find(&ck, "x"));
    st_close(&ck);
    free(path);
}

Test(safetensors, open_dir_single) {
    char *path = build(g_dir, "model.safetensors", GOOD_HEADER, 59);
    st_checkpoint ck;
    mf_err e;
    cr_assert(st_open_dir(&ck, g_dir, &e) == MF_OK, "open_dir failed: %s", e.msg);
    cr_assert_eq(ck.n_tensors, 8);
    const st_tensor *t = st_find(&ck, "a.bf16");
    cr_assert(t && t->dtype == ST_BF16 && t->numel == 4, "a.bf16 found with its shape");
    check_data(t, 24);
    st_close(&ck);
    free(path);
}

static const char SHARD1[] =
    "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
    " \"c\": {\"dtype\": \"U8\", \"shape\": [3], \"data_offsets\": [8, 11]}}";
static const char SHARD2[] =
    "{\"b\": {\"dtype\": \"BF16\", \"shape\": [2, 2], \"data_offsets\": [0, 8]},"
    " \"extra\": {\"dtype\": \"I8\", \"shape\": [1], \"data_offsets\": [8, 9]}}";
static const char INDEX[] =
    "{\"metadata\": {\"total_size\": 20}, \"weight_map\": {"
    "\"a\": \"model-00001-of-00002.safetensors\","
    " \"b\": \"model-00002-of-00002.safetensors\","
    " \"c\": \"model-00001-of-00002.safetensors\"}}";

static void build_shards(void) {
    free(build(g_dir, "model-00001-of-00002.safetensors", SHARD1, 11));
    free(build(g_dir, "model-00002-of-00002.safetensors", SHARD2, 9));
}

Test(safetensors, sharded_dir) {
    build_shards();
    write_text(g_dir, "model.safetensors.index.json", INDEX);
    /* A stray single file must be ignored when the index exists. */
    free(build(g_dir, "model.safetensors", "{}", 0));
    st_checkpoint ck;
    mf_err e;
    cr_assert(st_open_dir(&ck, g_dir, &e) == MF_OK, "sharded open failed: %s", e.msg);
    cr_assert_eq(ck.n_files, 2, "each shard opened once, got %zu files", ck.n_files);
    cr_assert_eq(ck.n_tensors, 4, "a, b, c and extra (not in the map) expected, got %zu",
                 ck.n_tensors);
    static const char *order[] = {"a", "b", "c", "extra"};
    for (int i = 0; i < 4; i++) cr_assert_str_eq(ck.tensors[i].name, order[i]);
    const st_tensor *a = st_find(&ck, "a"), *b = st_find(&ck, "b"), *c = st_find(&ck, "c"),
                    *x = st_find(&ck, "extra");
    cr_assert(a && b && c && x);
    cr_assert(strstr(a->file, "model-00001-of-00002.safetensors"), "a in shard 1: %s", a->file);
    cr_assert(strstr(c->file, "model-00001-of-00002.safetensors"), "c in shard 1: %s", c->file);
    cr_assert(strstr(b->file, "model-00002-of-00002.safetensors"), "b in shard 2: %s", b->file);
    cr_assert(strstr(x->file, "model-00002-of-00002.safetensors"), "extra in shard 2");
    cr_assert(a->file == c->file, "tensors of one shard share its path string");
    check_data(a, 0);
    check_data(c, 8);
    check_data(b, 0);
    check_data(x, 8);
    cr_assert_eq(b->dtype, ST_BF16);
    cr_assert_eq(b->numel, 4);
    st_close(&ck);
}

/* ---- broken single files ---- */

Test(safetensors, refuses_truncated_data) {
    /* The good header, but the data area is cut at 40 of 59 bytes. */
    refuse(GOOD_HEADER, 40, MF_ERR_FORMAT, "\"m.i32\"");
}

Test(safetensors, refuses_garbage_header) {
    refuse("this is not json at all", 16, MF_ERR_FORMAT, "not valid JSON");
}

Test(safetensors, refuses_trailing_garbage_in_header) {
    refuse("{} xyz", 0, MF_ERR_FORMAT, "trailing");
}

Test(safetensors, refuses_header_not_object) {
    refuse("[1, 2, 3]", 0, MF_ERR_FORMAT, "not a JSON object");
}

Test(safetensors, refuses_header_length_past_end) {
    refuse_file("{}", 1000, 10, MF_ERR_FORMAT, "past the end");
}

Test(safetensors, refuses_absurd_header_length) {
    refuse_file("{}", 1ull << 40, 0, MF_ERR_FORMAT, "absurd");
    refuse_file("{}", UINT64_MAX, 0, MF_ERR_FORMAT, "absurd");
}

Test(safetensors, refuses_zero_header_length) {
    refuse("", 0, MF_ERR_FORMAT, "not valid JSON");
}

Test(safetensors, refuses_tiny_and_empty_files) {
    char *path = th_join(g_dir, "tiny.safetensors");
    mf_err e;
    st_checkpoint ck;
    cr_assert(th_write_file(path, "abc", 3) == 0);
    expect_refused(st_open_file(&ck, path, &e), MF_ERR_FORMAT, &ck, &e, path, "3 bytes");
    cr_assert(th_write_file(path, "", 0) == 0);
    expect_refused(st_open_file(&ck, path, &e), MF_ERR_FORMAT, &ck, &e, path, "0 bytes");
    free(path);
}

Test(safetensors, refuses_missing_file) {
    char *path = th_join(g_dir, "nope.safetensors");
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_file(&ck, path, &e), MF_ERR_IO, &ck, &e, path, NULL);
    free(path);
}

Test(safetensors, refuses_offsets_past_end) {
    refuse("{\"t\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [8, 12]}}", 10,
                MF_ERR_FORMAT, "\"t\"");
}

Test(safetensors, refuses_size_mismatch) {
    refuse("{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 12]}}", 16,
                MF_ERR_FORMAT, "\"w\"");
}

Test(safetensors, refuses_overlap) {
    static const char h[] =
        "{\"a\": {\"dtype\": \"U8\", \"shape\": [16], \"data_offsets\": [0, 16]},"
        " \"b\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [20, 24]},"
        " \"c\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [8, 16]}}";
    refuse(h, 24, MF_ERR_FORMAT, "overlap");
    char *path = th_join(g_dir, "bad.safetensors");
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_file(&ck, path, &e), MF_ERR_FORMAT, &ck, &e, "\"a\"", "\"c\"");
    free(path);
}

Test(safetensors, allows_touching_and_empty_ranges) {
    static const char h[] =
        "{\"a\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]},"
        " \"e\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [4, 4]},"
        " \"b\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [8, 16]}}";
    char *path = build(g_dir, "ok.safetensors", h, 16);
    mf_err e;
    st_checkpoint ck;
    cr_assert(st_open_file(&ck, path, &e) == MF_OK, "touching ranges are fine: %s", e.msg);
    st_close(&ck);
    free(path);
}

Test(safetensors, refuses_unknown_dtype) {
    refuse("{\"d\": {\"dtype\": \"F64\", \"shape\": [1], \"data_offsets\": [0, 8]}}", 8,
                MF_ERR_UNSUPPORTED, "\"F64\"");
    refuse("{\"x99\": {\"dtype\": \"X99\", \"shape\": [1], \"data_offsets\": [0, 8]}}", 8,
                MF_ERR_UNSUPPORTED, "\"x99\"");
}

Test(safetensors, refuses_bad_dtype_type) {
    refuse("{\"d\": {\"dtype\": 4, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
                MF_ERR_FORMAT, "\"d\"");
}

Test(safetensors, refuses_negative_shape) {
    refuse("{\"n\": {\"dtype\": \"U8\", \"shape\": [-1, 4], \"data_offsets\": [0, 4]}}", 4,
                MF_ERR_FORMAT, "\"n\"");
}

Test(safetensors, refuses_fractional_and_string_shape) {
    static const char h1[] = "{\"f\": {\"dtype\": \"U8\", \"shape\": [1.5], \"data_offsets\": [0, 1]}}";
    refuse(h1, 1, MF_ERR_FORMAT, "shape[0]");
    static const char h2[] = "{\"s\": {\"dtype\": \"U8\", \"shape\": [\"2\"], \"data_offsets\": [0, 2]}}";
    refuse(h2, 2, MF_ERR_FORMAT, "\"s\"");
    static const char h3[] = "{\"s\": {\"dtype\": \"U8\", \"shape\": 2, \"data_offsets\": [0, 2]}}";
    refuse(h3, 2, MF_ERR_FORMAT, "shape");
}

Test(safetensors, refuses_too_many_dims) {
    static const char h[] =
        "{\"m\": {\"dtype\": \"U8\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 1]}}";
    refuse(h, 1, MF_ERR_FORMAT, "9 dims");
}

Test(safetensors, refuses_numel_overflow) {
    /* 2^52 * 2^52 overflows int64; a product of 4 * 2^62 would overflow u64 bytes. */
    static const char h1[] = "{\"o\": {\"dtype\": \"F32\", \"shape\": [4503599627370496, "
                             "4503599627370496], \"data_offsets\": [0, 4]}}";
    refuse(h1, 4, MF_ERR_FORMAT, "too many elements");
    static const char h2[] = "{\"o\": {\"dtype\": \"F32\", \"shape\": [4503599627370496, 1024],"
                             " \"data_offsets\": [0, 0]}}";
    refuse(h2, 4, MF_ERR_FORMAT, "\"o\"");
}

Test(safetensors, refuses_bad_offsets) {
    static const char h1[] = "{\"r\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [4, 2]}}";
    refuse(h1, 8, MF_ERR_FORMAT, "begin after end");
    static const char h2[] = "{\"r\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0]}}";
    refuse(h2, 8, MF_ERR_FORMAT, "data_offsets");
    static const char h3[] = "{\"r\": {\"dtype\": \"U8\", \"shape\": [2]}}";
    refuse(h3, 8, MF_ERR_FORMAT, "data_offsets");
    static const char h4[] = "{\"r\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [-2, 0]}}";
    refuse(h4, 8, MF_ERR_FORMAT, "\"r\"");
}

Test(safetensors, refuses_entry_not_object) {
    refuse("{\"q\": [1, 2]}", 0, MF_ERR_FORMAT, "\"q\"");
    refuse("{\"__metadata__\": 5}", 0, MF_ERR_FORMAT, "__metadata__");
}

Test(safetensors, refuses_duplicate_in_file) {
    static const char h[] =
        "{\"d\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
        " \"d\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}";
    refuse(h, 2, MF_ERR_FORMAT, "\"d\" appears twice");
}

/* ---- broken directories ---- */

Test(safetensors, refuses_empty_dir) {
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_dir(&ck, g_dir, &e), MF_ERR_IO, &ck, &e, g_dir,
                   "no model.safetensors or model.safetensors.index.json");
    char *nodir = th_join(g_dir, "absent");
    expect_refused(st_open_dir(&ck, nodir, &e), MF_ERR_IO, &ck, &e, nodir, NULL);
    free(nodir);
}

Test(safetensors, refuses_missing_shard) {
    free(build(g_dir, "model-00001-of-00002.safetensors", SHARD1, 11));
    write_text(g_dir, "model.safetensors.index.json", INDEX);
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_dir(&ck, g_dir, &e), MF_ERR_IO, &ck, &e,
                   "model-00002-of-00002.safetensors", "model.safetensors.index.json");
}

Test(safetensors, refuses_tensor_absent_from_shard) {
    build_shards();
    write_text(g_dir, "model.safetensors.index.json",
               "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\","
               " \"ghost\": \"model-00002-of-00002.safetensors\"}}");
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_dir(&ck, g_dir, &e), MF_ERR_FORMAT, &ck, &e, "\"ghost\"",
                   "model-00002-of-00002.safetensors");
}

Test(safetensors, refuses_tensor_in_wrong_shard) {
    build_shards();
    write_text(g_dir, "model.safetensors.index.json",
               "{\"weight_map\": {\"a\": \"model-00002-of-00002.safetensors\","
               " \"c\": \"model-00001-of-00002.safetensors\"}}");
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_dir(&ck, g_dir, &e), MF_ERR_FORMAT, &ck, &e, "\"a\"",
                   "model-00002-of-00002.safetensors");
}

Test(safetensors, refuses_duplicate_across_shards) {
    free(build(g_dir, "s1.safetensors", SHARD1, 11));
    free(build(g_dir, "s2.safetensors", SHARD1, 11));
    write_text(g_dir, "model.safetensors.index.json",
               "{\"weight_map\": {\"a\": \"s1.safetensors\", \"c\": \"s2.safetensors\"}}");
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_dir(&ck, g_dir, &e), MF_ERR_FORMAT, &ck, &e, "s2.safetensors",
                   "two shards");
}

Test(safetensors, refuses_bad_shard_names) {
    build_shards();
    static const char *bad[] = {
        "{\"weight_map\": {\"a\": \"../model-00001-of-00002.safetensors\"}}",
        "{\"weight_map\": {\"a\": \"..\"}}",
        "{\"weight_map\": {\"a\": \"\"}}",
        "{\"weight_map\": {\"a\": 3}}",
        "{\"weight_map\": {}}",
        "{\"weight_map\": [\"a\"]}",
        "{\"nothing\": 1}",
        "not json",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(g_dir, "model.safetensors.index.json", bad[i]);
        mf_err e;
        st_checkpoint ck;
        mf_status st = st_open_dir(&ck, g_dir, &e);
        cr_assert(st == MF_ERR_FORMAT, "index %s: expected bad format, got %s (%s)", bad[i],
                  mf_status_name(st), e.msg);
        cr_assert(is_zeroed(&ck));
        cr_assert(strstr(e.msg, "model.safetensors.index.json"), "message names the index: %s",
                  e.msg);
    }
}

Test(safetensors, broken_shard_is_reported_with_its_path) {
    free(build(g_dir, "model-00001-of-00002.safetensors", SHARD1, 11));
    free(build(g_dir, "model-00002-of-00002.safetensors", SHARD2, 5)); /* truncated */
    write_text(g_dir, "model.safetensors.index.json", INDEX);
    mf_err e;
    st_checkpoint ck;
    expect_refused(st_open_dir(&ck, g_dir, &e), MF_ERR_FORMAT, &ck, &e,
                   "model-00002-of-00002.safetensors", "\"b\"");
}

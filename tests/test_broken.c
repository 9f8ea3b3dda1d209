/* test_broken.c - broken checkpoints and outputs are refused by `moeflux convert` / `info`
 * with a message naming the file or tensor, a non-zero exit, no crash and no output file.
 * Not a test of good conversions (test_convert.c). */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "helpers.h"

static char *g_tmp, *g_src, *g_out;

/* Each test works on its own copy of a single-file fixture. */
static void setup(void) {
    g_tmp = th_tmpdir();
    cr_assert(g_tmp);
    g_src = th_join(g_tmp, "ckpt");
    char *fx = th_join(th_fixtures(), "qwen3_5_moe_text");
    th_copy_dir(fx, g_src);
    free(fx);
    g_out = th_join(g_tmp, "out.moeflux");
}
static void teardown(void) {
    th_rmtree(g_tmp);
    free(g_tmp);
    free(g_src);
    free(g_out);
}

TestSuite(broken, .init = setup, .fini = teardown, .timeout = 60);

static int count_outputs(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    while (d && (e = readdir(d)))
        if (strstr(e->d_name, "out.moeflux")) n++;
    if (d) closedir(d);
    return n;
}

/* Converts g_src to out and expects a clean refusal whose message holds needle (and needle2). */
static void expect_refused_to(const char *out, const char *needle, const char *needle2) {
    char *err = NULL;
    char *argv[] = {(char *)th_bin(), "convert", g_src, (char *)out, "--quiet", NULL};
    int rc = th_run(argv, NULL, &err);
    cr_assert_neq(rc, -1, "the converter crashed: %s", err);
    cr_assert_neq(rc, 0, "a broken input was accepted");
    cr_assert(err && strstr(err, "moeflux convert:"), "no error message: %s", err);
    if (needle) cr_assert(strstr(err, needle), "message \"%s\" should name \"%s\"", err, needle);
    if (needle2) cr_assert(strstr(err, needle2), "message \"%s\" should name \"%s\"", err, needle2);
    cr_assert_eq(count_outputs(g_tmp), 0, "an output (or temporary) file was left behind");
    free(err);
}

static void expect_refused(const char *needle, const char *needle2) { expect_refused_to(g_out, needle, needle2); }

static char *st_path(void) { return th_join(g_src, "model.safetensors"); }

/* Rewrites the safetensors header of g_src through `edit`, keeping the data area. */
static void edit_header(void (*edit)(cJSON *hdr, void *arg), void *arg) {
    char *p = st_path();
    size_t n;
    unsigned char *buf = th_read_file(p, &n);
    cr_assert(buf && n > 8);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | buf[i];
    cr_assert_leq(8 + hl, n);
    char *text = strndup((char *)buf + 8, hl);
    cJSON *hdr = cJSON_Parse(text);
    cr_assert(hdr);
    edit(hdr, arg);
    char *nt = cJSON_PrintUnformatted(hdr);
    size_t nl = strlen(nt), total = 8 + nl + (n - 8 - hl);
    unsigned char *nb = malloc(total);
    for (int i = 0; i < 8; i++) nb[i] = (unsigned char)((uint64_t)nl >> (8 * i));
    memcpy(nb + 8, nt, nl);
    memcpy(nb + 8 + nl, buf + 8 + hl, n - 8 - hl);
    cr_assert_eq(th_write_file(p, nb, total), 0);
    free(nb);
    free(nt);
    cJSON_Delete(hdr);
    free(text);
    free(buf);
    free(p);
}

static const char *Q_PROJ = "model.layers.3.self_attn.q_proj.weight";

static void drop_tensor(cJSON *hdr, void *arg) { cJSON_DeleteItemFromObjectCaseSensitive(hdr, (const char *)arg); }

static void swap_shape(cJSON *hdr, void *arg) {
    cJSON *t = cJSON_GetObjectItemCaseSensitive(hdr, (const char *)arg);
    cr_assert(t, "fixture lacks %s", (const char *)arg);
    cJSON *sh = cJSON_GetObjectItemCaseSensitive(t, "shape");
    double a = cJSON_GetArrayItem(sh, 0)->valuedouble, b = cJSON_GetArrayItem(sh, 1)->valuedouble;
    cr_assert_neq(a, b, "need a non-square tensor");
    cJSON_ReplaceItemInArray(sh, 0, cJSON_CreateNumber(b));
    cJSON_ReplaceItemInArray(sh, 1, cJSON_CreateNumber(a));
}

static void bad_dtype(cJSON *hdr, void *arg) {
    cJSON *t = cJSON_GetObjectItemCaseSensitive(hdr, (const char *)arg);
    cr_assert(t);
    cJSON_ReplaceItemInObjectCaseSensitive(t, "dtype", cJSON_CreateString("X99"));
}

static void offsets_past_end(cJSON *hdr, void *arg) {
    (void)arg;
    /* move the last tensor's range (with its size) beyond the data area */
    cJSON *it, *last = NULL;
    double best = -1;
    cJSON_ArrayForEach(it, hdr) {
        cJSON *o = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        if (o && cJSON_GetArrayItem(o, 1)->valuedouble > best) {
            best = cJSON_GetArrayItem(o, 1)->valuedouble;
            last = it;
        }
    }
    cr_assert(last);
    cJSON *o = cJSON_GetObjectItemCaseSensitive(last, "data_offsets");
    double b = cJSON_GetArrayItem(o, 0)->valuedouble, e = cJSON_GetArrayItem(o, 1)->valuedouble;
    cJSON_ReplaceItemInArray(o, 0, cJSON_CreateNumber(b + 4096));
    cJSON_ReplaceItemInArray(o, 1, cJSON_CreateNumber(e + 4096));
}

Test(broken, truncated_safetensors) {
    /* keep the header whole, drop the last half of the data */
    char *p = st_path();
    size_t n;
    void *buf = th_read_file(p, &n);
    cr_assert(buf);
    th_write_file(p, buf, n / 2);
    free(buf);
    expect_refused("model.safetensors", NULL);
    free(p);
}

Test(broken, garbage_header) {
    char *p = st_path();
    size_t n;
    unsigned char *buf = th_read_file(p, &n);
    memcpy(buf + 8, "#garbage{[not json", 18);
    th_write_file(p, buf, n);
    free(buf);
    expect_refused("model.safetensors", NULL);
    free(p);
}

Test(broken, header_length_past_end) {
    char *p = st_path();
    size_t n;
    unsigned char *buf = th_read_file(p, &n);
    for (int i = 0; i < 8; i++) buf[i] = 0;
    buf[4] = 1; /* 2^32 bytes */
    th_write_file(p, buf, n);
    free(buf);
    expect_refused("model.safetensors", NULL);
    free(p);
}

Test(broken, tiny_file) {
    char *p = st_path();
    th_write_file(p, "abc", 3);
    expect_refused("model.safetensors", NULL);
    free(p);
}

Test(broken, offsets_past_end) {
    edit_header(offsets_past_end, NULL);
    expect_refused("model.safetensors", NULL);
}

Test(broken, missing_tensor) {
    edit_header(drop_tensor, (void *)Q_PROJ);
    expect_refused(Q_PROJ, NULL);
}

Test(broken, wrong_shape) {
    edit_header(swap_shape, (void *)Q_PROJ);
    expect_refused(Q_PROJ, "shape");
}

Test(broken, unknown_dtype) {
    edit_header(bad_dtype, (void *)Q_PROJ);
    expect_refused(Q_PROJ, "X99");
}

Test(broken, missing_config) {
    char *p = th_join(g_src, "config.json");
    unlink(p);
    expect_refused("config.json", NULL);
    free(p);
}

Test(broken, malformed_config) {
    char *p = th_join(g_src, "config.json");
    th_write_file(p, "{\"model_type\": \"qwen3_moe\", ", 28);
    expect_refused("config.json", NULL);
    free(p);
}

Test(broken, unknown_model_type) {
    char *p = th_join(g_src, "config.json");
    char *text = th_read_file(p, NULL);
    cJSON *o = cJSON_Parse(text);
    cJSON_ReplaceItemInObjectCaseSensitive(o, "model_type", cJSON_CreateString("llama4_moe"));
    char *nt = cJSON_Print(o);
    th_write_file(p, nt, strlen(nt));
    expect_refused("llama4_moe", "config.json");
    free(nt);
    cJSON_Delete(o);
    free(text);
    free(p);
}

Test(broken, config_field_missing) {
    char *p = th_join(g_src, "config.json");
    char *text = th_read_file(p, NULL);
    cJSON *o = cJSON_Parse(text);
    cJSON_DeleteItemFromObjectCaseSensitive(o, "hidden_size");
    char *nt = cJSON_Print(o);
    th_write_file(p, nt, strlen(nt));
    expect_refused("hidden_size", "config.json");
    free(nt);
    cJSON_Delete(o);
    free(text);
    free(p);
}

Test(broken, not_a_directory) {
    char *p = th_join(g_src, "config.json");
    free(g_src);
    g_src = p;
    expect_refused("config.json", NULL);
}

Test(broken, unwritable_output) {
    /* a path under a regular file can never be created, even by root */
    char *out = th_join(g_src, "config.json/out.moeflux");
    expect_refused_to(out, "out.moeflux", NULL);
    free(out);
    char *argv[] = {(char *)th_bin(), "convert", g_src, "/proc/out.moeflux", "--quiet", NULL};
    char *err = NULL;
    int rc = th_run(argv, NULL, &err);
    cr_assert(rc > 0, "writing under /proc must fail cleanly: %s", err);
    free(err);
}

Test(broken, bad_type_flag) {
    char *argv[] = {(char *)th_bin(), "convert", g_src, g_out, "--experts", "q3", NULL};
    char *err = NULL;
    int rc = th_run(argv, NULL, &err);
    cr_assert(rc > 0 && strstr(err, "q3"), "bad --experts must be refused: %s", err);
    free(err);
}

/* ---- broken .moeflux files are refused by info ---- */

static char *good_output(void) {
    char *argv[] = {(char *)th_bin(), "convert", g_src, g_out, "--quiet", NULL};
    char *err = NULL;
    cr_assert_eq(th_run(argv, NULL, &err), 0, "%s", err);
    free(err);
    return g_out;
}

static void expect_info_refused(const char *path, const char *needle) {
    char *argv[] = {(char *)th_bin(), "info", (char *)path, NULL};
    char *err = NULL, *out = NULL;
    int rc = th_run(argv, &out, &err);
    cr_assert(rc > 0, "info accepted a broken file (rc %d): %s", rc, out);
    cr_assert(strstr(err, path), "message \"%s\" should name the file", err);
    if (needle) cr_assert(strstr(err, needle), "message \"%s\" should say \"%s\"", err, needle);
    free(err);
    free(out);
}

Test(broken, truncated_moeflux) {
    const char *p = good_output();
    struct stat sb;
    stat(p, &sb);
    cr_assert_eq(truncate(p, sb.st_size - 100), 0);
    expect_info_refused(p, "truncated");
}

Test(broken, corrupt_manifest) {
    const char *p = good_output();
    size_t n;
    unsigned char *buf = th_read_file(p, &n);
    buf[80] ^= 0x20;
    th_write_file(p, buf, n);
    free(buf);
    expect_info_refused(p, "checksum");
}

Test(broken, not_moeflux) {
    char *p = st_path();
    expect_info_refused(p, "magic");
    free(p);
}

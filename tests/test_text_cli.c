/* test_text_cli.c - the text commands end to end: tokenize / detokenize / template against the
 * Hugging Face references in tests/tokenizer, and run / chat on a small synth model carrying the
 * real Qwen3 tokenizer (seeded sampling, stop strings, EOS, session save/load). Not a tokenizer
 * unit test (test_tokenizer.c). */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

static char *tok_dir(const char *name) {
    const char *base = getenv("MOEFLUX_TOKENIZERS");
    char *b = th_join(base && *base ? base : "build/tokenizers", name);
    char *probe = th_join(b, "tokenizer.json");
    size_t n;
    void *data = th_read_file(probe, &n);
    cr_assert(data, "%s is missing: run tools/fetch-tokenizers.sh build/tokenizers", probe);
    free(data);
    free(probe);
    return b;
}

static cJSON *ref_json(const char *rel) {
    char *p = th_join("tests/tokenizer", rel);
    char *text = th_read_file(p, NULL);
    cr_assert(text, "cannot read %s", p);
    cJSON *o = cJSON_Parse(text);
    cr_assert(o, "%s is not JSON", p);
    free(text);
    free(p);
    return o;
}

/* tokenize --json on a sample of the reference strings gives the reference ids. */
Test(text_cli, tokenize_matches_reference, .timeout = 60) {
    char *dir = tok_dir("qwen3"), *tmp = th_tmpdir(), *f = th_join(tmp, "in.txt");
    cJSON *ref = ref_json("qwen3/encode.json");
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(ref, "cases");
    int n = cJSON_GetArraySize(cases), checked = 0;
    for (int i = 0; i < n; i += 37) {
        const cJSON *c = cJSON_GetArrayItem(cases, i);
        const char *text = cJSON_GetObjectItemCaseSensitive(c, "text")->valuestring;
        if (!*text) continue;
        th_write_file(f, text, strlen(text));
        char *argv[] = {(char *)th_bin(), "tokenize", dir, "--text-file", f, "--json", NULL};
        char *out = NULL, *err = NULL;
        cr_assert_eq(th_run(argv, &out, &err), 0, "%s", err);
        cJSON *got = cJSON_Parse(out);
        const cJSON *ids = cJSON_GetObjectItemCaseSensitive(got, "ids");
        const cJSON *want = cJSON_GetObjectItemCaseSensitive(c, "ids");
        cr_assert_eq(cJSON_GetArraySize(ids), cJSON_GetArraySize(want), "case %d: %s", i, out);
        for (int k = 0; k < cJSON_GetArraySize(want); k++)
            cr_assert_eq(cJSON_GetArrayItem(ids, k)->valuedouble, cJSON_GetArrayItem(want, k)->valuedouble,
                         "case %d token %d", i, k);
        cJSON_Delete(got);
        free(out);
        free(err);
        checked++;
    }
    cr_assert_gt(checked, 10);
    cJSON_Delete(ref);
    th_rmtree(tmp);
    free(tmp);
    free(f);
    free(dir);
}

/* detokenize prints exactly what the reference decoded. */
Test(text_cli, detokenize_matches_reference) {
    char *dir = tok_dir("qwen3");
    cJSON *ref = ref_json("qwen3/encode.json");
    const cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(ref, "cases"), 5);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(c, "ids");
    int n = cJSON_GetArraySize(ids);
    char **argv = calloc((size_t)n + 4, sizeof *argv);
    argv[0] = (char *)th_bin();
    argv[1] = "detokenize";
    argv[2] = dir;
    for (int k = 0; k < n; k++) {
        argv[3 + k] = malloc(16);
        snprintf(argv[3 + k], 16, "%d", (int)cJSON_GetArrayItem(ids, k)->valuedouble);
    }
    char *out = NULL, *err = NULL;
    cr_assert_eq(th_run(argv, &out, &err), 0, "%s", err);
    cr_assert_str_eq(out, cJSON_GetObjectItemCaseSensitive(c, "decoded")->valuestring);
    for (int k = 0; k < n; k++) free(argv[3 + k]);
    free(argv);
    free(out);
    free(err);
    cJSON_Delete(ref);
    free(dir);
}

/* The raw JSON text of the k-th value of `key` in a file's text (numbers keep their spelling,
 * which a parse and re-print would lose: 5.0 must stay 5.0). */
static char *raw_value(const char *text, const char *key, int k) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = text;
    for (int i = 0; i <= k; i++) {
        p = strstr(p, pat);
        cr_assert(p, "no occurrence %d of %s", k, key);
        p += strlen(pat);
    }
    while (*p == ' ') p++;
    const char *q = p;
    int depth = 0, in_str = 0;
    do {
        char ch = *q;
        if (in_str) {
            if (ch == '\\') q++;
            else if (ch == '"') in_str = 0;
        } else if (ch == '"') in_str = 1;
        else if (ch == '[' || ch == '{') depth++;
        else if (ch == ']' || ch == '}') depth--;
        q++;
    } while (*q && (depth > 0 || in_str));
    if (!strncmp(p, "null", 4)) q = p + 4;
    return strndup(p, (size_t)(q - p));
}

/* template prints exactly transformers' render, for both tokenizers. */
static void check_template(const char *name) {
    char *dir = tok_dir(name), *tmp = th_tmpdir();
    char rel[64];
    snprintf(rel, sizeof rel, "%s/chat.json", name);
    cJSON *ref = ref_json(rel);
    char *rp = th_join("tests/tokenizer", rel), *raw = th_read_file(rp, NULL);
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(ref, "cases");
    char *mf = th_join(tmp, "m.json"), *tf = th_join(tmp, "t.json");
    int n = cJSON_GetArraySize(cases);
    for (int i = 0; i < n; i += 5) {
        const cJSON *c = cJSON_GetArrayItem(cases, i);
        char *mj = raw_value(raw, "messages", i);
        th_write_file(mf, mj, strlen(mj));
        const cJSON *tools = cJSON_GetObjectItemCaseSensitive(c, "tools");
        const cJSON *think = cJSON_GetObjectItemCaseSensitive(c, "enable_thinking");
        char *argv[12];
        int k = 0;
        argv[k++] = (char *)th_bin();
        argv[k++] = "template";
        argv[k++] = dir;
        argv[k++] = "--messages";
        argv[k++] = mf;
        if (cJSON_IsArray(tools)) {
            char *tj = raw_value(raw, "tools", i);
            th_write_file(tf, tj, strlen(tj));
            free(tj);
            argv[k++] = "--tools";
            argv[k++] = tf;
        }
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt"))) argv[k++] = "--generation-prompt";
        if (cJSON_IsTrue(think)) argv[k++] = "--think";
        if (cJSON_IsFalse(think)) argv[k++] = "--no-think";
        argv[k] = NULL;
        char *out = NULL, *err = NULL;
        cr_assert_eq(th_run(argv, &out, &err), 0, "%s case %d: %s", name, i, err);
        cr_assert_str_eq(out, cJSON_GetObjectItemCaseSensitive(c, "text")->valuestring, "%s case %d", name, i);
        free(out);
        free(err);
        free(mj);
    }
    cJSON_Delete(ref);
    th_rmtree(tmp);
    free(tmp);
    free(mf);
    free(tf);
    free(dir);
    free(raw);
    free(rp);
}

Test(text_cli, template_qwen3, .timeout = 60) { check_template("qwen3"); }
Test(text_cli, template_deepseek_v3, .timeout = 60) { check_template("deepseek_v3"); }

/* ---- run and chat on a small model carrying the Qwen3 tokenizer ---- */

static char *g_tmp, *g_model;

static void model_setup(void) {
    g_tmp = th_tmpdir();
    g_model = th_join(g_tmp, "demo.moeflux");
    char *dir = tok_dir("qwen3");
    char *argv[] = {(char *)th_bin(), "synth", "demo-qwen3.5", g_model, "--layers", "2", "--tokenizer", dir,
                    "--seed", "3", "--quiet", NULL};
    char *err = NULL;
    cr_assert_eq(th_run(argv, NULL, &err), 0, "synth: %s", err);
    free(err);
    free(dir);
}

static void model_teardown(void) {
    th_rmtree(g_tmp);
    free(g_tmp);
    free(g_model);
}

static char *run_text(const char *seed, const char *extra1, const char *extra2, char **err) {
    char *argv[] = {(char *)th_bin(), "run", g_model, "-p", "Tell me a story about a cat.", "--chat", "-n", "24",
                    "--seed", (char *)seed, "--temp", "0.9", (char *)extra1, (char *)extra2, NULL};
    char *out = NULL;
    cr_assert_eq(th_run(argv, &out, err), 0, "run failed: %s", *err);
    return out;
}

Test(text_run, seeded_sampling_and_summary, .init = model_setup, .fini = model_teardown, .timeout = 120) {
    char *e1 = NULL, *e2 = NULL, *e3 = NULL;
    /* --no-host-reads only changes how a GPU reaches experts: the CPU's text stays the same */
    char *a = run_text("7", NULL, NULL, &e1), *b = run_text("7", "--no-host-reads", NULL, &e2),
         *c = run_text("8", NULL, NULL, &e3);
    cr_assert_str_eq(a, b, "the same seed must give the same text");
    cr_assert_str_neq(a, c, "another seed should give another text");
    cr_assert(strlen(a) > 0, "no text");
    cr_assert(strstr(e1, "decode 24 tok") && strstr(e1, "tok/s") && strstr(e1, "expert cache hit rate"),
              "summary line: %s", e1);
    free(a);
    free(b);
    free(c);
    free(e1);
    free(e2);
    free(e3);
}

Test(text_run, stop_string_cuts_the_text, .init = model_setup, .fini = model_teardown, .timeout = 120) {
    char *e1 = NULL, *e2 = NULL;
    char *full = run_text("11", NULL, NULL, &e1);
    /* a stop string taken from inside the free-running text ends it right before */
    size_t n = strlen(full);
    cr_assert_gt(n, 8, "need some text: %s", full);
    char stop[8];
    memcpy(stop, full + n / 2, 4);
    stop[4] = '\0';
    char *cut = run_text("11", "--stop", stop, &e2);
    char *at = strstr(full, stop);
    cr_assert(at, "stop string not in text");
    cr_assert_eq(strlen(cut), (size_t)(at - full), "text should end before the stop string: [%s] vs [%s]", cut, full);
    cr_assert(!strncmp(cut, full, strlen(cut)));
    cr_assert(strstr(e2, "stop string"), "%s", e2);
    free(full);
    free(cut);
    free(e1);
    free(e2);
}

Test(text_run, chat_turns_save_and_load, .init = model_setup, .fini = model_teardown, .timeout = 120) {
    char *state = th_join(g_tmp, "s.bin"), *in = th_join(g_tmp, "in.txt");
    char script[1024];
    snprintf(script, sizeof script, "first question\n/save %s\nsecond question\n/reset\n/load %s\nthird\n/quit\n", state,
             state);
    th_write_file(in, script, strlen(script));
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s chat %s -n 6 --seed 5 < %s", th_bin(), g_model, in);
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    char *out = NULL, *err = NULL;
    cr_assert_eq(th_run(argv, &out, &err), 0, "chat failed: %s", err);
    cr_assert(strstr(err, "saved") && strstr(err, "loaded") && strstr(err, "conversation cleared"), "%s", err);
    /* four answers: first, second, third (after load), each with a summary line */
    int summaries = 0;
    for (const char *p = err; (p = strstr(p, "expert cache hit rate")); p++) summaries++;
    cr_assert_eq(summaries, 3, "%s", err);
    free(out);
    free(err);
    free(state);
    free(in);
}

Test(text_run, bad_input_refused, .init = model_setup, .fini = model_teardown) {
    char *argv[] = {(char *)th_bin(), "run", g_model, "-p", "x", "--top-p", "0", NULL};
    char *err = NULL;
    int rc = th_run(argv, NULL, &err);
    cr_assert(rc > 0 && strstr(err, "top-p"), "%s", err);
    free(err);
    char *argv2[] = {(char *)th_bin(), "tokenize", "/nonexistent/dir", "hello", NULL};
    rc = th_run(argv2, NULL, &err);
    cr_assert(rc > 0 && strstr(err, "/nonexistent/dir"), "%s", err);
    free(err);
}

/* test_chat.c - tests of src/text/chat.c: transformers' renders in tests/tokenizer/<model>/chat.json
 * matched byte for byte, its refusals refused, hand-written cases. Not a tokenizer test. */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "text/chat.h"

/* ---- raw JSON spans ---- */

/* The reference files keep numbers as Python wrote them (1.0 is not 1), and a chat template prints
 * them back, so messages and tools go to chat_render as their raw source text, cut out here. */
static const char *js_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* End of the JSON value that starts at p (after whitespace), or NULL. */
static const char *js_end(const char *p) {
    p = js_ws(p);
    if (*p == '"') {
        for (p++; *p && *p != '"'; p++)
            if (*p == '\\' && p[1]) p++;
        return *p ? p + 1 : NULL;
    }
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (*p) {
            if (*p == '"') {
                if (!(p = js_end(p))) return NULL;
                continue;
            }
            if (*p == '{' || *p == '[') depth++;
            else if (*p == '}' || *p == ']') depth--;
            p++;
            if (!depth) return p;
        }
        return NULL;
    }
    while (*p && !strchr(",}] \t\n\r", *p)) p++;
    return p;
}

/* Start of the value of key in the object at p, or NULL. */
static const char *js_member(const char *p, const char *key) {
    p = js_ws(p);
    if (*p++ != '{') return NULL;
    for (;;) {
        p = js_ws(p);
        if (*p != '"') return NULL;
        const char *ke = js_end(p);
        if (!ke) return NULL;
        int match = (size_t)(ke - p - 2) == strlen(key) && !strncmp(p + 1, key, strlen(key));
        p = js_ws(ke);
        if (*p++ != ':') return NULL;
        p = js_ws(p);
        if (match) return p;
        if (!(p = js_end(p))) return NULL;
        p = js_ws(p);
        if (*p == ',') p++;
    }
}

/* Start of element i of the array at p, or NULL. */
static const char *js_index(const char *p, int i) {
    p = js_ws(p);
    if (*p++ != '[') return NULL;
    for (int k = 0;; k++) {
        p = js_ws(p);
        if (*p == ']') return NULL;
        if (k == i) return p;
        if (!(p = js_end(p))) return NULL;
        p = js_ws(p);
        if (*p == ',') p++;
    }
}

/* malloc'd copy of the value of key in the object at p; NULL when absent. */
static char *js_dup(const char *p, const char *key) {
    const char *v = p ? js_member(p, key) : NULL, *e = v ? js_end(v) : NULL;
    if (!e) return NULL;
    return strndup(v, (size_t)(e - v));
}

/* ---- reference renders ---- */

/* $MOEFLUX_CHAT_REFS points at another set of the same shape (e.g. the generator's --seed 2). */
static const char *refs_dir(void) {
    const char *d = getenv("MOEFLUX_CHAT_REFS");
    return d && *d ? d : "tests/tokenizer";
}

static const char *json_str_or_null(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Options of a case: add_generation_prompt and enable_thinking (null or absent: not passed). */
static chat_options case_options(const cJSON *c, const cJSON *root) {
    const cJSON *et = cJSON_GetObjectItemCaseSensitive(c, "enable_thinking");
    chat_options o = {cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt")),
                      cJSON_IsBool(et) ? cJSON_IsTrue(et) : -1, json_str_or_null(root, "bos_token"),
                      json_str_or_null(root, "eos_token")};
    return o;
}

/* Renders every case of DIR/chat.json and checks each "errors" entry is refused. */
static void check_reference(const char *name, chat_kind kind) {
    char *dir = th_join(refs_dir(), name), *path = th_join(dir, "chat.json");
    size_t len = 0;
    char *text = th_read_file(path, &len);
    cr_assert(text, "reference renders %s are missing", path);
    cJSON *root = cJSON_Parse(text);
    cr_assert(root, "%s is not JSON", path);
    const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(root, "template");
    cr_assert(cJSON_IsString(tpl), "%s has no template", path);
    cr_expect_eq(chat_detect(tpl->valuestring), kind, "%s: template detected as %s", name,
                 chat_kind_name(chat_detect(tpl->valuestring)));

    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(root, "cases");
    const char *raw_cases = js_member(text, "cases");
    cr_assert(cJSON_IsArray(cases) && raw_cases && cJSON_GetArraySize(cases) > 0,
              "%s has no cases", path);
    int i = 0, ok = 0, n = cJSON_GetArraySize(cases);
    for (const cJSON *c = cases->child; c; c = c->next, i++) {
        const char *raw = js_index(raw_cases, i);
        char *msgs = js_dup(raw, "messages"), *tools = js_dup(raw, "tools");
        const char *want = json_str_or_null(c, "text");
        cr_assert(msgs && want, "%s: case %d has no messages or text", name, i);
        chat_options opt = case_options(c, root);
        char *got = NULL;
        mf_err err = {0};
        mf_status st = chat_render(kind, msgs, tools, &opt, &got, &err);
        if (st == MF_OK && !strcmp(got, want)) {
            ok++;
        } else if (st != MF_OK) {
            cr_log_error("%s case %d refused: %s\n  messages %s", name, i, err.msg, msgs);
        } else {
            size_t k = 0;
            while (got[k] && got[k] == want[k]) k++;
            cr_log_error("%s case %d differs at byte %zu:\n  got  ...%.60s\n  want ...%.60s\n"
                         "  messages %s", name, i, k, got + (k > 20 ? k - 20 : 0),
                         want + (k > 20 ? k - 20 : 0), msgs);
        }
        free(got);
        free(msgs);
        free(tools);
    }

    const cJSON *errors = cJSON_GetObjectItemCaseSensitive(root, "errors");
    const char *raw_errors = js_member(text, "errors");
    int ne = cJSON_GetArraySize(errors), refused = 0;
    i = 0;
    for (const cJSON *c = errors ? errors->child : NULL; c; c = c->next, i++) {
        const char *raw = js_index(raw_errors, i);
        char *msgs = js_dup(raw, "messages"), *tools = js_dup(raw, "tools");
        cr_assert(msgs, "%s: error case %d has no messages", name, i);
        chat_options opt = case_options(c, root);
        char *got = NULL;
        mf_err err = {0};
        if (chat_render(kind, msgs, tools, &opt, &got, &err) != MF_OK) refused++;
        else cr_log_error("%s error case %d rendered (transformers: %s)\n  messages %s", name, i,
                          json_str_or_null(c, "error"), msgs);
        free(got);
        free(msgs);
        free(tools);
    }
    cr_log_info("%s: %d of %d renders match, %d of %d refusals\n", name, ok, n, refused, ne);
    cr_expect_eq(ok, n, "%s: %d of %d renders match", name, ok, n);
    cr_expect_eq(refused, ne, "%s: %d of %d error cases refused", name, refused, ne);
    cJSON_Delete(root);
    free(text);
    free(path);
    free(dir);
}

Test(chat, reference_qwen3) { check_reference("qwen3", CHAT_QWEN3); }
Test(chat, reference_qwen3_5) { check_reference("qwen3_5", CHAT_QWEN3_5); }
Test(chat, reference_deepseek_v3) { check_reference("deepseek_v3", CHAT_DEEPSEEK_V3); }

/* ---- hand-written cases (expectations read off each template's Jinja text) ---- */

static char *render(chat_kind kind, const char *msgs, const char *tools, int agp, int think) {
    chat_options opt = {agp, think, "<BOS>", "<EOS>"};
    char *out = NULL;
    mf_err err = {0};
    mf_status st = chat_render(kind, msgs, tools, &opt, &out, &err);
    cr_assert_eq(st, MF_OK, "refused: %s", err.msg);
    return out;
}

static void expect_render(chat_kind kind, const char *msgs, const char *tools, int agp, int think,
                          const char *want) {
    char *got = render(kind, msgs, tools, agp, think);
    cr_expect_str_eq(got, want);
    free(got);
}

/* Refused with a message that contains `needle`. */
static void expect_refused(chat_kind kind, const char *msgs, const char *tools, const char *needle) {
    chat_options opt = {1, -1, NULL, NULL};
    char *out = NULL;
    mf_err err = {0};
    mf_status st = chat_render(kind, msgs, tools, &opt, &out, &err);
    cr_expect_neq(st, MF_OK, "rendered %s", out ? out : "");
    cr_expect(strstr(err.msg, needle) != NULL, "message \"%s\" lacks \"%s\"", err.msg, needle);
    cr_expect_null(out);
    free(out);
}

Test(chat, detect) {
    cr_expect_eq(chat_detect(NULL), CHAT_UNKNOWN);
    cr_expect_eq(chat_detect(""), CHAT_UNKNOWN);
    cr_expect_eq(chat_detect("{% for message in messages %}{{ message.content }}{% endfor %}"),
                 CHAT_UNKNOWN);
    cr_expect_str_eq(chat_kind_name(CHAT_QWEN3), "qwen3");
    cr_expect_str_eq(chat_kind_name(CHAT_QWEN3_5), "qwen3_5");
    cr_expect_str_eq(chat_kind_name(CHAT_DEEPSEEK_V3), "deepseek_v3");
    cr_expect_str_eq(chat_kind_name(CHAT_UNKNOWN), "unknown");
    /* The Qwen3.5 template as shipped in the repository, and the same text with one more space. */
    size_t len = 0;
    char *t = th_read_file("tests/tokenizer/qwen3_5_chat_template.jinja", &len);
    cr_assert(t, "tests/tokenizer/qwen3_5_chat_template.jinja is missing");
    char *tt = realloc(t, len + 1);
    cr_assert(tt);
    tt[len] = 0;
    cr_expect_eq(chat_detect(tt), CHAT_QWEN3_5);
    char *t2 = malloc(len + 2);
    cr_assert(t2);
    memcpy(t2, tt, len);
    t2[len] = ' ';
    t2[len + 1] = 0;
    cr_expect_eq(chat_detect(t2), CHAT_UNKNOWN);
    free(t2);
    free(tt);
}

Test(chat, qwen3_basic) {
    const char *m = "[{\"role\": \"system\", \"content\": \"Be brief.\"},"
                    " {\"role\": \"user\", \"content\": \"Hi\"}]";
    expect_render(CHAT_QWEN3, m, NULL, 1, -1,
                  "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\n");
    expect_render(CHAT_QWEN3, m, NULL, 1, 0,
                  "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\n<think>\n\n</think>\n\n");
    expect_render(CHAT_QWEN3, m, "null", 0, 1,
                  "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}

Test(chat, qwen3_thinking) {
    /* Only the assistant turn after the last real user query keeps its reasoning; the earlier
     * one loses its <think> block. */
    const char *m = "[{\"role\": \"user\", \"content\": \"Q1\"},"
                    " {\"role\": \"assistant\", \"content\": \"<think>\\nr1\\n</think>\\n\\nA1\"},"
                    " {\"role\": \"user\", \"content\": \"Q2\"},"
                    " {\"role\": \"assistant\", \"content\": \"A2\", \"reasoning_content\": \"\\nr2\\n\"}]";
    expect_render(CHAT_QWEN3, m, NULL, 0, -1,
                  "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                  "<|im_start|>user\nQ2<|im_end|>\n"
                  "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n");
}

Test(chat, qwen3_tools) {
    /* tojson: ", " and ": " separators, key order kept, non-ASCII kept, numbers as Python prints
     * them (1.0 stays 1.0, 1e-05, big integers exact); arguments given as a string are printed
     * as is; tool responses are grouped into one user turn. */
    const char *tools = "[{\"type\": \"function\", \"function\": {\"name\": \"w\", \"d\": \"é\\n\\\"\","
                        " \"p\": {\"z\": 1.0, \"a\": 1e-5, \"n\": 123456789012345678901234567890,"
                        " \"b\": [true, null, -0, 0.1]}}}]";
    const char *m = "[{\"role\": \"user\", \"content\": \"go\"},"
                    " {\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": ["
                    "{\"type\": \"function\", \"function\": {\"name\": \"w\", \"arguments\": {\"x\": 2.50}}},"
                    "{\"name\": \"v\", \"arguments\": \"{\\\"raw\\\": 1}\"}]},"
                    " {\"role\": \"tool\", \"content\": \"r1\"}, {\"role\": \"tool\", \"content\": \"r2\"}]";
    expect_render(
        CHAT_QWEN3, m, tools, 1, -1,
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        "{\"type\": \"function\", \"function\": {\"name\": \"w\", \"d\": \"é\\n\\\"\", \"p\": {\"z\": 1.0,"
        " \"a\": 1e-05, \"n\": 123456789012345678901234567890, \"b\": [true, null, 0, 0.1]}}}\n"
        "</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\ngo<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"w\", \"arguments\": {\"x\": 2.5}}\n</tool_call>\n"
        "<tool_call>\n{\"name\": \"v\", \"arguments\": {\"raw\": 1}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n");
}

Test(chat, qwen3_python_values) {
    /* A tool response that is not a string is printed with Python's str(): repr quoting, None,
     * True, float repr; a duplicate key keeps its first place and its last value (json.loads). */
    const char *m = "[{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"tool\", \"content\":"
                    " {\"a\": 1, \"l\": [1.5e16, null, true, \"it's\", \"x\\ty\"], \"b\": 0.0001,"
                    " \"a\": -1E+2}}]";
    expect_render(CHAT_QWEN3, m, NULL, 0, -1,
                  "<|im_start|>user\nq<|im_end|>\n<|im_start|>user\n<tool_response>\n"
                  "{'a': -100.0, 'l': [1.5e+16, None, True, \"it's\", 'x\\ty'], 'b': 0.0001}\n"
                  "</tool_response><|im_end|>\n");
}

Test(chat, qwen3_refusals) {
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", "
                               "\"content\": \"b\"}, {\"role\": \"user\", \"content\": null}]",
                   NULL, "message 2");
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\"}]",
                   NULL, "message 1");
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": \"a\"}, 5]", NULL, "message 1");
    expect_refused(CHAT_QWEN3, "[]", NULL, "no messages");
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": \"a\"}", NULL, "not valid JSON");
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": 01}]", NULL, "number");
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": \"a\\u0000b\"}]", NULL, "u0000");
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": \"\xff\"}]", NULL, "UTF-8");
    expect_refused(CHAT_QWEN3, "[{\"role\": \"user\", \"content\": \"a\"}]", "[1]", "tool 0");
    expect_refused(CHAT_UNKNOWN, "[{\"role\": \"user\", \"content\": \"a\"}]", NULL, "unknown");
}

Test(chat, deepseek_v3) {
    /* bos first, system prompts joined, and the template's own quirk: is_first is never reset,
     * so only the first tool call of the conversation opens <｜tool▁calls▁begin｜>. */
    const char *m = "[{\"role\": \"system\", \"content\": \"S1\"}, {\"role\": \"user\", \"content\": \"U\"},"
                    " {\"role\": \"system\", \"content\": \"S2\"},"
                    " {\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"type\": \"function\","
                    " \"function\": {\"name\": \"f\", \"arguments\": \"{}\"}}]},"
                    " {\"role\": \"tool\", \"content\": \"o1\"}, {\"role\": \"tool\", \"content\": \"o2\"}]";
    expect_render(CHAT_DEEPSEEK_V3, m, NULL, 1, -1,
                  "<BOS>S1\n\nS2<｜User｜>U<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
                  "<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁outputs▁begin｜>"
                  "<｜tool▁output▁begin｜>o1<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>o2"
                  "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>");
    expect_render(CHAT_DEEPSEEK_V3, "[{\"role\": \"user\", \"content\": \"U\"}, {\"role\": "
                  "\"assistant\", \"content\": \"A\"}]", NULL, 1, -1,
                  "<BOS><｜User｜>U<｜Assistant｜>A<｜end▁of▁sentence｜><｜Assistant｜>");
    expect_refused(CHAT_DEEPSEEK_V3, "[{\"role\": \"user\", \"content\": \"U\"}, {\"role\": "
                   "\"assistant\", \"content\": null, \"tool_calls\": [{\"type\": \"function\", "
                   "\"function\": {\"name\": \"f\", \"arguments\": {}}}]}]", NULL, "message 1");
}

Test(chat, qwen3_5) {
    /* Content parts, trimming, the always-open <think> of the generation prompt, and XML-style
     * tool calls whose parameters are printed with str() or tojson. */
    const char *tools = "[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]";
    const char *m = "[{\"role\": \"system\", \"content\": \" sys \"},"
                    " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"look \"},"
                    " {\"type\": \"image\"}]},"
                    " {\"role\": \"assistant\", \"content\": \"<think>r</think>\\n\\nok\", \"tool_calls\":"
                    " [{\"function\": {\"name\": \"f\", \"arguments\": {\"a\": 1.0, \"b\": [1, \"x\"],"
                    " \"c\": null, \"d\": \"s\"}}}]},"
                    " {\"role\": \"tool\", \"content\": \" out \"}]";
    char *got = render(CHAT_QWEN3_5, m, tools, 1, -1);
    const char *want_tail =
        "</IMPORTANT>\n\nsys<|im_end|>\n"
        "<|im_start|>user\nlook <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr\n</think>\n\nok\n\n<tool_call>\n<function=f>\n"
        "<parameter=a>\n1.0\n</parameter>\n<parameter=b>\n[1, \"x\"]\n</parameter>\n"
        "<parameter=c>\nNone\n</parameter>\n<parameter=d>\ns\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nout\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n";
    const char *head = "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n"
                       "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\"}}\n</tools>";
    cr_expect(!strncmp(got, head, strlen(head)), "head: %s", got);
    size_t n = strlen(got), k = strlen(want_tail);
    cr_expect(n >= k && !strcmp(got + n - k, want_tail), "tail: %s", got);
    free(got);
    expect_refused(CHAT_QWEN3_5, "[{\"role\": \"assistant\", \"content\": \"a\"}]", NULL, "no user query");
    expect_refused(CHAT_QWEN3_5, "[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"system\","
                   " \"content\": \"s\"}]", NULL, "message 1");
    expect_refused(CHAT_QWEN3_5, "[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\","
                   " \"content\": 5}]", NULL, "message 1");
}

/* test_tokenizer.c - tests of src/text/tokenizer.c: every case of tests/tokenizer/<name>/encode.json
 * (Hugging Face `tokenizers` on the real Qwen3 and DeepSeek-V3 tokenizers) reproduced exactly,
 * the incremental decoder on each, lossy decoding, refusals, and a synthetic tokenizer.json for
 * features those two files do not use. Not chat templates (test_chat.c). */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "helpers.h"
#include "text/tokenizer.h"

/* ---- where things are ---- */

static const char *tok_root(void) {
    const char *d = getenv("MOEFLUX_TOKENIZERS");
    return d && *d ? d : "build/tokenizers";
}

/* Loads $MOEFLUX_TOKENIZERS/<name>; with_config: tokenizer_config.json too (tok_load_dir). A
 * missing tokenizer fails the test: nothing here is skipped. */
static tokenizer *load_real(const char *name, int with_config) {
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/%s", tok_root(), name);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    struct stat st;
    if (stat(path, &st))
        cr_assert_fail("%s is missing: run tools/fetch-tokenizers.sh %s (or set MOEFLUX_TOKENIZERS)", path, tok_root());
    mf_err err = {0};
    tokenizer *t = NULL;
    mf_status s;
    if (with_config) {
        s = tok_load_dir(&t, dir, &err);
    } else {
        size_t len;
        char *json = th_read_file(path, &len);
        cr_assert(json, "cannot read %s", path);
        s = tok_load(&t, json, len, NULL, path, &err);
        free(json);
    }
    cr_assert_eq(s, MF_OK, "loading %s: %s", dir, err.msg);
    return t;
}

static int32_t *json_ids(const cJSON *a, size_t *n) {
    *n = (size_t)cJSON_GetArraySize(a);
    int32_t *v = malloc((*n + 1) * sizeof *v);
    cr_assert(v);
    size_t i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, a) v[i++] = (int32_t)e->valuedouble;
    return v;
}

static int ids_equal(const int32_t *a, size_t na, const int32_t *b, size_t nb) {
    return na == nb && (na == 0 || !memcmp(a, b, na * sizeof *a));
}

static int utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = p[i], len = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
                                            : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
        if (!len || i + len > n) return 0;
        unsigned lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80, hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
        if (len > 1 && (p[i + 1] < lo || p[i + 1] > hi)) return 0;
        for (unsigned k = 2; k < len; k++)
            if ((p[i + k] & 0xc0) != 0x80) return 0;
        i += len;
    }
    return 1;
}

static void encode_str(const tokenizer *t, const char *text, int parse_special, int add_special, int32_t **ids,
                       size_t *n) {
    mf_err err = {0};
    mf_status s = tok_encode(t, text, strlen(text), parse_special, add_special, ids, n, &err);
    cr_assert_eq(s, MF_OK, "encode \"%s\": %s", text, err.msg);
}

static char *decode_ids(const tokenizer *t, const int32_t *ids, size_t n, int skip, size_t *len) {
    mf_err err = {0};
    char *out = NULL;
    mf_status s = tok_decode(t, ids, n, skip, &out, len, &err);
    cr_assert_eq(s, MF_OK, "decode: %s", err.msg);
    return out;
}

/* Pushes ids through a tok_stream; every piece must be valid UTF-8; returns the concatenation. */
static char *stream_ids(const tokenizer *t, const int32_t *ids, size_t n, int skip, size_t *len, int *bad_piece) {
    tok_stream s;
    tok_stream_init(&s, t, skip);
    size_t cap = 64, w = 0;
    char *all = malloc(cap), piece[1024];
    cr_assert(all);
    *bad_piece = 0;
    for (size_t i = 0; i <= n; i++) {
        size_t k = i < n ? tok_stream_push(&s, ids[i], piece, sizeof piece) : tok_stream_flush(&s, piece, sizeof piece);
        if (!utf8_valid(piece, k)) *bad_piece = 1;
        if (w + k + 1 > cap) {
            cap = 2 * (w + k + 1);
            all = realloc(all, cap);
            cr_assert(all);
        }
        memcpy(all + w, piece, k);
        w += k;
    }
    all[w] = '\0';
    *len = w;
    return all;
}

/* ---- the reference cases ---- */

/* Checks every case of tests/tokenizer/<name>/encode.json: ids (add_special_tokens False) and
 * ids_special (True) with tokenizer.json alone, as `tokenizers` loads it; the same with
 * tokenizer_config.json, where cfg_bos is the BOS id its add_bos_token adds (-1: none; see
 * tokenizer.c on when the config is honoured); decode(ids) == decoded, and the stream decoder
 * gives the same text in valid UTF-8 pieces. */
static void check_reference(const char *name, int32_t cfg_bos) {
    char path[4096];
    snprintf(path, sizeof path, "%s/../tokenizer/%s/encode.json", th_fixtures(), name);
    size_t len;
    char *json = th_read_file(path, &len);
    cr_assert(json, "cannot read %s (the reference data of the tokenizer tests)", path);
    cJSON *root = cJSON_ParseWithLength(json, len);
    free(json);
    cr_assert(root, "%s: malformed JSON", path);
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(root, "cases");
    cr_assert(cJSON_IsArray(cases) && cJSON_GetArraySize(cases) >= 600, "%s: expected >= 600 cases", path);

    tokenizer *plain = load_real(name, 0), *cfg = load_real(name, 1);
    int n_cases = 0, bad = 0, bad_ids = 0, bad_sp = 0, bad_cfg = 0, bad_dec = 0, bad_stream = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const cJSON *jt = cJSON_GetObjectItemCaseSensitive(c, "text");
        const cJSON *jd = cJSON_GetObjectItemCaseSensitive(c, "decoded");
        cr_assert(cJSON_IsString(jt) && cJSON_IsString(jd), "%s: case %d lacks text/decoded", path, n_cases);
        const char *text = jt->valuestring, *decoded = jd->valuestring;
        size_t n_ref, n_sp_ref, n, n_sp, n_cfg, n_cfg0;
        int32_t *ref = json_ids(cJSON_GetObjectItemCaseSensitive(c, "ids"), &n_ref);
        int32_t *ref_sp = json_ids(cJSON_GetObjectItemCaseSensitive(c, "ids_special"), &n_sp_ref);
        int32_t *ids, *ids_sp, *ids_cfg, *ids_cfg0;
        encode_str(plain, text, 1, 0, &ids, &n);
        encode_str(plain, text, 1, 1, &ids_sp, &n_sp);
        encode_str(cfg, text, 1, 1, &ids_cfg, &n_cfg);
        encode_str(cfg, text, 1, 0, &ids_cfg0, &n_cfg0);
        int ok_ids = ids_equal(ids, n, ref, n_ref) && ids_equal(ids_cfg0, n_cfg0, ref, n_ref);
        int ok_sp = ids_equal(ids_sp, n_sp, ref_sp, n_sp_ref);
        int ok_cfg = cfg_bos < 0 ? ids_equal(ids_cfg, n_cfg, ref_sp, n_sp_ref)
                                 : n_cfg == n_ref + 1 && ids_cfg[0] == cfg_bos && ids_equal(ids_cfg + 1, n_ref, ref, n_ref);
        size_t dlen, slen;
        char *dec = decode_ids(plain, ref, n_ref, 0, &dlen);
        int ok_dec = dlen == strlen(decoded) && !memcmp(dec, decoded, dlen);
        int bad_piece;
        char *st = stream_ids(plain, ref, n_ref, 0, &slen, &bad_piece);
        int ok_stream = !bad_piece && slen == dlen && !memcmp(st, dec, dlen);
        if (!(ok_ids && ok_sp && ok_cfg && ok_dec && ok_stream)) {
            if (bad < 10)
                cr_log_error("%s case %d (%.60s): ids %s, ids_special %s, with config %s, decoded %s, stream %s", name,
                             n_cases, text, ok_ids ? "ok" : "DIFFER", ok_sp ? "ok" : "DIFFER", ok_cfg ? "ok" : "DIFFER",
                             ok_dec ? "ok" : "DIFFER", ok_stream ? "ok" : "DIFFER");
            bad++;
        }
        bad_ids += !ok_ids, bad_sp += !ok_sp, bad_cfg += !ok_cfg, bad_dec += !ok_dec, bad_stream += !ok_stream;
        n_cases++;
        free(ref), free(ref_sp), free(ids), free(ids_sp), free(ids_cfg), free(ids_cfg0), free(dec), free(st);
    }
    cr_assert_eq(bad, 0, "%s: %d of %d cases differ (ids %d, ids_special %d, with config %d, decoded %d, stream %d)",
                 name, bad, n_cases, bad_ids, bad_sp, bad_cfg, bad_dec, bad_stream);
    tok_free(plain);
    tok_free(cfg);
    cJSON_Delete(root);
}

Test(tokenizer, qwen3_reference, .timeout = 120) {
    check_reference("qwen3", -1); /* add_bos_token false, no bos_token */
}

Test(tokenizer, deepseek_v3_reference, .timeout = 120) {
    check_reference("deepseek_v3", -1); /* add_bos_token true, but only the post-processor adds tokens */
}

/* The ids of every chat.json rendering (test_chat.c checks the texts, this the ids): the text
 * encoded with added tokens parsed and no post-processing. qwen3_5's ids come from the qwen3
 * tokenizer (see tests/tokenizer/README.md). */
static void check_chat_ids(const char *refs, const char *tok_name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/../tokenizer/%s/chat.json", th_fixtures(), refs);
    size_t len;
    char *json = th_read_file(path, &len);
    cr_assert(json, "cannot read %s", path);
    cJSON *root = cJSON_ParseWithLength(json, len);
    free(json);
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(root, "cases");
    cr_assert(cJSON_IsArray(cases) && cJSON_GetArraySize(cases) >= 40, "%s: expected >= 40 cases", path);
    tokenizer *t = load_real(tok_name, 1);
    int n_cases = 0, bad = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        const cJSON *jt = cJSON_GetObjectItemCaseSensitive(c, "text");
        cr_assert(cJSON_IsString(jt), "%s: case %d has no text", path, n_cases);
        size_t n_ref, n;
        int32_t *ref = json_ids(cJSON_GetObjectItemCaseSensitive(c, "ids"), &n_ref), *ids;
        encode_str(t, jt->valuestring, 1, 0, &ids, &n);
        if (!ids_equal(ids, n, ref, n_ref)) {
            if (bad < 10) cr_log_error("%s chat case %d (%.60s): ids differ", refs, n_cases, jt->valuestring);
            bad++;
        }
        n_cases++;
        free(ref), free(ids);
    }
    cr_assert_eq(bad, 0, "%s: %d of %d chat renderings encode differently", refs, bad, n_cases);
    tok_free(t);
    cJSON_Delete(root);
}

Test(tokenizer, chat_rendering_ids, .timeout = 120) {
    check_chat_ids("qwen3", "qwen3");
    check_chat_ids("deepseek_v3", "deepseek_v3");
    check_chat_ids("qwen3_5", "qwen3");
}

/* ---- facts read off the tokenizer files ---- */

static void expect_ids(const tokenizer *t, const char *text, int parse_special, int add_special,
                       const int32_t *want, size_t n_want) {
    int32_t *ids;
    size_t n;
    encode_str(t, text, parse_special, add_special, &ids, &n);
    cr_expect(ids_equal(ids, n, want, n_want), "\"%s\": got %zu ids, want %zu (first %d)", text, n, n_want,
              n ? ids[0] : -1);
    free(ids);
}

Test(tokenizer, qwen3_vocab_and_added_tokens) {
    tokenizer *t = load_real("qwen3", 1);
    cr_expect_eq(tok_vocab_size(t), 151669);
    cr_expect_eq(tok_token_id(t, "<|endoftext|>"), 151643);
    cr_expect_eq(tok_token_id(t, "<|im_start|>"), 151644);
    cr_expect_eq(tok_token_id(t, "<|im_end|>"), 151645);
    cr_expect_eq(tok_token_id(t, "<think>"), 151667);
    cr_expect(tok_is_special(t, 151644));
    cr_expect(!tok_is_special(t, 151667), "<think> is added but not special");
    cr_expect(!tok_is_special(t, 9707));
    cr_expect_str_eq(tok_token_text(t, 9707), "Hello");
    cr_expect_str_eq(tok_token_text(t, 1879), "\304\240world"); /* "Ġworld" */
    cr_expect_str_eq(tok_token_text(t, 151645), "<|im_end|>");
    cr_expect_null(tok_token_text(t, 151669));
    cr_expect_null(tok_token_text(t, -1));
    cr_expect_eq(tok_token_id(t, "no such token"), -1);

    expect_ids(t, "Hello world!", 1, 0, (int32_t[]){9707, 1879, 0}, 3);
    expect_ids(t, "Hello world!", 1, 1, (int32_t[]){9707, 1879, 0}, 3); /* no BOS/EOS for Qwen3 */
    expect_ids(t, "<|im_start|>user", 1, 0, (int32_t[]){151644, 872}, 2);
    expect_ids(t, "", 1, 1, NULL, 0);

    /* parse_special=0: every added token is text, special or not */
    int32_t *ids;
    size_t n;
    encode_str(t, "<|im_start|><think>", 0, 0, &ids, &n);
    cr_expect(n > 2);
    for (size_t i = 0; i < n; i++) cr_expect(ids[i] < 151643, "id %d at %zu is an added token", ids[i], i);
    size_t len;
    char *s = decode_ids(t, ids, n, 1, &len);
    cr_expect_str_eq(s, "<|im_start|><think>");
    free(s);
    free(ids);

    /* skip_special drops special tokens only */
    int32_t seq[] = {151644, 9707, 151667, 151645, 99999999, -5};
    s = decode_ids(t, seq, 6, 0, &len);
    cr_expect_str_eq(s, "<|im_start|>Hello<think><|im_end|>"); /* unknown ids are dropped */
    free(s);
    s = decode_ids(t, seq, 6, 1, &len);
    cr_expect_str_eq(s, "Hello<think>");
    free(s);
    tok_free(t);
}

Test(tokenizer, deepseek_v3_vocab_and_bos) {
    tokenizer *plain = load_real("deepseek_v3", 0), *cfg = load_real("deepseek_v3", 1);
    cr_expect_eq(tok_vocab_size(cfg), 128815);
    cr_expect_eq(tok_token_id(cfg, "<\357\275\234begin\342\226\201of\342\226\201sentence\357\275\234>"), 0);
    cr_expect_eq(tok_token_id(cfg, "<\357\275\234end\342\226\201of\342\226\201sentence\357\275\234>"), 1);
    cr_expect(tok_is_special(cfg, 0) && tok_is_special(cfg, 1) && tok_is_special(cfg, 128000));
    expect_ids(plain, "hello", 1, 1, (int32_t[]){33310}, 1);   /* tokenizers: ByteLevel adds nothing */
    expect_ids(cfg, "hello", 1, 1, (int32_t[]){33310}, 1);     /* as transformers 5.17: no BOS */
    expect_ids(cfg, "hello", 1, 0, (int32_t[]){33310}, 1);
    tok_free(plain);
    tok_free(cfg);
}

/* ---- one tokenizer, several threads ---- */

typedef struct enc_job {
    const tokenizer *t;
    const char *text;
    size_t len;
    int32_t *ids; /* malloc'd by tok_encode */
    size_t n;
    mf_status st;
} enc_job;

static void *enc_thread(void *arg) {
    enc_job *j = arg;
    mf_err err = {0};
    j->st = tok_encode(j->t, j->text, j->len, 1, 0, &j->ids, &j->n, &err);
    return NULL;
}

Test(tokenizer, concurrent_encodes_agree) {
    tokenizer *t = load_real("qwen3", 0);
    /* varied words, so that the threads fill and read the shared word cache at once */
    size_t cap = 1 << 20, len = 0;
    char *text = malloc(cap);
    cr_assert(text);
    for (unsigned i = 0; len + 64 < cap; i++)
        len += (size_t)snprintf(text + len, cap - len, "word%u Zeta%u, %u don't\n", i * 7919u % 10007u, i % 97u, i);
    enc_job ref = {t, text, len, NULL, 0, MF_OK};
    enc_thread(&ref);
    cr_assert_eq(ref.st, MF_OK);
    tok_free(t);
    t = load_real("qwen3", 0); /* an empty cache again */
    enc_job jobs[4];
    pthread_t th[4];
    for (int k = 0; k < 4; k++) {
        jobs[k] = (enc_job){t, text, len, NULL, 0, MF_OK};
        cr_assert_eq(pthread_create(&th[k], NULL, enc_thread, &jobs[k]), 0);
    }
    for (int k = 0; k < 4; k++) {
        pthread_join(th[k], NULL);
        cr_expect_eq(jobs[k].st, MF_OK);
        cr_expect(ids_equal(jobs[k].ids, jobs[k].n, ref.ids, ref.n), "thread %d: %zu ids, want %zu", k, jobs[k].n, ref.n);
        free(jobs[k].ids);
    }
    free(ref.ids);
    free(text);
    tok_free(t);
}

/* ---- decoding of broken UTF-8 ---- */

/* The GPT-2 byte-level character of byte b (UTF-8 in out, NUL-terminated). */
static void byte_char(unsigned b, char out[3]) {
    unsigned cp = b, n = 0;
    int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
    if (!printable) {
        for (unsigned k = 0; k < b; k++)
            if (!((k >= '!' && k <= '~') || (k >= 0xa1 && k <= 0xac) || (k >= 0xae && k <= 0xff))) n++;
        cp = 256 + n;
    }
    if (cp < 0x80) out[0] = (char)cp, out[1] = 0;
    else out[0] = (char)(0xc0 | cp >> 6), out[1] = (char)(0x80 | (cp & 0x3f)), out[2] = 0;
}

Test(tokenizer, lossy_decoding_as_from_utf8_lossy) {
    tokenizer *t = load_real("qwen3", 0);
    static const struct {
        const char *bytes, *want; /* token bytes, one single-byte token each; String::from_utf8_lossy */
    } cases[] = {
        {"\342\202\254", "\342\202\254"},                         /* € whole */
        {"\342\202a", "\357\277\275a"},                           /* E2 82: one maximal prefix */
        {"\360\200", "\357\277\275\357\277\275"},                 /* F0 80: 80 is no F0 continuation */
        {"\355\240\200", "\357\277\275\357\277\275\357\277\275"}, /* a surrogate: three */
        {"\364\220\200\200", "\357\277\275\357\277\275\357\277\275\357\277\275"}, /* > U+10FFFF */
        {"\300\200", "\357\277\275\357\277\275"},                 /* overlong */
        {"\377a\303", "\357\277\275a\357\277\275"},               /* FF; C3 cut off at the end */
        {"\340\240", "\357\277\275"},                             /* E0 A0 cut off: one */
        {"\360\237\230\200", "\360\237\230\200"},                 /* an emoji byte by byte */
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        size_t n = strlen(cases[k].bytes), len, slen;
        int32_t ids[8];
        for (size_t i = 0; i < n; i++) {
            char c[3];
            byte_char((unsigned char)cases[k].bytes[i], c);
            ids[i] = tok_token_id(t, c);
            cr_assert(ids[i] >= 0, "no token for byte %02x", (unsigned char)cases[k].bytes[i]);
        }
        char *s = decode_ids(t, ids, n, 0, &len);
        cr_expect(len == strlen(cases[k].want) && !memcmp(s, cases[k].want, len), "case %zu", k);
        int bad_piece;
        char *st = stream_ids(t, ids, n, 0, &slen, &bad_piece);
        cr_expect(!bad_piece && slen == len && !memcmp(st, s, len), "stream, case %zu", k);
        free(s);
        free(st);
    }
    /* the emoji comes out whole on its last byte, nothing before */
    tok_stream s;
    tok_stream_init(&s, t, 0);
    char out[1024];
    const char *emoji = "\360\237\230\200";
    for (int i = 0; i < 4; i++) {
        char c[3];
        byte_char((unsigned char)emoji[i], c);
        size_t k = tok_stream_push(&s, tok_token_id(t, c), out, sizeof out);
        cr_expect_eq(k, i < 3 ? 0u : 4u);
    }
    cr_expect_eq(tok_stream_flush(&s, out, sizeof out), 0u);
    tok_free(t);
}

/* ---- refusals ---- */

Test(tokenizer, invalid_utf8_input_refused) {
    tokenizer *t = load_real("qwen3", 0);
    static const char *bad[] = {"\377", "abc\303", "\300\200", "\355\240\200", "\364\220\200\200", "a\200b"};
    for (size_t k = 0; k < sizeof bad / sizeof *bad; k++) {
        mf_err err = {0};
        int32_t *ids = NULL;
        size_t n = 0;
        cr_expect_eq(tok_encode(t, bad[k], strlen(bad[k]), 1, 0, &ids, &n, &err), MF_ERR_ARG, "case %zu", k);
        cr_expect(strstr(err.msg, "UTF-8"), "message: %s", err.msg);
        cr_expect_null(ids);
    }
    /* NUL is valid UTF-8 */
    mf_err err = {0};
    int32_t *ids;
    size_t n;
    cr_expect_eq(tok_encode(t, "a\0b", 3, 1, 0, &ids, &n, &err), MF_OK);
    cr_expect_eq(n, 3u);
    free(ids);
    tok_free(t);
}

static void expect_refused(const char *json, mf_status want, const char *needle) {
    tokenizer *t = NULL;
    mf_err err = {0};
    mf_status s = tok_load(&t, json, strlen(json), NULL, "bad.json", &err);
    cr_expect_eq(s, want, "%s: status %d, want %d (%s)", json, s, want, err.msg);
    cr_expect(strstr(err.msg, "bad.json") && strstr(err.msg, needle), "%s: message \"%s\" lacks \"%s\"", json,
              err.msg, needle);
    cr_expect_null(t);
    tok_free(t);
}

#define MODEL "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2}, \"merges\": [\"a b\"]}"

Test(tokenizer, malformed_tokenizer_json_refused) {
    expect_refused("{\"model\": ", MF_ERR_FORMAT, "malformed JSON");
    expect_refused("[1, 2]", MF_ERR_FORMAT, "not a JSON object");
    expect_refused("{}", MF_ERR_FORMAT, "model");
    expect_refused("{\"model\": {\"type\": \"BPE\", \"merges\": []}}", MF_ERR_FORMAT, "model.vocab");
    expect_refused("{\"model\": {\"type\": \"BPE\", \"vocab\": {}}}", MF_ERR_FORMAT, "model.merges");
    expect_refused("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"x\"}, \"merges\": []}}", MF_ERR_FORMAT,
                   "model.vocab[\"a\"]");
    expect_refused("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a c\"]}}", MF_ERR_FORMAT,
                   "\"c\" is not in the vocab");
    expect_refused("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a\"]}}", MF_ERR_FORMAT,
                   "model.merges[0]");
    expect_refused("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}", MF_ERR_UNSUPPORTED, "WordPiece");
    expect_refused("{" MODEL ", \"normalizer\": {\"type\": \"Lowercase\"}}", MF_ERR_UNSUPPORTED, "Lowercase");
    expect_refused("{" MODEL ", \"pre_tokenizer\": {\"type\": \"Metaspace\"}}", MF_ERR_UNSUPPORTED, "Metaspace");
    expect_refused("{" MODEL ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, "
                   "\"behavior\": \"Isolated\", \"invert\": false}}", MF_ERR_FORMAT, "bad regex");
    expect_refused("{" MODEL ", \"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"x\"}, "
                   "\"behavior\": \"Sideways\", \"invert\": false}}", MF_ERR_UNSUPPORTED, "Sideways");
    expect_refused("{" MODEL ", \"post_processor\": {\"type\": \"BlingFire\"}}", MF_ERR_UNSUPPORTED, "BlingFire");
    expect_refused("{" MODEL ", \"decoder\": {\"type\": \"WordPiece\"}}", MF_ERR_UNSUPPORTED, "WordPiece");
    expect_refused("{" MODEL ", \"added_tokens\": [{\"content\": \"x\"}]}", MF_ERR_FORMAT, "added_tokens[0]");

    /* the real file cut in half */
    char path[4200];
    snprintf(path, sizeof path, "%s/qwen3/tokenizer.json", tok_root());
    size_t len;
    char *json = th_read_file(path, &len);
    cr_assert(json, "%s is missing: run tools/fetch-tokenizers.sh %s", path, tok_root());
    tokenizer *t = NULL;
    mf_err err = {0};
    cr_expect_eq(tok_load(&t, json, len / 2, NULL, "half.json", &err), MF_ERR_FORMAT);
    cr_expect(strstr(err.msg, "half.json: malformed JSON"), "%s", err.msg);
    free(json);
    cr_expect_eq(tok_load_dir(&t, "/nonexistent/tokenizer/dir", &err), MF_ERR_IO);
    cr_expect(strstr(err.msg, "/nonexistent/tokenizer/dir/tokenizer.json"), "%s", err.msg);
}

/* ---- a synthetic tokenizer for what the real ones do not use ----
 * Vocabulary: the 256 byte-level characters (id = byte) and 15 merges (ids 256-270); added tokens
 * "<s>" and "</s>" (special), "[L]" lstrip, "[R]" rstrip, "[W]" single_word, "norm" normalized.
 * Their "id"s (300-305) disagree with what tokenizers assigns (271-276): tokenizers' ids win.
 * Expected values: tokenizers 0.23.2 on the same JSON. */

typedef enum syn_kind {
    SYN_REMOVED,         /* Split \d Removed, ByteLevel */
    SYN_MERGED_PREV_INV, /* Split \d MergedWithPrevious invert */
    SYN_MERGED_NEXT,     /* Split \d MergedWithNext */
    SYN_CONTIGUOUS_INV,  /* Split \d Contiguous invert */
    SYN_STRING_NEXT,     /* Split String "--" MergedWithNext; merges as "a b" strings */
    SYN_DIGITS_PREFIX,   /* Digits individual, ByteLevel add_prefix_space + use_regex */
    SYN_DIGITS_CONTIG,   /* Digits not individual, ByteLevel */
    SYN_TEMPLATE_NFKC,   /* NFKC, ByteLevel add_prefix_space + use_regex, TemplateProcessing <s> A </s> */
    SYN_NO_DECODER,      /* ByteLevel, no decoder: tokens joined by spaces */
    SYN_COUNT
} syn_kind;

static char *syn_json(syn_kind k) {
    static const char *merges[][2] = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\304\240", "w"},
                                      {"o", "r"}, {"\304\240w", "or"}, {"\304\240wor", "l"}, {"\304\240worl", "d"},
                                      {"1", "2"}, {"12", "3"}, {"\304\240", "h"}, {"e", "llo"}, {"ll", "o"},
                                      {"\304\240h", "ello"}};
    static const char *pre[SYN_COUNT] = {
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\d\"},\"behavior\":\"Removed\",\"invert\":false},BL]}",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\d\"},\"behavior\":\"MergedWithPrevious\",\"invert\":true},BL]}",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\d\"},\"behavior\":\"MergedWithNext\",\"invert\":false},BL]}",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\d\"},\"behavior\":\"Contiguous\",\"invert\":true},BL]}",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"String\":\"--\"},\"behavior\":\"MergedWithNext\",\"invert\":false},BL]}",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Digits\",\"individual_digits\":true},BLR]}",
        "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Digits\",\"individual_digits\":false},BL]}",
        "BLR",
        "BL"};
    const char *bl = "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,\"use_regex\":false}";
    const char *blr = "{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":true,\"use_regex\":true}";
    cJSON *root = cJSON_CreateObject(), *model = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab"), *mj = cJSON_AddArrayToObject(model, "merges");
    for (unsigned b = 0; b < 256; b++) {
        char c[3];
        byte_char(b, c);
        cJSON_AddNumberToObject(vocab, c, b);
    }
    for (size_t i = 0; i < sizeof merges / sizeof *merges; i++) {
        char joined[32];
        snprintf(joined, sizeof joined, "%s%s", merges[i][0], merges[i][1]);
        cJSON_AddNumberToObject(vocab, joined, 256 + (double)i);
        if (k == SYN_STRING_NEXT) {
            snprintf(joined, sizeof joined, "%s %s", merges[i][0], merges[i][1]);
            cJSON_AddItemToArray(mj, cJSON_CreateString(joined));
        } else {
            cJSON_AddItemToArray(mj, cJSON_CreateStringArray(merges[i], 2));
        }
    }
    static const struct { const char *content, *flag; int special; } added[] = {
        {"<s>", NULL, 1}, {"</s>", NULL, 1}, {"[L]", "lstrip", 0}, {"[R]", "rstrip", 0}, {"[W]", "single_word", 0},
        {"norm", "normalized", 0}};
    cJSON *aj = cJSON_AddArrayToObject(root, "added_tokens");
    for (int i = 0; i < 6; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", 300 + i);
        cJSON_AddStringToObject(a, "content", added[i].content);
        static const char *flags[] = {"single_word", "lstrip", "rstrip", "normalized"};
        for (int f = 0; f < 4; f++)
            cJSON_AddBoolToObject(a, flags[f], added[i].flag && !strcmp(added[i].flag, flags[f]));
        cJSON_AddBoolToObject(a, "special", added[i].special);
        cJSON_AddItemToArray(aj, a);
    }
    /* the pre-tokenizer text with BL/BLR written out */
    char pbuf[1024] = "";
    for (const char *p = pre[k]; *p;) {
        if (!strncmp(p, "BLR", 3)) strcat(pbuf, blr), p += 3;
        else if (!strncmp(p, "BL", 2)) strcat(pbuf, bl), p += 2;
        else strncat(pbuf, p++, 1);
    }
    cJSON_AddItemToObject(root, "pre_tokenizer", cJSON_Parse(pbuf));
    if (k == SYN_TEMPLATE_NFKC) {
        cJSON_AddItemToObject(root, "normalizer", cJSON_Parse("{\"type\":\"NFKC\"}"));
        cJSON_AddItemToObject(root, "post_processor", cJSON_Parse(
            "{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},"
            "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}},{\"SpecialToken\":{\"id\":\"</s>\",\"type_id\":0}}],"
            "\"pair\":[{\"Sequence\":{\"id\":\"A\",\"type_id\":0}},{\"Sequence\":{\"id\":\"B\",\"type_id\":1}}],"
            "\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[300],\"tokens\":[\"<s>\"]},"
            "\"</s>\":{\"id\":\"</s>\",\"ids\":[301],\"tokens\":[\"</s>\"]}}}"));
    }
    if (k != SYN_NO_DECODER)
        cJSON_AddItemToObject(root, "decoder", cJSON_Parse(
            "{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":true,\"use_regex\":true}"));
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    cr_assert(s);
    return s;
}

static const struct syn_case {
    syn_kind kind;
    const char *text;
    int32_t ids[24];    /* -1 terminated */
    int32_t ids_sp[24]; /* add_special_tokens=True; -2: the same as ids */
    const char *decoded; /* NULL: the text itself */
} syn_cases[] = {
    {SYN_REMOVED, "ab12cd3", {97, 98, 99, 100, -1}, {-2}, "abcd"},
    {SYN_REMOVED, "1a22b333", {97, 98, -1}, {-2}, "ab"},
    {SYN_REMOVED, "hello--world 123", {259, 45, 45, 119, 261, 108, 100, 32, -1}, {-2}, "hello--world "},
    {SYN_REMOVED, "x--y----z--", {120, 45, 45, 121, 45, 45, 45, 45, 122, 45, 45, -1}, {-2}, NULL},
    {SYN_MERGED_PREV_INV, "ab12cd3", {97, 98, 49, 50, 99, 100, 51, -1}, {-2}, NULL},
    {SYN_MERGED_PREV_INV, "1a22b333", {49, 97, 50, 50, 98, 51, 51, 51, -1}, {-2}, NULL},
    {SYN_MERGED_PREV_INV, "hello--world 123", {259, 45, 45, 119, 261, 108, 100, 32, 49, 50, 51, -1}, {-2}, NULL},
    {SYN_MERGED_PREV_INV, "x--y----z--", {120, 45, 45, 121, 45, 45, 45, 45, 122, 45, 45, -1}, {-2}, NULL},
    {SYN_MERGED_NEXT, "ab12cd3", {97, 98, 49, 50, 99, 100, 51, -1}, {-2}, NULL},
    {SYN_MERGED_NEXT, "1a22b333", {49, 97, 50, 50, 98, 51, 51, 51, -1}, {-2}, NULL},
    {SYN_MERGED_NEXT, "hello--world 123", {259, 45, 45, 119, 261, 108, 100, 32, 49, 50, 51, -1}, {-2}, NULL},
    {SYN_MERGED_NEXT, "x--y----z--", {120, 45, 45, 121, 45, 45, 45, 45, 122, 45, 45, -1}, {-2}, NULL},
    {SYN_CONTIGUOUS_INV, "ab12cd3", {97, 98, 265, 99, 100, 51, -1}, {-2}, NULL},
    {SYN_CONTIGUOUS_INV, "1a22b333", {49, 97, 50, 50, 98, 51, 51, 51, -1}, {-2}, NULL},
    {SYN_CONTIGUOUS_INV, "hello--world 123", {259, 45, 45, 119, 261, 108, 100, 32, 266, -1}, {-2}, NULL},
    {SYN_CONTIGUOUS_INV, "x--y----z--", {120, 45, 45, 121, 45, 45, 45, 45, 122, 45, 45, -1}, {-2}, NULL},
    {SYN_STRING_NEXT, "ab12cd3", {97, 98, 265, 99, 100, 51, -1}, {-2}, NULL},
    {SYN_STRING_NEXT, "1a22b333", {49, 97, 50, 50, 98, 51, 51, 51, -1}, {-2}, NULL},
    {SYN_STRING_NEXT, "hello--world 123", {259, 45, 45, 119, 261, 108, 100, 32, 266, -1}, {-2}, NULL},
    {SYN_STRING_NEXT, "x--y----z--", {120, 45, 45, 121, 45, 45, 45, 45, 122, 45, 45, -1}, {-2}, NULL},
    {SYN_DIGITS_PREFIX, "ab12cd3", {32, 97, 98, 32, 49, 32, 50, 32, 99, 100, 32, 51, -1}, {-2}, " ab 1 2 cd 3"},
    {SYN_DIGITS_PREFIX, "1a22b333", {32, 49, 32, 97, 32, 50, 32, 50, 32, 98, 32, 51, 32, 51, 32, 51, -1}, {-2}, " 1 a 2 2 b 3 3 3"},
    {SYN_DIGITS_PREFIX, "hello--world 123", {32, 259, 45, 45, 119, 261, 108, 100, 32, 32, 49, 32, 50, 32, 51, -1}, {-2}, " hello--world  1 2 3"},
    {SYN_DIGITS_PREFIX, "x--y----z--", {32, 120, 45, 45, 121, 45, 45, 45, 45, 122, 45, 45, -1}, {-2}, " x--y----z--"},
    {SYN_DIGITS_PREFIX, "h\303\251llo w\303\266rld 12", {267, 195, 169, 269, 260, 195, 182, 114, 108, 100, 32, 32, 49, 32, 50, -1}, {-2}, " h\303\251llo w\303\266rld  1 2"},
    {SYN_DIGITS_CONTIG, "ab12cd3", {97, 98, 265, 99, 100, 51, -1}, {-2}, NULL},
    {SYN_DIGITS_CONTIG, "1a22b333", {49, 97, 50, 50, 98, 51, 51, 51, -1}, {-2}, NULL},
    {SYN_DIGITS_CONTIG, "hello--world 123", {259, 45, 45, 119, 261, 108, 100, 32, 266, -1}, {-2}, NULL},
    {SYN_DIGITS_CONTIG, "x--y----z--", {120, 45, 45, 121, 45, 45, 45, 45, 122, 45, 45, -1}, {-2}, NULL},
    {SYN_TEMPLATE_NFKC, "a [L] b  [L]c", {32, 97, 273, 32, 98, 273, 32, 99, -1}, {300, 32, 97, 273, 32, 98, 273, 32, 99, 301, -1}, " a[L] b[L] c"},
    {SYN_TEMPLATE_NFKC, "x [R]  y[R]z", {32, 120, 32, 274, 32, 121, 274, 32, 122, -1}, {300, 32, 120, 32, 274, 32, 121, 274, 32, 122, 301, -1}, " x [R] y[R] z"},
    {SYN_TEMPLATE_NFKC, "a[W]b [W] c[W]", {32, 97, 91, 87, 93, 98, 32, 275, 32, 99, 91, 87, 93, -1}, {300, 32, 97, 91, 87, 93, 98, 32, 275, 32, 99, 91, 87, 93, 301, -1}, " a[W]b [W] c[W]"},
    {SYN_TEMPLATE_NFKC, "norm \357\275\216\357\275\217\357\275\222\357\275\215 Norm", {276, 32, 276, 32, 78, 261, 109, -1}, {300, 276, 32, 276, 32, 78, 261, 109, 301, -1}, "norm norm Norm"},
    {SYN_TEMPLATE_NFKC, "<s>hello</s> <s>", {271, 32, 259, 272, 32, 271, -1}, {300, 271, 32, 259, 272, 32, 271, 301, -1}, "<s> hello</s> <s>"},
    {SYN_TEMPLATE_NFKC, "ab12cd3 \357\274\224\357\274\225 \357\254\201", {32, 97, 98, 265, 99, 100, 51, 32, 52, 53, 32, 102, 105, -1}, {300, 32, 97, 98, 265, 99, 100, 51, 32, 52, 53, 32, 102, 105, 301, -1}, " ab12cd3 45 fi"},
    {SYN_TEMPLATE_NFKC, " hello  world", {32, 259, 32, 264, -1}, {300, 32, 259, 32, 264, 301, -1}, NULL},
    {SYN_NO_DECODER, "<s>hello</s> <s>", {271, 259, 272, 32, 271, -1}, {-2}, "<s> hello </s> \304\240 <s>"},
    {SYN_NO_DECODER, "hello world", {259, 264, -1}, {-2}, "hello \304\240world"},
};

Test(tokenizer, synthetic_pipeline_features) {
    tokenizer *tk[SYN_COUNT] = {0};
    for (int k = 0; k < SYN_COUNT; k++) {
        char *json = syn_json((syn_kind)k);
        mf_err err = {0};
        cr_assert_eq(tok_load(&tk[k], json, strlen(json), NULL, "synthetic", &err), MF_OK, "config %d: %s", k, err.msg);
        free(json);
    }
    cr_expect_eq(tok_token_id(tk[0], "<s>"), 271, "tokenizers' id, not the file's 300");
    cr_expect_eq(tok_token_id(tk[0], "norm"), 276);
    for (size_t c = 0; c < sizeof syn_cases / sizeof *syn_cases; c++) {
        const struct syn_case *sc = &syn_cases[c];
        const tokenizer *t = tk[sc->kind];
        size_t n_want = 0, n_sp_want = 0;
        while (sc->ids[n_want] >= 0) n_want++;
        const int32_t *sp = sc->ids_sp[0] == -2 ? sc->ids : sc->ids_sp;
        while (sp[n_sp_want] >= 0) n_sp_want++;
        int32_t *ids, *ids_sp;
        size_t n, n_sp, len, slen;
        encode_str(t, sc->text, 1, 0, &ids, &n);
        encode_str(t, sc->text, 1, 1, &ids_sp, &n_sp);
        cr_expect(ids_equal(ids, n, sc->ids, n_want), "case %zu (kind %d, \"%s\"): ids differ", c, sc->kind, sc->text);
        cr_expect(ids_equal(ids_sp, n_sp, sp, n_sp_want), "case %zu (kind %d, \"%s\"): ids_special differ", c,
                  sc->kind, sc->text);
        char *dec = decode_ids(t, sc->ids, n_want, 0, &len);
        const char *want = sc->decoded ? sc->decoded : sc->text;
        cr_expect(len == strlen(want) && !memcmp(dec, want, len), "case %zu: decoded \"%s\", want \"%s\"", c, dec, want);
        int bad_piece;
        char *st = stream_ids(t, sc->ids, n_want, 0, &slen, &bad_piece);
        cr_expect(!bad_piece && slen == len && !memcmp(st, dec, len), "case %zu: stream \"%s\"", c, st);
        free(ids), free(ids_sp), free(dec), free(st);
    }
    for (int k = 0; k < SYN_COUNT; k++) tok_free(tk[k]);
}

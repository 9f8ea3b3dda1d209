/* text.c - the public text handle: a tokenizer, a chat template and the generation config,
 * read from a .moeflux file's carried files or from a tokenizer directory. Not the tokenizer
 * (tokenizer.c) or the template renderer (chat.c). */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "format/mfpack.h"
#include "text/chat.h"
#include "text/sampler.h"
#include "text/tokenizer.h"

struct mf_text {
    mf_err err;
    tokenizer *tok;
    chat_kind kind;
    char *bos, *eos;          /* special token strings from tokenizer_config.json */
    int32_t eos_ids[8];
    int n_eos;
};

struct mf_sampler {
    sampler *s;
};

struct mf_detok {
    tok_stream st;
};

void mf_free(void *p) { free(p); }

mf_sampler *mf_sampler_new(const mf_sampler_params *p, int vocab) {
    if (mf_sampler_params_check(p, NULL, 0) != MF_OK || vocab < 1) return NULL;
    mf_sampler *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->s = sampler_new(p, vocab);
    if (!m->s) {
        free(m);
        return NULL;
    }
    return m;
}

int32_t mf_sampler_sample(mf_sampler *s, float *logits, const int32_t *history, int n_history) {
    return sampler_sample(s->s, logits, history, n_history);
}

sampler *mf_sampler_inner(mf_sampler *s) { return s->s; }

void mf_sampler_free(mf_sampler *s) {
    if (!s) return;
    sampler_free(s->s);
    free(s);
}

/* A token string from tokenizer_config.json: a plain string or {"content": ...}. */
static char *config_token(const cJSON *cfg, const char *key) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (cJSON_IsObject(it)) it = cJSON_GetObjectItemCaseSensitive(it, "content");
    return cJSON_IsString(it) ? strdup(it->valuestring) : NULL;
}

static void add_eos(mf_text *t, int32_t id) {
    if (id < 0 || t->n_eos == 8) return;
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return;
    t->eos_ids[t->n_eos++] = id;
}

static char *read_small(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = (n >= 0 && n < (1L << 30)) ? malloc((size_t)n + 1) : NULL;
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(f);
    if (b) b[n] = '\0';
    return b;
}

/* Files by name from a model or a directory. */
typedef struct source {
    mfpack_file f;
    int is_model;
    const char *dir;
} source;

static char *source_get(source *s, const char *name) {
    if (s->is_model) {
        char *data = NULL;
        mf_err e;
        if (!mfpack_find_blob(&s->f.L, name) || mfpack_read_blob(&s->f, name, &data, NULL, &e)) return NULL;
        return data;
    }
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", s->dir, name);
    return read_small(p);
}

mf_status mf_text_open(const char *path, mf_text **out) {
    mf_text *t = calloc(1, sizeof *t);
    *out = t;
    if (!t) return MF_ERR_NOMEM;
    source src = {0};
    src.f.fd = -1;
    struct stat sb;
    if (stat(path, &sb) != 0) return err_set(&t->err, MF_ERR_IO, "%s: no such file or directory", path);
    mf_status st;
    if (S_ISDIR(sb.st_mode)) {
        src.dir = path;
    } else {
        if ((st = mfpack_open(&src.f, path, &t->err))) return st;
        src.is_model = 1;
    }
    char *tj = source_get(&src, "tokenizer.json"), *tc = source_get(&src, "tokenizer_config.json");
    char *gc = source_get(&src, "generation_config.json"), *tmpl = source_get(&src, "chat_template.jinja");
    if (!tj) {
        st = err_set(&t->err, MF_ERR_FORMAT, "%s: no tokenizer.json (%s)", path,
                     src.is_model ? "convert from a checkpoint directory that has one" : "not a tokenizer directory");
        goto done;
    }
    if ((st = tok_load(&t->tok, tj, strlen(tj), tc, path, &t->err))) goto done;
    cJSON *cfg = tc ? cJSON_Parse(tc) : NULL;
    if (cfg) {
        t->bos = config_token(cfg, "bos_token");
        t->eos = config_token(cfg, "eos_token");
        const cJSON *ct = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
        if (!tmpl && cJSON_IsString(ct)) tmpl = strdup(ct->valuestring);
        cJSON_Delete(cfg);
    }
    if (tmpl) t->kind = chat_detect(tmpl);
    cJSON *gen = gc ? cJSON_Parse(gc) : NULL;
    const cJSON *eid = gen ? cJSON_GetObjectItemCaseSensitive(gen, "eos_token_id") : NULL;
    if (cJSON_IsNumber(eid)) add_eos(t, (int32_t)eid->valuedouble);
    else if (cJSON_IsArray(eid)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, eid) if (cJSON_IsNumber(e)) add_eos(t, (int32_t)e->valuedouble);
    }
    cJSON_Delete(gen);
    if (t->eos) add_eos(t, tok_token_id(t->tok, t->eos));
done:
    free(tj);
    free(tc);
    free(gc);
    free(tmpl);
    if (src.is_model) mfpack_close(&src.f);
    return st;
}

const char *mf_text_error(const mf_text *t) { return t ? t->err.msg : "out of memory"; }

void mf_text_free(mf_text *t) {
    if (!t) return;
    tok_free(t->tok);
    free(t->bos);
    free(t->eos);
    free(t);
}

mf_status mf_text_encode(mf_text *t, const char *text, size_t len, int parse_special, int add_special,
                         int32_t **ids, size_t *n) {
    return tok_encode(t->tok, text, len, parse_special, add_special, ids, n, &t->err);
}

mf_status mf_text_decode(mf_text *t, const int32_t *ids, size_t n, int skip_special, char **text, size_t *len) {
    return tok_decode(t->tok, ids, n, skip_special, text, len, &t->err);
}

int mf_text_vocab(const mf_text *t) { return t && t->tok ? tok_vocab_size(t->tok) : 0; }

int mf_text_eos_ids(const mf_text *t, const int32_t **ids) {
    *ids = t->eos_ids;
    return t->n_eos;
}

const char *mf_text_template_name(const mf_text *t) {
    return t && t->kind != CHAT_UNKNOWN ? chat_kind_name(t->kind) : NULL;
}

mf_status mf_text_set_template(mf_text *t, const char *jinja_text) {
    chat_kind k = chat_detect(jinja_text);
    if (k == CHAT_UNKNOWN)
        return err_set(&t->err, MF_ERR_UNSUPPORTED,
                       "the chat template is not one moeflux renders (qwen3, qwen3_5, deepseek_v3)");
    t->kind = k;
    return MF_OK;
}

mf_status mf_text_render_chat(mf_text *t, const char *messages_json, const char *tools_json,
                              int add_generation_prompt, int enable_thinking, char **out) {
    if (t->kind == CHAT_UNKNOWN)
        return err_set(&t->err, MF_ERR_UNSUPPORTED,
                       "the model's chat template is not recognised; pass --chat-template-file with a "
                       "qwen3, qwen3_5 or deepseek_v3 template");
    chat_options o = {add_generation_prompt, enable_thinking, t->bos, t->eos};
    return chat_render(t->kind, messages_json, tools_json, &o, out, &t->err);
}

mf_detok *mf_detok_new(mf_text *t, int skip_special) {
    mf_detok *d = calloc(1, sizeof *d);
    if (d) tok_stream_init(&d->st, t->tok, skip_special);
    return d;
}

size_t mf_detok_push(mf_detok *d, int32_t id, char *out, size_t cap) { return tok_stream_push(&d->st, id, out, cap); }
size_t mf_detok_flush(mf_detok *d, char *out, size_t cap) { return tok_stream_flush(&d->st, out, cap); }
void mf_detok_free(mf_detok *d) { free(d); }

/* tokenizer_load.c - reading a Hugging Face tokenizer.json (and tokenizer_config.json) into the
 * tokenizer: the BPE model, added tokens, normalizers, pre-tokenizers (regexes rewritten for
 * PCRE2), post-processor and decoder; every unsupported or malformed field refused by name.
 * Not encoding or decoding (tokenizer.c, whose opening comment gives the rules both follow). */
#include <cJSON.h>
#include <errno.h>
#include <stdio.h>

#include "text/tok_internal.h"

/* ---- loading helpers ---- */

static int pool_add(tokenizer *t, const char *s, size_t n, uint32_t *off) {
    if (t->pool.n + n + 1 > UINT32_MAX - 1) return -1;
    *off = (uint32_t)t->pool.n;
    if (bbuf_put(&t->pool, s, n) || bbuf_put(&t->pool, "", 1)) return -1;
    return 0;
}

static const char *json_type(const cJSON *j) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type");
    return cJSON_IsString(ty) ? ty->valuestring : NULL;
}

static int json_bool(const cJSON *j, const char *name, int dflt) {
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, name);
    if (cJSON_IsBool(b)) return cJSON_IsTrue(b);
    return dflt;
}

/* Writes, as class ranges, the code points of ucd_new in the category named (L, Lu, L&, ...). */
static int ucd_new_ranges(const char *name, size_t len, bbuf *out) {
    if (len < 1 || len > 2) return 0;
    for (size_t i = 0; i < sizeof ucd_new / sizeof *ucd_new; i++) {
        const char *c = ucd_new[i].cat;
        int hit = len == 1 ? c[0] == name[0]
                           : (name[1] == '&' ? c[0] == 'L' && strchr("ult", c[1]) : !memcmp(c, name, 2));
        if (!hit) continue;
        char r[40];
        int k = snprintf(r, sizeof r, "\\x{%X}-\\x{%X}", (unsigned)ucd_new[i].first, (unsigned)ucd_new[i].last);
        if (bbuf_put(out, r, (size_t)k)) return -1;
    }
    return 0;
}

/* Rewrites an Oniguruma pattern for PCRE2: \s, \S and \h (hex digit in Oniguruma) become
 * explicit classes, \p{X} of a general category gains the code points of ucd_new. Returns 0, or -1 with why set for constructs PCRE2 would read otherwise. */
#define WS_BODY "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
static int regex_translate(const char *s, size_t n, bbuf *out, const char **why) {
    int in_class = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\\' && i + 1 < n && (s[i + 1] == 'p' || s[i + 1] == 'P')) {
            int neg = s[i + 1] == 'P';
            size_t a = i + 2, e = a + 1; /* the name: s[a, e) */
            int braced = a < n && s[a] == '{';
            if (braced) {
                const char *close = memchr(s + a, '}', n - a);
                if (!close) { *why = "unterminated \\p{"; return -1; }
                a++;
                e = (size_t)(close - s);
                if (a < e && s[a] == '^') neg = !neg, a++;
            }
            if (e > n) { *why = "truncated \\p"; return -1; }
            bbuf extra = {0};
            if (ucd_new_ranges(s + a, e - a, &extra)) { free(extra.p); return -1; }
            size_t end = braced ? e + 1 : e;
            if (extra.n && neg && in_class) {
                free(extra.p);
                *why = "a negated Unicode property inside a character class";
                return -1;
            }
            int r = 0;
            if (!extra.n || in_class) {
                r = bbuf_put(out, s + i, end - i) || bbuf_put(out, extra.p, extra.n);
            } else {
                r = bbuf_put(out, neg ? "[^" : "[", neg ? 2 : 1) || bbuf_put(out, "\\p{", 3) ||
                    bbuf_put(out, s + a, e - a) || bbuf_put(out, "}", 1) || bbuf_put(out, extra.p, extra.n) ||
                    bbuf_put(out, "]", 1);
            }
            free(extra.p);
            if (r) return -1;
            i = end - 1;
            continue;
        }
        if (c == '\\' && i + 1 < n) {
            char d = s[++i];
            const char *rep = NULL;
            if (d == 's') rep = in_class ? WS_BODY : "[" WS_BODY "]";
            else if (d == 'S') {
                if (in_class) { *why = "\\S inside a character class"; return -1; }
                rep = "[^" WS_BODY "]";
            } else if (d == 'h') rep = in_class ? "0-9a-fA-F" : "[0-9a-fA-F]";
            else if (d == 'H') {
                if (in_class) { *why = "\\H inside a character class"; return -1; }
                rep = "[^0-9a-fA-F]";
            } else if (d == 'Q') { *why = "\\Q...\\E quoting"; return -1; }
            if (rep) {
                if (bbuf_put(out, rep, strlen(rep))) return -1;
            } else if (bbuf_put(out, s + i - 1, 2)) return -1;
            continue;
        }
        if (in_class) {
            if (c == '[' && i + 1 < n && s[i + 1] == ':') { /* POSIX [:name:] */
                const char *e = NULL;
                for (size_t k = i + 2; k + 1 < n; k++)
                    if (s[k] == ':' && s[k + 1] == ']') { e = s + k + 2; break; }
                if (!e) { *why = "unterminated [:class:]"; return -1; }
                if (bbuf_put(out, s + i, (size_t)(e - (s + i)))) return -1;
                i = (size_t)(e - s) - 1;
                continue;
            }
            if (c == '[') { *why = "nested character class"; return -1; }
            if (c == '&' && i + 1 < n && s[i + 1] == '&') { *why = "class intersection &&"; return -1; }
            if (c == ']') in_class = 0;
        } else if (c == '[') {
            in_class = 1;
            if (bbuf_put(out, "[", 1)) return -1;
            if (i + 1 < n && s[i + 1] == '^') { if (bbuf_put(out, "^", 1)) return -1; i++; }
            if (i + 1 < n && s[i + 1] == ']') { if (bbuf_put(out, "\\]", 2)) return -1; i++; }
            continue;
        }
        if (bbuf_put(out, &c, 1)) return -1;
    }
    return 0;
}

static mf_status regex_compile(pre_step *ps, const char *pat, size_t n, const char *what,
                               const char *field, mf_err *err) {
    bbuf tr = {0};
    const char *why = NULL;
    if (regex_translate(pat, n, &tr, &why)) {
        free(tr.p);
        if (!why) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: %s: regex uses %s: %.*s", what, field, why,
                       (int)(n > 200 ? 200 : n), pat);
    }
    int ec;
    PCRE2_SIZE eo;
    ps->re = pcre2_compile((PCRE2_SPTR)tr.p, tr.n, PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &ec, &eo,
                           NULL);
    free(tr.p);
    if (!ps->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return err_set(err, MF_ERR_FORMAT, "%s: %s: bad regex (%s): %.*s", what, field, (char *)msg,
                       (int)(n > 200 ? 200 : n), pat);
    }
    ps->jit = pcre2_jit_compile(ps->re, PCRE2_JIT_COMPLETE) == 0;
    return MF_OK;
}

static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static mf_status load_pretok(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: pre_tokenizer without a \"type\"", what);
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "pretokenizers");
        if (!cJSON_IsArray(list))
            return err_set(err, MF_ERR_FORMAT, "%s: pre_tokenizer Sequence without \"pretokenizers\"", what);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) {
            mf_status st = load_pretok(t, e, what, err);
            if (st) return st;
        }
        return MF_OK;
    }
    if (t->n_pre == TOK_MAX_STEPS)
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: more than %d pre-tokenizers", what, TOK_MAX_STEPS);
    pre_step *ps = &t->pre[t->n_pre];
    memset(ps, 0, sizeof *ps);
    if (!strcmp(ty, "Split")) {
        ps->kind = PRE_SPLIT;
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
        const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(j, "behavior");
        static const char *names[] = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext",
                                      "Contiguous"};
        int b = -1;
        for (int k = 0; k < 5 && cJSON_IsString(beh); k++)
            if (!strcmp(beh->valuestring, names[k])) b = k;
        if (b < 0)
            return err_set(err, cJSON_IsString(beh) ? MF_ERR_UNSUPPORTED : MF_ERR_FORMAT,
                           "%s: pre_tokenizer Split: behavior %s", what,
                           cJSON_IsString(beh) ? beh->valuestring : "missing");
        ps->beh = (split_beh)b;
        ps->invert = json_bool(j, "invert", 0);
        if (cJSON_IsString(rx)) {
            mf_status st = regex_compile(ps, rx->valuestring, strlen(rx->valuestring), what,
                                         "pre_tokenizer Split pattern", err);
            if (st) return st;
        } else if (cJSON_IsString(str)) {
            ps->lit_len = strlen(str->valuestring);
            ps->lit = malloc(ps->lit_len + 1);
            if (!ps->lit) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
            memcpy(ps->lit, str->valuestring, ps->lit_len + 1);
        } else {
            return err_set(err, MF_ERR_FORMAT, "%s: pre_tokenizer Split: pattern is neither {\"Regex\"} nor {\"String\"}", what);
        }
    } else if (!strcmp(ty, "ByteLevel")) {
        ps->kind = PRE_BYTELEVEL;
        ps->beh = SPLIT_ISOLATED;
        ps->add_prefix_space = json_bool(j, "add_prefix_space", 1);
        if (json_bool(j, "use_regex", 1)) {
            mf_status st = regex_compile(ps, GPT2_RE, strlen(GPT2_RE), what, "ByteLevel regex", err);
            if (st) return st;
        }
    } else if (!strcmp(ty, "Digits")) {
        ps->kind = PRE_DIGITS;
        ps->beh = json_bool(j, "individual_digits", 0) ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS;
    } else {
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: pre_tokenizer type %s is not supported", what, ty);
    }
    t->n_pre++;
    return MF_OK;
}

static mf_status load_normalizer(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: normalizer without a \"type\"", what);
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "normalizers");
        if (!cJSON_IsArray(list))
            return err_set(err, MF_ERR_FORMAT, "%s: normalizer Sequence without \"normalizers\"", what);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) {
            mf_status st = load_normalizer(t, e, what, err);
            if (st) return st;
        }
        return MF_OK;
    }
    static const char *names[] = {"NFC", "NFD", "NFKC", "NFKD"};
    for (int k = 0; k < 4; k++) {
        if (strcmp(ty, names[k])) continue;
        if (t->n_norm == TOK_MAX_NORMS)
            return err_set(err, MF_ERR_UNSUPPORTED, "%s: more than %d normalizers", what, TOK_MAX_NORMS);
        t->norm[t->n_norm++] = (norm_kind)k;
        return MF_OK;
    }
    return err_set(err, MF_ERR_UNSUPPORTED, "%s: normalizer type %s is not supported", what, ty);
}


static mf_status load_post(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: post_processor without a \"type\"", what);
    if (!strcmp(ty, "ByteLevel")) return MF_OK; /* offsets only */
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "processors");
        if (!cJSON_IsArray(list))
            return err_set(err, MF_ERR_FORMAT, "%s: post_processor Sequence without \"processors\"", what);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) { /* each later processor wraps what the earlier ones made */
            mf_status st = load_post(t, e, what, err);
            if (st) return st;
        }
        return MF_OK;
    }
    ivec pre = {0}, post = {0};
    int bad = 0, seen_a = 0;
    if (!strcmp(ty, "TemplateProcessing")) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(j, "single");
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(j, "special_tokens");
        if (!cJSON_IsArray(single))
            return err_set(err, MF_ERR_FORMAT, "%s: post_processor TemplateProcessing without \"single\"", what);
        const cJSON *it;
        cJSON_ArrayForEach(it, single) {
            const cJSON *tok = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
            const cJSON *seq = cJSON_GetObjectItemCaseSensitive(it, "Sequence");
            if (seq) { seen_a = 1; continue; }
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(tok, "id");
            const cJSON *def = cJSON_IsString(name) ? cJSON_GetObjectItemCaseSensitive(sp, name->valuestring) : NULL;
            const cJSON *ids = cJSON_GetObjectItemCaseSensitive(def, "ids");
            if (!cJSON_IsArray(ids)) {
                free(pre.p);
                free(post.p);
                return err_set(err, MF_ERR_FORMAT, "%s: post_processor TemplateProcessing: special token %s has no \"ids\" in special_tokens",
                               what, cJSON_IsString(name) ? name->valuestring : "(unnamed)");
            }
            const cJSON *id;
            cJSON_ArrayForEach(id, ids) {
                if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_ID) bad = 1;
                else if (ivec_push(seen_a ? &post : &pre, (int32_t)id->valuedouble)) bad = 2;
            }
        }
    } else if (!strcmp(ty, "BertProcessing") || !strcmp(ty, "RobertaProcessing")) {
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(j, "cls");
        const cJSON *sep = cJSON_GetObjectItemCaseSensitive(j, "sep");
        const cJSON *c1 = cJSON_GetArrayItem(cls, 1), *s1 = cJSON_GetArrayItem(sep, 1);
        if (!cJSON_IsNumber(c1) || !cJSON_IsNumber(s1))
            return err_set(err, MF_ERR_FORMAT, "%s: post_processor %s: cls/sep must be [token, id]", what, ty);
        if (ivec_push(&pre, (int32_t)c1->valuedouble) || ivec_push(&post, (int32_t)s1->valuedouble)) bad = 2;
    } else {
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: post_processor type %s is not supported", what, ty);
    }
    /* wrap: new pre + old pre ... old post + new post */
    if (!bad && (ivec_reserve(&pre, t->post_pre.n) || ivec_reserve(&post, t->post_post.n))) bad = 2;
    if (!bad) {
        if (t->post_pre.n) memcpy(pre.p + pre.n, t->post_pre.p, t->post_pre.n * sizeof *pre.p);
        pre.n += t->post_pre.n;
        if (post.n) memmove(post.p + t->post_post.n, post.p, post.n * sizeof *post.p);
        if (t->post_post.n) memcpy(post.p, t->post_post.p, t->post_post.n * sizeof *post.p);
        post.n += t->post_post.n;
        free(t->post_pre.p);
        free(t->post_post.p);
        t->post_pre = pre;
        t->post_post = post;
        return MF_OK;
    }
    free(pre.p);
    free(post.p);
    if (bad == 2) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
    return err_set(err, MF_ERR_FORMAT, "%s: post_processor %s: a special token id is not a valid id", what, ty);
}

static mf_status load_decoder(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: decoder without a \"type\"", what);
    if (!strcmp(ty, "ByteLevel")) {
        t->decoder_bytelevel = 1;
        return MF_OK;
    }
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "decoders");
        if (cJSON_IsArray(list) && cJSON_GetArraySize(list) == 1)
            return load_decoder(t, cJSON_GetArrayItem(list, 0), what, err);
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: decoder Sequence is supported only with one ByteLevel decoder", what);
    }
    return err_set(err, MF_ERR_UNSUPPORTED, "%s: decoder type %s is not supported", what, ty);
}

static mf_status oom(mf_err *err, const char *what) {
    return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
}

static mf_status load_bpe(tokenizer *t, const cJSON *model, const char *what, mf_err *err) {
    if (!cJSON_IsObject(model)) return err_set(err, MF_ERR_FORMAT, "%s: no \"model\" object", what);
    const char *ty = json_type(model);
    if (ty && strcmp(ty, "BPE"))
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: model type %s is not supported (only BPE)", what, ty);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(vocab)) return err_set(err, MF_ERR_FORMAT, "%s: model.vocab missing or not an object", what);
    if (!cJSON_IsArray(merges)) return err_set(err, MF_ERR_FORMAT, "%s: model.merges missing or not an array", what);
    const cJSON *drop = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (cJSON_IsNumber(drop) && drop->valuedouble > 0)
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: model.dropout %g (random BPE) is not supported", what, drop->valuedouble);
    t->fuse_unk = json_bool(model, "fuse_unk", 0);
    if (json_bool(model, "byte_fallback", 0))
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: model.byte_fallback (<0xXX> tokens) is not supported", what);
    t->ignore_merges = json_bool(model, "ignore_merges", 0);
    const cJSON *cp = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    const cJSON *es = cJSON_GetObjectItemCaseSensitive(model, "end_of_word_suffix");
    if (cJSON_IsString(cp) && cp->valuestring[0] && !(t->cont_prefix = strdup(cp->valuestring))) return oom(err, what);
    if (cJSON_IsString(es) && es->valuestring[0] && !(t->end_suffix = strdup(es->valuestring))) return oom(err, what);

    int n_vocab = cJSON_GetArraySize(vocab);
    if (smap_init(&t->vocab, (size_t)n_vocab)) return oom(err, what);
    const cJSON *e;
    int32_t max_id = -1;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= TOK_MAX_ID || e->valuedouble != (int32_t)e->valuedouble)
            return err_set(err, MF_ERR_FORMAT, "%s: model.vocab[\"%.100s\"] is not a valid id", what, e->string);
        uint32_t off;
        if (pool_add(t, e->string, strlen(e->string), &off)) return oom(err, what);
        smap_set(&t->vocab, t->pool.p, off, (uint32_t)strlen(e->string), (int32_t)e->valuedouble);
        if ((int32_t)e->valuedouble > max_id) max_id = (int32_t)e->valuedouble;
    }
    t->n_ids = max_id + 1;

    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    t->unk_id = -1;
    if (cJSON_IsString(unk)) {
        t->unk_id = smap_get(&t->vocab, t->pool.p, unk->valuestring, strlen(unk->valuestring));
        if (t->unk_id < 0)
            return err_set(err, MF_ERR_FORMAT, "%s: model.unk_token \"%.100s\" is not in the vocab", what, unk->valuestring);
    }

    size_t n_merges = (size_t)cJSON_GetArraySize(merges);
    t->merges.cap = pow2_at_least(2 * n_merges + 1);
    t->merges.key = malloc(t->merges.cap * sizeof *t->merges.key);
    t->merges.rank = malloc(t->merges.cap * sizeof *t->merges.rank);
    t->merges.merged = malloc(t->merges.cap * sizeof *t->merges.merged);
    if (!t->merges.key || !t->merges.rank || !t->merges.merged) return oom(err, what);
    memset(t->merges.rank, 0xff, t->merges.cap * sizeof *t->merges.rank);
    size_t plen = t->cont_prefix ? strlen(t->cont_prefix) : 0;
    bbuf joined = {0};
    int32_t rank = 0;
    size_t idx = 0;
    cJSON_ArrayForEach(e, merges) {
        const char *a, *b;
        size_t la, lb;
        char *sp = NULL;
        if (cJSON_IsString(e)) { /* "a b": exactly one space; "#version" lines are skipped */
            if (!strncmp(e->valuestring, "#version", 8)) { idx++; continue; }
            sp = strchr(e->valuestring, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                free(joined.p);
                return err_set(err, MF_ERR_FORMAT, "%s: model.merges[%zu] \"%.100s\" is not \"a b\"", what, idx, e->valuestring);
            }
            a = e->valuestring;
            la = (size_t)(sp - a);
            b = sp + 1;
            lb = strlen(b);
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 0)) && cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
            a = cJSON_GetArrayItem(e, 0)->valuestring;
            b = cJSON_GetArrayItem(e, 1)->valuestring;
            la = strlen(a);
            lb = strlen(b);
        } else {
            free(joined.p);
            return err_set(err, MF_ERR_FORMAT, "%s: model.merges[%zu] is neither \"a b\" nor [a, b]", what, idx);
        }
        int32_t ia = smap_get(&t->vocab, t->pool.p, a, la), ib = smap_get(&t->vocab, t->pool.p, b, lb);
        joined.n = 0;
        size_t skip = plen <= lb ? plen : lb;
        if (bbuf_put(&joined, a, la) || bbuf_put(&joined, b + skip, lb - skip)) {
            free(joined.p);
            return oom(err, what);
        }
        int32_t im = smap_get(&t->vocab, t->pool.p, joined.p, joined.n);
        if (ia < 0 || ib < 0 || im < 0) {
            const char *miss = ia < 0 ? a : ib < 0 ? b : joined.p;
            int ml = (int)(ia < 0 ? la : ib < 0 ? lb : joined.n);
            free(joined.p);
            return err_set(err, MF_ERR_FORMAT, "%s: model.merges[%zu]: token \"%.*s\" is not in the vocab", what, idx,
                           ml > 100 ? 100 : ml, miss);
        }
        uint32_t s = mmap_slot(&t->merges, (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib);
        t->merges.key[s] = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
        t->merges.rank[s] = rank++; /* a repeated pair keeps its last rank, as the HashMap does */
        t->merges.merged[s] = im;
        idx++;
    }
    free(joined.p);
    return MF_OK;
}

static int trie_add(trie *tr, const char *s, size_t n, int32_t tok) {
    if (!n) return 0;
    int32_t *link = &tr->root[(unsigned char)s[0]];
    int32_t nd = -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        if (i > 0) link = &tr->node[nd].child;
        int32_t c = *link;
        while (c >= 0 && tr->node[c].byte != b) c = tr->node[c].sibling;
        if (c < 0) {
            if (tr->n == tr->cap) {
                size_t cap = tr->cap ? tr->cap * 2 : 256;
                trie_node *p = realloc(tr->node, cap * sizeof *p);
                if (!p) return -1;
                tr->node = p;
                tr->cap = cap;
                if (i > 0) link = &tr->node[nd].child; /* the array moved */
            }
            c = (int32_t)tr->n++;
            tr->node[c] = (trie_node){-1, *link, -1, b};
            *link = c;
        }
        nd = c;
    }
    tr->node[nd].tok = tok;
    tr->n_tok++;
    return 0;
}

static mf_status load_added(tokenizer *t, const cJSON *list, const char *what, mf_err *err) {
    for (int k = 0; k < 256; k++) t->raw_trie.root[k] = t->norm_trie.root[k] = -1;
    if (!list || cJSON_IsNull(list)) return smap_init(&t->added_map, 0) ? oom(err, what) : MF_OK;
    if (!cJSON_IsArray(list)) return err_set(err, MF_ERR_FORMAT, "%s: added_tokens is not an array", what);
    int n = cJSON_GetArraySize(list);
    t->added = calloc((size_t)n + 1, sizeof *t->added);
    if (!t->added || smap_init(&t->added_map, (size_t)n)) return oom(err, what);
    const cJSON *e;
    int i = 0;
    int32_t max_added = -1, n_vocab = (int32_t)t->vocab.n;
    int k = 0;
    cJSON_ArrayForEach(e, list) { /* ids as AddedVocabulary::add_tokens gives them; "id" is only checked */
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_ID || !cJSON_IsString(content))
            return err_set(err, MF_ERR_FORMAT, "%s: added_tokens[%d] needs a valid \"id\" and a \"content\" string", what, k);
        k++;
        size_t len = strlen(content->valuestring);
        int32_t dup = smap_get(&t->added_map, t->pool.p, content->valuestring, len);
        if (!len || dup >= 0) { /* ignored; a special duplicate still makes the content special */
            if (dup >= 0 && json_bool(e, "special", 0)) t->added[dup].special = 1;
            continue;
        }
        added_tok *a = &t->added[i];
        a->id = smap_get(&t->vocab, t->pool.p, content->valuestring, len);
        if (a->id < 0) a->id = max_added < 0 ? n_vocab : max_added >= n_vocab ? max_added + 1 : n_vocab;
        if (a->id >= TOK_MAX_ID) return err_set(err, MF_ERR_FORMAT, "%s: too many added_tokens", what);
        if (a->id > max_added) max_added = a->id;
        if (pool_add(t, content->valuestring, len, &a->off)) return oom(err, what);
        a->len = (uint32_t)len;
        a->special = (unsigned char)json_bool(e, "special", 0);
        a->lstrip = (unsigned char)json_bool(e, "lstrip", 0);
        a->rstrip = (unsigned char)json_bool(e, "rstrip", 0);
        a->single_word = (unsigned char)json_bool(e, "single_word", 0);
        a->normalized = (unsigned char)json_bool(e, "normalized", !a->special);
        a->noff = a->off;
        a->nlen = a->len;
        if (a->normalized && t->n_norm) { /* matched against normalized text: normalize it too */
            int same;
            size_t nl = 0;
            char *ns = normalize(t, content->valuestring, len, &nl, &same);
            if (!same) {
                if (!ns || pool_add(t, ns, nl, &a->noff)) { free(ns); return oom(err, what); }
                a->nlen = (uint32_t)nl;
            }
            free(ns);
        }
        smap_set(&t->added_map, t->pool.p, a->off, a->len, i);
        if (a->id >= t->n_ids) t->n_ids = a->id + 1;
        i++;
    }
    t->n_added = i;
    for (i = 0; i < t->n_added; i++) {
        added_tok *a = &t->added[i];
        int r = a->normalized ? trie_add(&t->norm_trie, t->pool.p + a->noff, a->nlen, i)
                              : trie_add(&t->raw_trie, t->pool.p + a->off, a->len, i);
        if (r) return oom(err, what);
    }
    return MF_OK;
}

/* The token's string in the pool (added tokens first, as AddedVocabulary::simple_id_to_token). */
static mf_status build_id_tables(tokenizer *t, const char *what, mf_err *err) {
    size_t n = (size_t)t->n_ids;
    t->id_off = malloc((n + 1) * sizeof *t->id_off);
    t->dec_off = malloc((n + 1) * sizeof *t->dec_off);
    t->dec_len = calloc(n + 1, sizeof *t->dec_len);
    t->special = calloc(n + 1, 1);
    if (!t->id_off || !t->dec_off || !t->dec_len || !t->special) return oom(err, what);
    memset(t->id_off, 0xff, (n + 1) * sizeof *t->id_off);
    for (uint32_t k = 0; k < t->vocab.n; k++) t->id_off[t->vocab.ent[k].val] = t->vocab.ent[k].off;
    for (int k = 0; k < t->n_added; k++) {
        t->id_off[t->added[k].id] = t->added[k].off;
        t->special[t->added[k].id] = t->added[k].special;
    }
    bbuf tmp = {0};
    for (size_t id = 0; id < n; id++) {
        t->dec_off[id] = t->id_off[id];
        if (t->id_off[id] == UINT32_MAX) continue;
        const char *s = t->pool.p + t->id_off[id];
        size_t len = strlen(s);
        t->dec_len[id] = (uint32_t)len;
        if (!t->decoder_bytelevel) continue;
        tmp.n = 0;
        int all = 1;
        for (size_t i = 0; i < len;) {
            size_t cl;
            int32_t c = utf8_decode(s + i, &cl);
            i += cl;
            if (c >= 324 || t->bt.dec[c] < 0) { all = 0; break; }
            char b = (char)t->bt.dec[c];
            if (bbuf_put(&tmp, &b, 1)) { free(tmp.p); return oom(err, what); }
        }
        if (!all) continue; /* a character outside the table: the token's raw UTF-8 */
        uint32_t off;
        if (pool_add(t, tmp.p, tmp.n, &off)) { free(tmp.p); return oom(err, what); }
        t->dec_off[id] = off;
        t->dec_len[id] = (uint32_t)tmp.n;
    }
    free(tmp.p);
    return MF_OK;
}

/* tokenizer_config.json: BOS/EOS only when the post-processor adds nothing itself. */
static mf_status load_config(tokenizer *t, const char *config_json, const char *what, mf_err *err) {
    cJSON *cfg = cJSON_Parse(config_json);
    if (!cfg || !cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return err_set(err, MF_ERR_FORMAT, "%s: tokenizer_config.json is not a JSON object", what);
    }
    mf_status st = MF_OK;
    /* The flags are read and their tokens checked, but only a tokenizer.json post_processor adds
     * tokens (see the top of this file). */
    if (!t->post_pre.n && !t->post_post.n) {
        static const char *flags[2] = {"add_bos_token", "add_eos_token"};
        static const char *names[2] = {"bos_token", "eos_token"};
        for (int k = 0; k < 2 && !st; k++) {
            if (!json_bool(cfg, flags[k], 0)) continue;
            const cJSON *tok = cJSON_GetObjectItemCaseSensitive(cfg, names[k]);
            if (cJSON_IsObject(tok)) tok = cJSON_GetObjectItemCaseSensitive(tok, "content");
            int32_t id = cJSON_IsString(tok) ? tok_token_id(t, tok->valuestring) : -1;
            if (id < 0) {
                st = err_set(err, MF_ERR_FORMAT, "%s: tokenizer_config.json: %s is true but %s is %s", what,
                             flags[k], names[k], cJSON_IsString(tok) ? "not a known token" : "missing");
            }
        }
    }
    cJSON_Delete(cfg);
    return st;
}

void tok_free(tokenizer *t) {
    if (!t) return;
    free(t->pool.p);
    free(t->id_off);
    free(t->dec_off);
    free(t->dec_len);
    free(t->special);
    smap_free(&t->vocab);
    free(t->merges.key);
    free(t->merges.rank);
    free(t->merges.merged);
    free(t->cont_prefix);
    free(t->end_suffix);
    free(t->added);
    smap_free(&t->added_map);
    free(t->raw_trie.node);
    free(t->norm_trie.node);
    for (int k = 0; k < t->n_pre; k++) {
        pcre2_code_free(t->pre[k].re);
        free(t->pre[k].lit);
    }
    free(t->post_pre.p);
    free(t->post_post.p);
    if (t->cache) pthread_mutex_destroy(&t->cache->mu);
    free(t->cache);
    free(t);
}

mf_status tok_load(tokenizer **out, const char *tokenizer_json, size_t len, const char *config_json,
                   const char *what, mf_err *err) {
    if (!what) what = "tokenizer.json";
    if (!out || !tokenizer_json) return err_set(err, MF_ERR_ARG, "%s: tok_load: NULL argument", what);
    *out = NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(tokenizer_json, len, &end, 0);
    if (!root) {
        size_t at = end && end >= tokenizer_json ? (size_t)(end - tokenizer_json) : 0;
        return err_set(err, MF_ERR_FORMAT, "%s: malformed JSON near byte %zu", what, at);
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return err_set(err, MF_ERR_FORMAT, "%s: not a JSON object", what);
    }
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        cJSON_Delete(root);
        return oom(err, what);
    }
    byte_table_init(&t->bt);
    for (int k = 0; k < 256; k++) t->raw_trie.root[k] = t->norm_trie.root[k] = -1;
    mf_status st = load_bpe(t, cJSON_GetObjectItemCaseSensitive(root, "model"), what, err);
    if (!st) st = load_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), what, err);
    if (!st) st = load_added(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), what, err);
    if (!st) st = load_pretok(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), what, err);
    if (!st) st = load_post(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), what, err);
    if (!st) st = load_decoder(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"), what, err);
    cJSON_Delete(root);
    if (!st) st = build_id_tables(t, what, err);
    if (!st && config_json) st = load_config(t, config_json, what, err);
    if (!st) {
        if (!(t->cache = calloc(1, sizeof *t->cache))) st = oom(err, what);
        else pthread_mutex_init(&t->cache->mu, NULL);
    }
    if (st) {
        tok_free(t);
        return st;
    }
    *out = t;
    return MF_OK;
}

static char *read_all(const char *path, size_t *len, int *missing) {
    *missing = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        *missing = errno == ENOENT;
        return NULL;
    }
    bbuf b = {0};
    char chunk[65536];
    size_t r;
    while ((r = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (bbuf_put(&b, chunk, r)) { fclose(f); free(b.p); return NULL; }
    int bad = ferror(f);
    fclose(f);
    if (bad || bbuf_put(&b, "", 1)) { free(b.p); return NULL; }
    *len = b.n - 1;
    return b.p ? b.p : NULL;
}

mf_status tok_load_dir(tokenizer **out, const char *dir, mf_err *err) {
    if (!out || !dir) return err_set(err, MF_ERR_ARG, "tok_load_dir: NULL argument");
    char path[4096], cpath[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    snprintf(cpath, sizeof cpath, "%s/tokenizer_config.json", dir);
    size_t len = 0, clen = 0;
    int missing;
    char *json = read_all(path, &len, &missing);
    if (!json) return err_set(err, MF_ERR_IO, "%s: %s", path, missing ? "no such file" : "cannot read");
    char *cfg = read_all(cpath, &clen, &missing);
    if (!cfg && !missing) {
        free(json);
        return err_set(err, MF_ERR_IO, "%s: cannot read", cpath);
    }
    mf_status st = tok_load(out, json, len, cfg, path, err);
    free(json);
    free(cfg);
    return st;
}

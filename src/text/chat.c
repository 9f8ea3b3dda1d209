/* chat.c - the Qwen3, Qwen3.5 and DeepSeek-V3 chat templates written out in C: byte for byte what
 * transformers renders with each model's Jinja, refusing what it raises on. Not a Jinja engine. */
#include "text/chat.h"

#include <cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

/* ---- output buffer ---- */

typedef struct sbuf {
    char *p;     /* NUL-terminated text, owned */
    size_t n, cap;
    int oom;
} sbuf;

static void sb_addn(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sb_add(sbuf *b, const char *s) { sb_addn(b, s, strlen(s)); }
static void sb_addc(sbuf *b, char c) { sb_addn(b, &c, 1); }

/* A view into a string that some JSON value or buffer owns. */
typedef struct span {
    const char *p;
    size_t n;
} span;

static span sp_of(const char *s) { return (span){s, strlen(s)}; }
static void sb_addsp(sbuf *b, span s) { sb_addn(b, s.p, s.n); }

/* ---- JSON input ---- */

/* cJSON keeps a number only as a double, but Python prints json.loads("1.0") as 1.0 and
 * json.loads("1") as 1, and keeps integers of any size. So after cJSON has parsed a text, a
 * second pass walks the same text in lock step with the tree and stores each number's source
 * token in the node's valuestring (cJSON_Delete frees it). The same pass refuses what Python's
 * json.loads refuses and cJSON accepts: leading zeros, control characters inside strings or as
 * whitespace, and \u0000 (which would cut a C string short). */
typedef struct jwalk {
    const char *p;
    const char *bad; /* why the text was refused, or NULL */
} jwalk;

static void jw_ws(jwalk *w) {
    while (*w->p && (unsigned char)*w->p <= 32) {
        if (*w->p != ' ' && *w->p != '\t' && *w->p != '\n' && *w->p != '\r')
            w->bad = "a control character outside a string";
        w->p++;
    }
}

static void jw_string(jwalk *w) {
    const char *p = w->p + 1; /* past the opening quote */
    while (*p && *p != '"') {
        if ((unsigned char)*p < 0x20) w->bad = "a control character inside a string";
        if (*p == '\\') {
            if (p[1] == 'u' && !strncmp(p + 2, "0000", 4)) w->bad = "\\u0000 inside a string";
            p++;
        }
        if (*p) p++;
    }
    w->p = *p ? p + 1 : p;
}

/* Length of a JSON number (as Python's json module accepts it) at s; 0 if none. */
static size_t json_number_len(const char *s) {
    const char *p = s;
    if (*p == '-') p++;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (*p >= '0' && *p <= '9') p++;
    else return 0;
    if (*p == '.' && p[1] >= '0' && p[1] <= '9') {
        p++;
        while (*p >= '0' && *p <= '9') p++;
    }
    if (*p == 'e' || *p == 'E') {
        const char *q = p + 1;
        if (*q == '+' || *q == '-') q++;
        if (*q >= '0' && *q <= '9') {
            while (*q >= '0' && *q <= '9') q++;
            p = q;
        }
    }
    return (size_t)(p - s);
}

static void jw_value(jwalk *w, cJSON *v) {
    jw_ws(w);
    if (cJSON_IsObject(v) || cJSON_IsArray(v)) {
        w->p++; /* '{' or '[' */
        for (cJSON *c = v->child; c && !w->bad; c = c->next) {
            jw_ws(w);
            if (cJSON_IsObject(v)) {
                jw_string(w);
                jw_ws(w);
                w->p++; /* ':' */
            }
            jw_value(w, c);
            jw_ws(w);
            if (*w->p == ',') w->p++;
        }
        jw_ws(w);
        w->p++; /* '}' or ']' */
    } else if (cJSON_IsString(v)) {
        jw_string(w);
    } else if (cJSON_IsNumber(v)) {
        size_t n = json_number_len(w->p), m = strspn(w->p, "0123456789+-.eE");
        if (n == 0 || n != m) {
            w->bad = "a malformed number";
            return;
        }
        v->valuestring = malloc(n + 1);
        if (!v->valuestring) {
            w->bad = "out of memory";
            return;
        }
        memcpy(v->valuestring, w->p, n);
        v->valuestring[n] = 0;
        w->p += n;
    } else {
        w->p += cJSON_IsFalse(v) ? 5 : 4; /* true, null */
    }
}

static int utf8_valid(const char *s, size_t n) {
    while (n) {
        utf8proc_int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &c);
        if (k <= 0) return 0;
        s += k, n -= (size_t)k;
    }
    return 1;
}

/* Parses text into *out; `what` names it in error messages. */
static mf_status json_load(const char *text, const char *what, cJSON **out, mf_err *err) {
    *out = NULL;
    size_t len = strlen(text);
    if (!utf8_valid(text, len))
        return err_set(err, MF_ERR_ARG, "chat: %s is not valid UTF-8", what);
    if (len >= 3 && !memcmp(text, "\xef\xbb\xbf", 3))
        return err_set(err, MF_ERR_ARG, "chat: %s starts with a byte order mark", what);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    if (!root)
        return err_set(err, MF_ERR_ARG, "chat: %s is not valid JSON (near byte %zu)", what,
                       end ? (size_t)(end - text) : 0);
    jwalk w = {text, NULL};
    jw_value(&w, root);
    if (w.bad) {
        cJSON_Delete(root);
        return err_set(err, MF_ERR_ARG, "chat: %s holds %s", what, w.bad);
    }
    *out = root;
    return MF_OK;
}

/* ---- Python values: lookups, truthiness, str(), repr() and json.dumps() ---- */

/* A missing key is Jinja's Undefined and is NULL here. A duplicate key keeps its last value, as
 * json.loads does. */
static const cJSON *obj_get(const cJSON *o, const char *key) {
    const cJSON *found = NULL;
    if (!cJSON_IsObject(o)) return NULL;
    for (const cJSON *c = o->child; c; c = c->next)
        if (c->string && !strcmp(c->string, key)) found = c;
    return found;
}

/* Whether a key of an object appeared before c (so Python's dict holds it at that place). */
static int key_seen_before(const cJSON *o, const cJSON *c) {
    for (const cJSON *e = o->child; e != c; e = e->next)
        if (!strcmp(e->string, c->string)) return 1;
    return 0;
}

static int is_str(const cJSON *v) { return v && cJSON_IsString(v); }
static int str_eq(const cJSON *v, const char *s) { return is_str(v) && !strcmp(v->valuestring, s); }

/* Python's bool(value); Undefined is false. */
static int py_truthy(const cJSON *v) {
    if (!v || cJSON_IsNull(v) || cJSON_IsFalse(v)) return 0;
    if (cJSON_IsTrue(v)) return 1;
    if (cJSON_IsNumber(v)) return strtod(v->valuestring, NULL) != 0.0;
    if (cJSON_IsString(v)) return v->valuestring[0] != 0;
    return v->child != NULL;
}

/* Python's repr() of a float (the shortest text that reads back the same), or json.dumps' form. */
static void py_float(sbuf *b, double d, int json) {
    if (isinf(d)) {
        sb_add(b, json ? (d > 0 ? "Infinity" : "-Infinity") : (d > 0 ? "inf" : "-inf"));
        return;
    }
    char e[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec - 1, d);
        if (strtod(e, NULL) == d) break;
    }
    /* e is [-]D[.DDD]e[+-]XX: split it into sign, digits and the decimal point's position. */
    char digits[24];
    int nd = 0;
    const char *p = e;
    int neg = *p == '-';
    if (neg) p++;
    for (; *p != 'e'; p++)
        if (*p != '.') digits[nd++] = *p;
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    int decpt = atoi(p + 1) + 1;
    char out[64];
    int o = 0;
    if (neg) out[o++] = '-';
    if (decpt <= -4 || decpt > 16) { /* exponent form, as float_repr_style 'short' does */
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++) out[o++] = digits[i];
        }
        o += snprintf(out + o, sizeof out - (size_t)o, "e%c%02d", decpt - 1 < 0 ? '-' : '+',
                      abs(decpt - 1));
    } else if (decpt <= 0) {
        out[o++] = '0';
        out[o++] = '.';
        for (int i = 0; i < -decpt; i++) out[o++] = '0';
        for (int i = 0; i < nd; i++) out[o++] = digits[i];
    } else {
        for (int i = 0; i < decpt; i++) out[o++] = i < nd ? digits[i] : '0';
        out[o++] = '.';
        if (nd <= decpt) out[o++] = '0';
        for (int i = decpt; i < nd; i++) out[o++] = digits[i];
    }
    sb_addn(b, out, (size_t)o);
}

/* A number as Python prints the value json.loads made of its token: integers exactly as written
 * (any size; -0 is 0), floats through repr(). */
static void py_number(sbuf *b, const cJSON *v, int json) {
    const char *t = v->valuestring;
    if (!strpbrk(t, ".eE")) sb_add(b, strcmp(t, "-0") ? t : "0");
    else py_float(b, strtod(t, NULL), json);
}

/* Python's str.isprintable() for one code point. */
static int py_printable(utf8proc_int32_t c) {
    if (c == ' ') return 1;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_CC: case UTF8PROC_CATEGORY_CF: case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO: case UTF8PROC_CATEGORY_CN: case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP: case UTF8PROC_CATEGORY_ZS:
        return 0;
    default:
        return 1;
    }
}

/* Python's repr() of a str. */
static void py_repr_str(sbuf *b, const char *s) {
    char q = strchr(s, '\'') && !strchr(s, '"') ? '"' : '\'';
    sb_addc(b, q);
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    while (*p) {
        utf8proc_int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate(p, -1, &c);
        if (k <= 0) break; /* the input was checked to be UTF-8 */
        char esc[16];
        if (c == q || c == '\\') {
            sb_addc(b, '\\');
            sb_addc(b, (char)c);
        } else if (c == '\t') sb_add(b, "\\t");
        else if (c == '\n') sb_add(b, "\\n");
        else if (c == '\r') sb_add(b, "\\r");
        else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", (unsigned)c);
            sb_add(b, esc);
        } else if (c < 0x7f || py_printable(c)) sb_addn(b, (const char *)p, (size_t)k);
        else {
            snprintf(esc, sizeof esc, c <= 0xff ? "\\x%02x" : c <= 0xffff ? "\\u%04x" : "\\U%08x",
                     (unsigned)c);
            sb_add(b, esc);
        }
        p += k;
    }
    sb_addc(b, q);
}

/* A JSON string as json.dumps(ensure_ascii=False) writes it. */
static void json_str(sbuf *b, const char *s) {
    sb_addc(b, '"');
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        char esc[8];
        switch (c) {
        case '"': sb_add(b, "\\\""); break;
        case '\\': sb_add(b, "\\\\"); break;
        case '\n': sb_add(b, "\\n"); break;
        case '\r': sb_add(b, "\\r"); break;
        case '\t': sb_add(b, "\\t"); break;
        case '\b': sb_add(b, "\\b"); break;
        case '\f': sb_add(b, "\\f"); break;
        default:
            if (c < 0x20) {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                sb_add(b, esc);
            } else sb_addc(b, (char)c);
        }
    }
    sb_addc(b, '"');
}

/* One printer for both ways a template prints a value: json != 0 is the tojson filter of
 * transformers' template environment (json.dumps(value, ensure_ascii=False) with the default
 * separators ", " and ": ", keys in their order, floats through repr()); json == 0 is Python's
 * repr() (what str() of a list or dict prints for its items). They differ only in the scalars. */
static void py_print(sbuf *b, const cJSON *v, int json) {
    if (cJSON_IsNull(v)) sb_add(b, json ? "null" : "None");
    else if (cJSON_IsTrue(v)) sb_add(b, json ? "true" : "True");
    else if (cJSON_IsFalse(v)) sb_add(b, json ? "false" : "False");
    else if (cJSON_IsNumber(v)) py_number(b, v, json);
    else if (cJSON_IsString(v)) {
        if (json) json_str(b, v->valuestring);
        else py_repr_str(b, v->valuestring);
    } else if (cJSON_IsArray(v)) {
        sb_addc(b, '[');
        for (const cJSON *c = v->child; c; c = c->next) {
            if (c != v->child) sb_add(b, ", ");
            py_print(b, c, json);
        }
        sb_addc(b, ']');
    } else {
        sb_addc(b, '{');
        int first = 1;
        for (const cJSON *c = v->child; c; c = c->next) {
            if (key_seen_before(v, c)) continue;
            if (!first) sb_add(b, ", ");
            first = 0;
            if (json) json_str(b, c->string);
            else py_repr_str(b, c->string);
            sb_add(b, ": ");
            py_print(b, obj_get(v, c->string), json);
        }
        sb_addc(b, '}');
    }
}

static void py_repr(sbuf *b, const cJSON *v) { py_print(b, v, 0); }
static void py_json(sbuf *b, const cJSON *v) { py_print(b, v, 1); }

/* What Jinja prints for {{ value }} and value|string: str(value); Undefined prints nothing. */
static void py_str(sbuf *b, const cJSON *v) {
    if (!v) return;
    if (cJSON_IsString(v)) sb_add(b, v->valuestring);
    else py_repr(b, v);
}


/* ---- Python string methods on spans ---- */

static int sp_starts(span s, const char *pre) {
    size_t k = strlen(pre);
    return s.n >= k && !memcmp(s.p, pre, k);
}

static int sp_ends(span s, const char *suf) {
    size_t k = strlen(suf);
    return s.n >= k && !memcmp(s.p + s.n - k, suf, k);
}

/* First (last) occurrence of needle, or NULL. */
static const char *sp_find(span s, const char *needle) {
    return memmem(s.p, s.n, needle, strlen(needle));
}

static const char *sp_rfind(span s, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = s.n >= k ? s.n - k + 1 : 0; i-- > 0;)
        if (!memcmp(s.p + i, needle, k)) return s.p + i;
    return NULL;
}

/* s.split(sep)[0] and s.split(sep)[-1]. */
static span sp_before_first(span s, const char *sep) {
    const char *f = sp_find(s, sep);
    return f ? (span){s.p, (size_t)(f - s.p)} : s;
}

static span sp_after_last(span s, const char *sep) {
    const char *f = sp_rfind(s, sep);
    if (!f) return s;
    f += strlen(sep);
    return (span){f, s.n - (size_t)(f - s.p)};
}

/* lstrip('\n'), rstrip('\n'), strip('\n'). */
static span sp_lstrip_nl(span s) {
    while (s.n && *s.p == '\n') s.p++, s.n--;
    return s;
}

static span sp_rstrip_nl(span s) {
    while (s.n && s.p[s.n - 1] == '\n') s.n--;
    return s;
}

static span sp_strip_nl(span s) { return sp_rstrip_nl(sp_lstrip_nl(s)); }

/* Python's str.isspace() for one code point (Unicode 14, as Python 3.11 has it). */
static int py_isspace(utf8proc_int32_t c) {
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
           c == 0x202f || c == 0x205f || c == 0x3000;
}

/* str.strip() with no argument, which Jinja's trim filter calls. */
static span sp_trim(span s) {
    while (s.n) {
        utf8proc_int32_t c;
        utf8proc_ssize_t k =
            utf8proc_iterate((const utf8proc_uint8_t *)s.p, (utf8proc_ssize_t)s.n, &c);
        if (k <= 0 || !py_isspace(c)) break;
        s.p += k, s.n -= (size_t)k;
    }
    while (s.n) {
        size_t i = s.n - 1;
        while (i > 0 && ((unsigned char)s.p[i] & 0xc0) == 0x80) i--;
        utf8proc_int32_t c;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s.p + i,
                                              (utf8proc_ssize_t)(s.n - i), &c);
        if (k <= 0 || !py_isspace(c)) break;
        s.n = i;
    }
    return s;
}

/* An assistant turn's text split at </think> as both Qwen templates do it:
 * content = s.split('</think>')[-1].lstrip('\n') and
 * reasoning = s.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n'). */
static void think_split(span s, span *content, span *reasoning) {
    span before = sp_rstrip_nl(sp_before_first(s, "</think>"));
    *reasoning = sp_lstrip_nl(sp_after_last(before, "<think>"));
    *content = sp_lstrip_nl(sp_after_last(s, "</think>"));
}

/* A user turn that only passes tool responses back (not a query of its own). */
static int is_tool_response(span s) {
    return sp_starts(s, "<tool_response>") && sp_ends(s, "</tool_response>");
}

/* ---- the conversation as the templates see it ---- */

typedef struct chat_in {
    const cJSON **msg;     /* (n) the message objects */
    int n;
    const cJSON *tools;    /* a non-empty array of objects, or NULL */
    const chat_options *opt;
} chat_in;

static const cJSON *msg_role(const chat_in *in, int i) { return obj_get(in->msg[i], "role"); }

static int role_is(const chat_in *in, int i, const char *role) {
    return str_eq(msg_role(in, i), role);
}

/* Where a template concatenates content with '+', Python raises unless it is a str. */
static mf_status need_str(const cJSON *v, int i, const char *field, mf_err *err) {
    if (is_str(v)) return MF_OK;
    return err_set(err, MF_ERR_ARG, "chat: message %d: %s is %s, not a string", i, field,
                   !v ? "missing" : cJSON_IsNull(v) ? "null" : cJSON_IsArray(v) ? "a list"
                   : cJSON_IsObject(v) ? "an object" : "a number or boolean");
}

/* The tools block that Qwen3 and Qwen3.5 open their system turn with. */
static void tools_json_lines(sbuf *o, const cJSON *tools) {
    for (const cJSON *t = tools->child; t; t = t->next) {
        sb_addc(o, '\n');
        py_json(o, t);
    }
}

/* ---- Qwen3 ---- */

static mf_status qwen3_tool_calls(const cJSON *calls, span content, int i, sbuf *o, mf_err *err) {
    /* A truthy string or object iterates into characters or keys, which have no name or
     * arguments: tojson(Undefined) raises. A number or boolean is not iterable. */
    if (!cJSON_IsArray(calls))
        return err_set(err, MF_ERR_ARG, "chat: message %d: tool_calls is not a list", i);
    int j = 0;
    for (const cJSON *c = calls->child; c; c = c->next, j++) {
        if (j > 0 || content.n) sb_addc(o, '\n');
        const cJSON *call = c, *fn = obj_get(c, "function");
        if (py_truthy(fn)) call = fn;
        const cJSON *args = obj_get(call, "arguments");
        if (!cJSON_IsObject(call) || !args)
            return err_set(err, MF_ERR_ARG, "chat: message %d: tool call %d has no arguments", i,
                           j);
        sb_add(o, "<tool_call>\n{\"name\": \"");
        py_str(o, obj_get(call, "name"));
        sb_add(o, "\", \"arguments\": ");
        if (is_str(args)) sb_add(o, args->valuestring);
        else py_json(o, args);
        sb_add(o, "}\n</tool_call>");
    }
    return MF_OK;
}

static mf_status qwen3_assistant(const chat_in *in, int i, int last_query, sbuf *o, mf_err *err) {
    const cJSON *m = in->msg[i], *content = obj_get(m, "content");
    const cJSON *rc = obj_get(m, "reasoning_content");
    const cJSON *reasoning = NULL; /* reasoning_content as given, or NULL for rspan */
    span rspan = {"", 0}, cspan;
    int split = 0;
    mf_status st;
    if (rc && !cJSON_IsNull(rc)) {
        reasoning = rc;
    } else if (content) { /* '</think>' in content: Undefined holds nothing, a scalar raises */
        int has = 0;
        if (cJSON_IsString(content)) has = strstr(content->valuestring, "</think>") != NULL;
        else if (cJSON_IsObject(content)) has = obj_get(content, "</think>") != NULL;
        else if (cJSON_IsArray(content)) {
            for (const cJSON *c = content->child; c; c = c->next) has |= str_eq(c, "</think>");
        } else {
            return err_set(err, MF_ERR_ARG, "chat: message %d: content is null, a number or a "
                           "boolean", i);
        }
        if (has) {
            if ((st = need_str(content, i, "content", err))) return st;
            think_split(sp_of(content->valuestring), &cspan, &rspan);
            split = 1;
        }
    }
    if (!split) { /* every way on concatenates content or calls its lstrip */
        if ((st = need_str(content, i, "content", err))) return st;
        cspan = sp_of(content->valuestring);
    }
    int rtruthy = reasoning ? py_truthy(reasoning) : rspan.n > 0;
    if (i > last_query && (i == in->n - 1 || rtruthy)) {
        if (reasoning) {
            if ((st = need_str(reasoning, i, "reasoning_content", err))) return st;
            rspan = sp_of(reasoning->valuestring);
        }
        sb_add(o, "<|im_start|>assistant\n<think>\n");
        sb_addsp(o, sp_strip_nl(rspan));
        sb_add(o, "\n</think>\n\n");
        sb_addsp(o, sp_lstrip_nl(cspan));
    } else {
        sb_add(o, "<|im_start|>assistant\n");
        sb_addsp(o, cspan);
    }
    const cJSON *calls = obj_get(m, "tool_calls");
    if (py_truthy(calls) && (st = qwen3_tool_calls(calls, cspan, i, o, err))) return st;
    sb_add(o, "<|im_end|>\n");
    return MF_OK;
}

static mf_status render_qwen3(const chat_in *in, sbuf *o, mf_err *err) {
    const cJSON *m0 = in->msg[0];
    int sys0 = role_is(in, 0, "system");
    mf_status st;
    if (sys0 && (st = need_str(obj_get(m0, "content"), 0, "content", err))) return st;
    if (in->tools) {
        sb_add(o, "<|im_start|>system\n");
        if (sys0) {
            sb_add(o, obj_get(m0, "content")->valuestring);
            sb_add(o, "\n\n");
        }
        sb_add(o, "# Tools\n\nYou may call one or more functions to assist with the user query."
                  "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
                  "<tools>");
        tools_json_lines(o, in->tools);
        sb_add(o, "\n</tools>\n\nFor each function call, return a json object with function name "
                  "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
                  "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n");
    } else if (sys0) {
        sb_add(o, "<|im_start|>system\n");
        sb_add(o, obj_get(m0, "content")->valuestring);
        sb_add(o, "<|im_end|>\n");
    }
    /* The last user message that is not tool responses passed back as a user turn. */
    int last_query = in->n - 1;
    for (int i = in->n - 1; i >= 0; i--) {
        if (!role_is(in, i, "user")) continue;
        const cJSON *c = obj_get(in->msg[i], "content");
        if ((st = need_str(c, i, "content", err))) return st;
        if (!is_tool_response(sp_of(c->valuestring))) {
            last_query = i;
            break;
        }
    }
    for (int i = 0; i < in->n; i++) {
        const cJSON *role = msg_role(in, i), *c = obj_get(in->msg[i], "content");
        if (str_eq(role, "user") || (str_eq(role, "system") && i > 0)) {
            if ((st = need_str(c, i, "content", err))) return st;
            sb_add(o, "<|im_start|>");
            sb_add(o, role->valuestring);
            sb_addc(o, '\n');
            sb_add(o, c->valuestring);
            sb_add(o, "<|im_end|>\n");
        } else if (str_eq(role, "assistant")) {
            if ((st = qwen3_assistant(in, i, last_query, o, err))) return st;
        } else if (str_eq(role, "tool")) {
            if (i == 0 || !role_is(in, i - 1, "tool")) sb_add(o, "<|im_start|>user");
            sb_add(o, "\n<tool_response>\n");
            py_str(o, c);
            sb_add(o, "\n</tool_response>");
            if (i == in->n - 1 || !role_is(in, i + 1, "tool")) sb_add(o, "<|im_end|>\n");
        }
        /* any other role (or none) is skipped, as the template does */
    }
    if (in->opt->add_generation_prompt) {
        sb_add(o, "<|im_start|>assistant\n");
        if (in->opt->enable_thinking == 0) sb_add(o, "<think>\n\n</think>\n\n");
    }
    return MF_OK;
}

/* ---- Qwen3.5 ---- */

/* Python's `needle in item` for a content part; -1 where it raises (item not a container). */
static int q35_part_has(const cJSON *item, const char *needle) {
    if (cJSON_IsString(item)) return strstr(item->valuestring, needle) != NULL;
    if (cJSON_IsObject(item)) return obj_get(item, needle) != NULL;
    if (cJSON_IsArray(item)) {
        for (const cJSON *c = item->child; c; c = c->next)
            if (str_eq(c, needle)) return 1;
        return 0;
    }
    return -1;
}

/* The template's render_content macro followed by |trim: a string as is, a list of parts with
 * images and videos as placeholders (add_vision_id is never passed, so no "Picture N: "), None or
 * missing as ''. *out is malloc'd. */
static mf_status q35_content(const cJSON *v, int i, int is_system, char **out, mf_err *err) {
    sbuf b = {0};
    sb_add(&b, "");
    if (is_str(v)) {
        sb_add(&b, v->valuestring);
    } else if (cJSON_IsArray(v)) {
        int j = 0;
        for (const cJSON *it = v->child; it; it = it->next, j++) {
            int img = q35_part_has(it, "image");
            if (img < 0) {
                free(b.p);
                return err_set(err, MF_ERR_ARG, "chat: message %d: content part %d is not an "
                               "object", i, j);
            }
            const cJSON *type = obj_get(it, "type");
            const char *pad = NULL;
            if (img || q35_part_has(it, "image_url") || str_eq(type, "image")) pad = "image";
            else if (q35_part_has(it, "video") || str_eq(type, "video")) pad = "video";
            if (pad && is_system) {
                free(b.p);
                return err_set(err, MF_ERR_ARG, "chat: message %d: a system message cannot contain "
                               "%ss", i, pad);
            }
            if (pad) {
                sb_add(&b, "<|vision_start|><|");
                sb_add(&b, pad);
                sb_add(&b, "_pad|><|vision_end|>");
            }
            else if (q35_part_has(it, "text")) py_str(&b, obj_get(it, "text"));
            else {
                free(b.p);
                return err_set(err, MF_ERR_ARG, "chat: message %d: content part %d has no text, "
                               "image or video", i, j);
            }
        }
    } else if (v && !cJSON_IsNull(v)) {
        free(b.p);
        return err_set(err, MF_ERR_ARG, "chat: message %d: unexpected content type", i);
    }
    if (b.oom) {
        free(b.p);
        return err_set(err, MF_ERR_NOMEM, "chat: out of memory");
    }
    span t = sp_trim((span){b.p, b.n});
    memmove(b.p, t.p, t.n);
    b.p[t.n] = 0;
    *out = b.p;
    return MF_OK;
}

static mf_status q35_tool_calls(const cJSON *calls, span content, int i, sbuf *o, mf_err *err) {
    /* Only a list (or a string, whose characters have no name) is iterated; an object or a
     * number is skipped by "is iterable and is not mapping". */
    if (cJSON_IsString(calls))
        return err_set(err, MF_ERR_ARG, "chat: message %d: tool_calls is a string", i);
    if (!cJSON_IsArray(calls)) return MF_OK;
    int j = 0;
    for (const cJSON *c = calls->child; c; c = c->next, j++) {
        const cJSON *call = c, *fn = obj_get(c, "function");
        if (fn) call = fn;
        const cJSON *name = obj_get(call, "name");
        if (!is_str(name))
            return err_set(err, MF_ERR_ARG, "chat: message %d: tool call %d has no string name", i,
                           j);
        if (j > 0) sb_add(o, "\n<tool_call>\n<function=");
        else if (sp_trim(content).n) sb_add(o, "\n\n<tool_call>\n<function=");
        else sb_add(o, "<tool_call>\n<function=");
        sb_add(o, name->valuestring);
        sb_add(o, ">\n");
        const cJSON *args = obj_get(call, "arguments");
        if (args && !cJSON_IsObject(args))
            return err_set(err, MF_ERR_ARG, "chat: message %d: tool call %d arguments is not an "
                           "object", i, j);
        for (const cJSON *a = args ? args->child : NULL; a; a = a->next) {
            if (key_seen_before(args, a)) continue;
            const cJSON *v = obj_get(args, a->string);
            sb_add(o, "<parameter=");
            sb_add(o, a->string);
            sb_add(o, ">\n");
            if (cJSON_IsObject(v) || cJSON_IsArray(v)) py_json(o, v);
            else py_str(o, v);
            sb_add(o, "\n</parameter>\n");
        }
        sb_add(o, "</function>\n</tool_call>");
    }
    return MF_OK;
}

static mf_status q35_assistant(const chat_in *in, int i, const char *content, int last_query,
                               sbuf *o, mf_err *err) {
    const cJSON *m = in->msg[i], *rc = obj_get(m, "reasoning_content");
    span c = sp_of(content), r = {"", 0};
    if (is_str(rc)) {
        r = sp_of(rc->valuestring);
    } else if (sp_find(c, "</think>")) {
        think_split(c, &c, &r);
    }
    r = sp_trim(r);
    if (i > last_query) {
        sb_add(o, "<|im_start|>assistant\n<think>\n");
        sb_addsp(o, r);
        sb_add(o, "\n</think>\n\n");
    } else {
        sb_add(o, "<|im_start|>assistant\n");
    }
    sb_addsp(o, c);
    const cJSON *calls = obj_get(m, "tool_calls");
    if (py_truthy(calls)) {
        mf_status st = q35_tool_calls(calls, c, i, o, err);
        if (st) return st;
    }
    sb_add(o, "<|im_end|>\n");
    return MF_OK;
}

static mf_status q35_body(const chat_in *in, char **contents, sbuf *o, mf_err *err) {
    mf_status st;
    int sys0 = role_is(in, 0, "system");
    char *sys = NULL;
    if (sys0 && (st = q35_content(obj_get(in->msg[0], "content"), 0, 1, &sys, err))) return st;
    if (in->tools) {
        sb_add(o, "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n"
                  "<tools>");
        tools_json_lines(o, in->tools);
        sb_add(o, "\n</tools>\n\nIf you choose to call a function ONLY reply in the following "
                  "format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n"
                  "<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
                  "<parameter=example_parameter_2>\nThis is the value for the second parameter\n"
                  "that can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n"
                  "<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an "
                  "inner <function=...></function> block must be nested within "
                  "<tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n"
                  "- You may provide optional reasoning for your function call in natural language "
                  "BEFORE the function call, but NOT after\n- If there is no function call "
                  "available, answer the question like normal with your current knowledge and do "
                  "not tell the user about function calls\n</IMPORTANT>");
        if (sys && *sys) {
            sb_add(o, "\n\n");
            sb_add(o, sys);
        }
        sb_add(o, "<|im_end|>\n");
    } else if (sys0) {
        sb_add(o, "<|im_start|>system\n");
        sb_add(o, sys);
        sb_add(o, "<|im_end|>\n");
    }
    free(sys);
    int last_query = -1;
    for (int i = in->n - 1; i >= 0 && last_query < 0; i--) {
        if (role_is(in, i, "user") && !is_tool_response(sp_of(contents[i]))) last_query = i;
    }
    if (last_query < 0)
        return err_set(err, MF_ERR_ARG, "chat: no user query found in messages");
    for (int i = 0; i < in->n; i++) {
        const cJSON *role = msg_role(in, i);
        if (str_eq(role, "system")) {
            if (i > 0)
                return err_set(err, MF_ERR_ARG, "chat: message %d: a system message must be at "
                               "the beginning", i);
        } else if (str_eq(role, "user")) {
            sb_add(o, "<|im_start|>user\n");
            sb_add(o, contents[i]);
            sb_add(o, "<|im_end|>\n");
        } else if (str_eq(role, "assistant")) {
            if ((st = q35_assistant(in, i, contents[i], last_query, o, err))) return st;
        } else if (str_eq(role, "tool")) {
            if (i > 0 && !role_is(in, i - 1, "tool")) sb_add(o, "<|im_start|>user");
            sb_add(o, "\n<tool_response>\n");
            sb_add(o, contents[i]);
            sb_add(o, "\n</tool_response>");
            if (i == in->n - 1 || !role_is(in, i + 1, "tool")) sb_add(o, "<|im_end|>\n");
        } else {
            return err_set(err, MF_ERR_ARG, "chat: message %d: unexpected message role", i);
        }
    }
    if (in->opt->add_generation_prompt) {
        sb_add(o, "<|im_start|>assistant\n");
        sb_add(o, in->opt->enable_thinking == 0 ? "<think>\n\n</think>\n\n" : "<think>\n");
    }
    return MF_OK;
}

static mf_status render_qwen3_5(const chat_in *in, sbuf *o, mf_err *err) {
    /* Every message's content goes through render_content|trim in the main loop, so any content
     * the macro refuses fails the render whatever its role. */
    char **contents = calloc((size_t)in->n, sizeof *contents);
    if (!contents) return err_set(err, MF_ERR_NOMEM, "chat: out of memory");
    mf_status st = MF_OK;
    for (int i = 0; i < in->n && !st; i++)
        st = q35_content(obj_get(in->msg[i], "content"), i, 0, &contents[i], err);
    if (!st) st = q35_body(in, contents, o, err);
    for (int i = 0; i < in->n; i++) free(contents[i]);
    free(contents);
    return st;
}

/* ---- DeepSeek-V3 ---- */

static mf_status ds_tool_call(const cJSON *t, int i, int j, int first, sbuf *o, mf_err *err) {
    const cJSON *type = obj_get(t, "type"), *fn = obj_get(t, "function");
    const cJSON *name = obj_get(fn, "name"), *args = obj_get(fn, "arguments");
    if (!is_str(type) || !is_str(name) || !is_str(args))
        return err_set(err, MF_ERR_ARG, "chat: message %d: tool call %d needs string type, "
                       "function.name and function.arguments", i, j);
    if (first) sb_add(o, "<｜Assistant｜><｜tool▁calls▁begin｜>");
    else sb_addc(o, '\n');
    sb_add(o, "<｜tool▁call▁begin｜>");
    sb_add(o, type->valuestring);
    sb_add(o, "<｜tool▁sep｜>");
    sb_add(o, name->valuestring);
    sb_add(o, "\n```json\n");
    sb_add(o, args->valuestring);
    sb_add(o, "\n```<｜tool▁call▁end｜>");
    if (!first) sb_add(o, "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>");
    return MF_OK;
}

/* The template's flags live across messages (is_first is never reset, so only the very first
 * tool call of the conversation opens a tool-calls block), and they are kept so here. */
static mf_status render_deepseek_v3(const chat_in *in, sbuf *o, mf_err *err) {
    static const char eos[] = "<｜end▁of▁sentence｜>", outputs_end[] = "<｜tool▁outputs▁end｜>";
    mf_status st;
    sb_add(o, in->opt->bos_token ? in->opt->bos_token : "");
    int first_sp = 1;
    for (int i = 0; i < in->n; i++) {
        if (!role_is(in, i, "system")) continue;
        const cJSON *c = obj_get(in->msg[i], "content");
        if ((st = need_str(c, i, "content", err))) return st;
        if (!first_sp) sb_add(o, "\n\n");
        sb_add(o, c->valuestring);
        first_sp = 0;
    }
    int is_first = 0, is_tool = 0, output_first = 1;
    for (int i = 0; i < in->n; i++) {
        const cJSON *c = obj_get(in->msg[i], "content");
        if (role_is(in, i, "user")) {
            is_tool = 0;
            if ((st = need_str(c, i, "content", err))) return st;
            sb_add(o, "<｜User｜>");
            sb_add(o, c->valuestring);
        }
        if (role_is(in, i, "assistant") && cJSON_IsNull(c)) {
            is_tool = 0;
            const cJSON *calls = obj_get(in->msg[i], "tool_calls");
            /* for tool in tool_calls: missing iterates nothing, null/number/bool raise, a string or
             * object iterates characters or keys (which have no type) */
            int iterable = cJSON_IsArray(calls) || cJSON_IsString(calls) || cJSON_IsObject(calls);
            if (calls && !cJSON_IsArray(calls) && (!iterable || py_truthy(calls)))
                return err_set(err, MF_ERR_ARG, "chat: message %d: tool_calls is not a list", i);
            int j = 0;
            for (const cJSON *t = cJSON_IsArray(calls) ? calls->child : NULL; t; t = t->next, j++) {
                if ((st = ds_tool_call(t, i, j, !is_first, o, err))) return st;
                is_first = 1;
            }
        }
        if (role_is(in, i, "assistant") && !cJSON_IsNull(c)) {
            if ((st = need_str(c, i, "content", err))) return st;
            sb_add(o, is_tool ? outputs_end : "<｜Assistant｜>");
            sb_add(o, c->valuestring);
            sb_add(o, eos);
            is_tool = 0;
        }
        if (role_is(in, i, "tool")) {
            is_tool = 1;
            if ((st = need_str(c, i, "content", err))) return st;
            sb_add(o, output_first ? "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>"
                                   : "\n<｜tool▁output▁begin｜>");
            sb_add(o, c->valuestring);
            sb_add(o, "<｜tool▁output▁end｜>");
            output_first = 0;
        }
    }
    if (is_tool) sb_add(o, outputs_end);
    if (in->opt->add_generation_prompt && !is_tool) sb_add(o, "<｜Assistant｜>");
    return MF_OK;
}

/* ---- recognising a template, rendering ---- */

const char *chat_kind_name(chat_kind k) {
    switch (k) {
    case CHAT_QWEN3: return "qwen3";
    case CHAT_QWEN3_5: return "qwen3_5";
    case CHAT_DEEPSEEK_V3: return "deepseek_v3";
    default: return "unknown";
    }
}

static uint64_t fnv1a64(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
    return h;
}

/* A template is recognised only by its exact text (length and FNV-1a hash): the renderers above
 * are proved byte for byte against these texts, and a template differing by even whitespace
 * (which Jinja may or may not strip) could render differently, so it is CHAT_UNKNOWN. So are
 * the other releases' templates (Qwen3-2507, DeepSeek-V3-0324 and R1, the small Qwen3.5 models
 * whose thinking defaults to off) until they are written out and tested here. */
static const struct {
    chat_kind kind;
    size_t len;
    uint64_t fnv;
} known_templates[] = {
    {CHAT_QWEN3, 4116, 0x2bfdb7aa9754484eull},       /* Qwen3's original (hybrid thinking) */
    {CHAT_DEEPSEEK_V3, 2301, 0xebe3604156dc466aull}, /* DeepSeek-V3's original */
    {CHAT_QWEN3_5, 7756, 0xf07c510f47fbaca0ull},     /* Qwen3.5-35B-A3B's */
};

chat_kind chat_detect(const char *template_text) {
    if (!template_text) return CHAT_UNKNOWN;
    size_t n = strlen(template_text);
    uint64_t h = fnv1a64(template_text, n);
    for (size_t i = 0; i < sizeof known_templates / sizeof known_templates[0]; i++)
        if (known_templates[i].len == n && known_templates[i].fnv == h)
            return known_templates[i].kind;
    return CHAT_UNKNOWN;
}

/* Checks the shape every template assumes: messages a non-empty list of objects (transformers
 * itself fails on an empty list), tools absent, null or a list of objects. */
static mf_status chat_in_check(const cJSON *msgs, const cJSON *tools, mf_err *err) {
    if (!cJSON_IsArray(msgs)) return err_set(err, MF_ERR_ARG, "chat: messages is not a list");
    if (!msgs->child) return err_set(err, MF_ERR_ARG, "chat: no messages");
    int i = 0;
    for (const cJSON *m = msgs->child; m; m = m->next, i++)
        if (!cJSON_IsObject(m))
            return err_set(err, MF_ERR_ARG, "chat: message %d is not an object", i);
    if (tools && !cJSON_IsNull(tools)) {
        if (!cJSON_IsArray(tools)) return err_set(err, MF_ERR_ARG, "chat: tools is not a list");
        i = 0;
        for (const cJSON *t = tools->child; t; t = t->next, i++)
            if (!cJSON_IsObject(t))
                return err_set(err, MF_ERR_ARG, "chat: tool %d is not an object", i);
    }
    return MF_OK;
}

mf_status chat_render(chat_kind kind, const char *messages_json, const char *tools_json,
                      const chat_options *opt, char **out, mf_err *err) {
    static const chat_options defaults = {0, -1, NULL, NULL};
    if (!out) return err_set(err, MF_ERR_ARG, "chat: no output pointer");
    *out = NULL;
    if (!messages_json) return err_set(err, MF_ERR_ARG, "chat: no messages");
    if (kind != CHAT_QWEN3 && kind != CHAT_QWEN3_5 && kind != CHAT_DEEPSEEK_V3)
        return err_set(err, MF_ERR_UNSUPPORTED, "chat: no renderer for template kind %s",
                       chat_kind_name(kind));
    cJSON *msgs = NULL, *tools = NULL;
    mf_status st = json_load(messages_json, "messages", &msgs, err);
    if (!st && tools_json) st = json_load(tools_json, "tools", &tools, err);
    if (!st) st = chat_in_check(msgs, tools, err);
    chat_in in = {NULL, cJSON_GetArraySize(msgs), NULL, opt ? opt : &defaults};
    if (!st && !(in.msg = malloc((size_t)in.n * sizeof *in.msg)))
        st = err_set(err, MF_ERR_NOMEM, "chat: out of memory");
    if (!st) {
        int i = 0;
        for (const cJSON *m = msgs->child; m; m = m->next) in.msg[i++] = m;
        if (cJSON_IsArray(tools) && tools->child) in.tools = tools; /* `if tools`: [] is false */
        sbuf o = {0};
        sb_add(&o, "");
        st = kind == CHAT_QWEN3 ? render_qwen3(&in, &o, err)
             : kind == CHAT_QWEN3_5 ? render_qwen3_5(&in, &o, err)
             : render_deepseek_v3(&in, &o, err);
        if (!st && o.oom) st = err_set(err, MF_ERR_NOMEM, "chat: out of memory");
        if (st) free(o.p);
        else *out = o.p;
    }
    free(in.msg);
    cJSON_Delete(msgs);
    cJSON_Delete(tools);
    return st;
}

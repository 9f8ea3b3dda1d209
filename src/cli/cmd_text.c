/* cmd_text.c - `moeflux tokenize`, `detokenize` and `template`: the text side without a model
 * run. Not generation (cmd_run.c). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "moeflux.h"

char *cli_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (!buf) break;
        if (n + 1 >= cap) {
            if (cap >= ((size_t)1 << 31)) {
                free(buf);
                buf = NULL;
                break;
            }
            char *nb = realloc(buf, cap *= 2);
            if (!nb) free(buf);
            buf = nb;
            continue;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        if (r == 0) break;
        n += r;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        if (len) *len = n;
    }
    return buf;
}

static void json_string(FILE *o, const char *s, size_t n) {
    fputc('"', o);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') fprintf(o, "\\%c", c);
        else if (c == '\n') fputs("\\n", o);
        else if (c == '\r') fputs("\\r", o);
        else if (c == '\t') fputs("\\t", o);
        else if (c < 0x20) fprintf(o, "\\u%04x", c);
        else fputc(c, o);
    }
    fputc('"', o);
}

int cmd_tokenize(int argc, char **argv) {
    const char *src = NULL, *text = NULL, *file = NULL;
    int json = 0, no_special = 0, add_special = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--text-file") && i + 1 < argc) file = argv[++i];
        else if (!strcmp(argv[i], "--no-parse-special")) no_special = 1;
        else if (!strcmp(argv[i], "--add-special")) add_special = 1;
        else if (argv[i][0] == '-' && argv[i][1] && strcmp(argv[i], "--")) {
            fprintf(stderr, "moeflux tokenize: unknown option '%s'\n", argv[i]);
            return 2;
        } else if (!strcmp(argv[i], "--") && i + 1 < argc && !text) text = argv[++i];
        else if (!src) src = argv[i];
        else if (!text) text = argv[i];
        else {
            fprintf(stderr, "moeflux tokenize: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!src || (!text == !file)) {
        fprintf(stderr, "usage: moeflux tokenize MODEL_OR_TOKENIZER_DIR (TEXT | --text-file F) [--json]\n"
                        "                        [--no-parse-special] [--add-special]\n");
        return 2;
    }
    size_t len = 0;
    char *buf = NULL;
    if (file) {
        buf = cli_read_file(file, &len);
        if (!buf) {
            fprintf(stderr, "moeflux tokenize: cannot read %s\n", file);
            return 1;
        }
        text = buf;
    } else {
        len = strlen(text);
    }
    mf_text *t = NULL;
    int rc = 1;
    int32_t *ids = NULL;
    size_t n = 0;
    if (mf_text_open(src, &t) != MF_OK || mf_text_encode(t, text, len, !no_special, add_special, &ids, &n) != MF_OK) {
        fprintf(stderr, "moeflux tokenize: %s\n", mf_text_error(t));
        goto done;
    }
    if (json) printf("{\"ids\": [");
    for (size_t i = 0; i < n; i++) printf(json ? "%s%d" : "%s%d", i ? (json ? ", " : " ") : "", ids[i]);
    printf(json ? "]}\n" : "\n");
    rc = 0;
done:
    mf_free(ids);
    mf_text_free(t);
    free(buf);
    return rc;
}

int cmd_detokenize(int argc, char **argv) {
    if (argc < 1) {
        fprintf(stderr, "usage: moeflux detokenize MODEL_OR_TOKENIZER_DIR ID... [--skip-special] [--json]\n");
        return 2;
    }
    int skip = 0, json = 0, n = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(argc + 1));
    if (!ids) return 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--skip-special")) {
            skip = 1;
            continue;
        }
        if (!strcmp(argv[i], "--json")) {
            json = 1;
            continue;
        }
        char *end;
        long v = strtol(argv[i], &end, 10);
        if (*end || end == argv[i] || v < 0 || v > 0x7fffffff) {
            fprintf(stderr, "moeflux detokenize: '%s' is not a token id\n", argv[i]);
            free(ids);
            return 2;
        }
        ids[n++] = (int32_t)v;
    }
    mf_text *t = NULL;
    char *text = NULL;
    size_t len = 0;
    int rc = 1;
    if (mf_text_open(argv[0], &t) != MF_OK || mf_text_decode(t, ids, (size_t)n, skip, &text, &len) != MF_OK) {
        fprintf(stderr, "moeflux detokenize: %s\n", mf_text_error(t));
    } else {
        if (json) {
            printf("{\"text\": ");
            json_string(stdout, text, len);
            printf("}\n");
        } else {
            fwrite(text, 1, len, stdout);
        }
        rc = 0;
    }
    mf_free(text);
    mf_text_free(t);
    free(ids);
    return rc;
}

int cmd_template(int argc, char **argv) {
    const char *src = NULL, *messages = NULL, *tools = NULL, *tmpl = NULL;
    int gen = 0, think = -1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--messages") && i + 1 < argc) messages = argv[++i];
        else if (!strcmp(a, "--tools") && i + 1 < argc) tools = argv[++i];
        else if (!strcmp(a, "--chat-template-file") && i + 1 < argc) tmpl = argv[++i];
        else if (!strcmp(a, "--generation-prompt")) gen = 1;
        else if (!strcmp(a, "--think")) think = 1;
        else if (!strcmp(a, "--no-think")) think = 0;
        else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "moeflux template: unknown option '%s'\n", a);
            return 2;
        } else if (!src) src = a;
        else {
            fprintf(stderr, "moeflux template: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!src || !messages) {
        fprintf(stderr, "usage: moeflux template MODEL_OR_TOKENIZER_DIR --messages F.json [--tools F.json]\n"
                        "                        [--generation-prompt] [--think | --no-think] [--chat-template-file F]\n");
        return 2;
    }
    char *mj = cli_read_file(messages, NULL), *tj = tools ? cli_read_file(tools, NULL) : NULL;
    char *tt = tmpl ? cli_read_file(tmpl, NULL) : NULL;
    if (!mj || (tools && !tj) || (tmpl && !tt)) {
        fprintf(stderr, "moeflux template: cannot read %s\n", !mj ? messages : (tools && !tj) ? tools : tmpl);
        free(mj);
        free(tj);
        free(tt);
        return 1;
    }
    mf_text *t = NULL;
    char *out = NULL;
    int rc = 1;
    if (mf_text_open(src, &t) != MF_OK || (tt && mf_text_set_template(t, tt) != MF_OK) ||
        mf_text_render_chat(t, mj, tj, gen, think, &out) != MF_OK) {
        fprintf(stderr, "moeflux template: %s\n", mf_text_error(t));
    } else {
        fputs(out, stdout);
        rc = 0;
    }
    mf_free(out);
    mf_text_free(t);
    free(mj);
    free(tj);
    free(tt);
    return rc;
}

/* cmd_run.c - `moeflux run` (one prompt, streamed answer, summary line) and `moeflux chat`
 * (interactive turns over one kept session). Not library code: sees only include/moeflux.h. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/commands.h"
#include "moeflux.h"

static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig) {
    (void)sig;
    g_interrupted = 1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define MAX_STOPS 8

typedef struct gen_opts {
    mf_sampler_params sp;
    int n_predict;             /* -1: until EOS or the context is full */
    const char *stops[MAX_STOPS];
    int n_stops;
    int ignore_eos;
    int think;                 /* -1 default, 0, 1 */
    const char *system;
    const char *template_file;
    mf_engine_options eo;
    mf_session_options so;
} gen_opts;

/* Parses one option shared by run and chat; returns the arguments used (0: not ours, -1: bad). */
static int parse_common(gen_opts *g, int argc, char **argv, int i, const char *cmd) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    char *end = NULL;
#define NEED_VAL                                                                                   \
    do {                                                                                           \
        if (!v) {                                                                                  \
            fprintf(stderr, "moeflux %s: %s needs a value\n", cmd, a);                             \
            return -1;                                                                             \
        }                                                                                          \
    } while (0)
#define FLOAT_OPT(name, field)                                                                     \
    if (!strcmp(a, name)) {                                                                        \
        NEED_VAL;                                                                                  \
        g->field = strtof(v, &end);                                                                \
        if (*end) {                                                                                \
            fprintf(stderr, "moeflux %s: %s needs a number, not '%s'\n", cmd, a, v);               \
            return -1;                                                                             \
        }                                                                                          \
        return 2;                                                                                  \
    }
#define INT_OPT(name, field)                                                                       \
    if (!strcmp(a, name)) {                                                                        \
        NEED_VAL;                                                                                  \
        long x_ = strtol(v, &end, 10);                                                             \
        if (*end || x_ < -1 || x_ > 100000000) {                                                   \
            fprintf(stderr, "moeflux %s: %s needs an integer, not '%s'\n", cmd, a, v);             \
            return -1;                                                                             \
        }                                                                                          \
        g->field = (int)x_;                                                                        \
        return 2;                                                                                  \
    }
    FLOAT_OPT("--temp", sp.temperature)
    FLOAT_OPT("--temperature", sp.temperature)
    INT_OPT("--top-k", sp.top_k)
    FLOAT_OPT("--top-p", sp.top_p)
    FLOAT_OPT("--min-p", sp.min_p)
    FLOAT_OPT("--repeat-penalty", sp.repetition_penalty)
    FLOAT_OPT("--presence-penalty", sp.presence_penalty)
    FLOAT_OPT("--frequency-penalty", sp.frequency_penalty)
    INT_OPT("--repeat-last-n", sp.penalty_last_n)
    INT_OPT("-n", n_predict)
    INT_OPT("--n-predict", n_predict)
    INT_OPT("--threads", eo.n_threads)
    INT_OPT("--ctx", so.max_ctx)
    INT_OPT("--chunk", so.prefill_chunk)
    if (!strcmp(a, "--seed")) {
        NEED_VAL;
        g->sp.seed = strtoull(v, &end, 10);
        if (*end) return -1;
        return 2;
    }
    if (!strcmp(a, "--stop")) {
        NEED_VAL;
        if (g->n_stops == MAX_STOPS || !*v) {
            fprintf(stderr, "moeflux %s: at most %d non-empty --stop strings\n", cmd, MAX_STOPS);
            return -1;
        }
        g->stops[g->n_stops++] = v;
        return 2;
    }
    int cache = parse_cache_opt(cmd, a, v, &g->eo);
    if (cache) return cache < 0 ? -1 : 2;
    if (!strcmp(a, "--system")) {
        NEED_VAL;
        g->system = v;
        return 2;
    }
    if (!strcmp(a, "--chat-template-file")) {
        NEED_VAL;
        g->template_file = v;
        return 2;
    }
    if (!strcmp(a, "--cuda")) return (g->eo.use_cuda = 1);
    if (!strcmp(a, "--no-host-reads")) return (g->eo.no_host_reads = 1);
    if (!strcmp(a, "--ignore-eos")) return (g->ignore_eos = 1);
    if (!strcmp(a, "--think")) return (g->think = 1);
    if (!strcmp(a, "--no-think")) return (g->think = 0) + 1;
    if (!strcmp(a, "--reference")) return (g->eo.reference = 1);
    return 0;
#undef NEED_VAL
#undef FLOAT_OPT
#undef INT_OPT
}

static void gen_defaults(gen_opts *g) {
    memset(g, 0, sizeof *g);
    mf_sampler_params_init(&g->sp);
    g->sp.temperature = 0.7f;
    g->sp.top_p = 0.9f;
    g->sp.seed = (uint64_t)time(NULL);
    g->n_predict = -1;
    g->think = -1;
    mf_engine_options_init(&g->eo);
    mf_session_options_init(&g->so);
}

/* Everything a generation needs, opened once. */
typedef struct engine {
    mf_model *m;
    mf_text *t;
    mf_session *s;
    mf_sampler *smp;
    int vocab;
    int greedy;               /* plain argmax, no penalties */
    int32_t next;             /* the choice after the last token (the logits stay on the backend) */
    int32_t *hist;            /* [max_ctx] the session's tokens */
    int n_hist;
    int max_ctx;
} engine;

static int engine_open(engine *e, const char *path, gen_opts *g, const char *cmd) {
    memset(e, 0, sizeof *e);
    char err[160];
    if (mf_sampler_params_check(&g->sp, err, sizeof err) != MF_OK) {
        fprintf(stderr, "moeflux %s: %s\n", cmd, err);
        return -1;
    }
    if (mf_text_open(path, &e->t) != MF_OK) {
        fprintf(stderr, "moeflux %s: %s\n", cmd, mf_text_error(e->t));
        return -1;
    }
    if (g->template_file) {
        char *tt = cli_read_file(g->template_file, NULL);
        if (!tt || mf_text_set_template(e->t, tt) != MF_OK) {
            fprintf(stderr, "moeflux %s: %s: %s\n", cmd, g->template_file, tt ? mf_text_error(e->t) : "cannot read");
            free(tt);
            return -1;
        }
        free(tt);
    }
    if (mf_model_open(path, &e->m) != MF_OK || mf_model_load(e->m, &g->eo) != MF_OK) {
        fprintf(stderr, "moeflux %s: %s\n", cmd, mf_model_error(e->m));
        return -1;
    }
    e->vocab = mf_model_vocab(e->m);
    if (mf_text_vocab(e->t) > e->vocab) {
        fprintf(stderr, "moeflux %s: the tokenizer has %d tokens, the model only %d\n", cmd, mf_text_vocab(e->t),
                e->vocab);
        return -1;
    }
    if (mf_session_new(e->m, &g->so, &e->s) != MF_OK) {
        fprintf(stderr, "moeflux %s: %s\n", cmd, mf_session_error(e->s));
        return -1;
    }
    e->max_ctx = g->so.max_ctx;
    e->greedy = g->sp.temperature <= 0 && g->sp.repetition_penalty == 1.0f && g->sp.presence_penalty == 0 &&
                g->sp.frequency_penalty == 0;
    e->smp = mf_sampler_new(&g->sp, e->vocab);
    e->hist = malloc(sizeof(int32_t) * (size_t)e->max_ctx);
    if (!e->smp || !e->hist) {
        fprintf(stderr, "moeflux %s: out of memory\n", cmd);
        return -1;
    }
    return 0;
}

static void engine_close(engine *e) {
    mf_sampler_free(e->smp);
    mf_session_free(e->s);
    mf_model_free(e->m);
    mf_text_free(e->t);
    free(e->hist);
}

/* Runs n tokens and picks the next one (on the backend where it can: only the token comes back). */
static mf_status engine_eval(engine *e, const int32_t *toks, int n) {
    if (e->greedy) return mf_session_eval_greedy(e->s, toks, n, &e->next);
    return mf_session_eval_sample(e->s, toks, n, e->smp, &e->next);
}

/* Makes the session hold exactly `ids` (reusing the longest common prefix), leaving the
 * choice after the last one (engine_eval). Returns the number of tokens evaluated, or -1. */
static int engine_sync(engine *e, const int32_t *ids, int n, const char *cmd) {
    if (n > e->max_ctx) {
        fprintf(stderr, "moeflux %s: %d tokens exceed the context of %d (--ctx)\n", cmd, n, e->max_ctx);
        return -1;
    }
    int common = 0;
    while (common < n && common < e->n_hist && e->hist[common] == ids[common]) common++;
    if (common == n && n > 0) common--; /* re-run the last token to get the choice after it */
    if (mf_session_truncate(e->s, common) != MF_OK) {
        fprintf(stderr, "moeflux %s: %s\n", cmd, mf_session_error(e->s));
        return -1;
    }
    e->n_hist = common;
    if (n > common && engine_eval(e, ids + common, n - common) != MF_OK) {
        fprintf(stderr, "moeflux %s: %s\n", cmd, mf_session_error(e->s));
        return -1;
    }
    memcpy(e->hist + common, ids + common, sizeof(int32_t) * (size_t)(n - common));
    e->n_hist = n;
    return n - common;
}

typedef struct gen_result {
    char *text;               /* the decoded answer, malloc'd */
    size_t len;
    int n_gen;
    double decode_s;
    int stopped_by;           /* 0 length, 1 eos, 2 stop string, 3 interrupted, 4 context full */
} gen_result;

/* Samples tokens after the session's current state, streaming text to stdout. */
static int generate(engine *e, const gen_opts *g, gen_result *r, const char *cmd) {
    memset(r, 0, sizeof *r);
    const int32_t *eos;
    int n_eos = mf_text_eos_ids(e->t, &eos);
    mf_detok *d = mf_detok_new(e->t, 1);
    size_t cap = 1 << 16;
    r->text = malloc(cap);
    if (!d || !r->text) {
        mf_detok_free(d);
        return -1;
    }
    r->text[0] = '\0';
    char piece[2048];
    size_t printed = 0;
    double t0 = now_s();
    g_interrupted = 0;
    for (;;) {
        if (g->n_predict >= 0 && r->n_gen >= g->n_predict) break;
        if (g_interrupted) {
            r->stopped_by = 3;
            break;
        }
        if (e->n_hist >= e->max_ctx) {
            r->stopped_by = 4;
            break;
        }
        int32_t tok = e->next;
        int is_eos = 0;
        for (int i = 0; i < n_eos; i++) is_eos |= tok == eos[i];
        if (is_eos && !g->ignore_eos) {
            r->stopped_by = 1;
            break;
        }
        r->n_gen++;
        size_t k = mf_detok_push(d, tok, piece, sizeof piece);
        if (r->len + k + 1 > cap) {
            char *nt = realloc(r->text, cap = 2 * (cap + k));
            if (!nt) break;
            r->text = nt;
        }
        memcpy(r->text + r->len, piece, k);
        r->len += k;
        r->text[r->len] = '\0';
        /* stop strings: cut the text where one appears; hold back what could start one */
        size_t safe = r->len;
        int hit = 0;
        for (int i = 0; i < g->n_stops; i++) {
            char *at = strstr(r->text + (printed > 64 ? printed - 64 : 0), g->stops[i]);
            if (at) {
                r->len = (size_t)(at - r->text);
                r->text[r->len] = '\0';
                hit = 1;
            } else {
                size_t sl = strlen(g->stops[i]);
                for (size_t m = sl - 1; m > 0; m--)
                    if (r->len >= m && !memcmp(r->text + r->len - m, g->stops[i], m)) {
                        if (r->len - m < safe) safe = r->len - m;
                        break;
                    }
            }
        }
        if (hit) safe = r->len;
        if (safe > printed) {
            fwrite(r->text + printed, 1, safe - printed, stdout);
            fflush(stdout);
            printed = safe;
        }
        if (hit) {
            r->stopped_by = 2;
            e->hist[e->n_hist++] = tok;
            if (engine_eval(e, &tok, 1) != MF_OK) break;
            break;
        }
        e->hist[e->n_hist++] = tok;
        if (engine_eval(e, &tok, 1) != MF_OK) {
            fprintf(stderr, "\nmoeflux %s: %s\n", cmd, mf_session_error(e->s));
            mf_detok_free(d);
            return -1;
        }
    }
    if (r->stopped_by != 2) {
        size_t k = mf_detok_flush(d, piece, sizeof piece);
        if (r->len + k + 1 <= cap) {
            memcpy(r->text + r->len, piece, k);
            r->len += k;
            r->text[r->len] = '\0';
        }
    }
    if (r->len > printed) fwrite(r->text + printed, 1, r->len - printed, stdout);
    fflush(stdout);
    r->decode_s = now_s() - t0;
    mf_detok_free(d);
    return 0;
}

static void summary(engine *e, int n_prompt, double prompt_s, const gen_result *r) {
    mf_expert_stats st;
    mf_model_expert_stats(e->m, &st);
    uint64_t uses = st.hits + st.misses;
    static const char *why[] = {"length", "eos", "stop string", "interrupted", "context full"};
    fprintf(stderr, "\n[prompt %d tok, %.1f tok/s | decode %d tok, %.1f tok/s | expert cache hit rate %.1f%% | %s]\n",
            n_prompt, prompt_s > 0 ? n_prompt / prompt_s : 0.0, r->n_gen,
            r->decode_s > 0 ? r->n_gen / r->decode_s : 0.0, uses ? 100.0 * st.hits / uses : 0.0, why[r->stopped_by]);
}

/* A JSON string literal of s (malloc'd). */
static char *json_quote(const char *s) {
    size_t n = strlen(s), k = 0;
    char *o = malloc(6 * n + 3);
    if (!o) return NULL;
    o[k++] = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            o[k++] = '\\';
            o[k++] = (char)c;
        } else if (c == '\n') {
            o[k++] = '\\';
            o[k++] = 'n';
        } else if (c < 0x20) {
            k += (size_t)sprintf(o + k, "\\u%04x", c);
        } else {
            o[k++] = (char)c;
        }
    }
    o[k++] = '"';
    o[k] = '\0';
    return o;
}

static void usage_run(void) {
    fprintf(stderr,
            "usage: moeflux run MODEL -p PROMPT [-n N] [--chat] [--system S] [--think|--no-think]\n"
            "       [--temp T] [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R] [--repeat-last-n N]\n"
            "       [--presence-penalty P] [--frequency-penalty F] [--seed S] [--stop STR]... [--ignore-eos]\n"
            "       [--ctx N] [--threads N] [--host-cache-gb G] [--cuda] [--gpu-cache-gb G] [--no-host-reads]\n"
            "       [--chat-template-file F]\n");
}

int cmd_run(int argc, char **argv) {
    gen_opts g;
    gen_defaults(&g);
    const char *model = NULL, *prompt = NULL;
    int chat = 0;
    for (int i = 0; i < argc; i++) {
        int used = parse_common(&g, argc, argv, i, "run");
        if (used < 0) return 2;
        if (used) {
            i += used - 1;
            continue;
        }
        if ((!strcmp(argv[i], "-p") || !strcmp(argv[i], "--prompt")) && i + 1 < argc) prompt = argv[++i];
        else if (!strcmp(argv[i], "--chat")) chat = 1;
        else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "moeflux run: unknown option '%s'\n", argv[i]);
            usage_run();
            return 2;
        } else if (!model) model = argv[i];
        else {
            fprintf(stderr, "moeflux run: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!model || !prompt) {
        usage_run();
        return 2;
    }
    engine e;
    int rc = 1;
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    gen_result r = {0};
    if (engine_open(&e, model, &g, "run")) goto done;
    if (chat) {
        char *q = json_quote(prompt), *sq = g.system ? json_quote(g.system) : NULL;
        size_t ml = strlen(q) + (sq ? strlen(sq) : 0) + 128;
        char *msgs = malloc(ml);
        if (!q || !msgs) goto done;
        if (sq) snprintf(msgs, ml, "[{\"role\": \"system\", \"content\": %s}, {\"role\": \"user\", \"content\": %s}]", sq, q);
        else snprintf(msgs, ml, "[{\"role\": \"user\", \"content\": %s}]", q);
        free(q);
        free(sq);
        mf_status st = mf_text_render_chat(e.t, msgs, NULL, 1, g.think, &text);
        free(msgs);
        if (st != MF_OK) {
            fprintf(stderr, "moeflux run: %s\n", mf_text_error(e.t));
            goto done;
        }
    }
    const char *input = chat ? text : prompt;
    if (mf_text_encode(e.t, input, strlen(input), chat, !chat, &ids, &n) != MF_OK) {
        fprintf(stderr, "moeflux run: %s\n", mf_text_error(e.t));
        goto done;
    }
    if (n == 0) {
        fprintf(stderr, "moeflux run: the prompt encodes to no tokens\n");
        goto done;
    }
    signal(SIGINT, on_sigint);
    double t0 = now_s();
    if (engine_sync(&e, ids, (int)n, "run") < 0) goto done;
    double prompt_s = now_s() - t0;
    if (generate(&e, &g, &r, "run")) goto done;
    summary(&e, (int)n, prompt_s, &r);
    rc = 0;
done:
    free(r.text);
    mf_free(ids);
    mf_free(text);
    engine_close(&e);
    return rc;
}

/* ---- chat ---- */

/* The conversation as a growing JSON array text. */
typedef struct convo {
    char *json;
    size_t len, cap;
} convo;

static int convo_add(convo *c, const char *role, const char *content) {
    char *q = json_quote(content);
    if (!q) return -1;
    size_t need = c->len + strlen(q) + strlen(role) + 64;
    if (need > c->cap) {
        char *nj = realloc(c->json, c->cap = 2 * need);
        if (!nj) {
            free(q);
            return -1;
        }
        c->json = nj;
    }
    if (c->len == 0) c->len = (size_t)sprintf(c->json, "[");
    else c->json[--c->len] = '\0'; /* drop the closing bracket */
    c->len += (size_t)sprintf(c->json + c->len, "%s{\"role\": \"%s\", \"content\": %s}]", c->len > 1 ? ", " : "",
                              role, q);
    free(q);
    return 0;
}

static void convo_reset(convo *c, const char *system) {
    c->len = 0;
    if (c->json) c->json[0] = '\0';
    if (system) convo_add(c, "system", system);
}

/* Lists the tool calls an answer makes (<tool_call> JSON </tool_call>, as Qwen writes them, or
 * <function=NAME> blocks, as Qwen3.5 does), so they read as calls rather than text. */
static void show_tool_calls(const char *text) {
    const char *p = text;
    int n = 0;
    while ((p = strstr(p, "<tool_call>"))) {
        p += strlen("<tool_call>");
        const char *end = strstr(p, "</tool_call>");
        size_t len = end ? (size_t)(end - p) : strlen(p);
        while (len && (*p == '\n' || *p == ' ')) p++, len--;
        while (len && (p[len - 1] == '\n' || p[len - 1] == ' ')) len--;
        n++;
        fprintf(stderr, "%s[tool call %d] %.*s%s", n > 1 ? "\n" : "\n\n", n, (int)len, p, end ? "" : " (unterminated)");
        if (!end) break;
        p = end;
    }
}

int cmd_chat(int argc, char **argv) {
    gen_opts g;
    gen_defaults(&g);
    const char *model = NULL;
    for (int i = 0; i < argc; i++) {
        int used = parse_common(&g, argc, argv, i, "chat");
        if (used < 0) return 2;
        if (used) {
            i += used - 1;
            continue;
        }
        if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "moeflux chat: unknown option '%s'\n", argv[i]);
            return 2;
        } else if (!model) model = argv[i];
        else {
            fprintf(stderr, "moeflux chat: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "usage: moeflux chat MODEL [sampling and engine options as for run]\n");
        return 2;
    }
    engine e;
    if (engine_open(&e, model, &g, "chat")) {
        engine_close(&e);
        return 1;
    }
    if (!mf_text_template_name(e.t)) {
        fprintf(stderr, "moeflux chat: %s\n", "the model's chat template is not recognised; use --chat-template-file");
        engine_close(&e);
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, NULL);
    convo c = {0};
    convo_reset(&c, g.system);
    int tty = isatty(0);
    fprintf(stderr, "moeflux chat: %s template; /reset, /save FILE, /load FILE, /quit; Ctrl-C stops an answer, Ctrl-D quits\n",
            mf_text_template_name(e.t));
    char line[65536];
    for (;;) {
        if (tty) fprintf(stderr, "> ");
        g_interrupted = 0;
        if (!fgets(line, sizeof line, stdin)) {
            if (g_interrupted && !feof(stdin)) {
                clearerr(stdin);
                fprintf(stderr, "\n(Ctrl-D or /quit to leave)\n");
                continue;
            }
            break;
        }
        size_t ll = strlen(line);
        while (ll && (line[ll - 1] == '\n' || line[ll - 1] == '\r')) line[--ll] = '\0';
        if (!ll) continue;
        if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) break;
        if (!strcmp(line, "/reset")) {
            convo_reset(&c, g.system);
            mf_session_reset(e.s);
            e.n_hist = 0;
            fprintf(stderr, "(conversation cleared)\n");
            continue;
        }
        if (!strncmp(line, "/save ", 6) || !strncmp(line, "/load ", 6)) {
            const char *path = line + 6;
            char jp[4200];
            snprintf(jp, sizeof jp, "%s.json", path);
            if (line[1] == 's') {
                FILE *f = fopen(jp, "wb");
                int ok = f && fputs(c.json ? c.json : "[]", f) >= 0;
                if (f) ok = (fclose(f) == 0) && ok;
                if (!ok || mf_session_save(e.s, path) != MF_OK)
                    fprintf(stderr, "(cannot save: %s)\n", ok ? mf_session_error(e.s) : jp);
                else fprintf(stderr, "(saved %d positions to %s and the conversation to %s)\n", e.n_hist, path, jp);
            } else {
                char *cj = cli_read_file(jp, NULL);
                if (!cj || mf_session_load(e.s, path) != MF_OK) {
                    fprintf(stderr, "(cannot load: %s)\n", cj ? mf_session_error(e.s) : jp);
                    free(cj);
                    continue;
                }
                free(c.json);
                c.json = cj;
                c.len = strlen(cj);
                c.cap = c.len + 1;
                /* the loaded session's tokens are the prefix to reuse */
                e.n_hist = mf_session_pos(e.s);
                int32_t *ids = NULL;
                size_t n = 0;
                char *text = NULL;
                if (mf_text_render_chat(e.t, c.json, NULL, 0, g.think, &text) == MF_OK &&
                    mf_text_encode(e.t, text, strlen(text), 1, 0, &ids, &n) == MF_OK && (int)n >= e.n_hist)
                    memcpy(e.hist, ids, sizeof(int32_t) * (size_t)e.n_hist);
                else e.n_hist = 0;
                mf_free(ids);
                mf_free(text);
                fprintf(stderr, "(loaded %d positions)\n", mf_session_pos(e.s));
            }
            continue;
        }
        if (convo_add(&c, "user", line)) break;
        char *text = NULL;
        int32_t *ids = NULL;
        size_t n = 0;
        if (mf_text_render_chat(e.t, c.json, NULL, 1, g.think, &text) != MF_OK ||
            mf_text_encode(e.t, text, strlen(text), 1, 0, &ids, &n) != MF_OK) {
            fprintf(stderr, "moeflux chat: %s\n", mf_text_error(e.t));
            mf_free(text);
            mf_free(ids);
            break;
        }
        double t0 = now_s();
        int evaluated = engine_sync(&e, ids, (int)n, "chat");
        mf_free(text);
        mf_free(ids);
        if (evaluated < 0) break;
        double prompt_s = now_s() - t0;
        gen_result r;
        if (generate(&e, &g, &r, "chat")) break;
        show_tool_calls(r.text);
        summary(&e, evaluated, prompt_s, &r);
        if (convo_add(&c, "assistant", r.text)) {
            free(r.text);
            break;
        }
        free(r.text);
    }
    free(c.json);
    engine_close(&e);
    return 0;
}

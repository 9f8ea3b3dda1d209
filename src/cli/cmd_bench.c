/* cmd_bench.c - `moeflux bench`: times prefill and decode on a model with random prompt tokens
 * and reports speed, expert-cache behaviour and memory, as text or JSON. Not a test: it asserts
 * nothing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/commands.h"
#include "moeflux.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

uint64_t peak_rss_bytes(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

static void usage_bench(void) {
    fprintf(stderr, "usage: moeflux bench MODEL [--prompt-tokens N] [--gen-tokens N] [--json] [--seed S]\n"
                    "                     [--expert-cache-mb N] [--threads N] [--io-threads N] [--o-direct]\n"
                    "                     [--chunk N] [--reference]\n");
}

int cmd_bench(int argc, char **argv) {
    const char *model = NULL;
    int n_prompt = 128, n_gen = 32, json = 0;
    unsigned seed = 1;
    mf_engine_options eo;
    mf_engine_options_init(&eo);
    mf_session_options so;
    mf_session_options_init(&so);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        int *iv = NULL;
        if (!strcmp(a, "--prompt-tokens")) iv = &n_prompt;
        else if (!strcmp(a, "--gen-tokens")) iv = &n_gen;
        else if (!strcmp(a, "--threads")) iv = &eo.n_threads;
        else if (!strcmp(a, "--io-threads")) iv = &eo.io_threads;
        else if (!strcmp(a, "--chunk")) iv = &so.prefill_chunk;
        if (iv || !strcmp(a, "--seed") || !strcmp(a, "--expert-cache-mb")) {
            if (!val) {
                fprintf(stderr, "moeflux bench: %s needs a value\n", a);
                return 2;
            }
            char *end;
            long v = strtol(val, &end, 10);
            if (!strcmp(a, "--expert-cache-mb")) {
                if (parse_mb(val, &eo.expert_cache_bytes)) {
                    fprintf(stderr, "moeflux bench: bad size '%s'\n", val);
                    return 2;
                }
            } else if (*end || v < 0 || v > 1000000) {
                fprintf(stderr, "moeflux bench: bad value '%s' for %s\n", val, a);
                return 2;
            } else if (iv) *iv = (int)v;
            else seed = (unsigned)v;
            i++;
        } else if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "--o-direct")) eo.o_direct = 1;
        else if (!strcmp(a, "--reference")) eo.reference = 1;
        else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "moeflux bench: unknown option '%s'\n", a);
            usage_bench();
            return 2;
        } else if (!model) model = a;
        else {
            fprintf(stderr, "moeflux bench: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (!model || n_prompt < 1) {
        usage_bench();
        return 2;
    }
    int rc = 1;
    mf_model *m = NULL;
    mf_session *s = NULL;
    int32_t *toks = NULL;
    float *logits = NULL;
    if (mf_model_open(model, &m) != MF_OK || mf_model_load(m, &eo) != MF_OK) {
        fprintf(stderr, "moeflux bench: %s\n", mf_model_error(m));
        goto done;
    }
    so.max_ctx = n_prompt + n_gen;
    if (mf_session_new(m, &so, &s) != MF_OK) {
        fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
        goto done;
    }
    int V = mf_model_vocab(m);
    toks = malloc(sizeof(int32_t) * (size_t)(n_prompt + 1));
    logits = malloc(sizeof(float) * (size_t)V);
    if (!toks || !logits) goto done;
    uint64_t x = 0x9e3779b97f4a7c15ull * (seed + 1);
    for (int i = 0; i < n_prompt; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        toks[i] = (int32_t)(x % (uint64_t)V);
    }
    double t0 = now_s();
    if (mf_session_eval(s, toks, n_prompt, logits, 0) != MF_OK) {
        fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
        goto done;
    }
    double t1 = now_s();
    mf_expert_stats pre;
    mf_model_expert_stats(m, &pre);
    mf_model_reset_expert_stats(m);
    double t2 = now_s();
    for (int i = 0; i < n_gen; i++) {
        int32_t best = 0;
        for (int v = 1; v < V; v++)
            if (logits[v] > logits[best]) best = v;
        if (mf_session_eval(s, &best, 1, logits, 0) != MF_OK) {
            fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
            goto done;
        }
    }
    double t3 = now_s();
    mf_expert_stats dec;
    mf_model_expert_stats(m, &dec);
    double pf = n_prompt / (t1 - t0), dc = n_gen > 0 ? n_gen / (t3 - t2) : 0;
    uint64_t du = dec.hits + dec.misses, pu = pre.hits + pre.misses;
    double dec_hit = du ? (double)dec.hits / du : 0, pre_hit = pu ? (double)pre.hits / pu : 0;
    if (json) {
        printf("{\"model\": \"%s\", \"backend\": \"cpu\", \"threads\": %d, \"prompt_tokens\": %d, "
               "\"gen_tokens\": %d, \"prefill_s\": %.6f, \"prefill_tok_s\": %.3f, \"decode_s\": %.6f, "
               "\"decode_tok_s\": %.3f, \"prefill_expert_hit_rate\": %.4f, \"prefill_bytes_read\": %llu, "
               "\"decode_expert_hit_rate\": %.4f, \"decode_bytes_read\": %llu, \"decode_read_gbps\": %.3f, "
               "\"expert_cache_budget_bytes\": %llu, \"expert_cache_peak_bytes\": %llu, "
               "\"peak_rss_bytes\": %llu}\n",
               model, eo.n_threads, n_prompt, n_gen, t1 - t0, pf, t3 - t2, dc, pre_hit,
               (unsigned long long)pre.bytes_read, dec_hit, (unsigned long long)dec.bytes_read,
               dec.read_seconds > 0 ? dec.bytes_read / dec.read_seconds / 1e9 : 0.0,
               (unsigned long long)dec.budget_bytes, (unsigned long long)dec.peak_bytes,
               (unsigned long long)peak_rss_bytes());
    } else {
        printf("prefill  %5d tokens  %8.3f s  %9.2f tok/s  expert hit rate %5.1f%%  %.1f MB read\n", n_prompt,
               t1 - t0, pf, 100 * pre_hit, pre.bytes_read / 1e6);
        printf("decode   %5d tokens  %8.3f s  %9.2f tok/s  expert hit rate %5.1f%%  %.1f MB read\n", n_gen,
               t3 - t2, dc, 100 * dec_hit, dec.bytes_read / 1e6);
        printf("expert cache budget %.1f MB, peak %.1f MB; peak RSS %.1f MB\n", dec.budget_bytes / 1e6,
               dec.peak_bytes / 1e6, peak_rss_bytes() / 1e6);
    }
    rc = 0;
done:
    free(toks);
    free(logits);
    mf_session_free(s);
    mf_model_free(m);
    return rc;
}

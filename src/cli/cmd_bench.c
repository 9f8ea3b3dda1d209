/* cmd_bench.c - `moeflux bench`: times prefill and decode on a model with random prompt tokens
 * and reports speed, the time split per phase, expert-tier behaviour and memory against the
 * limits of the run (memory bandwidth, PCIe or disk), as text or JSON. Not a test: it asserts
 * nothing. */
#include <cJSON.h>
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
    fprintf(stderr, "usage: moeflux bench MODEL [--prompt-tokens N] [--gen-tokens N] [--warmup-tokens N] [--json]\n"
                    "                     [--seed S]\n"
                    "                     [--cuda] [--gpu-cache-gb G] [--host-cache-gb G] [--threads N]\n"
                    "                     [--io-threads N] [--o-direct] [--chunk N] [--reference] [--no-profile]\n"
                    "                     [--no-graph] [--no-host-reads] [--no-predict]\n");
}

static double jnum(const cJSON *o, const char *k) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(it) ? it->valuedouble : cJSON_IsBool(it) ? cJSON_IsTrue(it) : 0.0;
}

/* Bytes a decoded token must read from backend memory at context length ctx: every dense
 * matrix except the embedding (one row), the routed experts it uses, its KV cache. */
static double bytes_per_token(const cJSON *info, double ctx) {
    double dense = jnum(info, "dense_bytes") - jnum(info, "embed_bytes");
    double experts = jnum(info, "n_moe_layers") * jnum(info, "n_experts_per_tok") * jnum(info, "expert_bytes");
    double full = 0;
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(info, "layer_types"), *e;
    cJSON_ArrayForEach(e, lt) full += cJSON_IsString(e) && !strcmp(e->valuestring, "full_attention");
    double kv = full * ctx * jnum(info, "n_kv_heads") * jnum(info, "head_dim") * 4 * 2;
    return dense + experts + kv;
}

int cmd_bench(int argc, char **argv) {
    const char *model = NULL;
    int n_prompt = 128, n_gen = 32, n_warm = 0, json = 0, profile = 1;
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
        else if (!strcmp(a, "--warmup-tokens")) iv = &n_warm;
        else if (!strcmp(a, "--threads")) iv = &eo.n_threads;
        else if (!strcmp(a, "--io-threads")) iv = &eo.io_threads;
        else if (!strcmp(a, "--chunk")) iv = &so.prefill_chunk;
        int cache = parse_cache_opt("bench", a, val, &eo);
        if (cache < 0) return 2;
        if (cache) {
            i++;
        } else if (iv || !strcmp(a, "--seed")) {
            if (!val) {
                fprintf(stderr, "moeflux bench: %s needs a value\n", a);
                return 2;
            }
            char *end;
            {
                long v = strtol(val, &end, 10);
                if (*end || v < 0 || v > 1000000) {
                    fprintf(stderr, "moeflux bench: bad value '%s' for %s\n", val, a);
                    return 2;
                }
                if (iv) *iv = (int)v;
                else seed = (unsigned)v;
            }
            i++;
        } else if (!strcmp(a, "--json")) json = 1;
        else if (!strcmp(a, "--cuda")) eo.use_cuda = 1;
        else if (!strcmp(a, "--no-profile")) profile = 0;
        else if (!strcmp(a, "--no-graph")) so.no_graph = 1;
        else if (!strcmp(a, "--no-host-reads")) eo.no_host_reads = 1;
        else if (!strcmp(a, "--no-predict")) so.no_predict = 1;
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
    cJSON *info = NULL;
    if (mf_model_open(model, &m) != MF_OK || mf_model_load(m, &eo) != MF_OK) {
        fprintf(stderr, "moeflux bench: %s\n", mf_model_error(m));
        goto done;
    }
    info = cJSON_Parse(mf_model_info_json(m));
    so.max_ctx = n_prompt + n_warm + n_gen + (profile ? n_gen : 0) + 1;
    if (mf_session_new(m, &so, &s) != MF_OK) {
        fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
        goto done;
    }
    int V = mf_model_vocab(m);
    toks = malloc(sizeof(int32_t) * (size_t)(n_prompt + 1));
    if (!toks || !info) goto done;
    uint64_t x = 0x9e3779b97f4a7c15ull * (seed + 1);
    for (int i = 0; i < n_prompt; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        toks[i] = (int32_t)(x % (uint64_t)V);
    }
    /* prefill */
    double t0 = now_s();
    int32_t next = 0;
    if (mf_session_eval_greedy(s, toks, n_prompt, &next) != MF_OK) {
        fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
        goto done;
    }
    double t1 = now_s();
    mf_expert_stats pre, dec;
    mf_model_expert_stats(m, &pre);
    /* untimed decode steps first: the caches reach their steady state */
    for (int i = 0; i < n_warm; i++) {
        int32_t tok = next;
        if (mf_session_eval_greedy(s, &tok, 1, &next) != MF_OK) {
            fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
            goto done;
        }
    }
    mf_model_reset_expert_stats(m);
    /* decode, unprofiled */
    double t2 = now_s();
    /* greedy decoding on the backend: only token ids cross to the host */
    for (int i = 0; i < n_gen; i++) {
        int32_t tok = next;
        if (mf_session_eval_greedy(s, &tok, 1, &next) != MF_OK) {
            fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
            goto done;
        }
    }
    double t3 = now_s();
    mf_model_expert_stats(m, &dec);
    /* a second, profiled decode gives the time split */
    mf_profile prof;
    memset(&prof, 0, sizeof prof);
    if (profile && n_gen > 0) {
        mf_session_set_profile(s, 1);
        mf_session_reset_profile(s);
        for (int i = 0; i < n_gen; i++) {
            int32_t tok = next;
            if (mf_session_eval_greedy(s, &tok, 1, &next) != MF_OK) {
                fprintf(stderr, "moeflux bench: %s\n", mf_session_error(s));
                goto done;
            }
        }
        mf_session_profile(s, &prof);
    }
    uint64_t rss = peak_rss_bytes(); /* before the bandwidth probe's buffers */
    double dev_gbps = 0, up_gbps = 0;
    mf_model_bandwidth(m, &dev_gbps, &up_gbps);
    double pf = n_prompt / (t1 - t0), dc = n_gen > 0 ? n_gen / (t3 - t2) : 0;
    uint64_t du = dec.hits + dec.misses, pu = pre.hits + pre.misses;
    uint64_t gu = dec.gpu_hits + dec.gpu_misses;
    double dec_hit = du ? (double)dec.hits / du : 0, pre_hit = pu ? (double)pre.hits / pu : 0;
    double gpu_hit = gu ? (double)dec.gpu_hits / gu : 0;
    /* limits: memory-bound from the bytes a token reads; transfer-bound from the bytes that
     * actually moved per token (on a GPU uploads and experts read from host RAM, both over the
     * bus; file reads on the CPU) */
    double bpt = bytes_per_token(info, n_prompt + n_gen / 2.0);
    double mem_limit = dev_gbps > 0 ? dev_gbps * 1e9 / bpt : 0;
    double gpu_moved = (double)dec.gpu_bytes_uploaded + (double)dec.gpu_bytes_from_host;
    double moved = n_gen > 0 ? (eo.use_cuda ? gpu_moved : (double)dec.bytes_read) / n_gen : 0;
    double xfer_gbps = eo.use_cuda ? up_gbps : (dec.read_seconds > 0 ? dec.bytes_read / dec.read_seconds / 1e9 : 0);
    double xfer_limit = moved > 0 && xfer_gbps > 0 ? xfer_gbps * 1e9 / moved : 0;
    double ptok = prof.tokens ? (double)prof.tokens : 1;
    const char *backend = mf_model_backend(m);
    if (json) {
        printf("{\"model\": \"%s\", \"backend\": \"%s\", \"threads\": %d, \"prompt_tokens\": %d, \"gen_tokens\": %d, "
               "\"prefill_s\": %.6f, \"prefill_tok_s\": %.3f, \"decode_s\": %.6f, \"decode_tok_s\": %.3f, "
               "\"decode_split_ms_per_token\": {\"mixer\": %.4f, \"router\": %.4f, \"expert_wait\": %.4f, "
               "\"expert_compute\": %.4f, \"other\": %.4f}, "
               "\"prefill_expert_hit_rate\": %.4f, \"prefill_bytes_read\": %llu, "
               "\"decode_expert_hit_rate\": %.4f, \"decode_bytes_read\": %llu, \"decode_read_gbps\": %.3f, "
               "\"decode_gpu_hit_rate\": %.4f, \"decode_gpu_bytes_uploaded\": %llu, "
               "\"decode_gpu_bytes_from_host\": %llu, \"gpu_cache_budget_bytes\": %llu, "
               "\"expert_cache_budget_bytes\": %llu, \"expert_cache_peak_bytes\": %llu, \"peak_rss_bytes\": %llu, "
               "\"memory_gbps\": %.2f, \"transfer_gbps\": %.2f, \"bytes_per_token\": %.0f, \"moved_bytes_per_token\": %.0f, "
               "\"memory_bound_tok_s\": %.2f, \"transfer_bound_tok_s\": %.2f, \"fraction_of_memory_bound\": %.4f, "
               "\"fraction_of_transfer_bound\": %.4f, \"prediction_accuracy\": %.4f}\n",
               model, backend, eo.n_threads, n_prompt, n_gen, t1 - t0, pf, t3 - t2, dc, 1e3 * prof.mixer / ptok,
               1e3 * prof.router / ptok, 1e3 * prof.expert_wait / ptok, 1e3 * prof.expert_compute / ptok,
               1e3 * prof.other / ptok, pre_hit, (unsigned long long)pre.bytes_read, dec_hit,
               (unsigned long long)dec.bytes_read, dec.read_seconds > 0 ? dec.bytes_read / dec.read_seconds / 1e9 : 0.0,
               gpu_hit, (unsigned long long)dec.gpu_bytes_uploaded, (unsigned long long)dec.gpu_bytes_from_host,
               (unsigned long long)dec.gpu_budget_bytes,
               (unsigned long long)dec.budget_bytes, (unsigned long long)dec.peak_bytes,
               (unsigned long long)rss, dev_gbps, xfer_gbps, bpt, moved, mem_limit, xfer_limit,
               mem_limit > 0 ? dc / mem_limit : 0.0, xfer_limit > 0 ? dc / xfer_limit : 0.0,
               prof.predicted_total ? (double)prof.predicted_hits / prof.predicted_total : 0.0);
    } else {
        printf("backend %s\n", backend);
        printf("prefill  %5d tokens  %8.3f s  %9.2f tok/s  expert hit rate %5.1f%%  %.1f MB read\n", n_prompt,
               t1 - t0, pf, 100 * pre_hit, pre.bytes_read / 1e6);
        printf("decode   %5d tokens  %8.3f s  %9.2f tok/s  host hit rate %5.1f%%  %.1f MB read", n_gen, t3 - t2, dc,
               100 * dec_hit, dec.bytes_read / 1e6);
        if (eo.use_cuda)
            printf("  gpu hit rate %5.1f%%  %.1f MB uploaded  %.1f MB read from host RAM", 100 * gpu_hit,
                   dec.gpu_bytes_uploaded / 1e6, dec.gpu_bytes_from_host / 1e6);
        printf("\n");
        if (prof.tokens)
            printf("decode split, ms/token: mixer %.3f  router %.3f  expert wait %.3f  expert compute %.3f  other %.3f\n",
                   1e3 * prof.mixer / ptok, 1e3 * prof.router / ptok, 1e3 * prof.expert_wait / ptok,
                   1e3 * prof.expert_compute / ptok, 1e3 * prof.other / ptok);
        if (prof.predicted_total)
            printf("next-layer expert prediction: %.1f%% of routed experts predicted\n",
                   100.0 * prof.predicted_hits / prof.predicted_total);
        printf("limits: %.1f MB/token at %.1f GB/s memory -> %.1f tok/s (%.0f%% reached)", bpt / 1e6, dev_gbps, mem_limit,
               mem_limit > 0 ? 100 * dc / mem_limit : 0.0);
        if (xfer_limit > 0)
            printf("; %.1f MB/token moved at %.1f GB/s -> %.1f tok/s (%.0f%% reached)", moved / 1e6, xfer_gbps,
                   xfer_limit, 100 * dc / xfer_limit);
        printf("\nexpert cache budget %.1f MB, peak %.1f MB; peak RSS %.1f MB\n", dec.budget_bytes / 1e6,
               dec.peak_bytes / 1e6, rss / 1e6);
    }
    rc = 0;
done:
    cJSON_Delete(info);
    free(toks);
    mf_session_free(s);
    mf_model_free(m);
    return rc;
}

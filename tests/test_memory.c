/* test_memory.c - resident memory while decoding a model whose experts are ten times the
 * expert cache budget: peak RSS stays under dense weights + budget + session state + a small
 * constant. Not a speed test. */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"

#if defined(__SANITIZE_ADDRESS__)
#define ASAN_BUILD 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ASAN_BUILD 1
#endif
#endif
#ifndef ASAN_BUILD
#define ASAN_BUILD 0
#endif

static double jnum(const char *json, const char *key) {
    cJSON *o = cJSON_Parse(json);
    cr_assert(o, "not JSON: %s", json);
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    cr_assert(cJSON_IsNumber(it), "no %s in %s", key, json);
    double v = it->valuedouble;
    cJSON_Delete(o);
    return v;
}

Test(memory, decode_rss_bounded_by_dense_budget_state, .timeout = 300) {
    char *dir = th_tmpdir(), *model = th_join(dir, "m.moeflux");
    /* one layer of Qwen3-30B-A3B: 650 MB of dense weights (embedding, lm_head), 128 experts of
     * 2.65 MB = 340 MB; the cache gets a tenth of that */
    char *syn[] = {(char *)th_bin(), "synth", "qwen3-30b-a3b", model, "--layers", "1", "--quiet", NULL};
    char *out = NULL, *err = NULL;
    cr_assert_eq(th_run(syn, &out, &err), 0, "synth: %s", err);
    free(out);
    free(err);
    char *inf[] = {(char *)th_bin(), "info", model, "--json", NULL};
    cr_assert_eq(th_run(inf, &out, &err), 0, "%s", err);
    double dense = jnum(out, "dense_bytes"), experts = jnum(out, "experts_bytes");
    double n_layers = jnum(out, "n_layers"), kv = jnum(out, "n_kv_heads"), hd = jnum(out, "head_dim");
    double hidden = jnum(out, "hidden_size"), vocab = jnum(out, "vocab_size");
    free(out);
    free(err);
    double budget_mb = experts / 10 / (1024.0 * 1024.0);
    char mb[32];
    snprintf(mb, sizeof mb, "%.0f", budget_mb);
    if (ASAN_BUILD) setenv("ASAN_OPTIONS", "quarantine_size_mb=0:detect_leaks=0", 1);
    char *bench[] = {(char *)th_bin(), "bench", model, "--prompt-tokens", "16", "--gen-tokens", "16",
                     "--expert-cache-mb", mb, "--json", NULL};
    cr_assert_eq(th_run(bench, &out, &err), 0, "bench: %s", err);
    double rss = jnum(out, "peak_rss_bytes"), budget = jnum(out, "expert_cache_budget_bytes");
    double read = jnum(out, "decode_bytes_read");
    cr_assert_leq(budget, experts / 10 + 4 * 1024 * 1024, "budget %g for %g of experts", budget, experts);
    cr_assert_gt(read, 0, "a cache a tenth of the experts must read while decoding");
    /* session state: KV cache for 32 positions of every layer, activations of a 32-token chunk
     * (a few hidden-wide and projection-wide rows), logits */
    double state = n_layers * 32 * kv * hd * 4 * 2 + 32 * 8 * 8192 * 4 + 4 * vocab + 32 * hidden * 4 * 3;
    double constant = 24.0 * 1024 * 1024;                  /* program, libraries, stacks, allocator */
    if (ASAN_BUILD) constant += (dense + budget) / 8 + 128.0 * 1024 * 1024; /* shadow memory */
    double bound = dense + budget + state + constant;
    cr_log_info("peak RSS %.1f MB; dense %.1f MB + cache %.1f MB + state %.1f MB + %.0f MB = %.1f MB", rss / 1e6,
                dense / 1e6, budget / 1e6, state / 1e6, constant / 1e6, bound / 1e6);
    cr_assert_leq(rss, bound, "peak RSS %.1f MB exceeds %.1f MB", rss / 1e6, bound / 1e6);
    free(out);
    free(err);
    th_rmtree(dir);
    free(dir);
    free(model);
}

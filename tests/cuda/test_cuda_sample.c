/* test_cuda_sample.c - the CUDA backend's sample op against the host sampler (text/sampler.c):
 * for the same logits and the same seed both pick the same tokens, over vocabularies from 7 to
 * 248,320 tokens, logit spreads from flat to peaked, ties, non-finite logits, every cut (top-k,
 * top-p, min-p) and the penalties, including draws whose cuts reach more candidates than the
 * device sorts (the op answers -1 and the host finishes from the penalised logits); and
 * mf_session_eval_sample on the GPU against the host sampler over mf_session_eval's logits, with
 * every expert on the GPU (the recorded decode step) and with a one-expert cache (streaming).
 * Needs a GPU (make test-cuda). */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "../helpers.h"
#include "text/sampler.h"

#define MAX_VOCAB 248320

static mf_backend *gpu;
static float *d_logits; /* device [MAX_VOCAB] */
static int32_t *d_out;  /* device [1] */

static void gpu_up(void) {
    mf_err err = {0};
    gpu = cuda_backend_create(0, &err);
    cr_assert(gpu, "no CUDA device: %s", err.msg);
    d_logits = gpu->ops->alloc(gpu, sizeof(float) * MAX_VOCAB);
    d_out = gpu->ops->alloc(gpu, sizeof(int32_t));
    cr_assert(d_logits && d_out, "out of device memory");
}

static void gpu_down(void) {
    if (!gpu) return;
    gpu->ops->free(gpu, d_logits);
    gpu->ops->free(gpu, d_out);
    gpu->ops->destroy(gpu);
    gpu = NULL;
}

TestSuite(cuda_sample, .init = gpu_up, .fini = gpu_down);

enum { SPREAD_NORMAL, SPREAD_PEAKED, SPREAD_TIES, SPREAD_FLAT, SPREAD_NONFINITE };

/* Logits of one kind: normal (sd 3), one token far ahead, quarter steps (many ties), a narrow
 * band (flat: top-p reaches thousands), or normal with -inf, NaN and sometimes +inf mixed in. */
static void make_logits(float *l, int64_t V, int kind) {
    for (int64_t i = 0; i < V; i++) {
        double x = th_rng_normal();
        switch (kind) {
        case SPREAD_PEAKED: l[i] = (float)(x * 2.0); break;
        case SPREAD_TIES: l[i] = (float)(floor(x * 4.0) / 4.0); break;
        case SPREAD_FLAT: l[i] = (float)(x * 0.05); break;
        default: l[i] = (float)(x * 3.0); break;
        }
    }
    if (kind == SPREAD_PEAKED) l[th_rng_next() % (uint64_t)V] = 30.0f;
    if (kind == SPREAD_NONFINITE) {
        for (int64_t i = 0; i < V / 10 + 1; i++) l[th_rng_next() % (uint64_t)V] = -INFINITY;
        l[th_rng_next() % (uint64_t)V] = NAN;
        if (th_rng_next() % 3 == 0) l[th_rng_next() % (uint64_t)V] = INFINITY;
    }
}

typedef struct draw_stats {
    int draws, host_finished;
} draw_stats;

/* One draw both ways: the host sampler h on a copy of the logits; the twin sampler d (same
 * seed, so the same draw u) through the op, finished on the host when the op answers -1. */
static void draw_both(sampler *h, sampler *d, const float *logits, int64_t V, const int32_t *hist, int n_hist,
                      float *scratch, draw_stats *ds, const char *what) {
    memcpy(scratch, logits, sizeof(float) * (size_t)V);
    const int32_t want = sampler_sample(h, scratch, hist, n_hist);
    mf_sample_args a;
    sampler_prepare(d, hist, n_hist, &a);
    gpu->ops->upload(gpu, d_logits, logits, sizeof(float) * (size_t)V);
    gpu->ops->sample(gpu, d_logits, V, &a, d_out);
    int32_t got = -2;
    gpu->ops->download(gpu, &got, d_out, sizeof got);
    cr_assert_null(cuda_backend_last_error(gpu), "%s: %s", what, cuda_backend_last_error(gpu));
    if (got == -1) {
        gpu->ops->download(gpu, scratch, d_logits, sizeof(float) * (size_t)V);
        got = sampler_finish(d, scratch, &a, 1);
        ds->host_finished++;
    }
    ds->draws++;
    cr_assert_eq(got, want, "%s: the device picked %d, the host %d", what, got, want);
}

static void run_cases(int64_t V, const int *kinds, int n_kinds, int draws_per_case, draw_stats *ds) {
    const float temps[] = {0.0f, 0.3f, 1.0f, 1.7f};
    const int top_ks[] = {0, 1, 40, 3000};
    const float top_ps[] = {1.0f, 0.9f, 0.5f};
    const float min_ps[] = {0.0f, 0.05f};
    float *logits = malloc(sizeof(float) * (size_t)V), *scratch = malloc(sizeof(float) * (size_t)V);
    int32_t hist[96];
    cr_assert(logits && scratch && V <= MAX_VOCAB);
    uint64_t seed = 1;
    for (int k = 0; k < n_kinds; k++)
        for (size_t ti = 0; ti < sizeof temps / sizeof temps[0]; ti++)
            for (size_t ki = 0; ki < sizeof top_ks / sizeof top_ks[0]; ki++)
                for (size_t pi = 0; pi < sizeof top_ps / sizeof top_ps[0]; pi++)
                    for (size_t mi = 0; mi < sizeof min_ps / sizeof min_ps[0]; mi++)
                        for (int pen = 0; pen < 2; pen++) {
                            if (temps[ti] == 0 && (ki || pi || mi)) continue; /* cuts do not apply */
                            mf_sampler_params p;
                            mf_sampler_params_init(&p);
                            p.temperature = temps[ti];
                            p.top_k = top_ks[ki];
                            p.top_p = top_ps[pi];
                            p.min_p = min_ps[mi];
                            p.seed = seed++;
                            if (pen) {
                                p.repetition_penalty = 1.3f;
                                p.presence_penalty = 0.5f;
                                p.frequency_penalty = 0.25f;
                                p.penalty_last_n = 64;
                            }
                            sampler *h = sampler_new(&p, (int)V), *d = sampler_new(&p, (int)V);
                            cr_assert(h && d);
                            for (int r = 0; r < draws_per_case; r++) {
                                make_logits(logits, V, kinds[k]);
                                for (int i = 0; i < 96; i++) hist[i] = (int32_t)(th_rng_next() % (uint64_t)(V < 50 ? V : 50));
                                char what[160];
                                snprintf(what, sizeof what, "V %lld kind %d T %g top-k %d top-p %g min-p %g pen %d draw %d",
                                         (long long)V, kinds[k], temps[ti], top_ks[ki], top_ps[pi], min_ps[mi], pen, r);
                                draw_both(h, d, logits, V, hist, 96, scratch, ds, what);
                            }
                            sampler_free(h);
                            sampler_free(d);
                        }
    free(logits);
    free(scratch);
}

Test(cuda_sample, same_tokens_as_the_host_sampler) {
    th_rng_seed(7);
    draw_stats ds = {0};
    const int all[] = {SPREAD_NORMAL, SPREAD_PEAKED, SPREAD_TIES, SPREAD_FLAT, SPREAD_NONFINITE};
    run_cases(7, all, 5, 4, &ds);
    run_cases(5000, all, 5, 2, &ds);
    const int big[] = {SPREAD_NORMAL, SPREAD_FLAT};
    run_cases(248320, big, 2, 1, &ds);
    cr_log_info("sample: %d draws agree with the host sampler, %d finished on the host", ds.draws, ds.host_finished);
    cr_assert_gt(ds.host_finished, 0, "no draw reached past what the device sorts");
    cr_assert_lt(ds.host_finished, ds.draws / 4, "most draws should finish on the device");
}

/* Every logit -inf (the host gives token 0) and a vocabulary whose logits are all equal. */
Test(cuda_sample, degenerate_logits) {
    const int64_t V = 1000;
    float *l = malloc(sizeof(float) * V), *scratch = malloc(sizeof(float) * V);
    cr_assert(l && scratch);
    draw_stats ds = {0};
    for (int c = 0; c < 3; c++) {
        for (int64_t i = 0; i < V; i++) l[i] = c == 0 ? -INFINITY : (c == 1 ? 0.5f : NAN);
        mf_sampler_params p;
        mf_sampler_params_init(&p);
        p.temperature = 0.8f;
        p.top_p = c == 1 ? 0.3f : 1.0f;
        p.seed = 3;
        sampler *h = sampler_new(&p, (int)V), *d = sampler_new(&p, (int)V);
        for (int r = 0; r < 8; r++) draw_both(h, d, l, V, NULL, 0, scratch, &ds, "degenerate");
        sampler_free(h);
        sampler_free(d);
    }
    free(l);
    free(scratch);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* Not a timed test: prints the op's time per draw at a real vocabulary for the notes. */
Test(cuda_sample, time_per_draw) {
    const int64_t V = 248320;
    float *l = malloc(sizeof(float) * V);
    cr_assert(l);
    th_rng_seed(11);
    make_logits(l, V, SPREAD_NORMAL);
    gpu->ops->upload(gpu, d_logits, l, sizeof(float) * V);
    mf_sampler_params p;
    mf_sampler_params_init(&p);
    p.temperature = 0.7f;
    p.top_p = 0.9f;
    p.top_k = 0;
    p.repetition_penalty = 1.1f;
    sampler *d = sampler_new(&p, (int)V);
    int32_t hist[64] = {0}, tok = 0;
    const int N = 200;
    double t0 = 0;
    for (int i = 0; i < N + 10; i++) {
        if (i == 10) t0 = now_ms();
        mf_sample_args a;
        sampler_prepare(d, hist, 64, &a);
        gpu->ops->sample(gpu, d_logits, V, &a, d_out);
        gpu->ops->download(gpu, &tok, d_out, sizeof tok);
        cr_assert(tok >= 0 && tok < V);
    }
    cr_log_info("sample: %.1f us a draw over %lld tokens (T 0.7, top-p 0.9, repetition 1.1), token included",
                (now_ms() - t0) * 1e3 / N, (long long)V);
    sampler_free(d);
    free(l);
}

/* ---- the session path ---- */

TestSuite(cuda_session_sample, .init = th_tmp_setup, .fini = th_tmp_teardown);

static void session_same_tokens(const char *fixture, uint64_t gpu_cache) {
    th_ref r;
    th_ref_load(&r, fixture);
    char *path = th_convert(fixture, NULL, NULL);
    mf_engine_options eo;
    mf_engine_options_init(&eo);
    eo.use_cuda = 1;
    eo.gpu_cache_bytes = gpu_cache;
    eo.n_threads = 2;
    mf_model *m = th_load(path, &eo);
    char what[128];
    snprintf(what, sizeof what, "%s, GPU cache %llu bytes", fixture, (unsigned long long)gpu_cache);
    th_check_eval_sample_modes(m, &r, what);
    mf_model_free(m);
    free(path);
    th_ref_free(&r);
}

Test(cuda_session_sample, qwen3_5_moe_text) {
    session_same_tokens("qwen3_5_moe_text", 1ull << 30);
    session_same_tokens("qwen3_5_moe_text", 1);
}

Test(cuda_session_sample, qwen3_next) {
    session_same_tokens("qwen3_next", 1ull << 30);
    session_same_tokens("qwen3_next", 1);
}

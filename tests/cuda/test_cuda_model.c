/* test_cuda_model.c - the engine on the CUDA backend against transformers: every fixture's logits
 * at every prompt position and its greedy continuation, with a GPU expert cache holding every
 * expert and with one of a single slot; quantized conversions against the CPU engine.
 * Needs a GPU (make test-cuda). Not op-level checks (test_cuda_ops.c). */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <stdio.h>
#include <stdlib.h>

#include "../helpers.h"
#include "moeflux.h"

TestSuite(cuda_model, .init = th_tmp_setup, .fini = th_tmp_teardown, .timeout = 300);

/* use_cuda: gpu_cache bytes of GPU expert cache (0: default); no_host_reads: every expert the
 * GPU computes is uploaded into its cache first. */
static mf_model *load(const char *path, int use_cuda, uint64_t gpu_cache, int no_host_reads) {
    mf_engine_options eo;
    mf_engine_options_init(&eo);
    eo.use_cuda = use_cuda;
    eo.gpu_cache_bytes = gpu_cache;
    eo.no_host_reads = no_host_reads;
    eo.n_threads = 2;
    return th_load(path, &eo);
}

/* Lossless conversion on the GPU reproduces transformers: logits within 1e-2 at every prompt
 * position (prefill through the tiled matmul, chunk 64; and through 5-token chunks, the GEMV),
 * the same greedy continuation (decode steps), for a cache of every expert, and for one of a
 * single slot both with the experts it lacks read from host RAM in place (the default when RAM
 * holds them all) and uploaded into it first. */
static void check_fixture(const char *fixture) {
    th_ref r;
    th_ref_load(&r, fixture);
    char *path = th_convert(fixture, NULL, NULL);
    const uint64_t caches[3] = {(uint64_t)1 << 30, 1, 1};
    for (int ci = 0; ci < 3; ci++) {
        mf_model *m = load(path, 1, caches[ci], ci == 2);
        int V = mf_model_vocab(m);
        cr_assert_eq(V, r.vocab);
        for (int chunk = 64; chunk >= 5; chunk -= 59) {
            mf_session *s = th_session(m, chunk);
            float *lg = th_eval_all(s, r.prompt, r.n_prompt, V);
            double d = th_max_diff(lg, r.logits, (int64_t)r.n_prompt * V);
            cr_log_info("%s gpu cache %llu chunk %d: max |logit - transformers| = %.3g", fixture,
                        (unsigned long long)caches[ci], chunk, d);
            cr_assert_leq(d, 1e-2, "%s (gpu cache %llu B, chunk %d): max |logit - transformers| = %g", fixture,
                          (unsigned long long)caches[ci], chunk, d);
            /* the greedy continuation through decode steps, then chosen on the GPU (argmax; with
             * every expert resident the decode steps replay one recorded graph), only token ids
             * coming back */
            char what[160];
            snprintf(what, sizeof what, "%s (gpu cache %llu B, chunk %d)", fixture, (unsigned long long)caches[ci],
                     chunk);
            th_check_greedy(s, &r, lg + (size_t)(r.n_prompt - 1) * (size_t)V, V, what);
            free(lg);
            mf_session_free(s);
        }
        mf_expert_stats st;
        mf_model_expert_stats(m, &st);
        cr_log_info("%s gpu cache %llu: %llu hits, %llu misses, %llu evictions", fixture,
                    (unsigned long long)caches[ci], (unsigned long long)st.gpu_hits,
                    (unsigned long long)st.gpu_misses, (unsigned long long)st.gpu_evictions);
        if (ci >= 1) cr_assert_gt(st.gpu_evictions, 0, "a one-slot GPU cache must evict");
        /* the decode steps of the default one-slot run computed experts from host RAM */
        if (ci == 1) cr_assert_gt(st.gpu_host_reads, 0, "%s: no expert was read in place", fixture);
        if (ci != 1) cr_assert_eq(st.gpu_host_reads, 0);
        cr_assert_leq(st.gpu_peak_bytes, st.gpu_budget_bytes);
        mf_model_free(m);
    }
    free(path);
    th_ref_free(&r);
}

Test(cuda_model, qwen3_5_moe_vl) { check_fixture("qwen3_5_moe_vl"); }
Test(cuda_model, qwen3_5_moe_text) { check_fixture("qwen3_5_moe_text"); }
Test(cuda_model, qwen3_next) { check_fixture("qwen3_next"); }
Test(cuda_model, qwen3_moe_experts) { check_fixture("qwen3_moe_experts"); }
Test(cuda_model, qwen3_moe_fused) { check_fixture("qwen3_moe_fused"); }
Test(cuda_model, qwen3_5_moe_mlx4) { check_fixture("qwen3_5_moe_mlx4"); }
Test(cuda_model, qwen3_next_mlx8) { check_fixture("qwen3_next_mlx8"); }

/* The default q4 experts / q8 dense conversion on the GPU against the same file on the CPU
 * (the q4/q8 kernels at model level): logits within 1e-3. */
static void check_quantized(const char *fixture, const char *experts, const char *dense) {
    th_ref r;
    th_ref_load(&r, fixture);
    char *path = th_convert(fixture, experts, dense);
    mf_model *mc = load(path, 0, 0, 0), *mg = load(path, 1, 1 << 20, 0);
    int V = mf_model_vocab(mc);
    mf_session *sc = th_session(mc, 64), *sg = th_session(mg, 64);
    float *lc = th_eval_all(sc, r.prompt, r.n_prompt, V), *lgp = th_eval_all(sg, r.prompt, r.n_prompt, V);
    double d = th_max_diff(lgp, lc, (int64_t)r.n_prompt * V);
    cr_log_info("%s experts %s dense %s: max |gpu - cpu| = %.3g", fixture, experts, dense, d);
    cr_assert_leq(d, 1e-3, "%s experts %s dense %s: max |gpu - cpu| = %g", fixture, experts, dense, d);
    /* decode steps (GEMV) against the CPU too */
    float *a = malloc(sizeof(float) * (size_t)V), *b = malloc(sizeof(float) * (size_t)V);
    for (int i = 0; i < 4; i++) {
        int32_t tok = r.greedy[i];
        cr_assert_eq(mf_session_eval(sc, &tok, 1, a, 0), MF_OK);
        cr_assert_eq(mf_session_eval(sg, &tok, 1, b, 0), MF_OK);
        d = th_max_diff(b, a, V);
        cr_assert_leq(d, 1e-3, "%s decode step %d: max |gpu - cpu| = %g", fixture, i, d);
    }
    free(a);
    free(b);
    free(lc);
    free(lgp);
    mf_session_free(sc);
    mf_session_free(sg);
    mf_model_free(mc);
    mf_model_free(mg);
    free(path);
    th_ref_free(&r);
}

Test(cuda_model, quantized_qwen3_5_moe_vl) { check_quantized("qwen3_5_moe_vl", "q4", "q8"); }
Test(cuda_model, quantized_qwen3_next) { check_quantized("qwen3_next", "q4", "q8"); }
Test(cuda_model, quantized_qwen3_moe_fused) { check_quantized("qwen3_moe_fused", "q8", "q4"); }

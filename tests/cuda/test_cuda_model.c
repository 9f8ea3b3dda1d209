/* test_cuda_model.c - the engine on the CUDA backend against transformers: every fixture's logits
 * at every prompt position and its greedy continuation, with a GPU expert cache holding every
 * expert and with one of a single slot; quantized conversions against the CPU engine.
 * Needs a GPU (make test-cuda). Not op-level checks (test_cuda_ops.c). */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../helpers.h"
#include "moeflux.h"

static char *g_tmp;

static void setup(void) {
    g_tmp = th_tmpdir();
    cr_assert(g_tmp);
}
static void teardown(void) {
    th_rmtree(g_tmp);
    free(g_tmp);
}

TestSuite(cuda_model, .init = setup, .fini = teardown, .timeout = 300);

typedef struct ref {
    int32_t *prompt, *greedy;
    int n_prompt, n_greedy;
    float *logits; /* [n_prompt][vocab] */
    int64_t vocab;
} ref;

static void ref_load(ref *r, const char *fixture) {
    char *dir = th_join(th_fixtures(), fixture);
    char *rj = th_join(dir, "ref.json"), *rl = th_join(dir, "ref_logits.npy");
    r->prompt = th_json_ints(rj, "prompt", &r->n_prompt);
    r->greedy = th_json_ints(rj, "greedy", &r->n_greedy);
    int64_t rows;
    r->logits = th_read_npy_f32(rl, &rows, &r->vocab);
    cr_assert(r->prompt && r->greedy && r->logits, "cannot read the reference of %s", fixture);
    cr_assert_eq(rows, r->n_prompt);
    free(dir);
    free(rj);
    free(rl);
}

static void ref_free(ref *r) {
    free(r->prompt);
    free(r->greedy);
    free(r->logits);
}

/* Converts a fixture with the CLI: lossless (bf16 everywhere; MLX files keep their bits) or with
 * the given expert and dense types. */
static char *convert(const char *fixture, const char *experts, const char *dense) {
    char *src = th_join(th_fixtures(), fixture), *out = th_join(g_tmp, experts ? "q.moeflux" : "l.moeflux");
    int mlx = strstr(fixture, "mlx") != NULL;
    char *argv[] = {(char *)th_bin(), "convert", src, out, "--quiet", NULL, NULL, NULL, NULL, NULL};
    if (experts) {
        argv[5] = "--experts", argv[6] = (char *)experts, argv[7] = "--dense", argv[8] = (char *)dense;
    } else if (!mlx) {
        argv[5] = "--experts", argv[6] = "bf16", argv[7] = "--dense", argv[8] = "bf16";
    }
    char *err = NULL;
    cr_assert_eq(th_run(argv, NULL, &err), 0, "convert %s: %s", fixture, err);
    free(err);
    free(src);
    return out;
}

/* use_cuda: gpu_cache bytes of GPU expert cache (0: default). */
static mf_model *load(const char *path, int use_cuda, uint64_t gpu_cache) {
    mf_model *m = NULL;
    cr_assert_eq(mf_model_open(path, &m), MF_OK, "%s", mf_model_error(m));
    mf_engine_options eo;
    mf_engine_options_init(&eo);
    eo.use_cuda = use_cuda;
    eo.gpu_cache_bytes = gpu_cache;
    eo.n_threads = 2;
    cr_assert_eq(mf_model_load(m, &eo), MF_OK, "%s", mf_model_error(m));
    return m;
}

static mf_session *session(mf_model *m, int chunk) {
    mf_session_options so;
    mf_session_options_init(&so);
    so.max_ctx = 64;
    so.prefill_chunk = chunk;
    mf_session *s = NULL;
    cr_assert_eq(mf_session_new(m, &so, &s), MF_OK, "%s", mf_session_error(s));
    return s;
}

static float *eval_all(mf_session *s, const int32_t *toks, int n, int vocab) {
    float *lg = malloc(sizeof(float) * (size_t)n * (size_t)vocab);
    cr_assert_eq(mf_session_eval(s, toks, n, lg, 1), MF_OK, "%s", mf_session_error(s));
    return lg;
}

static double max_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        cr_assert(isfinite(a[i]) && isfinite(b[i]), "non-finite logit at %lld", (long long)i);
        double d = fabs((double)a[i] - b[i]);
        if (d > m) m = d;
    }
    return m;
}

static int argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

/* Lossless conversion on the GPU reproduces transformers: logits within 1e-2 at every prompt
 * position (prefill through the tiled matmul, chunk 64; and through 5-token chunks, the GEMV),
 * the same greedy continuation (decode steps), for a cache of every expert and of one slot. */
static void check_fixture(const char *fixture) {
    ref r;
    ref_load(&r, fixture);
    char *path = convert(fixture, NULL, NULL);
    const uint64_t caches[2] = {(uint64_t)1 << 30, 1};
    for (int ci = 0; ci < 2; ci++) {
        mf_model *m = load(path, 1, caches[ci]);
        int V = mf_model_vocab(m);
        cr_assert_eq(V, r.vocab);
        for (int chunk = 64; chunk >= 5; chunk -= 59) {
            mf_session *s = session(m, chunk);
            float *lg = eval_all(s, r.prompt, r.n_prompt, V);
            double d = max_diff(lg, r.logits, (int64_t)r.n_prompt * V);
            cr_log_info("%s gpu cache %llu chunk %d: max |logit - transformers| = %.3g", fixture,
                        (unsigned long long)caches[ci], chunk, d);
            cr_assert_leq(d, 1e-2, "%s (gpu cache %llu B, chunk %d): max |logit - transformers| = %g", fixture,
                          (unsigned long long)caches[ci], chunk, d);
            float *last = malloc(sizeof(float) * (size_t)V);
            memcpy(last, lg + (size_t)(r.n_prompt - 1) * (size_t)V, sizeof(float) * (size_t)V);
            for (int i = 0; i < r.n_greedy; i++) {
                int32_t tok = argmax(last, V);
                cr_assert_eq(tok, r.greedy[i], "%s (gpu cache %llu B): greedy step %d gave %d, transformers %d",
                             fixture, (unsigned long long)caches[ci], i, tok, r.greedy[i]);
                cr_assert_eq(mf_session_eval(s, &tok, 1, last, 0), MF_OK, "%s", mf_session_error(s));
                for (int v = 0; v < V; v++) cr_assert(isfinite(last[v]), "non-finite logit in decode");
            }
            /* the same continuation chosen on the GPU (argmax; with every expert resident the
             * decode steps replay one recorded graph), only token ids coming back */
            mf_session_reset(s);
            int32_t next = -1;
            cr_assert_eq(mf_session_eval_greedy(s, r.prompt, r.n_prompt, &next), MF_OK, "%s", mf_session_error(s));
            for (int i = 0; i < r.n_greedy; i++) {
                cr_assert_eq(next, r.greedy[i], "%s (gpu cache %llu B): eval_greedy step %d gave %d, transformers %d",
                             fixture, (unsigned long long)caches[ci], i, next, r.greedy[i]);
                int32_t tok = next;
                cr_assert_eq(mf_session_eval_greedy(s, &tok, 1, &next), MF_OK, "%s", mf_session_error(s));
            }
            free(last);
            free(lg);
            mf_session_free(s);
        }
        mf_expert_stats st;
        mf_model_expert_stats(m, &st);
        cr_log_info("%s gpu cache %llu: %llu hits, %llu misses, %llu evictions", fixture,
                    (unsigned long long)caches[ci], (unsigned long long)st.gpu_hits,
                    (unsigned long long)st.gpu_misses, (unsigned long long)st.gpu_evictions);
        if (ci == 1) cr_assert_gt(st.gpu_evictions, 0, "a one-slot GPU cache must evict");
        cr_assert_leq(st.gpu_peak_bytes, st.gpu_budget_bytes);
        mf_model_free(m);
    }
    free(path);
    ref_free(&r);
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
    ref r;
    ref_load(&r, fixture);
    char *path = convert(fixture, experts, dense);
    mf_model *mc = load(path, 0, 0), *mg = load(path, 1, 1 << 20);
    int V = mf_model_vocab(mc);
    mf_session *sc = session(mc, 64), *sg = session(mg, 64);
    float *lc = eval_all(sc, r.prompt, r.n_prompt, V), *lgp = eval_all(sg, r.prompt, r.n_prompt, V);
    double d = max_diff(lgp, lc, (int64_t)r.n_prompt * V);
    cr_log_info("%s experts %s dense %s: max |gpu - cpu| = %.3g", fixture, experts, dense, d);
    cr_assert_leq(d, 1e-3, "%s experts %s dense %s: max |gpu - cpu| = %g", fixture, experts, dense, d);
    /* decode steps (GEMV) against the CPU too */
    float *a = malloc(sizeof(float) * (size_t)V), *b = malloc(sizeof(float) * (size_t)V);
    for (int i = 0; i < 4; i++) {
        int32_t tok = r.greedy[i];
        cr_assert_eq(mf_session_eval(sc, &tok, 1, a, 0), MF_OK);
        cr_assert_eq(mf_session_eval(sg, &tok, 1, b, 0), MF_OK);
        d = max_diff(b, a, V);
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
    ref_free(&r);
}

Test(cuda_model, quantized_qwen3_5_moe_vl) { check_quantized("qwen3_5_moe_vl", "q4", "q8"); }
Test(cuda_model, quantized_qwen3_next) { check_quantized("qwen3_next", "q4", "q8"); }
Test(cuda_model, quantized_qwen3_moe_fused) { check_quantized("qwen3_moe_fused", "q8", "q4"); }

/* test_session_sample.c - mf_session_eval_sample against the host sampler over the logits
 * mf_session_eval gives: the same tokens for the same seed, with every cut and the penalties,
 * step after step on a fixture, on this build's default backend (the CPU here; the CUDA tests
 * run the same check on the GPU). Not the sampler's own definitions (test_sampler.c). */
#include <criterion/criterion.h>

#include <stdlib.h>
#include <string.h>

#include "helpers.h"

TestSuite(session_sample, .init = th_tmp_setup, .fini = th_tmp_teardown);

/* The fixture's reference, and the fixture converted losslessly and loaded on the CPU. */
static mf_model *load_cpu(const char *fixture, th_ref *r, char **path) {
    th_ref_load(r, fixture);
    *path = th_convert(fixture, NULL, NULL);
    mf_engine_options eo;
    mf_engine_options_init(&eo);
    eo.n_threads = 2;
    return th_load(*path, &eo);
}

/* Every sampling mode on the fixture. */
static void same_tokens(const char *fixture) {
    th_ref r;
    char *path;
    mf_model *m = load_cpu(fixture, &r, &path);
    th_check_eval_sample_modes(m, &r, fixture);
    mf_model_free(m);
    free(path);
    th_ref_free(&r);
}

Test(session_sample, qwen3_5_moe_text) { same_tokens("qwen3_5_moe_text"); }
Test(session_sample, qwen3_next) { same_tokens("qwen3_next"); }
Test(session_sample, qwen3_moe_fused) { same_tokens("qwen3_moe_fused"); }

Test(session_sample, wrong_vocabulary_refused) {
    th_ref r;
    char *path;
    mf_model *m = load_cpu("qwen3_moe_fused", &r, &path);
    mf_session *s = th_session(m, 4);
    mf_sampler_params p;
    mf_sampler_params_init(&p);
    mf_sampler *a = mf_sampler_new(&p, (int)r.vocab + 1);
    int32_t tok = -5;
    cr_assert_eq(mf_session_eval_sample(s, r.prompt, r.n_prompt, a, &tok), MF_ERR_ARG);
    cr_assert(strstr(mf_session_error(s), "vocabulary"), "%s", mf_session_error(s));
    cr_assert_eq(mf_session_pos(s), 0);
    cr_assert_eq(mf_session_eval_sample(s, r.prompt, r.n_prompt, NULL, &tok), MF_ERR_ARG);
    mf_sampler_free(a);
    mf_session_free(s);
    mf_model_free(m);
    free(path);
    th_ref_free(&r);
}

/* test_sampler.c - the sampler against its definitions: greedy is argmax, draws follow the
 * tempered softmax, top-k / top-p / min-p cut where their definitions say, penalties follow
 * transformers' and OpenAI's formulas, the seed fixes the sequence. Not a generation test. */
#include <criterion/criterion.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "text/sampler.h"

TestSuite(sampler);

static mf_sampler_params params(float temp) {
    mf_sampler_params p;
    mf_sampler_params_init(&p);
    p.temperature = temp;
    p.seed = 42;
    return p;
}

static void fill(float *l, int n, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        l[i] = (float)((seed >> 8) % 10000) / 1000.0f - 5.0f;
    }
}

Test(sampler, greedy_is_argmax) {
    mf_sampler_params p = params(0);
    sampler *s = sampler_new(&p, 1000);
    float l[1000];
    for (int trial = 0; trial < 20; trial++) {
        fill(l, 1000, (unsigned)trial + 1);
        int best = 0;
        for (int i = 1; i < 1000; i++)
            if (l[i] > l[best]) best = i;
        cr_assert_eq(sampler_sample(s, l, NULL, 0), best);
    }
    sampler_free(s);
}

/* Draw frequencies match softmax(l / T) within 5 standard errors. */
Test(sampler, draws_follow_tempered_softmax) {
    const int V = 6, N = 40000;
    float base[6] = {1.0f, 0.5f, 0.0f, -0.5f, 2.0f, -3.0f};
    float T = 0.7f;
    mf_sampler_params p = params(T);
    sampler *s = sampler_new(&p, V);
    int hits[6] = {0};
    for (int i = 0; i < N; i++) {
        float l[6];
        memcpy(l, base, sizeof l);
        hits[sampler_sample(s, l, NULL, 0)]++;
    }
    double z = 0;
    for (int i = 0; i < V; i++) z += exp(base[i] / T);
    for (int i = 0; i < V; i++) {
        double pi = exp(base[i] / T) / z, se = sqrt(pi * (1 - pi) / N);
        cr_assert_leq(fabs((double)hits[i] / N - pi), 5 * se + 1e-4, "token %d: %g vs %g", i, (double)hits[i] / N, pi);
    }
    sampler_free(s);
}

Test(sampler, top_k_top_p_min_p_cut) {
    /* probabilities at T = 1 of these logits: sorted 0.6439, 0.2369, 0.0871, 0.0320 */
    float base[4] = {0.0f, 2.0f, 1.0f, 3.0f};
    struct { int k; float top_p, min_p; int allowed[4]; } cases[] = {
        {1, 1.0f, 0.0f, {0, 0, 0, 1}},
        {2, 1.0f, 0.0f, {0, 1, 0, 1}},
        {0, 0.80f, 0.0f, {0, 1, 0, 1}},  /* 0.644 < 0.8 <= 0.881 */
        {0, 0.60f, 0.0f, {0, 0, 0, 1}},
        {0, 1.0f, 0.30f, {0, 1, 0, 1}},  /* keep p >= 0.3 x 0.644 = 0.193 */
        {0, 1.0f, 0.10f, {0, 1, 1, 1}},  /* 0.0644 */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        mf_sampler_params p = params(1.0f);
        p.top_k = cases[c].k;
        p.top_p = cases[c].top_p;
        p.min_p = cases[c].min_p;
        p.seed = c;
        sampler *s = sampler_new(&p, 4);
        int seen[4] = {0};
        for (int i = 0; i < 4000; i++) {
            float l[4];
            memcpy(l, base, sizeof l);
            seen[sampler_sample(s, l, NULL, 0)]++;
        }
        for (int t = 0; t < 4; t++) {
            if (cases[c].allowed[t]) cr_assert_gt(seen[t], 0, "case %zu: token %d never drawn", c, t);
            else cr_assert_eq(seen[t], 0, "case %zu: token %d drawn %d times", c, t, seen[t]);
        }
        sampler_free(s);
    }
}

/* A flat distribution over a large vocabulary: top-p keeps far more than one sorted batch of
 * candidates, ties ranked by id, and draws spread over all of the kept ones. */
Test(sampler, top_p_over_many_equal_candidates) {
    enum { V = 5000, DRAWS = 4000 };
    mf_sampler_params p;
    mf_sampler_params_init(&p);
    p.temperature = 1.0f;
    p.top_p = 0.5f;
    p.seed = 7;
    mf_sampler *s = mf_sampler_new(&p, V);
    cr_assert(s);
    float *l = malloc(sizeof(float) * V);
    int max_id = -1;
    for (int d = 0; d < DRAWS; d++) {
        for (int i = 0; i < V; i++) l[i] = 2.0f;
        int32_t t = mf_sampler_sample(s, l, NULL, 0);
        /* 2500 float probabilities of 1/5000 sum to just under 0.5: the set may hold id 2500 too */
        cr_assert(t >= 0 && t <= V / 2, "draw %d: token %d is outside the top-p set (ids up to %d)", d, t, V / 2);
        if (t > max_id) max_id = t;
    }
    cr_assert_gt(max_id, V / 2 - 100, "draws never reached the end of the kept set (max id %d)", max_id);
    free(l);
    mf_sampler_free(s);
}

static int desc_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* top-k over a large vocabulary of spread logits: every draw is one of the k largest (found here
 * by sorting), and most of them get drawn. */
Test(sampler, top_k_over_a_large_vocabulary) {
    enum { V = 50000, TOPK = 50, DRAWS = 3000 };
    mf_sampler_params p;
    mf_sampler_params_init(&p);
    p.temperature = 5.0f; /* flat enough that all k are likely */
    p.top_k = TOPK;
    p.seed = 11;
    mf_sampler *s = mf_sampler_new(&p, V);
    cr_assert(s);
    float *l = malloc(sizeof(float) * V), *sorted = malloc(sizeof(float) * V), *work = malloc(sizeof(float) * V);
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < V; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        l[i] = (float)((double)(x >> 11) * 0x1.0p-53 * 40.0 - 20.0);
    }
    memcpy(sorted, l, sizeof(float) * V);
    qsort(sorted, V, sizeof(float), desc_float);
    const float kth = sorted[TOPK - 1];
    unsigned char *seen = calloc(V, 1);
    int distinct = 0;
    for (int d = 0; d < DRAWS; d++) {
        memcpy(work, l, sizeof(float) * V);
        int32_t t = mf_sampler_sample(s, work, NULL, 0);
        cr_assert(t >= 0 && t < V && l[t] >= kth, "draw %d: token %d (logit %g) is not among the %d largest (>= %g)",
                  d, t, t >= 0 && t < V ? (double)l[t] : 0.0, TOPK, (double)kth);
        if (!seen[t]) seen[t] = 1, distinct++;
    }
    cr_assert_geq(distinct, TOPK * 3 / 4, "only %d of the %d kept tokens were drawn", distinct, TOPK);
    free(l);
    free(sorted);
    free(work);
    free(seen);
    mf_sampler_free(s);
}

/* Logits that are not finite: +inf takes the draw, NaN never wins, all -inf gives the first id;
 * greedy and sampling alike, never a read outside the candidates. */
Test(sampler, non_finite_logits) {
    enum { V = 1000 };
    const float temps[2] = {0.0f, 0.8f};
    float l[V];
    for (int ti = 0; ti < 2; ti++) {
        mf_sampler_params p;
        mf_sampler_params_init(&p);
        p.temperature = temps[ti];
        p.top_k = 5;
        p.top_p = 0.9f;
        p.seed = 3;
        mf_sampler *s = mf_sampler_new(&p, V);
        cr_assert(s);
        for (int i = 0; i < V; i++) l[i] = -INFINITY;
        cr_assert_eq(mf_sampler_sample(s, l, NULL, 0), 0, "all -inf at T %g", (double)temps[ti]);
        for (int i = 0; i < V; i++) l[i] = (float)(i % 7);
        l[321] = INFINITY;
        cr_assert_eq(mf_sampler_sample(s, l, NULL, 0), 321, "+inf at T %g", (double)temps[ti]);
        for (int i = 0; i < V; i++) l[i] = NAN;
        l[9] = 1.0f;
        cr_assert_eq(mf_sampler_sample(s, l, NULL, 0), 9, "NaNs around one number at T %g", (double)temps[ti]);
        mf_sampler_free(s);
    }
}

Test(sampler, penalties_follow_their_formulas) {
    float l[5] = {2.0f, -1.0f, 0.5f, 3.0f, 1.0f};
    int32_t hist[6] = {0, 1, 1, 4, 0, 0};
    mf_sampler_params p = params(0);
    p.repetition_penalty = 2.0f;
    p.presence_penalty = 0.25f;
    p.frequency_penalty = 0.1f;
    sampler *s = sampler_new(&p, 5);
    float got[5];
    memcpy(got, l, sizeof l);
    sampler_sample(s, got, hist, 6);
    /* token 0: seen 3 times, positive: 2/2 - 0.25 - 0.3; token 1: twice, negative: -1*2 - 0.25 - 0.2;
     * token 4: once: 1/2 - 0.25 - 0.1; tokens 2 and 3 untouched */
    float want[5] = {2.0f / 2 - 0.25f - 0.3f, -1.0f * 2 - 0.25f - 0.2f, 0.5f, 3.0f, 1.0f / 2 - 0.25f - 0.1f};
    for (int i = 0; i < 5; i++) cr_assert_float_eq(got[i], want[i], 1e-6, "token %d: %g vs %g", i, got[i], want[i]);
    /* the window: only the last 2 tokens (0, 0) count */
    p.penalty_last_n = 2;
    sampler *w = sampler_new(&p, 5);
    memcpy(got, l, sizeof l);
    sampler_sample(w, got, hist, 6);
    cr_assert_float_eq(got[0], 2.0f / 2 - 0.25f - 0.2f, 1e-6);
    cr_assert_float_eq(got[1], -1.0f, 1e-6);
    sampler_free(s);
    sampler_free(w);
}

Test(sampler, same_seed_same_sequence) {
    float base[200];
    fill(base, 200, 7);
    int32_t a[50], b[50], c[50];
    for (int run = 0; run < 3; run++) {
        mf_sampler_params p = params(1.0f);
        p.top_p = 0.95f;
        p.seed = run == 2 ? 9 : 5;
        sampler *s = sampler_new(&p, 200);
        int32_t *out = run == 0 ? a : run == 1 ? b : c;
        for (int i = 0; i < 50; i++) {
            float l[200];
            memcpy(l, base, sizeof l);
            out[i] = sampler_sample(s, l, out, i);
        }
        sampler_free(s);
    }
    cr_assert(!memcmp(a, b, sizeof a), "the same seed must give the same tokens");
    cr_assert(memcmp(a, c, sizeof a), "another seed should give other tokens");
}

Test(sampler, bad_params_refused) {
    char err[128];
    mf_sampler_params p = params(1.0f);
    p.top_p = 0;
    cr_assert_eq(mf_sampler_params_check(&p, err, sizeof err), MF_ERR_ARG);
    cr_assert(strstr(err, "top-p"));
    p = params(-1.0f);
    cr_assert_eq(mf_sampler_params_check(&p, err, sizeof err), MF_ERR_ARG);
    p = params(0.8f);
    cr_assert_eq(mf_sampler_params_check(&p, err, sizeof err), MF_OK);
}

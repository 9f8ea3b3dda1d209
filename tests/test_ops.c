/* test_ops.c - every op of the CPU backend's ops table, on the fast path (2 threads, chunked
 * deltanet) and the reference path, against naive double-precision versions written here from
 * the math (REFERENCE.md section 3, transformers' modeling_qwen3_5_moe.py). Outputs start as NaN
 * and must come back finite; guard floats after every output must stay untouched.
 * Not cpu_matmul's full type coverage (test_matmul.c) and not a speed test. */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "format/quant.h"
#include "helpers.h"

/* ---- double-precision references (random numbers and guarded buffers: helpers.h) ---- */

static double *dalloc(int64_t n) {
    double *p = calloc((size_t)(n ? n : 1), sizeof(double));
    cr_assert(p, "out of memory");
    return p;
}

/* norm(got - ref) / norm(ref). */
static double rel_err(const float *got, const double *ref, int64_t n) {
    double d = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = (double)got[i] - ref[i];
        d += e * e;
        r += ref[i] * ref[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

/* ---- the two paths of the CPU backend ---- */

enum { PATH_FAST, PATH_REF, N_PATHS };
static const char *const path_name[N_PATHS] = {"fast", "reference"};
static mf_backend *be[N_PATHS];

static void backends_free(void) {
    for (int p = 0; p < N_PATHS; p++) {
        if (be[p]) be[p]->ops->destroy(be[p]);
        be[p] = NULL;
    }
}

/* Fresh backends whose scratch is reserved for exactly these limits, so that a kernel reading
 * or writing past its scratch is caught by the sanitizers. */
static void backends_new(int64_t max_ctx, int64_t max_tokens, int max_head_dim) {
    backends_free();
    be[PATH_FAST] = cpu_backend_create(2, 0);
    be[PATH_REF] = cpu_backend_create(1, 1);
    cr_assert(be[PATH_FAST] && be[PATH_REF], "cannot create the CPU backends");
    mf_backend_limits lim = {max_ctx, max_tokens, max_head_dim, 0, 0, 0, 0};
    for (int p = 0; p < N_PATHS; p++)
        cr_assert(be[p]->ops->reserve(be[p], &lim) == MF_OK, "reserve failed");
}

static void setup(void) { backends_new(1, 1, 1); }
static void teardown(void) { backends_free(); }

TestSuite(ops, .init = setup, .fini = teardown, .timeout = 60);

/* ---- rmsnorm: y = x / sqrt(mean(x^2) + eps) * w ---- */

Test(ops, rmsnorm) {
    static const struct { int64_t rows, dim; } cases[] = {{1, 64}, {7, 64}, {3, 4096}, {5, 4096}};
    const float eps = 1e-6f;
    double worst = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (int weighted = 0; weighted < 2; weighted++)
            for (int inplace = 0; inplace < 2; inplace++)
                for (int p = 0; p < N_PATHS; p++) {
                    int64_t rows = cases[ci].rows, dim = cases[ci].dim, n = rows * dim;
                    th_rng_seed(100 + ci * 8 + (uint64_t)weighted * 4 + (uint64_t)inplace * 2 + (uint64_t)p);
                    float *x = th_buf_alloc(n), *w = th_buf_alloc(dim);
                    for (int64_t r = 0; r < rows; r++) /* rows of different scales */
                        th_fill_normal(x + r * dim, dim, 0.1 * (double)r, 0.05 + 3.0 * th_rng_unif());
                    th_fill_normal(w, dim, 1.0, 0.5);
                    double *ref = dalloc(n);
                    for (int64_t r = 0; r < rows; r++) {
                        double ss = 0;
                        for (int64_t i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
                        double inv = 1.0 / sqrt(ss / (double)dim + (double)eps);
                        for (int64_t i = 0; i < dim; i++)
                            ref[r * dim + i] = x[r * dim + i] * inv * (weighted ? (double)w[i] : 1.0);
                    }
                    float *y = inplace ? th_buf_copy(x, n) : th_buf_alloc(n);
                    float *xin = inplace ? y : x;
                    be[p]->ops->rmsnorm(be[p], xin, weighted ? w : NULL, rows, dim, eps, y);
                    char what[96];
                    snprintf(what, sizeof what, "rmsnorm %lldx%lld w=%d inplace=%d %s", (long long)rows,
                             (long long)dim, weighted, inplace, path_name[p]);
                    th_check_written(y, n, what);
                    for (int64_t i = 0; i < n; i++)
                        cr_assert(fabs((double)y[i] - ref[i]) <= 2e-6 * fabs(ref[i]) + 1e-30,
                                  "%s: element %lld is %.9g, expected %.9g", what, (long long)i,
                                  (double)y[i], ref[i]);
                    double e = rel_err(y, ref, n);
                    if (e > worst) worst = e;
                    free(x);
                    free(w);
                    free(y);
                    free(ref);
                }
    cr_log_info("rmsnorm: worst relative error %.3g", worst);
}

/* ---- add_rmsnorm: x += a, then y = rmsnorm(x) * w ---- */

Test(ops, add_rmsnorm) {
    const int64_t rows = 3, dim = 2048, n = rows * dim;
    const float eps = 1e-6f;
    for (int p = 0; p < N_PATHS; p++) {
        th_rng_seed(150 + (uint64_t)p);
        float *x = th_buf_alloc(n), *a = th_buf_alloc(n), *w = th_buf_alloc(dim), *y = th_buf_alloc(n);
        th_fill_normal(x, n, 0.2, 1.5);
        th_fill_normal(a, n, -0.1, 0.7);
        th_fill_normal(w, dim, 1.0, 0.5);
        double *sum = dalloc(n), *ref = dalloc(n);
        for (int64_t r = 0; r < rows; r++) {
            double ss = 0;
            for (int64_t i = 0; i < dim; i++) {
                sum[r * dim + i] = (double)(x[r * dim + i] + a[r * dim + i]); /* the f32 sum, as x holds it */
                ss += sum[r * dim + i] * sum[r * dim + i];
            }
            double inv = 1.0 / sqrt(ss / (double)dim + (double)eps);
            for (int64_t i = 0; i < dim; i++) ref[r * dim + i] = sum[r * dim + i] * inv * w[i];
        }
        be[p]->ops->add_rmsnorm(be[p], x, a, w, rows, dim, eps, y);
        th_check_written(x, n, "add_rmsnorm sum");
        th_check_written(y, n, "add_rmsnorm output");
        for (int64_t i = 0; i < n; i++) {
            cr_assert(x[i] == (float)sum[i], "add_rmsnorm %s: x[%lld] is not x + a", path_name[p], (long long)i);
            cr_assert(fabs((double)y[i] - ref[i]) <= 2e-6 * fabs(ref[i]) + 1e-30, "add_rmsnorm %s: element %lld",
                      path_name[p], (long long)i);
        }
        free(x);
        free(a);
        free(w);
        free(y);
        free(sum);
        free(ref);
    }
}

/* ---- rope: pair (i, i + rot/2) rotates by pos * theta^(-2i/rot); dims >= rot unchanged ---- */

Test(ops, rope) {
    static const int32_t scattered[] = {7, 3, 65535, 0, 1000};
    static const struct {
        int64_t n_tok;
        int heads, hd, rot;
        double theta;
        int32_t pos0; /* positions pos0 + t; -1: the scattered list */
    } cases[] = {
        {6, 3, 256, 64, 1e7, 1000}, /* qwen3_5_moe: partial rotary 0.25 */
        {6, 4, 32, 8, 1e4, 1000},
        {4, 2, 64, 64, 1e4, 0},     /* full rotary */
        {5, 2, 128, 32, 1e6, -1},
    };
    double worst = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (int p = 0; p < N_PATHS; p++) {
            int64_t nt = cases[ci].n_tok;
            int heads = cases[ci].heads, hd = cases[ci].hd, rot = cases[ci].rot, half = rot / 2;
            int64_t n = nt * heads * hd;
            th_rng_seed(200 + ci * 2 + (uint64_t)p);
            int32_t pos[8];
            for (int64_t t = 0; t < nt; t++) pos[t] = cases[ci].pos0 < 0 ? scattered[t] : cases[ci].pos0 + (int32_t)t;
            float *x0 = th_buf_alloc(n);
            th_fill_normal(x0, n, 0.0, 1.0);
            double *ref = dalloc(n);
            for (int64_t i = 0; i < n; i++) ref[i] = x0[i];
            for (int64_t t = 0; t < nt; t++)
                for (int h = 0; h < heads; h++) {
                    const float *xv = x0 + (t * heads + h) * hd;
                    double *rv = ref + (t * heads + h) * hd;
                    for (int i = 0; i < half; i++) {
                        double ang = (double)pos[t] * pow(cases[ci].theta, -2.0 * i / rot);
                        double a = xv[i], b = xv[i + half];
                        rv[i] = a * cos(ang) - b * sin(ang);
                        rv[i + half] = b * cos(ang) + a * sin(ang);
                    }
                }
            float *x = th_buf_copy(x0, n);
            be[p]->ops->rope(be[p], x, nt, heads, hd, rot, pos, cases[ci].theta);
            char what[96];
            snprintf(what, sizeof what, "rope hd %d rot %d theta %g case %zu %s", hd, rot, cases[ci].theta, ci,
                     path_name[p]);
            th_check_written(x, n, what);
            for (int64_t t = 0; t < nt; t++)
                for (int h = 0; h < heads; h++) {
                    int64_t o = (t * heads + h) * hd;
                    /* the angle is an f32 product (as in transformers): off by up to pos * 2^-23 rad */
                    for (int i = 0; i < half; i++) {
                        double tol = ((double)pos[t] * 0x1.0p-22 + 1e-6) *
                                     (fabs((double)x0[o + i]) + fabs((double)x0[o + i + half]));
                        for (int s = 0; s < 2; s++) {
                            int64_t k = o + i + s * half;
                            cr_assert(fabs((double)x[k] - ref[k]) <= tol,
                                      "%s: t %lld head %d dim %lld is %.9g, expected %.9g", what, (long long)t,
                                      h, (long long)(k - o), (double)x[k], ref[k]);
                        }
                    }
                    for (int i = rot; i < hd; i++)
                        cr_assert(memcmp(&x[o + i], &x0[o + i], sizeof(float)) == 0,
                                  "%s: t %lld head %d dim %d beyond rot_dim changed", what, (long long)t, h, i);
                }
            double e = rel_err(x, ref, n);
            if (e > worst) worst = e;
            free(x0);
            free(x);
            free(ref);
        }
    cr_log_info("rope: worst relative error %.3g", worst);
}

/* ---- attention: causal softmax(q k^T * scale) v with grouped KV heads ---- */

Test(ops, attention) {
    static const struct { int n_heads, n_kv, hd; int64_t pos0, n_tok; } cases[] = {
        {8, 2, 64, 0, 1},  {8, 2, 64, 0, 9},  {8, 2, 64, 37, 1},  {8, 2, 64, 37, 9},
        {3, 3, 64, 0, 1},  {3, 3, 64, 0, 9},  {3, 3, 64, 37, 1},  {3, 3, 64, 37, 9},
        {8, 2, 256, 37, 9}, {4, 1, 32, 5, 70},
    };
    enum { EXTRA = 4 }; /* cache rows after the last position, all NaN: never to be read */
    double worst = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (int p = 0; p < N_PATHS; p++) {
            int nh = cases[ci].n_heads, nkv = cases[ci].n_kv, hd = cases[ci].hd, group = nh / nkv;
            int64_t pos0 = cases[ci].pos0, nt = cases[ci].n_tok, n_valid = pos0 + nt, n_ctx = n_valid + EXTRA;
            if (p == 0) backends_new(n_valid, nt, 1);
            th_rng_seed(300 + ci * 2 + (uint64_t)p);
            int64_t nq = nt * nh * hd, ncache = n_ctx * nkv * hd;
            float *q = th_buf_alloc(nq), *kc = th_buf_alloc(ncache), *vc = th_buf_alloc(ncache);
            th_fill_normal(q, nq, 0.0, 1.0);
            th_fill_normal(kc, n_valid * nkv * hd, 0.0, 1.0); /* rows >= n_valid stay NaN */
            th_fill_normal(vc, n_valid * nkv * hd, 0.0, 1.0);
            /* Positions after pos0 are visible only to later tokens: give them large keys and
             * values offset by 1000, so that any leak into an earlier token is glaring. */
            for (int64_t pp = pos0 + 1; pp < n_valid; pp++)
                for (int64_t i = 0; i < nkv * hd; i++) {
                    kc[pp * nkv * hd + i] *= 4.0f;
                    vc[pp * nkv * hd + i] += 1000.0f;
                }
            float scale = 1.0f / sqrtf((float)hd);
            double *ref = dalloc(nq), *sc = dalloc(n_valid);
            for (int64_t t = 0; t < nt; t++)
                for (int h = 0; h < nh; h++) {
                    int kvh = h / group;
                    const float *qv = q + (t * nh + h) * hd;
                    double mx = -INFINITY, sum = 0;
                    for (int64_t pp = 0; pp <= pos0 + t; pp++) {
                        const float *kv = kc + (pp * nkv + kvh) * hd;
                        double d = 0;
                        for (int i = 0; i < hd; i++) d += (double)qv[i] * kv[i];
                        sc[pp] = d * scale;
                        if (sc[pp] > mx) mx = sc[pp];
                    }
                    for (int64_t pp = 0; pp <= pos0 + t; pp++) sum += (sc[pp] = exp(sc[pp] - mx));
                    double *o = ref + (t * nh + h) * hd;
                    for (int64_t pp = 0; pp <= pos0 + t; pp++) {
                        const float *vv = vc + (pp * nkv + kvh) * hd;
                        for (int i = 0; i < hd; i++) o[i] += sc[pp] / sum * vv[i];
                    }
                }
            float *out = th_buf_alloc(nq);
            int32_t *pos = malloc(sizeof(int32_t) * (size_t)nt);
            for (int64_t t = 0; t < nt; t++) pos[t] = (int32_t)(pos0 + t);
            be[p]->ops->attention(be[p], q, kc, vc, pos, n_valid, nt, nh, nkv, hd, scale, out);
            free(pos);
            char what[112];
            snprintf(what, sizeof what, "attention heads %d kv %d hd %d pos0 %lld n_tok %lld %s", nh, nkv, hd,
                     (long long)pos0, (long long)nt, path_name[p]);
            th_check_written(out, nq, what);
            for (int64_t row = 0; row < nt * nh; row++) {
                double e = rel_err(out + row * hd, ref + row * hd, hd);
                cr_assert(e <= 1e-5, "%s: token %lld head %lld relative error %.3g", what,
                          (long long)(row / nh), (long long)(row % nh), e);
                if (e > worst) worst = e;
            }
            free(q);
            free(kc);
            free(vc);
            free(ref);
            free(sc);
            free(out);
        }
    cr_log_info("attention: worst relative error (per token and head) %.3g", worst);
}

/* ---- argmax (greedy choice) ---- */

Test(ops, argmax) {
    enum { V = 1000 };
    for (int p = 0; p < N_PATHS; p++) {
        /* the largest, the lowest index among ties, NaN never chosen */
        th_rng_seed(900 + (uint64_t)p);
        float *x = th_buf_alloc(3 * V);
        th_fill_normal(x, 3 * V, 0.0, 1.0);
        x[417] = 9.0f;                             /* row 0: a clear winner */
        x[V + 5] = x[V + 600] = x[V + 999] = 7.0f; /* row 1: ties go to the lowest index */
        x[2 * V + 0] = NAN, x[2 * V + 3] = NAN;    /* row 2: NaNs around the winner */
        x[2 * V + 2] = 8.0f;
        int32_t out[3] = {-1, -1, -1};
        be[p]->ops->argmax(be[p], x, 3, V, out);
        cr_assert(out[0] == 417 && out[1] == 5 && out[2] == 2, "argmax %s: %d %d %d", path_name[p], out[0], out[1],
                  out[2]);
        free(x);
    }
}

/* ---- conv1d_silu: depthwise causal conv over [state ; x], then SiLU ---- */

Test(ops, conv1d_silu) {
    enum { C = 96, K = 4, N = 8 };
    static const int64_t split[] = {1, 5, 2};
    double worst = 0;
    for (int p = 0; p < N_PATHS; p++) {
        th_rng_seed(400 + (uint64_t)p);
        float *x = th_buf_alloc(N * C), *w = th_buf_alloc(C * K), *state0 = th_buf_alloc((K - 1) * C);
        th_fill_normal(x, N * C, 0.0, 1.0);
        th_fill_normal(w, C * K, 0.0, 0.7);
        th_fill_normal(state0, (K - 1) * C, 0.0, 1.0);
        /* the input sequence seen by the conv: the K-1 state rows, then the N tokens */
        double *ref = dalloc(N * C);
        for (int64_t t = 0; t < N; t++)
            for (int64_t ch = 0; ch < C; ch++) {
                double acc = 0;
                for (int k = 0; k < K; k++) {
                    int64_t s = t + k; /* index into [state ; x] */
                    double in = s < K - 1 ? state0[s * C + ch] : x[(s - (K - 1)) * C + ch];
                    acc += (double)w[ch * K + k] * in;
                }
                ref[t * C + ch] = acc / (1.0 + exp(-acc));
            }
        /* one call of N tokens */
        float *st_whole = th_buf_copy(state0, (K - 1) * C), *out_whole = th_buf_alloc(N * C);
        be[p]->ops->conv1d_silu(be[p], x, st_whole, w, N, C, K, out_whole);
        char what[96];
        snprintf(what, sizeof what, "conv1d_silu one call %s", path_name[p]);
        th_check_written(out_whole, N * C, what);
        th_check_written(st_whole, (K - 1) * C, what);
        double e = rel_err(out_whole, ref, N * C);
        cr_assert(e <= 1e-6, "%s: relative error %.3g", what, e);
        if (e > worst) worst = e;
        /* the final state holds the last K-1 inputs, oldest first */
        for (int k = 0; k < K - 1; k++)
            cr_assert(memcmp(st_whole + k * C, x + (N - (K - 1) + k) * C, sizeof(float) * C) == 0,
                      "%s: state row %d is not input %d", what, k, N - (K - 1) + k);
        /* the same tokens in three calls, the state carried */
        float *st = th_buf_copy(state0, (K - 1) * C);
        int64_t t0 = 0;
        for (size_t si = 0; si < sizeof split / sizeof split[0]; si++) {
            int64_t n = split[si];
            float *out = th_buf_alloc(n * C);
            be[p]->ops->conv1d_silu(be[p], x + t0 * C, st, w, n, C, K, out);
            snprintf(what, sizeof what, "conv1d_silu call %zu of %lld tokens %s", si, (long long)n, path_name[p]);
            th_check_written(out, n * C, what);
            th_check_written(st, (K - 1) * C, what);
            cr_assert(memcmp(out, out_whole + t0 * C, sizeof(float) * (size_t)(n * C)) == 0,
                      "%s: differs from the single call", what);
            free(out);
            t0 += n;
        }
        cr_assert(memcmp(st, st_whole, sizeof(float) * (K - 1) * C) == 0,
                  "conv1d_silu %s: state after three calls differs from one call", path_name[p]);
        free(x);
        free(w);
        free(state0);
        free(ref);
        free(st_whole);
        free(out_whole);
        free(st);
    }
    cr_log_info("conv1d_silu: worst relative error %.3g", worst);
}

/* ---- deltanet: the gated delta rule, a naive double-precision recurrence ---- */

enum { G_WIDE, G_NEAR0 };

typedef struct dn_case {
    int Hk, Hv, dk, dv;
    int64_t n_tok;
    int gmode;
} dn_case;

/* Worst output and state errors of each path over the cases run, and where they were. */
static double dn_worst[N_PATHS];
static char dn_worst_at[N_PATHS][128];

/* Runs one case on both paths against the naive recurrence. */
static void deltanet_case(const dn_case *c, uint64_t seed) {
    int Hk = c->Hk, Hv = c->Hv, dk = c->dk, dv = c->dv, ratio = Hv / Hk;
    int64_t nt = c->n_tok, nqk = nt * Hk * dk, nv = nt * Hv * dv, ng = nt * Hv, ns = (int64_t)Hv * dk * dv;
    th_rng_seed(seed);
    float *q = th_buf_alloc(nqk), *k = th_buf_alloc(nqk), *v = th_buf_alloc(nv);
    float *g = th_buf_alloc(ng), *beta = th_buf_alloc(ng), *S0 = th_buf_alloc(ns);
    th_fill_normal(q, nqk, 0.0, 1.0);
    th_fill_normal(k, nqk, 0.0, 1.0);
    for (int64_t r = 0; r < nt * Hk; r++) { /* L2-normalise; q scaled by dk^-0.5 */
        double sq = 0, sk = 0;
        for (int i = 0; i < dk; i++) {
            sq += (double)q[r * dk + i] * q[r * dk + i];
            sk += (double)k[r * dk + i] * k[r * dk + i];
        }
        for (int i = 0; i < dk; i++) {
            q[r * dk + i] = (float)(q[r * dk + i] / sqrt(sq) / sqrt((double)dk));
            k[r * dk + i] = (float)(k[r * dk + i] / sqrt(sk));
        }
    }
    th_fill_normal(v, nv, 0.0, 1.0);
    for (int64_t i = 0; i < ng; i++) {
        /* g = -exp(A) * softplus(a): log decays in [-5, -0.001], or (G_NEAR0) in (-1e-3, 0) */
        double A = -2.0 + 3.0 * th_rng_unif(), a = 2.0 * th_rng_normal();
        double gg = -exp(A) * log1p(exp(a));
        if (c->gmode == G_WIDE)
            gg = gg < -5.0 ? -5.0 : gg > -0.001 ? -0.001 : gg;
        else
            gg = -1e-3 * (1e-3 + th_rng_unif());
        g[i] = (float)gg;
        beta[i] = (float)(1.0 / (1.0 + exp(-1.5 * th_rng_normal())));
    }
    th_fill_normal(S0, ns, 0.0, 0.5);

    /* naive: per v-head h, S [dk][dv]: S *= exp(g); kv = S^T k; S += k (x) beta (v - kv); o = S^T q */
    double *S = dalloc(ns), *ref = dalloc(nv), *kv = dalloc(dv);
    for (int64_t i = 0; i < ns; i++) S[i] = S0[i];
    for (int64_t t = 0; t < nt; t++)
        for (int h = 0; h < Hv; h++) {
            int kh = h / ratio;
            double *Sh = S + (int64_t)h * dk * dv, decay = exp((double)g[t * Hv + h]), b = beta[t * Hv + h];
            const float *qt = q + (t * Hk + kh) * dk, *kt = k + (t * Hk + kh) * dk, *vt = v + (t * Hv + h) * dv;
            for (int64_t i = 0; i < (int64_t)dk * dv; i++) Sh[i] *= decay;
            for (int e = 0; e < dv; e++) {
                kv[e] = 0;
                for (int r = 0; r < dk; r++) kv[e] += Sh[r * dv + e] * kt[r];
            }
            for (int r = 0; r < dk; r++)
                for (int e = 0; e < dv; e++) Sh[r * dv + e] += kt[r] * b * (vt[e] - kv[e]);
            double *o = ref + (t * Hv + h) * dv;
            for (int e = 0; e < dv; e++)
                for (int r = 0; r < dk; r++) o[e] += Sh[r * dv + e] * qt[r];
        }

    backends_new(1, nt, dk > dv ? dk : dv);
    for (int p = 0; p < N_PATHS; p++) {
        float *St = th_buf_copy(S0, ns), *out = th_buf_alloc(nv);
        be[p]->ops->deltanet(be[p], q, k, v, g, beta, St, nt, Hk, Hv, dk, dv, out);
        char what[128];
        snprintf(what, sizeof what, "deltanet Hk %d Hv %d dk %d dv %d n_tok %lld g %s %s", Hk, Hv, dk, dv,
                 (long long)nt, c->gmode == G_WIDE ? "wide" : "near 0", path_name[p]);
        th_check_written(out, nv, what);
        th_check_written(St, ns, what);
        double eo = rel_err(out, ref, nv), es = rel_err(St, S, ns);
        cr_assert(eo <= 1e-4, "%s: output relative error %.3g", what, eo);
        cr_assert(es <= 1e-4, "%s: final state relative error %.3g", what, es);
        if (eo > dn_worst[p] || es > dn_worst[p]) {
            dn_worst[p] = eo > es ? eo : es;
            snprintf(dn_worst_at[p], sizeof dn_worst_at[p], "%s", what);
        }
        free(St);
        free(out);
    }
    free(q);
    free(k);
    free(v);
    free(g);
    free(beta);
    free(S0);
    free(S);
    free(ref);
    free(kv);
}

Test(ops, deltanet) {
    static const int64_t lens[] = {1, 7, 8, 64, 65, 150}; /* the fast path chunks from 8, by 64 */
    static const int heads[][2] = {{2, 4}, {2, 2}};
    uint64_t seed = 500;
    for (size_t hi = 0; hi < 2; hi++)
        for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++)
            for (int gm = G_WIDE; gm <= G_NEAR0; gm++) {
                dn_case c = {heads[hi][0], heads[hi][1], 32, 32, lens[li], gm};
                deltanet_case(&c, seed++);
            }
    static const dn_case big[] = {
        {2, 4, 128, 128, 1, G_WIDE},  {2, 4, 128, 128, 8, G_WIDE}, {2, 4, 128, 128, 13, G_WIDE},
        {2, 4, 128, 128, 13, G_NEAR0}, {1, 3, 48, 80, 9, G_WIDE},   {1, 3, 48, 80, 70, G_NEAR0},
    };
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++)
        deltanet_case(&big[i], seed++);
    for (int p = 0; p < N_PATHS; p++)
        cr_log_info("deltanet %s: worst relative error (outputs and final states) %.3g at %s", path_name[p],
                    dn_worst[p], dn_worst_at[p]);
}

/* ---- matmul and embed through the ops table, for a q4 and a bf16 matrix ---- */

static double bf16_bits(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Decodes the stored matrix from its layout (q4: u32 words, 8 values a word lowest bits
 * first, then bf16 scales and biases per group of 64; bf16: raw), in double; mag[i] is
 * |scale q| + |bias|, the size of the terms before they are summed. */
static void decode_ref(mf_qtype t, const void *data, int64_t rows, int64_t cols, double *out, double *mag) {
    if (t == MF_QTYPE_BF16) {
        const uint16_t *h = data;
        for (int64_t i = 0; i < rows * cols; i++) mag[i] = fabs(out[i] = bf16_bits(h[i]));
        return;
    }
    const uint32_t *words = data;
    const uint16_t *scales = (const uint16_t *)(words + rows * cols / 8), *biases = scales + rows * cols / 64;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            uint32_t qv = (words[r * cols / 8 + c / 8] >> (4 * (c % 8))) & 15u;
            double s = bf16_bits(scales[r * cols / 64 + c / 64]), b = bf16_bits(biases[r * cols / 64 + c / 64]);
            out[r * cols + c] = s * qv + b;
            mag[r * cols + c] = fabs(s * qv) + fabs(b);
        }
}

Test(ops, matmul_embed) {
    static const struct { mf_qtype t; int64_t rows, cols; } mats[] = {
        {MF_QTYPE_Q4, 96, 256},
        {MF_QTYPE_BF16, 80, 200},
    };
    static const int64_t ntoks[] = {1, 7};
    static const int32_t ids[] = {3, 0, -1, 3, 17}; /* -1: the last row */
    enum { N_IDS = sizeof ids / sizeof ids[0] };
    double worst_mm = 0, worst_em = 0;
    for (size_t mi = 0; mi < sizeof mats / sizeof mats[0]; mi++) {
        mf_qtype t = mats[mi].t;
        int64_t rows = mats[mi].rows, cols = mats[mi].cols, n = rows * cols;
        th_rng_seed(600 + mi);
        float *wf = th_buf_alloc(n);
        th_fill_normal(wf, n, 0.0, 0.1);
        for (int64_t r = 0; r < rows; r += 3) /* some rows off centre */
            for (int64_t c = 0; c < cols; c++) wf[r * cols + c] += 0.2f;
        uint64_t bytes = quant_tensor_bytes(t, rows, cols);
        void *data = malloc(bytes);
        cr_assert(data);
        quant_encode(t, wf, rows, cols, data);
        mf_wmat w = {t, rows, cols, data};
        double *wd = dalloc(n), *mag = dalloc(n);
        decode_ref(t, data, rows, cols, wd, mag);
        /* my reading of the layout agrees with the project's decoder and with the source values */
        float *dec = th_buf_alloc(n);
        quant_decode(t, data, rows, cols, dec);
        for (int64_t i = 0; i < n; i++)
            cr_assert(fabs((double)dec[i] - wd[i]) <= 0x1.0p-22 * mag[i], "%s: layout read differs at %lld",
                      mf_qtype_name(t), (long long)i);
        double *wsrc = dalloc(n);
        for (int64_t i = 0; i < n; i++) wsrc[i] = wf[i];
        cr_assert(rel_err(dec, wsrc, n) < (t == MF_QTYPE_Q4 ? 0.1 : 0.01), "%s: encoding lost the values",
                  mf_qtype_name(t));
        for (int p = 0; p < N_PATHS; p++) {
            for (size_t ti = 0; ti < sizeof ntoks / sizeof ntoks[0]; ti++) {
                int64_t nt = ntoks[ti];
                float *x = th_buf_alloc(nt * cols), *y = th_buf_alloc(nt * rows);
                th_fill_normal(x, nt * cols, 0.0, 1.0);
                double *ref = dalloc(nt * rows);
                for (int64_t tt = 0; tt < nt; tt++)
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t c = 0; c < cols; c++) ref[tt * rows + r] += wd[r * cols + c] * x[tt * cols + c];
                be[p]->ops->matmul(be[p], &w, x, nt, y);
                char what[96];
                snprintf(what, sizeof what, "matmul %s %lldx%lld n_tok %lld %s", mf_qtype_name(t), (long long)rows,
                         (long long)cols, (long long)nt, path_name[p]);
                th_check_written(y, nt * rows, what);
                for (int64_t tt = 0; tt < nt; tt++) {
                    double e = rel_err(y + tt * rows, ref + tt * rows, rows);
                    cr_assert(e <= 1e-5, "%s: token %lld relative error %.3g", what, (long long)tt, e);
                    if (e > worst_mm) worst_mm = e;
                }
                free(x);
                free(y);
                free(ref);
            }
            int32_t id[N_IDS];
            for (int i = 0; i < N_IDS; i++) id[i] = ids[i] < 0 ? (int32_t)rows - 1 : ids[i];
            float *out = th_buf_alloc(N_IDS * cols);
            be[p]->ops->embed(be[p], &w, id, N_IDS, out);
            char what[96];
            snprintf(what, sizeof what, "embed %s %s", mf_qtype_name(t), path_name[p]);
            th_check_written(out, N_IDS * cols, what);
            for (int i = 0; i < N_IDS; i++)
                for (int64_t c = 0; c < cols; c++) {
                    double r = wd[id[i] * cols + c], d = fabs((double)out[i * cols + c] - r);
                    cr_assert(d <= 0x1.0p-22 * mag[id[i] * cols + c], "%s: id %d col %lld is %.9g, expected %.9g",
                              what, id[i], (long long)c, (double)out[i * cols + c], r);
                    if (fabs(r) > 0 && d / fabs(r) > worst_em) worst_em = d / fabs(r);
                }
            free(out);
        }
        free(wf);
        free(data);
        free(wd);
        free(mag);
        free(dec);
        free(wsrc);
    }
    cr_log_info("matmul: worst relative error %.3g; embed: worst element relative error %.3g", worst_mm,
                worst_em);
}

/* ---- moe_experts: a layer's routed experts; host_alloc ---- */

/* E expert blobs laid out as th_expert_layout says; dec[e][part] holds the parts as quant_decode
 * reads them. */
typedef struct moe_blobs {
    mf_expert_layout lay;
    unsigned char *mem;
    const void **table; /* [E] */
    float *dec[64][3];
    int E;
} moe_blobs;

static void moe_blobs_make(moe_blobs *mb, const mf_qtype types[3], int E, int64_t H, int64_t I) {
    mb->E = E;
    const int64_t rows[3] = {I, I, H}, cols[3] = {H, H, I};
    uint64_t stride = th_expert_layout(&mb->lay, types, H, I);
    mb->mem = aligned_alloc(4096, stride * (uint64_t)E);
    mb->table = malloc(sizeof(void *) * (size_t)E);
    cr_assert(mb->mem && mb->table, "out of memory");
    memset(mb->mem, 0xa5, stride * (uint64_t)E); /* padding between parts: garbage */
    for (int e = 0; e < E; e++) {
        unsigned char *blob = mb->mem + stride * (uint64_t)e;
        mb->table[e] = blob;
        for (int p = 0; p < 3; p++) {
            int64_t n = rows[p] * cols[p];
            float *wf = th_buf_alloc(n);
            th_fill_normal(wf, n, 0.0, 1.0 / sqrt((double)cols[p]));
            for (int64_t r = 0; r < rows[p]; r += 5) /* some rows off centre */
                for (int64_t c = 0; c < cols[p]; c++) wf[r * cols[p] + c] += 0.05f;
            quant_encode(types[p], wf, rows[p], cols[p], blob + mb->lay.offset[p]);
            quant_decode(types[p], blob + mb->lay.offset[p], rows[p], cols[p], wf);
            mb->dec[e][p] = wf;
        }
    }
}

static void moe_blobs_free(moe_blobs *mb) {
    for (int e = 0; e < mb->E; e++)
        for (int p = 0; p < 3; p++) free(mb->dec[e][p]);
    free(mb->mem);
    free(mb->table);
}

/* y[t] = sum_j w[t][j] down_e(silu(gate_e x) * up_e x), e = ids[t][j], in double from the
 * decoded parts. */
static void moe_ref(const moe_blobs *mb, const float *x, const int32_t *ids, const float *w, int64_t nt, int K,
                    double *y) {
    const int64_t H = mb->lay.hidden, I = mb->lay.inter;
    double *a = dalloc(I);
    for (int64_t t = 0; t < nt; t++)
        for (int j = 0; j < K; j++) {
            int e = ids[t * K + j];
            const float *G = mb->dec[e][0], *U = mb->dec[e][1], *D = mb->dec[e][2], *xt = x + t * H;
            for (int64_t i = 0; i < I; i++) {
                double g = 0, u = 0;
                for (int64_t c = 0; c < H; c++) {
                    g += (double)G[i * H + c] * xt[c];
                    u += (double)U[i * H + c] * xt[c];
                }
                a[i] = g / (1.0 + exp(-g)) * u;
            }
            for (int64_t r = 0; r < H; r++) {
                double o = 0;
                for (int64_t i = 0; i < I; i++) o += (double)D[r * I + i] * a[i];
                y[t * H + r] += w[t * K + j] * o;
            }
        }
    free(a);
}

Test(ops, moe_experts) {
    static const mf_qtype typesets[][3] = {
        {MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_Q4},
        {MF_QTYPE_Q8, MF_QTYPE_Q8, MF_QTYPE_Q8},
        {MF_QTYPE_BF16, MF_QTYPE_BF16, MF_QTYPE_BF16},
        {MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_BF16}, /* down of an inter that cannot be grouped */
    };
    static const struct { int E, K; } routes[] = {{8, 2}, {64, 8}};
    static const int64_t ntoks[] = {1, 3, 17};
    const int64_t H = 128, I = 64;
    double worst[N_PATHS] = {0}, worst_paths = 0;
    for (size_t ti = 0; ti < sizeof typesets / sizeof typesets[0]; ti++)
        for (size_t ri = 0; ri < sizeof routes / sizeof routes[0]; ri++) {
            int E = routes[ri].E, K = routes[ri].K;
            th_rng_seed(700 + ti * 10 + ri);
            moe_blobs mb;
            moe_blobs_make(&mb, typesets[ti], E, H, I);
            mf_backend_limits lim = {1, 17, 1, E, K, I, H};
            for (int p = 0; p < N_PATHS; p++) cr_assert(be[p]->ops->reserve(be[p], &lim) == MF_OK, "reserve failed");
            for (size_t ni = 0; ni < sizeof ntoks / sizeof ntoks[0]; ni++) {
                int64_t nt = ntoks[ni];
                float *x = th_buf_alloc(nt * H), *w = th_buf_alloc(nt * K);
                int32_t *ids = malloc(sizeof(int32_t) * (size_t)(nt * K));
                cr_assert(ids);
                th_fill_normal(x, nt * H, 0.0, 1.0);
                th_moe_routes(E, K, nt, ids, w);
                double *ref = dalloc(nt * H);
                moe_ref(&mb, x, ids, w, nt, K, ref);
                float *y[N_PATHS];
                for (int p = 0; p < N_PATHS; p++) {
                    y[p] = th_buf_alloc(nt * H); /* NaN: every element must be overwritten */
                    be[p]->ops->moe_experts(be[p], x, ids, w, nt, K, mb.table, &mb.lay, y[p]);
                    char what[128];
                    snprintf(what, sizeof what, "moe_experts %s/%s E %d K %d n_tok %lld %s",
                             mf_qtype_name(typesets[ti][0]), mf_qtype_name(typesets[ti][2]), E, K, (long long)nt,
                             path_name[p]);
                    th_check_written(y[p], nt * H, what);
                    for (int64_t t = 0; t < nt; t++) {
                        double e = rel_err(y[p] + t * H, ref + t * H, H);
                        cr_assert(e <= 1e-5, "%s: token %lld relative error %.3g", what, (long long)t, e);
                        if (e > worst[p]) worst[p] = e;
                    }
                }
                /* grouping by expert (fast) changes nothing beyond rounding */
                double *yr = dalloc(nt * H);
                for (int64_t i = 0; i < nt * H; i++) yr[i] = y[PATH_REF][i];
                double e = rel_err(y[PATH_FAST], yr, nt * H);
                cr_assert(e <= 1e-5, "moe_experts: fast and reference paths differ by %.3g", e);
                if (e > worst_paths) worst_paths = e;
                for (int p = 0; p < N_PATHS; p++) free(y[p]);
                free(x);
                free(w);
                free(ids);
                free(ref);
                free(yr);
            }
            moe_blobs_free(&mb);
        }
    cr_log_info("moe_experts: worst relative error fast %.3g, reference %.3g; fast vs reference %.3g",
                worst[PATH_FAST], worst[PATH_REF], worst_paths);
}

Test(ops, host_alloc) {
    static const size_t sizes[] = {1, 4096, 7 << 20};
    for (int p = 0; p < N_PATHS; p++)
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            unsigned char *m = be[p]->ops->host_alloc(be[p], sizes[si]);
            cr_assert(m, "host_alloc of %zu bytes failed", sizes[si]);
            size_t i = 0;
            while (i < sizes[si] && m[i] == 0) i++;
            cr_assert(i == sizes[si], "host_alloc memory not zeroed at %zu", i);
            memset(m, 0x5a, sizes[si]);
            cr_assert(m[sizes[si] - 1] == 0x5a);
            be[p]->ops->host_free(be[p], m);
        }
    be[PATH_FAST]->ops->host_free(be[PATH_FAST], NULL);
}

Test(ops, upload_async) {
    /* on the CPU an asynchronous upload is a copy: done on return, the fence has nothing to do */
    for (int p = 0; p < N_PATHS; p++) {
        unsigned char src[300], dst[300];
        for (int i = 0; i < 300; i++) src[i] = (unsigned char)(i * 3 + p), dst[i] = 0;
        uint64_t t = be[p]->ops->upload_async(be[p], dst, src, sizeof src);
        cr_assert(be[p]->ops->upload_done(be[p], t), "upload_async not done on return");
        be[p]->ops->upload_fence(be[p]);
        cr_assert(!memcmp(dst, src, sizeof src), "upload_async did not copy");
        be[p]->ops->upload_async(be[p], dst, src, 0); /* nothing to copy */
    }
}
